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
class MemConfig:
    method: Literal["mem", "random", "prefix", "uc"] = "mem"
    """mem: the MEM rounds (trigger_len=0 gives EM). random: no surrogate, nothing
    optimised: uniform integer delta in [-epsilon, epsilon], plus a random trigger of
    trigger_len tokens per sample (trigger_len=0: the plain random-noise baseline).
    prefix: the same noise plus ONE random trigger shared by every sample, the control
    for what any fixed caption prefix does to a victim evaluated on captions without it.
    uc: Unlearnable Clusters (the ``uc`` section; captions untouched, no trigger)."""
    rounds: int = 20
    """T: outer rounds (surrogate phase, then a pass over every sample)."""
    surrogate_steps: int = 200
    """M: surrogate AdamW steps per round (DDP across ranks)."""
    pgd_steps: int = 8
    """PGD steps on delta per sample per round."""
    hotflip_rounds: int = 5
    """HotFlip updates the trigger in the first H rounds."""
    hotflip_candidates: int = 16
    """Candidate tokens per trigger position tried by HotFlip."""
    trigger_len: int = 3
    """k: trigger tokens prefixed to the caption; 0 = EM (image noise only)."""
    trigger_vocab: int = 0
    """Size of the trigger vocabulary: 0 = every token that survives the text round trip
    (the paper); N = the first N alphabetic words of a seeded shuffle of those tokens."""
    epsilon: Optional[int] = None
    """L-inf bound of delta, in 1/255 units; null = the method's default: 8 (MEM, the
    baselines), 16 (UC)."""
    step_size: int = 1
    """PGD step, in 1/255 units."""
    batch_size: int = 128
    """Samples per batch, per rank, in both phases."""
    lr: float = 1.0e-4
    """Surrogate AdamW learning rate (constant, as in the paper's code)."""
    weight_decay: float = 0.2
    """Surrogate AdamW weight decay (not on biases, norms, logit_scale)."""
    shuffle_captions: bool = True
    """PGD pairs each image (and its own trigger) with a caption shuffled inside the
    batch, so delta can only bind to the trigger (the paper's "_shuffle" runs). Ignored
    when trigger_len is 0 (EM): delta then minimises the loss of the true pairs."""
    augment: bool = False
    """Expectation over transformation: the surrogate sees each image through a random
    resized crop (scale 0.8-1) so delta survives a victim's crops."""

    def __post_init__(self) -> None:
        if self.epsilon is None:
            object.__setattr__(self, "epsilon", 16 if self.method == "uc" else 8)
        for key in ("rounds", "batch_size", "epsilon", "step_size", "hotflip_candidates"):
            check(getattr(self, key) >= 1, f"mem.{key}", "must be at least 1")
        for key in ("surrogate_steps", "pgd_steps", "hotflip_rounds", "trigger_len", "trigger_vocab"):
            check(getattr(self, key) >= 0, f"mem.{key}", "must be 0 or more")
        check(self.epsilon <= 127, "mem.epsilon", "must be at most 127 (delta is int8)")
        check(self.trigger_len <= 20, "mem.trigger_len", "must be at most 20")
        check(self.method != "prefix" or self.trigger_len > 0, "mem.trigger_len", "must be at least 1 with mem.method=prefix")
        check(self.lr > 0, "mem.lr", "must be positive")


