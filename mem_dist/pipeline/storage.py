"""The one storage seam: thin fsspec helpers over string URLs.

Local paths, ``file://``, ``s3://`` (endpoint from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, credentials from the AWS chain, as botocore reads them) and any other
fsspec URL behave the same. Never ``pathlib`` on a URL. Every write that other stages rely
on is atomic: the object exists whole or not at all (local: temp file + ``os.replace``;
object stores: one PUT or a completed multipart upload), and local ones reach the disk
(fsync) before the rename, so a crash cannot leave a whole-looking but empty file. A PUT that
fails with a storage error is sent again (WRITE_ATTEMPTS in all): it is atomic, so a retry
never leaves half an object.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
import uuid
from typing import Any

import fsspec

WRITE_ATTEMPTS = 3  # PUTs of one object before a storage error is raised
WRITE_BACKOFF_S = 1.0  # seconds before the second PUT, doubled before each next one


def access_problem(e: BaseException) -> str | None:
    """One line if ``e`` says the storage refused access (no or wrong credentials, no
    permission), else None."""
    name = type(e).__name__
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if type(e).__module__.startswith("botocore") and "Credentials" in name:
        return (f"storage refused access ({name}: {first}); set credentials (AWS_* variables or ~/.aws) "
                f"and, for S3-compatible stores, AWS_ENDPOINT_URL_S3")
    if isinstance(e, PermissionError):
        return f"storage refused access ({name}: {first}); check the path's permissions or the store's credentials"
    return None


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        # S3 listings are strongly consistent; a stale cache would hide finished shards.
        options["use_listings_cache"] = False
    return fsspec.core.url_to_fs(url, **options)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/' (never os.sep), keeping the scheme."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under ``url``; empty if it does not exist."""
    fs, path = url_to_fs(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def sizes(url: str) -> dict[str, int]:
    """{name: size in bytes} of the files directly under ``url`` (one listing); empty if it
    does not exist."""
    fs, path = url_to_fs(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def open_file(url: str, mode: str = "rb"):
    """Open a URL for streaming reads."""
    fs, path = url_to_fs(url)
    return fs.open(path, mode)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see all of it or nothing."""
    fs, path = url_to_fs(url)
    if is_local(url):
        _local_replace(path, lambda f: f.write(data))
    else:
        _retrying(url, lambda: fs.pipe_file(path, data))


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def put_file_atomic(local_path: str, url: str) -> None:
    """Move a finished local file to ``url`` atomically (the local file is consumed)."""
    fs, path = url_to_fs(url)
    if is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _fsync_file(local_path)
        os.replace(local_path, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    else:
        _retrying(url, lambda: fs.put_file(local_path, path))
        os.remove(local_path)


def local_tempfile(url: str, suffix: str = "") -> str:
    """A temp file path to build an object in before :func:`put_file_atomic`: beside the
    target when local (so os.replace never crosses devices), else in the system temp dir."""
    if is_local(url):
        _, path = url_to_fs(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
    else:
        folder = tempfile.gettempdir()
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex}{suffix}")


def remove(url: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(url)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass


def _local_replace(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (not every file system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _retrying(url: str, put) -> None:
    """``put()``, sent again after a storage error (not a refusal: no access, no bucket)."""
    delay = WRITE_BACKOFF_S
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return put()
        except (PermissionError, FileNotFoundError):
            raise
        except OSError as e:
            if attempt == WRITE_ATTEMPTS:
                raise
            print(f"mem-dist: warning: writing {url} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"sending it again in {delay:g} s (try {attempt + 1} of {WRITE_ATTEMPTS})", flush=True)
            time.sleep(delay)
            delay *= 2
