"""Source shards: shard lists, ownership per rank, decoding a shard into canvases.

A shard is read whole (webdataset's tar iterator over an fsspec stream), each sample's
image becomes the *canvas* (the pixels the protected shard will store, see
:func:`to_canvas`), and every sample that cannot be used is skipped with a counted reason:

  ``decode_error``   the image bytes do not decode
  ``unsupported_format``  the image is in a format none of ``data.image_keys`` names (an EPS
                     or TIFF behind a .jpg name): never opened by a decoder
  ``image_too_large`` more pixels than ``data.max_pixels`` (a decompression bomb): not decoded
  ``no_image``       no member with one of ``data.image_keys``
  ``no_caption``     no caption member, or an empty caption, with ``data.empty_captions: drop``
                     (otherwise such a sample is kept with caption "")
  ``wrong_size``     ``resize_mode: no`` and the image is not image_size x image_size
  ``duplicate_key``  a key seen before in the same shard (the first sample is kept), or a
                     sample with a member twice (KEY.jpg twice: which image goes with the
                     caption is unknown, so that sample is skipped; the rest of the shard is kept)
  ``truncated_tar``  the tar ends mid-member (complete samples before the break are kept)
  ``corrupt_tar``    the tar ends as a tar should but a member header inside it is damaged,
                     the same way on every one of READ_ATTEMPTS reads (samples before it kept)
  ``missing_shard``  the shard does not exist (``data.on_missing: skip``)
  ``empty_shard``    the shard holds no samples

A read that fails mid-shard although the tar's tail shows it whole is a storage fault, not
bad data: the shard is read again (READ_ATTEMPTS in all, backoff from READ_BACKOFF_S), and
if every read fails :class:`ShardReadError` stops the rank, nothing of the shard committed,
for the run to resume when started again.

Shapes: N samples, H = W = data.image_size, C = 3; canvases are uint8 [N, H, W, C].
"""

from __future__ import annotations

import collections
import tarfile
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import braceexpand
import numpy as np

from mem_dist.pipeline import storage
from mem_dist.pipeline.canvas import HIGH_DEPTH_MODES, allowed_formats, as_rgb, decode, sniff_format, to_8bit, to_canvas, upright  # noqa: F401
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.config_io import ConfigError

READ_ATTEMPTS = 4  # reads of a whole tar before a mid-shard failure stops the rank
READ_BACKOFF_S = 1.0  # seconds before the second read, doubled before each next one

class ShardReadError(OSError):
    """A shard whose tar is whole could not be read READ_ATTEMPTS times: a storage fault."""

    one_line = True  # mem_dist.errors: one line, exit 1


