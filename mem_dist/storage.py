"""The one storage seam: thin fsspec helpers over string URLs.

Local paths, ``file://``, ``s3://`` (endpoint from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, credentials from the AWS chain, as botocore reads them) and any other
fsspec URL behave the same. Never ``pathlib`` on a URL. Every write that other stages rely
on is atomic: the object exists whole or not at all (local: temp file + ``os.replace``;
object stores: one PUT or a completed multipart upload).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from typing import Any

import fsspec


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
        fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def put_file_atomic(local_path: str, url: str) -> None:
    """Move a finished local file to ``url`` atomically (the local file is consumed)."""
    fs, path = url_to_fs(url)
    if is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.replace(local_path, path)
    else:
        fs.put_file(local_path, path)
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
