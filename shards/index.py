"""Where a feature shard lives, its per-sample index and its completion record.

    <name>/index.npy    one row per sample (`index_dtype`): key, label, where the image lives in its source
                        tar (data offset, size, crc32), decoded size, the V view records, and per view where
                        its tokens lie (offset, size, wds only) and their crc32; the row's own crc32 last
    <name>.done.json    completion record (`ShardRecord`): samples, skipped keys + reasons, files (size, sha256),
                        stats

Nothing without a record is read: the record is written last, after the shard directory is renamed into place.
"""
from __future__ import annotations

import dataclasses
import io
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.codecs import FORMAT_VERSION
from common.files import file_sha256
from shards.errors import CacheError, RefusedFile
from shards.remote import RemoteError
from shards.trust import check_record_fields, read_json
from shards.urlpath import RemotePath, as_path


def shard_dir(cache: Path, name: str) -> Path:
    return as_path(cache) / name  # a RemotePath for a cache at a URL (read only: shards/urlpath.py)


def record_path(cache: Path, name: str) -> Path:
    return as_path(cache) / f"{name}.done.json"


# ---------------------------------------------------------------- the per-sample index

def index_dtype(views: int, key_bytes: int) -> np.dtype:
    return np.dtype([
        ("key", f"S{max(key_bytes, 1)}"), ("cls", "<i4"),
        ("src_offset", "<i8"), ("src_size", "<i8"), ("src_crc", "<u4"),   # the image member in the source tar
        ("height", "<i4"), ("width", "<i4"),                                 # decoded size
        ("views", "<i4", (views, 5)),                                        # [top, left, h, w, flip] per view
        ("offset", "<i8", (views,)), ("nbytes", "<i8", (views,)),            # the view's bytes in vNN.tar (wds)
        ("crc", "<u4", (views,)),                                            # crc32 of the view's packed array
        ("row_crc", "<u4"),                                                  # crc32 of the row's other bytes
    ])


def row_ok(row) -> bool:
    """A row of an index is as written (its crop box, flip, offsets, key): training pairs nothing by a damaged one."""
    return zlib.crc32(row.tobytes()[:-4]) == int(row["row_crc"])


def read_index(cache: Path, name: str) -> np.ndarray:
    """The shard's index, memory-mapped (every process of a node shares the page cache; no pickle); from a
    cache at a URL, read whole into memory."""
    path = shard_dir(cache, name) / "index.npy"
    try:
        if isinstance(path, RemotePath):
            data = path.read_bytes()
            f = io.BytesIO(data)
            shape, order, dtype = _npy_header(f, len(data))
            return np.frombuffer(data, dtype, int(np.prod(shape)), f.tell()).reshape(shape, order=order)
        with open(path, "rb") as f:  # one open (np.load's mmap_mode opens the file three times)
            shape, order, dtype = _npy_header(f, os.fstat(f.fileno()).st_size)
            return np.memmap(f, dtype=dtype, mode="r", shape=shape, order=order, offset=f.tell())
    except ValueError as e:
        raise RefusedFile(f"{path}: not an index of this format ({e}); run `img2vec verify` on the cache") from None
    except (OSError, RemoteError) as e:
        raise CacheError(f"{path}: unreadable index ({e}); run `img2vec verify` on the cache") from None


