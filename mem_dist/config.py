"""Typed configuration: nested YAML plus ``key=value`` overrides, validated up front.

Every section is a frozen dataclass; a field's docstring is its documentation. A config
is built by :func:`load_config` from a YAML file and dotted overrides
(``mem.rounds=2 output=s3://b/run``). Anything wrong (an unknown key, a wrong type, a value
out of range) raises :class:`ConfigError` with one line naming the key, before any work
starts; the entry points turn it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key."""


# --------------------------------------------------------------------------------------
# The generation run (generate, merge, verify)
# --------------------------------------------------------------------------------------


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
    """Tar member extensions tried, in order, for the image."""
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
    """Unlearnable Clusters (``mem.method: uc``): k-means on the surrogate's image features,
    one perturbation per cluster pulling images toward the next cluster's centroid."""

    clusters: int = 10
    """p: k-means clusters, one perturbation each."""
    kmeans_samples: int = 100_000
    """Images k-means is fitted on (a seeded subset, the same share of every shard); every
    image is then assigned to its nearest centroid."""
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
    epochs: int = 50
    """Passes over the train_samples (the authors': 50)."""
    batch_size: int = 128
    """Images per optimisation step, over all ranks (each shard contributes its share)."""
    lr: Optional[float] = None
    """Adam learning rate (cosine to 0); null = the perturbation's default: 1e-4 for the
    generator (the authors'), 0.5 for direct perturbations (they move in 1/255 units)."""
    weight_decay: float = 5.0e-4
    generator_width: int = 64
    """The generator's ngf (64: the authors')."""
    generator_blocks: int = 6
    """Residual blocks of the generator (6: the authors')."""

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", 1.0e-4 if self.perturbation == "generator" else 0.5)
        check(self.clusters >= 2, "uc.clusters", "must be at least 2")
        for key in ("kmeans_samples", "train_samples", "epochs", "batch_size", "generator_width"):
            check(getattr(self, key) >= 1, f"uc.{key}", "must be at least 1")
        check(self.generator_blocks >= 0, "uc.generator_blocks", "must be 0 or more")
        check(self.lr > 0, "uc.lr", "must be positive")


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

    def __post_init__(self) -> None:
        check(self.processes >= 1, "merge.processes", "must be at least 1")
        check(1 <= self.jpeg_quality <= 100, "merge.jpeg_quality", "must be between 1 and 100")


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

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the generated state. Resuming is refused when these
        differ; mem.rounds is left out so a finished run can be extended."""
        mem = dataclasses.asdict(self.mem)
        mem.pop("rounds")
        return {
            "seed": self.seed,
            "data": dataclasses.asdict(self.data),
            # ensemble is left out when empty, so runs started before it existed still resume
            "surrogate": {k: v for k, v in dataclasses.asdict(self.surrogate).items()
                          if k != "precision" and (k != "ensemble" or v)},
            "mem": mem,
            **({"uc": dataclasses.asdict(self.uc)} if self.mem.method == "uc" else {}),
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


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

T = typing.TypeVar("T")


def load_config(cls: type[T], path: Optional[str] = None, overrides: typing.Sequence[str] = (),
                base: Optional[dict[str, Any]] = None) -> T:
    """Build a ``cls`` config from an optional YAML file and ``key=value`` overrides.

    Args:
        cls: the top-level config dataclass (RunConfig, EvalConfig).
        path: a YAML file, or None for the defaults.
        overrides: dotted ``key=value`` strings; values are parsed as YAML scalars
            (``2`` is an int, ``null`` is None, ``[a, b]`` a list).
        base: raw keys to start from (a recorded config, :func:`to_dict`); the file's keys,
            then the overrides, are laid over them.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: one line naming the offending key or file.
    """
    raw: dict[str, Any] = json.loads(json.dumps(base)) if base is not None else {}
    if path is not None:
        _lay_over(raw, read_yaml(path))
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    return build(cls, raw, prefix="")


def read_yaml(path: str) -> dict[str, Any]:
    """A config file's raw mapping; one-line errors for a missing file, bad YAML or a non-mapping."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return raw


def _lay_over(tree: dict[str, Any], top: dict[str, Any]) -> None:
    """``top``'s keys into ``tree``, section by section (a section in ``top`` keeps ``tree``'s other keys)."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _lay_over(tree[key], value)
        else:
            tree[key] = value


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings as (dotted key, YAML-parsed value) pairs; one-line errors."""
    out: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value (for example mem.rounds=2)")
        # A later override of a key wins, but one key twice in a row is what the shell makes
        # of an unquoted data.shards=.../{00000..00009}.tar: the last shard alone would win.
        if out and key == out[-1][0]:
            raise ConfigError(f"config key '{key}' is given twice in a row on the command line "
                              "(if the value holds {a..b}, quote it so the shell does not expand it)")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.append((key, parsed))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """A ``cls`` config section from a raw mapping; ``prefix`` names it in errors ("mem.")."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a section (a mapping of keys)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = prefix + str(unknown[0])
        raise ConfigError(f"unknown config key '{name}' (known in this section: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    # A section given without some keys keeps the dataclass defaults for them; nested
    # sections with required keys (data.shards) validate in their own __post_init__.
    for name, f in fields.items():
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kwargs[name] = default
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature problems are bugs
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top'}': {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list; got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp}")  # pragma: no cover


def check(ok: bool, key: str, what: str) -> None:
    """Raise a one-line ConfigError "config key 'KEY' WHAT" unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")
