"""``mem-dist verify OUTPUT``: re-read every protected sample and check it independently.

For each protected shard (read with webdataset's own pipeline, not with mem-dist's reader)
and each sample, against the source shard's canvas and the final-round state:

  pixels    decoded protected image - source canvas == stored delta, exactly
  bound     |delta| <= epsilon
  caption   == trigger_text + " " + source caption
  tokens    open_clip's tokenizer gives trigger_ids at positions 1..k
  missing   a state row with no protected sample

Prints a summary with PSNR and SSIM of protected against source (mean, min) and exits 1 on
any mismatch, 0 otherwise. The config is taken from ``OUTPUT/run.json``.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import sys

import numpy as np
import open_clip
import webdataset as wds
from PIL import Image
from skimage.metrics import structural_similarity

from mem_dist import state, storage, text
from mem_dist.config import ConfigError, RunConfig, build
from mem_dist.data import expand_shards, load_shard, shard_name
from mem_dist.merge import protected_url
from mem_dist.surrogate import resolve_model_name


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def run_config(output: str) -> RunConfig:
    """The run's config as generate recorded it in run.json."""
    url = storage.join(output, "run.json")
    if not storage.exists(url):
        raise ConfigError(f"{url} not found: is {output} a mem-dist run folder?")
    return build(RunConfig, storage.read_json(url)["config"], "")


def verify(output: str, log=print) -> dict:
    """Check every protected sample of a run; returns the counts and image-quality stats."""
    cfg = run_config(output)
    tok = open_clip.get_tokenizer(resolve_model_name(cfg.surrogate.model))
    round_ = state.latest_round(output)
    errors: collections.Counter = collections.Counter()
    first_error: dict[str, str] = {}
    psnrs, ssims, checked = [], [], 0

    def bad(kind: str, where: str) -> None:
        errors[kind] += 1
        first_error.setdefault(kind, where)

    for url in expand_shards(cfg.data.shards):
        name = shard_name(url)
        tar = protected_url(output, name, ".tar")
        if not storage.exists(tar):
            bad("missing_shard", tar)
            continue
        src = load_shard(url, cfg.data)
        canvas = dict(zip(src.keys, src.canvases))
        caption = dict(zip(src.keys, src.captions))
        st = state.read_state(state.state_url(output, round_, name))
        row_of = st.by_key()
        seen = set()
        for s in _read_tar(storage.read_bytes(tar)):
            key = s["__key__"]
            where = f"{name}/{key}"
            seen.add(key)
            img_bytes = s.get(cfg.merge.image_format)
            if key not in canvas or img_bytes is None:
                bad("unknown_sample", where)
                continue
            meta = json.loads(s["json"])
            if key not in row_of:
                if not meta.get("mem_dist", {}).get("protected", True):
                    continue  # copied through unprotected on request, and marked so
                bad("no_state", where)
                continue
            j = row_of[key]
            pixels = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB"))
            delta = st.delta[j]
            checked += 1
            if pixels.shape != canvas[key].shape or not np.array_equal(pixels.astype(np.int16) - canvas[key], delta):
                bad("pixels", where)
            if np.abs(delta.astype(np.int16)).max(initial=0) > cfg.mem.epsilon:
                bad("bound", where)
            cap = s["txt"].decode()
            if cap != text.protected_caption(st.trigger_text[j], caption[key]):
                bad("caption", where)
            k = len(st.trigger_ids[j])
            if tok([cap])[0][1:1 + k].tolist() != [int(i) for i in st.trigger_ids[j]]:
                bad("tokens", where)
            if pixels.shape == canvas[key].shape:
                psnrs.append(psnr(pixels, canvas[key]))
                ssims.append(structural_similarity(pixels, canvas[key], channel_axis=-1, data_range=255))
        lost = len(set(st.keys) - seen)
        if lost:
            bad("missing_sample", f"{name} ({lost} state rows without a protected sample)")
    finite = [p for p in psnrs if math.isfinite(p)]
    report = {
        "checked": checked, "mismatches": sum(errors.values()), "errors": dict(errors), "first_error": first_error,
        "psnr_mean": float(np.mean(finite)) if finite else math.inf, "psnr_min": float(min(finite)) if finite else math.inf,
        "ssim_mean": float(np.mean(ssims)) if ssims else 1.0, "ssim_min": float(min(ssims)) if ssims else 1.0,
    }
    verdict = "OK" if not errors else "FAILED"
    log(f"mem-dist verify {output}: {verdict}: {checked} samples checked, {report['mismatches']} mismatches "
        f"{dict(errors) or ''}| PSNR mean {report['psnr_mean']:.2f} dB, min {report['psnr_min']:.2f} dB | "
        f"SSIM mean {report['ssim_mean']:.4f}, min {report['ssim_min']:.4f}")
    for kind, where in first_error.items():
        log(f"  first {kind} mismatch: {where}")
    return report


def _read_tar(data: bytes) -> list[dict]:
    """Samples of a tar held in memory, grouped by key with webdataset's iterators."""
    members = wds.tariterators.tar_file_iterator(io.BytesIO(data))
    return list(wds.tariterators.group_by_keys(dict(m, __url__="protected") for m in members))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist verify", description="Check every protected sample of a run.")
    p.add_argument("output", help="the run folder (generate's output), any fsspec URL")
    args = p.parse_args(argv)
    try:
        report = verify(args.output)
    except ConfigError as e:
        print(f"mem-dist: error: {e}", file=sys.stderr)
        return 2
    return 1 if report["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