def _npy_header(f, size: int) -> tuple[tuple, str, np.dtype]:
    """(shape, order, dtype) of a .npy file, the file positioned at its data: a ValueError for a pickled array, or
    for rows the file does not hold (a header may claim 2^40 of them)."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError("an object array (pickled): refused")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > size - f.tell():
        raise ValueError(f"its header claims {need} bytes of rows, the file holds {size - f.tell()}")
    return shape, "F" if fortran else "C", dtype


# ---------------------------------------------------------------- completion records

@dataclass(frozen=True)
class RecordedFile:
    """A file under the shard's folder as stored: its size in bytes and sha256 (hex); keys this version does not
    know in `extra`, written back after them."""
    size: int
    sha256: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256, **self.extra}


@dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """`<name>.done.json`, typed (docs/FORMAT.md section 5). A field the file does not have is None (older records
    have no source_size; a damaged one may lack any, which record_problems and `img2vec verify` name).

    `from_dict` checks what every reader relies on (shards/trust.py check_record_fields: the shard's name, files
    inside its folder with sizes, samples a count, skipped a list; a RefusedFile naming the file and field); the
    other fields are kept as read (verify checks format and stats against the manifest). `to_dict` gives back the
    same JSON, key for key and in the same order, keys this version does not know (`extra`) after the others."""
    shard: str | None = None
    source: str | None = None         # the source shard's URL
    format: str | None = None         # "wds" or "zarr"
    format_version: int | None = None
    samples: int | None = None        # N, the rows of index.npy
    skipped: list[dict] | None = None  # {"key", "reason"} per source sample without a row
    seekable: bool | None = None      # a local uncompressed tar: src_offset can be read back with a seek
    source_size: int | None = None    # the local source tar's bytes (None for pipe: and URL sources, older records)
    files: dict[str, RecordedFile] | None = None  # every file under <name>/, by path relative to it
    stats: dict | None = None         # the shard's token sums (common.stats.TokenStats.to_dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, name: str, path) -> ShardRecord:
        d = check_record_fields(d, name, path)
        known = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        kw = {k: d[k] for k in known if k in d}
        if "files" in d:
            kw["files"] = {rel: RecordedFile(m["size"], m["sha256"], {k: v for k, v in m.items()
                                                                      if k not in ("size", "sha256")})
                           for rel, m in d["files"].items()}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = {rel: m.to_dict() for rel, m in value.items()} if f.name == "files" else value
        return {**out, **self.extra}


def read_record(cache: Path, name: str) -> ShardRecord | None:
    """The shard's completion record, None if it has none; a RefusedFile if it is torn or names anything outside
    the shard (shards/trust.py)."""
    p = record_path(cache, name)
    if not p.exists():
        return None
    try:
        record = read_json(p, "completion record")
    except RefusedFile as e:
        raise RefusedFile(f"{e}; delete it to redo shard {name}") from None
    return ShardRecord.from_dict(record, name, p)


def record_problems(cache: Path, name: str, record: ShardRecord) -> list[str]:
    """Cheap checks that a recorded shard's files are all there with their recorded sizes."""
    root = shard_dir(cache, name)
    problems = []
    for rel, meta in (record.files or {}).items():
        p = root / rel
        if not p.exists():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != meta.size:
            problems.append(f"{p} has {p.stat().st_size} bytes, the record says {meta.size}")
    if not record.files:
        problems.append(f"{record_path(cache, name)} lists no files (not a format-{FORMAT_VERSION} record)")
    if record.samples is None:
        problems.append(f"{record_path(cache, name)} has no sample count")
    return problems


def check_recorded(cache: Path, name: str, record: ShardRecord | None = None) -> ShardRecord:
    """The record of a shard that is complete (recorded, every file there), or a CacheError saying what to do."""
    record = record or read_record(cache, name)
    if record is None:
        raise CacheError(f"cache {cache}: shard {name} has no completion record (extraction unfinished or "
                         "interrupted); rerun extract-features with the same config to finish it")
    problems = record_problems(cache, name, record)
    if problems:
        raise CacheError(f"cache {cache}: shard {name}: {problems[0]}; rerun extract-features with the same "
                         "config to redo it")
    return record


def tree_files(path: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """relative path -> {"size", "sha256"} of every file under a shard directory (a record's "files"); `known`
    gives those of files hashed while they were written (their size on disk is checked against it)."""
    files = sorted(Path(r) / f for r, _, fs in os.walk(path) for f in fs)
    out = {}
    for p in files:
        rel, size = str(p.relative_to(path)), p.stat().st_size
        if known and rel in known:
            if known[rel]["size"] != size:
                raise CacheError(f"{p}: {size} bytes on disk, {known[rel]['size']} written; the file system lost data")
            out[rel] = known[rel]
        else:
            out[rel] = {"size": size, "sha256": file_sha256(p)}
    return out
