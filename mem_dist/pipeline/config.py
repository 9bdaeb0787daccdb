"""Typed configuration: nested YAML plus ``key=value`` overrides, validated up front.

Every section is a frozen dataclass; a field's docstring is its documentation. A config
is built by :func:`mem_dist.pipeline.config_io.load_config` from a YAML file and dotted overrides
(``mem.rounds=2 output=s3://b/run``). Anything wrong (an unknown key, a wrong type, a value
out of range) raises :class:`ConfigError` with one line naming the key, before any work
starts; the entry points turn it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mem_dist.methods import METHODS, get_method
from mem_dist.methods.mem.config import MemConfig, MemExperimental
from mem_dist.methods.keyed.config import KeyedConfig, KeyedExperimental
from mem_dist.methods.uc.config import UCConfig, UCExperimental
from mem_dist.pipeline.config_io import ConfigError, check


# --------------------------------------------------------------------------------------
# The generation run (generate, merge, verify)
# --------------------------------------------------------------------------------------


# data.image_keys: a member extension -> the Pillow formats its bytes may be opened as.
IMAGE_FORMATS = {
    "jpg": ("JPEG",), "jpeg": ("JPEG",), "jpe": ("JPEG",), "jfif": ("JPEG",), "png": ("PNG",), "webp": ("WEBP",),
    "gif": ("GIF",), "bmp": ("BMP",), "tif": ("TIFF",), "tiff": ("TIFF",), "avif": ("AVIF",), "jp2": ("JPEG2000",),
}
MAX_PIXELS = 64_000_000  # data.max_pixels' default
PILLOW_HARD_LIMIT = 178_956_970  # 2 x Pillow's Image.MAX_IMAGE_PIXELS: it refuses larger images itself


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""
    """Source shards: a brace-expanded fsspec URL ("data/demo/train/{00000..00007}.tar",
    "s3://bucket/laion/{00000..09999}.tar"); several specs may be joined with "::"."""
    image_size: int = 64
    """Side of the square canvas in pixels: the image exactly as the protected shard stores it."""
    resize_mode: Literal["center_crop", "border", "no"] = "center_crop"
    """How a source image becomes the canvas. center_crop: shorter side to image_size
    (PIL bicubic), then centre crop. border: longer side to image_size, then pad with white
    to a square (img2dataset's "border"). no: use the image as it is; an image that is not
    image_size x image_size is skipped with reason "wrong_size"."""
    caption_key: str = "txt"
    """Tar member extension that holds the caption."""
    image_keys: tuple[str, ...] = ("jpg", "png", "jpeg", "webp")
    """Tar member extensions tried, in order, for the image. They also name the only image
    formats ever opened (jpg/jpeg: JPEG, png: PNG, webp: WEBP; also gif, bmp, tif/tiff,
    avif, jp2): other bytes are skipped as "unsupported_format", never handed to a decoder."""
    max_pixels: int = MAX_PIXELS
    """An image with more pixels (width x height, from its header) is skipped as
    "image_too_large" before it is decoded (a decompression bomb); at most 178956970."""
    on_missing: Literal["error", "skip"] = "error"
    """A shard that does not exist: error = stop before any work (exit 2); skip = count it
    as "missing_shard" and go on."""
    cache_shards: int = 8
    """Decoded shards kept in memory per process (at least 1: the surrogate phase reads
    its batches shard by shard)."""
    empty_captions: Literal["protect", "copy", "drop"] = "protect"
    """A sample whose caption is empty or missing (img2dataset counts such downloads as
    successes). protect: protected like any other; its published caption is the trigger
    alone, and delta binds to that trigger (EM and the noise baselines: delta only).
    copy: not protected; merge copies it through unprotected (counted). drop: skipped and
    counted as "no_caption", in generation and in the published shard."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("config key 'data.shards' is required (a shard URL such as 'data/demo/train/{00000..00007}.tar')")
        check(self.image_size >= 8, "data.image_size", "must be at least 8")
        check(len(self.image_keys) > 0, "data.image_keys", "must name at least one extension")
        unknown = [k for k in self.image_keys if k.lower() not in IMAGE_FORMATS]
        check(not unknown, "data.image_keys", f"names '{unknown[0] if unknown else ''}', not an image format mem-dist "
                                              f"opens (known: {', '.join(IMAGE_FORMATS)})")
        check(1 <= self.max_pixels <= PILLOW_HARD_LIMIT, "data.max_pixels", f"must be between 1 and {PILLOW_HARD_LIMIT}")
        check(self.cache_shards >= 1, "data.cache_shards", "must be at least 1")


@dataclass(frozen=True)
class MemberConfig:
    model: Optional[str] = None
    """open_clip model name or model-config JSON path; null = surrogate.model."""
    pretrained: Optional[str] = None
    """null = random init (seeded per member); or a local checkpoint path."""


@dataclass(frozen=True)
class SurrogateConfig:
    model: str = "RN50"
    """open_clip model name (RN50, ViT-B-32, ...) or the path of a model-config JSON
    (embed_dim / vision_cfg / text_cfg), such as configs/models/tiny-rn.json."""
    pretrained: Optional[str] = None
    """null = random init (the paper's setting); or a local checkpoint path. Nothing is downloaded."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the surrogate's forward passes on GPU (fp32 on CPU always)."""
    ensemble: tuple[MemberConfig, ...] = ()
    """More surrogates trained alongside the first (each its own surrogate phase on the
    protected pairs, its own optimizer); PGD and HotFlip minimise the members' mean loss.
    A list of {model, pretrained}, e.g. [{pretrained: ckpt_b.pt}, {pretrained: ckpt_c.pt}]:
    protection against fine-tuning holds for the checkpoints the surrogates start from, so
    list every checkpoint attackers are likely to fine-tune. Members must share the first
    member's tokenizer. Each member costs about one more surrogate's time and memory."""


@dataclass(frozen=True)
class ExperimentalConfig:
    """Controls and ablations that only experiments/ and docs/efficacy.md set, one section per
    method (``experimental.uc.grid``). They decide the state like any generation key (the run's
    fingerprint covers them); the product config does not need them."""

    mem: MemExperimental = field(default_factory=MemExperimental)
    uc: UCExperimental = field(default_factory=UCExperimental)
    keyed: KeyedExperimental = field(default_factory=KeyedExperimental)


@dataclass(frozen=True)
class StateConfig:
    keep_rounds: int = 2
    """Per-shard state rounds kept on storage (the newest); 0 keeps every round."""
    checkpoint_keep: int = 2
    """Surrogate checkpoints kept (the newest); resume needs the last one."""

    def __post_init__(self) -> None:
        check(self.keep_rounds == 0 or self.keep_rounds >= 2, "state.keep_rounds", "must be 0 (keep all) or at least 2")
        check(self.checkpoint_keep >= 1, "state.checkpoint_keep", "must be at least 1")


@dataclass(frozen=True)
class MergeConfig:
    image_format: Literal["png", "webp", "jpg"] = "png"
    """png (default) or webp are lossless: delta is stored exactly. jpg (img2dataset's
    format; several times smaller) keeps part of delta; the stats say how much."""
    jpeg_quality: int = 95
    """jpg: quality 1-100 (img2dataset's default 95), no chroma subsampling."""
    copy_unprotected: bool = False
    """A sample with no state is dropped and counted (default); true copies it through
    unprotected, and the stats say how many."""
    processes: int = 1
    """Worker processes per machine (each also per rank under accelerate launch)."""
    publish_to: str = ""
    """Where the public side goes (the protected tars with their .parquet and _stats.json):
    any fsspec URL; "" = {output}/protected. The private side (manifest, state) stays under
    output either way."""
    drop_fields: tuple[str, ...] = ()
    """Source metadata not to publish: these json keys and parquet columns are removed from
    the published shards (e.g. [url, exif]; a published url points at the unprotected original)."""
    keep_fields: tuple[str, ...] = ()
    """Source json keys / parquet columns published besides img2dataset's own (caption, url,
    key, status, error_message, width, height, original_width, original_height, exif, md5,
    sha256, sha512), e.g. [similarity, LICENSE]. Every other source field (TEXT, alt,
    original_caption, ...) is left out. A published value equal to a protected sample's
    source caption fails the merge."""
    mode: Literal["incremental", "overwrite"] = "incremental"
    """incremental: skip a shard whose completion marker says it was published from the same
    state round with the same merge settings and destination; redo every other shard.
    overwrite: redo every shard (as img2dataset's incremental_mode)."""
    allow_unfinished: bool = False
    """Publish a run whose generation has not finished (rounds_done < rounds, or the final
    round's state incomplete): its newest complete round, recorded in the manifest. Refused
    (exit 2) by default."""

    def __post_init__(self) -> None:
        check(self.processes >= 1, "merge.processes", "must be at least 1")
        check(1 <= self.jpeg_quality <= 100, "merge.jpeg_quality", "must be between 1 and 100")
        both = sorted(set(self.keep_fields) & set(self.drop_fields))
        check(not both, "merge.keep_fields", f"'{both[0] if both else ''}' is in merge.drop_fields too")


# Old spellings of moved keys -> where they live now. Read from YAML files, overrides and the
# run.json of existing runs (RunConfig.upgrade); the fingerprint keeps the old layout.
MOVED_KEYS = {
    "mem.method": "method",
    **{f"mem.{k}": f"experimental.mem.{k}" for k in ("hotflip_candidates", "trigger_vocab", "shuffle_captions", "augment")},
    **{f"uc.{k}": f"experimental.uc.{k}" for k in ("perturbation", "train_on", "crop_padding", "flip", "lr", "weight_decay",
                                                   "grid", "generator_width", "generator_blocks")},
    **{f"keyed.{k}": f"experimental.keyed.{k}" for k in ("mirror", "luminance")},
}


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    """Seeds the surrogate's init, the trigger init and every per-shard random stream."""
    output: str = "runs/demo"
    """Run folder: any fsspec URL (local path, file://, s3://bucket/prefix)."""
    method: str = "mem"
    """The protection, by its name in the registry (:data:`mem_dist.methods.METHODS`): mem
    (MEM's rounds; mem.trigger_len=0 gives EM), random (uniform noise and a random trigger per
    sample, nothing optimised), prefix (the same noise and ONE random trigger for every
    sample), uc (Unlearnable Clusters). Each reads its own section (random and prefix: mem's)."""
    data: DataConfig = field(default_factory=DataConfig)  # data.shards is required: no default
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    mem: MemConfig = field(default_factory=MemConfig)
    uc: UCConfig = field(default_factory=UCConfig)
    keyed: KeyedConfig = field(default_factory=KeyedConfig)
    state: StateConfig = field(default_factory=StateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU (multi-process CPU runs need ACCELERATE_USE_CPU=1)."""
    progress: bool = True
    """Progress bars on the main process."""

    def __post_init__(self) -> None:
        check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}; got {self.method!r}")
        method = get_method(self.method)
        method.check(method.job(self))

    @staticmethod
    def upgrade(raw: dict[str, Any], under: dict[str, Any] | None = None) -> dict[str, Any]:
        """A raw config layer (a YAML file, one override, a run.json's config) with old spellings
        moved to where the keys live now (:data:`MOVED_KEYS`); a key given both ways in one layer
        keeps the new spelling's value. ``under``: the layers read before, which may name the
        method (under ``method: uc``, ``mem.epsilon`` is UC's bound, ``uc.epsilon``)."""
        raw = json.loads(json.dumps(raw))
        mem = raw.get("mem") if isinstance(raw.get("mem"), dict) else {}
        if "epsilon" in mem and mem["epsilon"] is None:  # null meant the method's default: now each section's own
            mem.pop("epsilon")
        below = under or {}
        method = raw.get("method") or mem.get("method") or below.get("method") or (below.get("mem") or {}).get("method")
        uc = raw.get("uc", {})
        if method == "uc" and "epsilon" in mem and isinstance(uc, dict) and "epsilon" not in uc:
            raw["uc"] = {**uc, "epsilon": mem.pop("epsilon")}  # UC's bound was mem.epsilon
        for old, new in MOVED_KEYS.items():
            section, key = old.split(".")
            if isinstance(raw.get(section), dict) and key in raw[section]:
                value = raw[section].pop(key)
                *path, leaf = new.split(".")
                node = raw
                for part in path:
                    node = node.setdefault(part, {})
                node.setdefault(leaf, value)
        return raw

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the generated state. Resuming is refused when these
        differ; mem.rounds is left out so a finished run can be extended, and keys that
        change no state byte (data.cache_shards: memory only; output, device, progress,
        state, merge) so a resume may change them. The method adds its own part
        (:meth:`mem_dist.methods.base.Method.fingerprint`)."""
        data = dataclasses.asdict(self.data)
        data.pop("cache_shards")
        if data["max_pixels"] == MAX_PIXELS:  # left out at its default, so runs started before it existed resume
            data.pop("max_pixels")
        return {
            "seed": self.seed,
            "data": data,
            # ensemble is left out when empty, so runs started before it existed still resume
            "surrogate": {k: v for k, v in dataclasses.asdict(self.surrogate).items()
                          if k != "precision" and (k != "ensemble" or v)},
            **get_method(self.method).fingerprint(get_method(self.method).job(self)),
        }

    def config_hash(self) -> str:
        return config_hash(self.fingerprint())


def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
