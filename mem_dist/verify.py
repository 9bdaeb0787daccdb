"""``mem-dist verify OUTPUT [--config C]``: re-read every protected sample and check it.

Each protected shard is read with webdataset's own tar iterators (not mem-dist's reader),
each source shard is decoded to canvases again, and every sample is checked against the
final-round state. Mismatch kinds:

  pixels          decoded protected image - source canvas != stored delta (exactly); for
                  merge.image_format jpg: the image is not canvas + delta as merge encodes
                  it (same quality; JPEG encoders of other libjpeg builds may differ)
  bound           |delta| > mem.epsilon
  caption         caption != trigger_text + " " + source caption
  tokens          open_clip's tokenizer does not give trigger_ids at positions 1..k
  meta            the json's "mem_dist" section disagrees with the state (trigger ids, round)
  json            the json's caption, width, height or image hash (md5 / sha256 / sha512) do
                  not describe the sample as written
  no_state        a sample with no state row that is not marked "protected": false
  unknown_sample  a key the source lacks, or a sample without its image
  missing_sample  a state row with no protected sample
  missing_shard   a protected shard (or its state, or its _stats.json) that does not exist

Prints one summary line with PSNR and SSIM of protected against source (mean, min), for
jpg (the format each shard's _stats.json records) the share of delta the images keep
(mean, min; :func:`mem_dist.merge.delta_kept`), and exits 1 on any mismatch, 0 otherwise.
The config comes from ``OUTPUT/run.json`` (written by generate), or from ``--config`` when
the run folder has none.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import sys

import numpy as np
import open_clip
import webdataset as wds
from skimage.metrics import structural_similarity

from mem_dist import state, storage, text
from mem_dist.cli import one_line_errors
from mem_dist.config import ConfigError, MergeConfig, RunConfig, build, load_config
from mem_dist.data import expand_shards, load_shard, shard_name
from mem_dist.merge import IMAGE_HASHES, decode_image, delta_kept, encode_image, kept_summary, protected_url
from mem_dist.surrogate import resolve_model_name


def run_config(output: str, cfg: RunConfig | None = None) -> RunConfig:
    """The run's config as generate recorded it in ``run.json``; ``cfg`` when there is none.

    Raises:
        ConfigError: neither is available, or run.json's config does not validate.
    """
    url = storage.join(output, "run.json")
    if storage.exists(url):
        return build(RunConfig, storage.read_json(url)["config"], "")
    if cfg is None:
        raise ConfigError(f"{url} not found: is {output} a mem-dist run folder? (or pass --config)")
    return cfg


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def protected_samples(url: str):
    """Samples of a protected tar, grouped by key with webdataset's iterators."""
    with storage.open_file(url, "rb") as stream:
        members = (dict(m, __url__=url) for m in wds.tariterators.tar_file_iterator(stream))
        yield from wds.tariterators.group_by_keys(members)


class Checker:
    """Mismatch counts (with the first place each kind was seen) and image-quality figures."""

    def __init__(self):
        self.errors: collections.Counter = collections.Counter()
        self.first: dict[str, str] = {}
        self.psnrs: list[float] = []
        self.ssims: list[float] = []
        self.kept: list[float] = []
        self.checked = 0

    def expect(self, ok: bool, kind: str, where: str) -> None:
        if not ok:
            self.errors[kind] += 1
            self.first.setdefault(kind, where)

    def quality(self, protected: np.ndarray, source: np.ndarray) -> None:
        self.psnrs.append(psnr(protected, source))
        self.ssims.append(float(structural_similarity(protected, source, channel_axis=-1, data_range=255)))

    def report(self) -> dict:
        finite = [p for p in self.psnrs if math.isfinite(p)]
        return {
            "checked": self.checked, "mismatches": sum(self.errors.values()), "errors": dict(self.errors),
            "first_error": dict(self.first),
            "psnr_mean": float(np.mean(finite)) if finite else math.inf,
            "psnr_min": float(min(finite)) if finite else math.inf,
            "ssim_mean": float(np.mean(self.ssims)) if self.ssims else 1.0,
            "ssim_min": float(min(self.ssims)) if self.ssims else 1.0,
            "delta_kept": kept_summary(self.kept),
        }


def describes(meta: dict, caption: str, img_bytes: bytes, pixels: np.ndarray) -> bool:
    """Whether a sample's json says what was written: its caption, size and image hashes."""
    height, width = pixels.shape[:2]
    return (meta.get("caption", caption) == caption and meta.get("width", width) == width
            and meta.get("height", height) == height
            and all(meta[h] == hashlib.new(h, img_bytes).hexdigest() for h in IMAGE_HASHES & meta.keys()))


