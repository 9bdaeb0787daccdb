"""Fashion-MNIST with harder content: each garment tinted and laid over a random smooth background.

    python experiments/fmnist_backgrounds.py SRC_DIR OUT_DIR [--seed 0]

SRC_DIR is `mem-dist import fashion-mnist`'s output (train, val, select); OUT_DIR gets the same
splits, keys, captions and json (PNG). A garment's grey level is its opacity (Fashion-MNIST's
background is black): pixel = g * tint + (1 - g) * background, with a random tint per image and a
background of 4 x 4 random colours bilinearly upsampled, plus +-24/255 pixel noise. What the
calibration needs when the plain photos are too easy (docs/efficacy.md, "Calibrated victims"):
the content is learned later, as on CIFAR-10, so a class-keyed shortcut is learned first.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from mem_dist.evaluation.baselines import write_perturbed
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.data import expand_shards, load_shard


def harder(canvases_NHWC: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w, _ = canvases_NHWC.shape
    g = canvases_NHWC.astype(np.float32).mean(3, keepdims=True) / 255
    tint = rng.uniform(0.35, 1.0, (n, 1, 1, 3)).astype(np.float32)
    coarse = torch.from_numpy(rng.uniform(0, 0.8, (n, 3, 4, 4)).astype(np.float32))
    bg = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    out = g * tint + (1 - g) * bg + rng.uniform(-24, 24, (n, h, w, 3)).astype(np.float32) / 255
    return np.clip(np.rint(out * 255), 0, 255).astype(np.int16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for i, split in enumerate(("train", "val", "select")):
        spec = os.path.join(a.src, split, "{00000..%05d}.tar" % (len(os.listdir(os.path.join(a.src, split))) // 3 - 1))
        shards = [load_shard(u, DataConfig(shards=spec, image_size=32, resize_mode="center_crop")) for u in expand_shards(spec)]
        canvases = np.concatenate([s.canvases for s in shards])
        new = harder(canvases, np.random.default_rng([a.seed, i]))
        n = write_perturbed(shards, new - canvases.astype(np.int16), os.path.join(a.out, split))
        print(f"fmnist_backgrounds: {n} {split} samples under {a.out}/{split}")


if __name__ == "__main__":
    main()