@dataclass(frozen=True)
class UCConfig:
    """Unlearnable Clusters (``mem.method: uc``): k-means on the surrogate's image features (or
    the captions'), one perturbation per cluster pulling images toward the next cluster's centroid."""

    clusters: int = 10
    """p: k-means clusters, one perturbation each."""
    kmeans_samples: int = 100_000
    """Images k-means is fitted on (a seeded subset, the same share of every shard); every
    image is then assigned to its nearest centroid."""
    cluster_on: Literal["image", "caption"] = "image"
    """What k-means clusters: image (UC's: the surrogate's image features) or caption (the CLIP
    surrogate's text-tower embedding of each caption; each cluster's perturbation still pulls
    its images toward the next cluster's mean image feature). An open_clip surrogate only."""
    train_samples: int = 20_000
    """Images the perturbations are optimised on (a seeded subset, the same share of every
    shard, held in memory across the ranks)."""
    perturbation: Literal["generator", "direct", "random"] = "generator"
    """generator: the authors' per-cluster ResNet generator from one fixed noise input, its
    output clamped to epsilon; direct: the p perturbations themselves, projected to epsilon;
    random: the control, seeded uniform noise per cluster, nothing optimised."""
    train_on: Literal["all", "cluster"] = "all"
    """all: every image is pushed by every cluster's perturbation toward that cluster's
    target (the authors' code: universal perturbations); cluster: each image only by its
    own cluster's (p times cheaper)."""
    augment: Literal["none", "images", "published"] = "none"
    """What the optimisation sees of the classifier victim's random crop and horizontal flip
    (uc.crop_padding, uc.flip): none; images: each training image cropped and flipped, the
    perturbation added after at its place (the authors' loader); published: the perturbed
    image cropped and flipped, as a victim's loader sees a published image (an expectation
    over the victim's augmentation; the best measured, docs/efficacy.md)."""
    crop_padding: int = 4
    """uc.augment's random crop: zero padding in canvas pixels (the classifier victim's
    classifier.crop_padding; 4 at 32 px is the papers' CIFAR crop); 0 = no crop."""
    flip: bool = True
    """uc.augment's random horizontal flip (the classifier victim's classifier.flip)."""
    epochs: int = 50
    """Passes over the train_samples (the authors': 50)."""
    batch_size: int = 128
    """Images per optimisation step, over all ranks (each shard contributes its share)."""
    lr: Optional[float] = None
    """Adam learning rate (cosine to 0); null = the perturbation's default: 1e-4 for the
    generator (the authors'), 0.5 for direct perturbations (they move in 1/255 units)."""
    weight_decay: Optional[float] = None
    """Adam's L2 weight decay; null = the perturbation's default: 5e-4 for the generator's
    weights (the authors'), 0 for direct perturbations (in 1/255 units, a decay of 5e-4 * delta
    outweighs their mean-normalised gradient a hundredfold and holds them at 0)."""
    grid: int = 0
    """0: a perturbation holds one value per canvas pixel (the authors'); g > 0: a g x g grid of
    values per channel (the generator's output, the direct tensor, the random noise), upsampled
    bilinearly to the canvas: a smooth, low-frequency code."""
    generator_width: int = 64
    """The generator's ngf (64: the authors')."""
    generator_blocks: int = 6
    """Residual blocks of the generator (6: the authors')."""

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", 1.0e-4 if self.perturbation == "generator" else 0.5)
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", 5.0e-4 if self.perturbation == "generator" else 0.0)
        check(self.clusters >= 2, "uc.clusters", "must be at least 2")
        for key in ("kmeans_samples", "train_samples", "epochs", "batch_size", "generator_width"):
            check(getattr(self, key) >= 1, f"uc.{key}", "must be at least 1")
        check(self.generator_blocks >= 0, "uc.generator_blocks", "must be 0 or more")
        check(self.grid >= 0, "uc.grid", "must be 0 (one value per canvas pixel) or a grid side")
        check(self.grid == 0 or self.grid >= 8 or self.perturbation != "generator", "uc.grid",
              "must be at least 8 for the generator (its two stride-2 downs and reflection padding)")
        check(self.crop_padding >= 0, "uc.crop_padding", "must be 0 or more")
        check(self.lr > 0, "uc.lr", "must be positive")
        check(self.weight_decay >= 0, "uc.weight_decay", "must be 0 or more")


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


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    """Seeds the surrogate's init, the trigger init and every per-shard random stream."""
    output: str = "runs/demo"
    """Run folder: any fsspec URL (local path, file://, s3://bucket/prefix)."""
    data: DataConfig = field(default_factory=DataConfig)  # data.shards is required: no default
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    mem: MemConfig = field(default_factory=MemConfig)
    uc: UCConfig = field(default_factory=UCConfig)
    state: StateConfig = field(default_factory=StateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU (multi-process CPU runs need ACCELERATE_USE_CPU=1)."""
    progress: bool = True
    """Progress bars on the main process."""

    def __post_init__(self) -> None:
        check(self.uc.grid <= self.data.image_size, "uc.grid", f"must be at most data.image_size ({self.data.image_size})")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the generated state. Resuming is refused when these
        differ; mem.rounds is left out so a finished run can be extended, and keys that
        change no state byte (data.cache_shards: memory only; output, device, progress,
        state, merge) so a resume may change them."""
        mem = dataclasses.asdict(self.mem)
        mem.pop("rounds")
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
            "mem": mem,
            **({"uc": self._uc_fingerprint()} if self.mem.method == "uc" else {}),
        }

    def _uc_fingerprint(self) -> dict[str, Any]:
        # the augmentation's keys are left out when it is off (they change nothing then), and
        # cluster_on when it is UC's image and grid when 0, so UC runs started before those keys
        # existed still resume
        uc = dataclasses.asdict(self.uc)
        if uc["augment"] == "none":
            for key in ("augment", "crop_padding", "flip"):
                uc.pop(key)
        if uc["cluster_on"] == "image":
            uc.pop("cluster_on")
        if uc["grid"] == 0:
            uc.pop("grid")
        return uc

    def config_hash(self) -> str:
        return config_hash(self.fingerprint())


def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
