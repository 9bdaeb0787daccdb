"""``mem-dist verify OUTPUT [--config C]``: re-read every published sample and check it.

Each published shard (where merge put it: ``merge.publish_to``, recorded in the run's
private stats) is read with webdataset's own tar iterators (not mem-dist's reader), each
source shard is decoded to canvases again, and every sample is checked against the
final-round state and the private manifest. Mismatch kinds:

  pixels          decoded protected image - source canvas != stored delta (exactly); for
                  merge.image_format jpg: the image is not canvas + delta as merge encodes
                  it (same quality; JPEG encoders of other libjpeg builds may differ)
  bound           |delta| > the method's epsilon (mem.epsilon, uc.epsilon, ...)
  caption         caption != trigger_text + " " + source caption
  tokens          open_clip's tokenizer does not give trigger_ids at positions 1..k
  meta            the manifest disagrees with the state (trigger ids) or the image (sha256)
  json            the json's caption, width, height or image hash (md5 / sha256 / sha512) do
                  not describe the sample as written
  public          a published json carries a key its source json lacks (the protection's
                  own, say), one of merge.drop_fields, or one that is neither img2dataset's
                  nor in merge.keep_fields
  leak            a published json or parquet value equals the source caption of a
                  protected sample whose published caption differs from it
  parquet         the published parquet's columns are not the source's published ones,
                  its keys not the source's in order, or its success rows not the tar's
                  samples with their size and hashes
  no_state        a published sample with no state row that the manifest does not list as copied
  unknown_sample  a key the source lacks, or a sample without its image
  missing_sample  a state row with no published sample
  missing_shard   a published shard (or its state, or its manifest) that does not exist

Each shard is checked against the state round its private stats say it was published from
(``made_from``: the final round, or an earlier one under ``merge.allow_unfinished``, which the
summary line then names); a shard merge recorded as missing at the source is counted, not
checked. Prints one summary line with PSNR and SSIM of protected against source (mean, min), for
jpg (the format the private stats record) the share of delta the images keep (mean, min;
:func:`mem_dist.publishing.merge.delta_kept`), and exits 1 on any mismatch, 0 otherwise. The config
comes from ``OUTPUT/run.json`` (written by generate), or from ``--config`` when the run
folder has none.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import math
import sys

import numpy as np
import open_clip
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image
from skimage.metrics import structural_similarity

from mem_dist.methods import get_method
from mem_dist.publishing import manifest, publish
from mem_dist.pipeline import storage, text
from mem_dist.pipeline.config import MergeConfig, RunConfig
from mem_dist.pipeline.config_io import ConfigError, load_config
from mem_dist.pipeline.data import expand_shards, load_shard, shard_name
from mem_dist.errors import one_line_errors
from mem_dist.publishing.merge import decode_image, delta_kept, encode_image, kept_summary, published_url
from mem_dist.publishing.merge_config import recorded_config
from mem_dist.pipeline.surrogate import resolve_model_name


def run_config(output: str, cfg: RunConfig | None = None) -> RunConfig:
    """The run's config as generate recorded it in ``run.json``; ``cfg`` when there is none.

    Raises:
        ConfigError: neither is available, or run.json's config does not validate.
    """
    recorded = recorded_config(output)
    if recorded is not None:
        return recorded
    if cfg is None:
        raise ConfigError(f"{storage.join(output, 'run.json')} not found: is {output} a mem-dist run folder? (or pass --config)")
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
        self.missing_sources = 0  # shards merge recorded as missing at the source
        self.unfinished: set[int] = set()  # rounds published from an unfinished run

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
            "missing_sources": self.missing_sources, "unfinished_rounds": sorted(self.unfinished),
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
            and all(meta[h] == hashlib.new(h, img_bytes).hexdigest() for h in set(publish.IMAGE_HASHES) & meta.keys()))


def json_keys(raw: bytes | None) -> set[str] | None:
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        return None
    return set(meta) if isinstance(meta, dict) else None


def check_parquet(folder: str, url: str, name: str, written: dict[str, bytes], fields: tuple[tuple[str, ...], tuple[str, ...]],
                  hidden: dict[str, str], check: "Checker") -> None:
    """The published parquet against the source's (columns, keys in order), the tar (success
    rows) and the protected samples' source captions (``hidden``: key -> caption)."""
    where, (keep, drop) = f"{name}.parquet", fields
    with storage.open_file(published_url(folder, name, ".parquet"), "rb") as f:
        table = pq.read_table(f)
    source = publish.read_source_table(url, ".parquet")
    if source is not None:
        check.expect(table.column_names == [c for c in source.column_names if publish.published(c, keep, drop)], "parquet", where)
        source_keys = source.column("key").to_pylist()
        check.expect(table.column("key").to_pylist()[: len(source_keys)] == source_keys, "parquet", where)
    rows = {r["key"]: r for r in table.to_pylist()}
    for key, caption in hidden.items():
        check.expect(publish.leaked_field(rows.get(key, {}), caption) is None, "leak", f"{where}: {key}")
    success = {k for k, r in rows.items() if r.get("status") == "success"}
    check.expect(success == set(written), "parquet", f"{where} (success rows vs the tar's samples)")
    for key in success & set(written):
        row, image = rows[key], written[key]
        with Image.open(io.BytesIO(image)) as img:
            size = img.size
        ok = all(row[h] == hashlib.new(h, image).hexdigest() for h in publish.IMAGE_HASHES if h in row)
        ok &= ("width" not in row or row["width"] == size[0]) and ("height" not in row or row["height"] == size[1])
        check.expect(ok, "parquet", f"{where}: {key}")


