"""A trained keyed generator, prototyped outside the pipeline (issue 39's `keyed.generator:
trained`, not built): does learning the projection make the code learned before the content?

The projection generator publishes δ = ε · sign(W e) on a g x g grid, W the key's ±1 matrix and e
the caption's centred embedding by the public text tower (mem_dist/methods/keyed/code.py). Here W
starts from that matrix and is trained, with the soft code ε · tanh(W e / τ) in place of the
signs, through the victim's random resized crop (0.9-1), to minimise a CLIP contrastive loss on
(canvas + code, caption):

    --objective surrogate   the frozen public checkpoint's loss (T2UE's: the code that checkpoint
                            already reads as the caption)
    --objective minmin      jointly with a fresh CLIP of the surrogate's architecture, its own init
                            (error-minimising noise from scratch: the code a new model picks up
                            fastest)

then publishes ε · sign(W e) (float64 here; the method would store W quantized to keep merge exact).
Writes PNG shards like experiments/keyed_probe.py, for `bash experiments/keyed.sh clip:SEED:NAME`.

    python experiments/keyed_trained.py SRC OUT --model M --pretrained CKPT [--objective minmin]
        [--grid 2] [--epsilon 16] [--steps 300]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from keyed_probe import agreement  # experiments/keyed_probe.py, beside this script
from mem_dist.evaluation.baselines import write_perturbed
from mem_dist.methods.keyed import code
from mem_dist.pipeline import augment, surrogate
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.data import expand_shards, load_shard


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src"), p.add_argument("out")
    p.add_argument("--model", required=True), p.add_argument("--pretrained", required=True)
    p.add_argument("--objective", choices=["surrogate", "minmin"], default="minmin")
    p.add_argument("--grid", type=int, default=2), p.add_argument("--epsilon", type=int, default=16)
    p.add_argument("--size", type=int, default=32), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300), p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2, help="W's")
    p.add_argument("--model-lr", type=float, default=5e-4, help="the fresh CLIP's (minmin), the victim's"), p.add_argument("--tau", type=float, default=0.3)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    cfg = DataConfig(shards=a.src, image_size=a.size)
    shards = [load_shard(u, cfg) for u in expand_shards(a.src)]
    captions = [c for s in shards for c in s.captions]
    labels = np.array([json.loads(m or "{}").get("label", -1) for s in shards for m in s.meta])  # -1: unlabelled (demo scenes)
    canvases = torch.from_numpy(np.concatenate([s.canvases for s in shards])).permute(0, 3, 1, 2).float()

    public, tokenizer, spec = surrogate.create_surrogate(a.model, a.pretrained, "cpu")
    e = code.embed(public, tokenizer, captions)
    e_NE = torch.from_numpy(e - e.mean(0)).float()
    cells = a.grid * a.grid * 3
    w0 = torch.from_numpy(code.projection(np.random.default_rng(a.seed).bytes(32), cells, e_NE.shape[1])).float()
    scale = float((e_NE @ w0.T).std())
    w = torch.nn.Parameter(w0 / scale)  # z = W e starts at unit spread
    print(f"{len(captions)} captions; the projection's code: {agreement(np.where((e_NE @ w0.T).numpy() >= 0, 1, -1), labels)}")

    tokens_NL = tokenizer(captions)
    if a.objective == "surrogate":
        model = surrogate.create_surrogate(a.model, a.pretrained, "cpu")[0].float()
        model.requires_grad_(False)
        groups = [{"params": [w], "lr": a.lr}]
    else:
        torch.manual_seed(a.seed + 1)
        model = surrogate.create_surrogate(a.model, None, "cpu")[0].float()
        groups = [{"params": [w], "lr": a.lr}, {"params": list(model.parameters()), "lr": a.model_lr}]
    model.train()
    optimizer = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(a.seed)
    upsample = torch.nn.Upsample(size=(a.size, a.size), mode="nearest")
    for step in range(a.steps):
        idx = torch.randint(len(captions), (a.batch,), generator=gen)
        soft = torch.tanh(e_NE[idx] @ w.T / a.tau).view(-1, a.grid, a.grid, 3).permute(0, 3, 1, 2)
        pixels = (canvases[idx] + a.epsilon * upsample(soft)).clamp(0, 255)
        pixels = augment.random_resized_crop(pixels, gen, (0.9, 1.0))
        loss = surrogate.clip_loss(model.encode_image(surrogate.to_model_input(pixels, spec)),
                                   model.encode_text(tokens_NL[idx]), model.logit_scale).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    with torch.no_grad():
        z = (torch.from_numpy(e - e.mean(0)) @ w.double().T).numpy()
    s = np.where(z >= 0, 1, -1).astype(np.int8)
    print(f"trained code: {agreement(s, labels)}; unique codes {len({r.tobytes() for r in s})}; "
          f"cells changed from the projection {(s != np.where((e_NE @ w0.T).numpy() >= 0, 1, -1)).mean():.3f}")
    d = code.upsample(s.reshape(-1, a.grid, a.grid, 3), a.size, a.size) * a.epsilon
    print(f"wrote {write_perturbed(shards, d.astype(np.int8), a.out)} samples to {a.out}")


if __name__ == "__main__":
    main()