class ReadFault(Exception):
    """A read of a whole tar failed part-way (``cause``); load_shard reads it again."""

    def __init__(self, url: str, cause: BaseException):
        super().__init__(f"{url}: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        self.url, self.cause = url, cause


@dataclass
class Shard:
    """One decoded source shard."""

    url: str
    keys: list[str]
    canvases: np.ndarray  # uint8 [N, H, W, C]
    captions: list[str]
    skipped: collections.Counter = field(default_factory=collections.Counter)
    meta: list[bytes | None] = field(default_factory=list)  # the raw KEY.json of each sample, if any
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of each sample skipped
    caption_ids: list[list[int]] | None = None  # BPE ids of each caption, filled by generation once per shard

    def without(self, rows: np.ndarray, reason: str) -> "Shard":
        """The shard without the samples at ``rows`` (bool mask or indices), counted as ``reason``."""
        drop = np.zeros(len(self), bool)
        drop[rows] = True
        keep = np.flatnonzero(~drop)
        skipped = collections.Counter(self.skipped)
        if drop.any():
            skipped[reason] += int(drop.sum())
        return Shard(self.url, [self.keys[i] for i in keep], self.canvases[keep], [self.captions[i] for i in keep], skipped,
                     [self.meta[i] for i in keep] if self.meta else [],
                     self.dropped + [(self.keys[i], reason) for i in np.flatnonzero(drop)])

    @property
    def name(self) -> str:
        return shard_name(self.url)

    def __len__(self) -> int:
        return len(self.keys)


def shard_name(url: str) -> str:
    """The shard's file name without ``.tar`` ("00003"): the name its state and
    protected output carry."""
    name = storage.basename(url)
    return name[: -len(".tar")] if name.endswith(".tar") else name


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of a brace-expanded spec; several specs may be joined with "::"."""
    urls: list[str] = []
    for part in spec.split("::"):
        urls.extend(braceexpand.braceexpand(part.strip()))
    names = [shard_name(u) for u in urls]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config key 'data.shards': shard name '{dupes[0]}' appears twice (outputs are named after shards)")
    return urls


def check_shards(cfg: DataConfig) -> list[str]:
    """The shard list, checked before any work starts: a missing shard is a ConfigError
    unless ``data.on_missing`` is ``skip`` (then it is counted when its turn comes)."""
    urls = expand_shards(cfg.shards)
    if not urls:
        raise ConfigError("config key 'data.shards' names no shards")
    if cfg.on_missing == "error":
        missing = missing_urls(urls)
        if missing:
            raise ConfigError(f"config key 'data.shards': shard not found: {missing[0]}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                              f"(set data.on_missing=skip to count and skip it)")
    return urls


def missing_urls(urls: list[str]) -> list[str]:
    """The URLs that do not exist, found with one listing per folder (40,000 shards on S3:
    40 LIST requests rather than 40,000 HEADs)."""
    folders: dict[str, set[str]] = {}
    for url in urls:
        folder = url.rsplit("/", 1)[0] if "/" in url else "."
        if folder not in folders:
            folders[folder] = set(storage.listdir(folder))
    return [u for u in urls if storage.basename(u) not in folders[u.rsplit("/", 1)[0] if "/" in u else "."]]


def owned(items: list, rank: int, world: int) -> list:
    """Round-robin ownership: item i belongs to rank i % world (exactly one owner)."""
    return items[rank::world]


def tar_is_complete(url: str, size: int | None = None) -> bool:
    """Whether a tar ends the way every tar writer ends it: a size that is a multiple of
    512 and two zero blocks. Python's tarfile (and so webdataset) treats a header cut
    short as the end of the archive, so truncation must be checked at the tail."""
    fs, path = storage.url_to_fs(url)
    size = fs.size(path) if size is None else size
    if size < 1024 or size % 512:
        return False
    return fs.cat_file(path, start=size - 1024, end=size) == bytes(1024)


def group_members(url: str, members):
    """Tar members grouped into samples the way webdataset groups them (consecutive members
    that share a key; suffixes lower-cased), except that a member the sample already has
    marks the sample ``__duplicate__`` (webdataset raises, which would end the shard there)."""
    from webdataset.tariterators import base_plus_ext  # webdataset imports torch: not before a shard is read

    current = None
    for member in members:
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": url}
        if suffix in current:
            current["__duplicate__"] = suffix
        else:
            current[suffix] = member["data"]
    if current is not None:
        yield current


def iter_samples(url: str, skipped: collections.Counter, size: int | None = None, last_try: bool = True):
    """Raw samples of a tar shard as dicts (``__key__`` plus member bytes by extension; a
    sample with a repeated member carries ``__duplicate__``).

    A truncated tar counts ``truncated_tar`` once; the samples before the break are yielded
    except the last one, which may be missing members. A tar that is whole but fails
    part-way raises :class:`ReadFault` (a storage fault: read it again), except on the
    ``last_try`` when the failure is the tar's own (a damaged header: ``corrupt_tar``,
    counted like truncation). ``size``: the tar's size in bytes, if known.
    """

    from webdataset.tariterators import tar_file_iterator

    def reraise(exn: Exception) -> bool:
        raise exn

    try:
        complete = tar_is_complete(url, size)
        stream = storage.open_file(url, "rb")
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as e:  # the tail check or the open met a storage error
        raise ReadFault(url, e) from e
    previous, broken = None, False
    with stream:
        try:
            for sample in group_members(url, tar_file_iterator(stream, handler=reraise)):
                if previous is not None:
                    yield previous
                previous = sample
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if complete and not (last_try and isinstance(e, (tarfile.TarError, EOFError))):
                raise ReadFault(url, e) from e
            broken = True
            _warn(f"{url}: not a valid tar after the samples read so far ({type(e).__name__}: {e})")
    if previous is not None and not broken and complete:
        yield previous
    if not complete:
        skipped["truncated_tar"] += 1
        _warn(f"{url}: tar is truncated; kept the complete samples before the break")
    elif broken:
        skipped["corrupt_tar"] += 1
        _warn(f"{url}: tar is damaged inside (the same way on every read); kept the complete samples before it")


def load_shard(url: str, cfg: DataConfig) -> Shard:
    """Decode every usable sample of a shard into its canvas and caption. A whole tar
    whose read fails part-way is read again (READ_ATTEMPTS in all); then ShardReadError."""
    DECODES.add()
    delay = READ_BACKOFF_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _load_shard(url, cfg, last_try=attempt == READ_ATTEMPTS)
        except ReadFault as fault:
            if attempt == READ_ATTEMPTS:
                raise ShardReadError(f"{fault} (the tar is whole; read {READ_ATTEMPTS} times): a storage fault, "
                                     f"nothing of this shard was committed; start the same command again to resume") from fault.cause
            _warn(f"read failed part-way, the tar is whole: {fault}; reading it again in {delay:g} s "
                  f"(try {attempt + 1} of {READ_ATTEMPTS})")
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _load_shard(url: str, cfg: DataConfig, last_try: bool) -> Shard:
    skipped: collections.Counter = collections.Counter()
    keys, canvases, captions, metas = [], [], [], []
    empty = np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)
    fs, path = storage.url_to_fs(url)
    try:
        size = fs.info(path)["size"]
    except FileNotFoundError:
        skipped["missing_shard"] += 1
        _warn(f"{url}: shard not found, skipped")
        return Shard(url, [], empty, [], skipped)
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        raise ReadFault(url, e) from e
    if size == 0:
        skipped["empty_shard"] += 1
        _warn(f"{url}: shard is empty (0 bytes), skipped")
        return Shard(url, [], empty, [], skipped)
    seen: set[str] = set()
    dropped: list[tuple[str, str]] = []

    def skip(key: str, reason: str) -> None:
        skipped[reason] += 1
        dropped.append((key, reason))

    for sample in iter_samples(url, skipped, size, last_try=last_try):
        key = sample.get("__key__", "?")
        if key in seen or "__duplicate__" in sample:  # state rows, merge and verify join on the key
            skip(key, "duplicate_key")
            continue
        raw = next((sample[k] for k in cfg.image_keys if k in sample), None)
        if raw is None:
            skip(key, "no_image")
            continue
        caption = sample.get(cfg.caption_key)
        caption = caption.decode("utf-8", errors="replace").strip() if caption is not None else ""
        if not caption and cfg.empty_captions == "drop":
            skip(key, "no_caption")
            continue
        canvas, reason = decode(raw, cfg)
        if canvas is None:
            skip(key, reason)
            continue
        seen.add(key)
        keys.append(key)
        canvases.append(canvas)
        captions.append(caption)
        metas.append(sample.get("json"))
    if not keys and not skipped:
        skipped["empty_shard"] += 1
    if sum(v for k, v in skipped.items() if k not in ("truncated_tar", "corrupt_tar")):
        _warn(f"{url}: skipped {dict(skipped)}")
    stack = np.stack(canvases) if canvases else empty
    return Shard(url, keys, stack, captions, skipped, metas, dropped)


def generation_view(shard: Shard, cfg: DataConfig) -> Shard:
    """The samples generation protects: all of them, but with ``data.empty_captions: copy``
    those with an empty caption (left to merge to copy through; counted "empty_caption")."""
    if cfg.empty_captions != "copy":
        return shard
    return shard.without(np.array([not c for c in shard.captions], bool), "empty_caption")


class ShardCache:
    """The last ``capacity`` decoded shards as generation sees them (:func:`generation_view`),
    so rounds do not decode the same tar again, plus at most one shard being decoded ahead
    in a background thread (:meth:`prefetch`): memory holds ``capacity + 1`` shards at most."""

    def __init__(self, cfg: DataConfig, capacity: int):
        self.cfg, self.capacity = cfg, capacity
        self._shards: collections.OrderedDict[str, Shard] = collections.OrderedDict()
        self._pending: dict[str, Future] = {}

    def _load(self, url: str) -> Shard:
        return generation_view(load_shard(url, self.cfg), self.cfg)

    def peek(self, url: str) -> Shard | None:
        """The shard if it is cached (nothing is decoded)."""
        return self._shards.get(url)

    def prefetch(self, url: str, executor: Executor) -> None:
        """Start decoding ``url`` on ``executor`` unless it is cached or already under way."""
        if url not in self._shards and not self._pending:  # one at a time: memory stays bounded
            self._pending[url] = executor.submit(self._load, url)

    def get(self, url: str) -> Shard:
        if url in self._shards:
            self._shards.move_to_end(url)
            return self._shards[url]
        pending = self._pending.pop(url, None)
        shard = pending.result() if pending is not None else self._load(url)
        self._shards[url] = shard
        while len(self._shards) > self.capacity:
            self._shards.popitem(last=False)
        return shard


class _Counter:
    """A thread-safe count (shards decoded in this process: the benchmarks read it)."""

    def __init__(self):
        self.value, self._lock = 0, threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


DECODES = _Counter()


def _warn(msg: str) -> None:
    print(f"mem-dist: warning: {msg}", flush=True)