def verify_shard(output: str, url: str, round_: int, cfg: RunConfig, tokenizer, check: Checker) -> None:
    """Check one protected shard against its source shard and its final-round state."""
    name = shard_name(url)
    tar, state_url = protected_url(output, name, ".tar"), state.state_url(output, round_, name)
    stats_url = protected_url(output, name, "_stats.json")
    for what in (tar, state_url, stats_url):
        if not storage.exists(what):
            check.expect(False, "missing_shard", what)
            return
    stats = storage.read_json(stats_url)  # how merge encoded this shard (merge.* may differ from run.json's)
    written = MergeConfig(image_format=stats.get("image_format", "png"), jpeg_quality=stats.get("jpeg_quality", 95))
    src = load_shard(url, cfg.data)
    source = {k: (c, cap) for k, c, cap in zip(src.keys, src.canvases, src.captions)}
    st = state.read_state(state_url)
    row_of = st.by_key()
    seen = set()
    for s in protected_samples(tar):
        key, where = s["__key__"], f"{name}/{s['__key__']}"
        seen.add(key)
        img_bytes = s.get(written.image_format)
        if key not in source or img_bytes is None or "txt" not in s:
            check.expect(False, "unknown_sample", where)
            continue
        canvas, src_caption = source[key]
        meta = json.loads(s.get("json", b"{}"))
        protection = meta.get("mem_dist", {})
        j = row_of.get(key)
        if j is None:  # fine only if merge copied it through on request and said so
            check.expect(protection.get("protected") is False, "no_state", where)
            continue
        check.checked += 1
        pixels = decode_image(img_bytes)
        delta, ids = st.delta[j], st.trigger_ids[j].tolist()
        same_shape = pixels.shape == canvas.shape == delta.shape
        summed = canvas.astype(np.int16) + delta if same_shape else None  # int16: a delta leaving [0, 255] shows
        if written.image_format == "jpg" and same_shape:
            in_range = int(summed.min()) >= 0 and int(summed.max()) <= 255
            rewritten = decode_image(encode_image(np.clip(summed, 0, 255).astype(np.uint8), written))
            check.expect(in_range and np.array_equal(pixels, rewritten), "pixels", where)
            check.kept.append(delta_kept(pixels, canvas, delta))
        else:
            check.expect(same_shape and np.array_equal(pixels, summed), "pixels", where)
        check.expect(int(np.abs(delta.astype(np.int16)).max(initial=0)) <= cfg.mem.epsilon, "bound", where)
        caption = s["txt"].decode("utf-8")
        check.expect(caption == text.protected_caption(st.trigger_text[j], src_caption), "caption", where)
        check.expect(tokenizer([caption])[0][1:1 + len(ids)].tolist() == ids, "tokens", where)
        check.expect(protection.get("trigger_ids") == ids and protection.get("round") == round_, "meta", where)
        check.expect(describes(meta, caption, img_bytes, pixels), "json", where)
        if pixels.shape == canvas.shape:
            check.quality(pixels, canvas)
    lost = len(set(st.keys) - seen)
    check.expect(lost == 0, "missing_sample", f"{name} ({lost} state rows without a protected sample)")


def verify(output: str, cfg: RunConfig | None = None) -> dict:
    """Check every protected sample of a run and print a one-line summary.

    Args:
        output: the run folder (generate's ``output``), any fsspec URL; protected shards
            and state are read from here.
        cfg: the config to use when ``output`` has no run.json.

    Returns:
        {"checked", "mismatches", "errors" (by kind), "first_error" (by kind),
        "psnr_mean", "psnr_min", "ssim_mean", "ssim_min", "delta_kept" ({"mean", "min"} for
        jpg, {} for lossless formats)}.

    Raises:
        ConfigError: no config, or no state under ``output``.
    """
    cfg = run_config(output, cfg)
    round_ = state.latest_round(output)
    if round_ == 0:
        raise ConfigError(f"no generation state under {storage.join(output, 'state')}")
    tokenizer = open_clip.get_tokenizer(resolve_model_name(cfg.surrogate.model))
    check = Checker()
    for url in expand_shards(cfg.data.shards):
        verify_shard(output, url, round_, cfg, tokenizer, check)
    report = check.report()
    verdict = "FAILED" if report["mismatches"] else "OK"
    print(f"mem-dist verify {output}: {verdict}: {report['checked']} samples checked, {report['mismatches']} mismatches"
          f"{' ' + str(report['errors']) if report['errors'] else ''} | PSNR mean {report['psnr_mean']:.2f} dB, "
          f"min {report['psnr_min']:.2f} dB | SSIM mean {report['ssim_mean']:.4f}, min {report['ssim_min']:.4f}"
          + (f" | delta kept mean {report['delta_kept']['mean']:.3f}, min {report['delta_kept']['min']:.3f}"
             if report["delta_kept"] else ""), flush=True)
    for kind, where in report["first_error"].items():
        print(f"  first {kind} mismatch: {where}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mem-dist verify", description="Re-check every protected sample of a run; exit 1 on any mismatch.")
    p.add_argument("output", help="the run folder (generate's output), any fsspec URL")
    p.add_argument("--config", help="the generation config, used only when OUTPUT has no run.json")
    args = p.parse_args(argv)

    def body() -> int:
        report = verify(args.output, load_config(RunConfig, args.config) if args.config else None)
        return 1 if report["mismatches"] else 0

    return one_line_errors(body)


if __name__ == "__main__":
    sys.exit(main())
