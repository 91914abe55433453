"""A cache is data, never code: what a cache's own files may name, checked before anything is opened through them.

A cache is often someone else's (a shared folder, a published release). Opening one reads its manifest,
completion records and indexes; every name, size and offset in them is checked here against the cache's own
files before use, and a file that fails is a RefusedFile naming it (exit 2), never a path outside the cache, a
read past a file's end, an allocation of a size the file cannot hold, or a command. docs/RELIABILITY.md
("Trust model") says what a cache may contain and what opening one can and cannot do.
"""
from __future__ import annotations

import json
import os
import stat

import numpy as np

from shards.errors import RefusedFile
from shards.remote import is_url

# Bounds on sizes a manifest or index states, far above any real cache (ViT-H at 448 px: 784 tokens x 1280
# channels, 4-10 views, images of some MB) and far below what would exhaust a machine's memory when believed.
MAX_VIEWS = 1024
MAX_VIEW_VALUES = 1 << 26     # T x C of one view (256 MiB as fp32)
MAX_VIEW_SIZE = 1 << 14       # augment.size, pixels
MAX_IMAGE_BYTES = 1 << 28     # a source image member (256 MiB)
MAX_IMAGE_SIDE = 1 << 20      # a decoded image's height or width


def name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name inside the cache folder (a shard's name), or None."""
    if not name or name in (".", ".."):
        return "is empty, '.' or '..'"
    if any(c in name for c in "/\\\0"):
        return "holds '/', '\\' or NUL (a path, not a name)"
    if name.startswith("."):
        return "starts with '.'"
    return None


def relative_problem(rel: str) -> str | None:
    """Why `rel` is not a path inside a shard's folder (a completion record's file), or None."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel or rel.startswith("/"):
        return "is not a relative path"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "leaves the shard's folder (an empty, '.' or '..' component)"
    return None


def source_problem(url: str) -> str | None:
    """Why a source URL that a cache names (its manifest) is not opened unless the user names it again, or None.
    Opened: an absolute local path of a regular file (or one that is missing: reported as missing where it is
    read), and URLs of the schemes shards.remote reads (a read, never a program). Refused: `pipe:` (a shell
    command) and every other scheme (webdataset's gopen would start curl, gsutil or ais for them)."""
    if url.startswith("pipe:"):
        return "is a pipe: command"
    if is_url(url):
        return None
    if "\0" in url or not url.startswith("/"):
        return "is neither an absolute path nor a URL read here (http, https, s3, gs, hf)"
    try:
        mode = os.stat(url).st_mode
    except OSError:
        return None  # missing: the reader names it and says to set data.shards
    return None if stat.S_ISREG(mode) else "is not a regular file (a FIFO or device would stall or never end)"


MAX_JSON_BYTES = 64 << 20     # a manifest or completion record (ImageNet's manifest: ~0.2 MB)


def read_json(path, what: str):
    """The JSON in a cache's file (a local Path or a RemotePath); a RefusedFile naming it if it is torn, nested
    past Python's recursion limit, larger than any such file, or not a regular file (a FIFO would block the reader
    forever, a link to /dev/zero fill its memory)."""
    data = _read_local(path, what) if isinstance(path, (str, os.PathLike)) else _read_remote(path, what)
    if len(data) > MAX_JSON_BYTES:  # grown since its size was read, or of no stated size
        raise refuse(path, f"more than {MAX_JSON_BYTES} bytes, more than any {what}")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RefusedFile(f"{path}: {what} is not valid JSON ({e}): torn or damaged") from None
    except RecursionError:
        raise refuse(path, f"nests arrays or objects deeper than any {what} (Python's recursion limit)") from None


def _read_local(path, what: str) -> bytes:
    """At most MAX_JSON_BYTES + 1 bytes of a regular file: its kind is checked before it is opened (opening some
    devices acts) and again on the open file (it may have been replaced meanwhile), which is opened non-blocking
    (opening a FIFO for reading waits for a writer)."""
    _check_regular(path, os.stat(path), what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        _check_regular(path, os.fstat(fd), what)
        return f.read(MAX_JSON_BYTES + 1)


def _check_regular(path, st: os.stat_result, what: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise refuse(path, f"is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise refuse(path, f"is not a regular file (a FIFO, device or socket: reading it could block or never end), "
                           f"not a {what}")
    if st.st_size > MAX_JSON_BYTES:
        raise refuse(path, f"{st.st_size} bytes, more than any {what} ({MAX_JSON_BYTES})")


def _read_remote(path, what: str) -> bytes:
    """A RemotePath's bytes: its stated size checked first; a server that states none is read to the bound."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise refuse(path, f"{size} bytes, more than any {what} ({MAX_JSON_BYTES})")
    if size:
        return path.read_bytes()
    with path.open() as f:
        return f.read(MAX_JSON_BYTES + 1)


def refuse(path, what: str) -> RefusedFile:
    return RefusedFile(f"{path}: {what}; refused: a cache is data, and nothing it names leaves the cache or "
                       "runs. Re-extract it, or get it again from where it came from")


# ---------------------------------------------------------------- completion records

def check_record_fields(record, name: str, path) -> dict:
    """The fields of a completion record that say where to read and how much, checked: `files` names paths inside
    the shard's folder with sizes, `samples` is a count. Missing fields are left to the callers' own messages."""
    if not isinstance(record, dict):
        raise refuse(path, f"is {type(record).__name__}, not a completion record (a JSON object)")
    if record.get("shard", name) != name:
        raise refuse(path, f"names shard {str(record['shard'])[:80]!r}, not {name!r}")
    files = record.get("files", {})
    if not isinstance(files, dict):
        raise refuse(path, "files is not an object")
    for rel, meta in files.items():
        why = relative_problem(rel)
        if why:
            raise refuse(path, f"files: {rel[:120]!r} {why}")
        if not (isinstance(meta, dict) and _count(meta.get("size")) and isinstance(meta.get("sha256"), str)):
            raise refuse(path, f"files: {rel!r} has no size (a whole number >= 0) and sha256")
    if "samples" in record and not _count(record["samples"]):
        raise refuse(path, f"samples is {str(record['samples'])[:40]}, not a whole number >= 0")
    if not isinstance(record.get("skipped", []), list):
        raise refuse(path, "skipped is not a list")
    return record


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ---------------------------------------------------------------- indexes

def check_index_values(index: np.ndarray, expected: np.dtype, fmt: str, view_sizes: list[int] | None, path) -> None:
    """Every row whose own crc32 holds (a damaged row is never used, see shards.index.row_ok) stays inside the
    cache's files: view bytes within their view file, crop boxes within the image, sizes sane. Rows whose crc32
    fails are left to the readers (a CorruptSample naming the key)."""
    from shards.index import row_ok

    if index.dtype != expected:
        raise refuse(path, f"dtype {index.dtype} is not an index of this format ({expected})")
    if index.ndim != 1:
        raise refuse(path, f"has shape {index.shape}, not one row per sample")
    bad = _out_of_range(index, fmt, view_sizes)
    for i in np.flatnonzero(bad.any(0)):
        if row_ok(index[i]):  # a consistent row that points outside: not damage, a file made to do this
            what = [w for w, b in zip(_CHECKS, bad[:, i]) if b]
            raise refuse(path, f"row {i} (key {index['key'][i][:80].decode(errors='replace')!r}): {', '.join(what)}")


_CHECKS = ("source image offset or size out of range", "decoded image size out of range",
           "a crop box outside the image or a flip not 0/1", "view bytes outside their view file")


def _out_of_range(index: np.ndarray, fmt: str, view_sizes: list[int] | None) -> np.ndarray:
    """[len(_CHECKS), N] bool: which rows break which bound (vectorized: an open is a few array passes)."""
    h, w = index["height"].astype(np.int64), index["width"].astype(np.int64)
    box = index["views"].astype(np.int64)  # [N, V, 5]: top, left, h, w, flip
    top, left, bh, bw, flip = (box[..., k] for k in range(5))
    src = (index["src_offset"] < 0) | (index["src_size"] < 0) | (index["src_size"] > MAX_IMAGE_BYTES)
    hw = (h < 1) | (w < 1) | (h > MAX_IMAGE_SIDE) | (w > MAX_IMAGE_SIDE)
    crops = ((top < 0) | (left < 0) | (bh < 1) | (bw < 1) | (top + bh > h[:, None]) | (left + bw > w[:, None])
             | ((flip != 0) & (flip != 1))).any(1)
    views = np.zeros(len(index), bool)
    if fmt == "wds" and view_sizes is not None:
        off, size, end = index["offset"], index["nbytes"], np.asarray(view_sizes, np.int64)[None, :]
        views = ((off < 0) | (size < 0) | (off > end) | (size > end - off)).any(1)  # no off + size: it may wrap
    return np.stack([src, hw, crops, views])