def verify_shard(output: str, url: str, round_: int, cfg: RunConfig, tokenizer, check: Checker) -> None:
    """Check one published shard against its source shard, the state round it was published
    from (``round_`` if its private stats do not say) and its manifest."""
    name = shard_name(url)
    stats = manifest.read_stats(output, name)  # how and where merge wrote this shard (merge.* may differ from run.json's)
    if stats is None:
        check.expect(False, "missing_shard", manifest.manifest_url(output, name, "_stats.json"))
        return
    if stats.get("missing"):  # missing at the source when merged (data.on_missing: skip): nothing was published
        check.missing_sources += 1
        return
    made = stats.get("made_from") or {}
    round_ = made.get("round", stats.get("round", round_))
    if made.get("unfinished"):
        check.unfinished.add(round_)
    folder = stats["published_to"] or storage.join(output, "protected")
    method = get_method(cfg.method)
    job = dataclasses.replace(method.job(cfg), output=output)
    tar = published_url(folder, name, ".tar")
    for what in (tar, *method.state_objects(job, round_, name), manifest.manifest_url(output, name)):
        if not storage.exists(what):
            check.expect(False, "missing_shard", what)
            return
    written_as = MergeConfig(image_format=stats.get("image_format", "png"), jpeg_quality=stats.get("jpeg_quality", 95))
    drop, keep = tuple(stats.get("drop_fields", ())), tuple(stats.get("keep_fields", ()))
    src = load_shard(url, cfg.data)
    source = {k: (c, cap, meta) for k, c, cap, meta in zip(src.keys, src.canvases, src.captions, src.meta or [None] * len(src))}
    st = method.shard_state(job, round_, src)
    epsilon = method.epsilon(job)
    row_of = st.by_key()
    record = manifest.read_manifest(output, name)
    seen, images, hidden = set(), {}, {}
    for s in protected_samples(tar):
        key, where = s["__key__"], f"{name}/{s['__key__']}"
        seen.add(key)
        img_bytes = s.get(written_as.image_format)
        if key not in source or img_bytes is None or "txt" not in s:
            check.expect(False, "unknown_sample", where)
            continue
        images[key] = img_bytes
        canvas, src_caption, src_meta = source[key]
        meta = json.loads(s.get("json", b"{}"))
        allowed = json_keys(src_meta)
        check.expect((allowed is None or set(meta) <= allowed) and all(publish.published(k, keep, drop) for k in meta),
                     "public", where)
        entry = record.get(key, {})
        j = row_of.get(key)
        if j is None:  # fine only if merge copied it through and said so (privately)
            check.expect(entry.get("outcome") == "copied", "no_state", where)
            continue
        check.checked += 1
        pixels = decode_image(img_bytes)
        delta, ids = st.delta[j], st.trigger_ids[j].tolist()
        same_shape = pixels.shape == canvas.shape == delta.shape
        summed = canvas.astype(np.int16) + delta if same_shape else None  # int16: a delta leaving [0, 255] shows
        if written_as.image_format == "jpg" and same_shape:
            in_range = int(summed.min()) >= 0 and int(summed.max()) <= 255
            rewritten = decode_image(encode_image(np.clip(summed, 0, 255).astype(np.uint8), written_as))
            check.expect(in_range and np.array_equal(pixels, rewritten), "pixels", where)
            check.kept.append(delta_kept(pixels, canvas, delta))
        else:
            check.expect(same_shape and np.array_equal(pixels, summed), "pixels", where)
        check.expect(int(np.abs(delta.astype(np.int16)).max(initial=0)) <= epsilon, "bound", where)
        caption = s["txt"].decode("utf-8")
        check.expect(caption == text.protected_caption(st.trigger_text[j], src_caption), "caption", where)
        if caption != src_caption:
            hidden[key] = src_caption
            check.expect(publish.leaked_field(meta, src_caption) is None, "leak", where)
        check.expect(tokenizer([caption])[0][1:1 + len(ids)].tolist() == ids, "tokens", where)
        check.expect(entry.get("outcome") == "protected" and entry.get("trigger_ids") == ids
                     and entry.get("image_sha256") == hashlib.sha256(img_bytes).hexdigest(), "meta", where)
        check.expect(describes(meta, caption, img_bytes, pixels), "json", where)
        if pixels.shape == canvas.shape:
            check.quality(pixels, canvas)
    lost = len(set(st.keys) - seen)
    check.expect(lost == 0, "missing_sample", f"{name} ({lost} state rows without a published sample)")
    check_parquet(folder, url, name, images, (keep, drop), hidden, check)


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
    method = get_method(cfg.method)
    round_ = method.state_round(dataclasses.replace(method.job(cfg), output=output))
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
             if report["delta_kept"] else "")
          + (f" | {report['missing_sources']} shards missing at the source (not published)" if report["missing_sources"] else "")
          + (f" | published from unfinished round(s) {report['unfinished_rounds']}" if report["unfinished_rounds"] else ""),
          flush=True)
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
