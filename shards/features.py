"""Feature shards (cache format 2): view-major token files, a per-sample index, completion records, manifest.

Layout of a cache directory, one feature shard per source shard:

    manifest.json              teacher fingerprint, view recipe, codec, format version, shard list, stats
    <name>/index.npy           one row per sample (INDEX_FIELDS): key, label, where the image lives in its
                               source tar (data offset, size, crc32), decoded size, the V view records,
                               and per view where its tokens lie (offset, size) and their crc32
    <name>/v00.tar ... vNN.tar (wds) one tar per view: member `<key>.tokens` = one compressed packed view
    <name>/tokens.zarr         (zarr) array [V, N, T, C'], one inner chunk per (view, sample), Zarr v3
                               sharding codec with SHARD_SAMPLES samples of one view per shard file
    <name>.done.json           completion record: samples, skipped keys + reasons, files (size, sha256), stats
    <name>.lock                lease of the extraction process working on the shard (absent when idle)

Reading one view of a sample reads that view's bytes only (plus 16 bytes of shard index per sample in
zarr), so an epoch reads ~1/V of the cache. A shard directory is written under a temporary name,
fsynced and renamed in one step; only then is it recorded, and nothing without a record is read.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import socket
import tarfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.augment import CUTS, replay_probe
from common.codecs import FORMAT_VERSION, TokenCodec, get_codec, view_crc32
from common.faults import fault_point
from common.stats import TokenStats

SHARD_SAMPLES = 256  # zarr: samples of one view per shard file (its index: 16 B x 256 = 4 KiB)


class CacheError(RuntimeError):
    """A cache that cannot be used as it is; the message names the file, shard or key."""


class CorruptSample(CacheError):
    def __init__(self, shard: str, key: str | None = None, reason: str | None = None, what: str = "feature shard"):
        if key is None:  # re-raised from a DataLoader worker with its message only
            super().__init__(shard)
            return
        fix = ("run `img2vec verify` and re-extract that shard (delete its .done.json)" if what == "feature shard"
               else "the source changed after extraction: restore it, or re-extract that shard")
        super().__init__(f"{what} {shard}: sample {key!r} is corrupt ({reason}); {fix}")
        self.shard, self.key = shard, key


# ---------------------------------------------------------------- atomic files

def fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for r, ds, _ in os.walk(path):
            for d in ds:
                fsync_dir(Path(r) / d)
        fsync_dir(path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_suffix() -> str:
    """Host, pid and a random part: ranks on different hosts often share a small pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{unique_suffix()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_files(path: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """relative path -> {"size", "sha256"} of every file under a shard directory; `known` gives those of files
    hashed while they were written (their size on disk is checked against it)."""
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


# ---------------------------------------------------------------- paths, records, leases

def shard_dir(cache: Path, name: str) -> Path:
    return Path(cache) / name


def record_path(cache: Path, name: str) -> Path:
    return Path(cache) / f"{name}.done.json"


def read_record(cache: Path, name: str) -> dict | None:
    p = record_path(cache, name)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{p}: completion record is not valid JSON ({e}); delete it to redo shard {name}") from None


def record_problems(cache: Path, name: str, record: dict) -> list[str]:
    """Cheap checks that a recorded shard's files are all there with their recorded sizes."""
    root = shard_dir(cache, name)
    problems = []
    for rel, meta in record.get("files", {}).items():
        p = root / rel
        if not p.exists():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, the record says {meta['size']}")
    if not record.get("files"):
        problems.append(f"{record_path(cache, name)} lists no files (not a format-{FORMAT_VERSION} record)")
    return problems


LEASE_TTL = 1800.0  # s without a heartbeat after which another host's lease counts as dead (a lost node)
_HELD: set[str] = set()  # nonces of the leases this process holds (a lock naming our pid and another nonce is
                         # a previous life's: a restarted container often gets the same hostname and pid)


class Lease:
    """`<name>.lock`, created with O_EXCL by the one process that works on a shard: host, pid, start time; its
    mtime is the holder's heartbeat (`beat()`, on every batch written). A lease is stale when its process is
    dead on this host, or when another host's has not beaten for LEASE_TTL. Taking over a stale lease goes
    through a second O_EXCL file, so two processes that both judge it stale cannot both take it."""

    def __init__(self, cache: Path, name: str):
        self.path = Path(cache) / f"{name}.lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "nonce": os.urandom(8).hex(), "since": time.time()}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        _HELD.add(self.me["nonce"])
        return True

    def acquire(self) -> bool:
        if self._create():
            return True
        if not self._stale():
            return False
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another process is taking it over (or died doing so long ago)
            if time.time() - _mtime(guard) > 60:
                guard.unlink(missing_ok=True)
            return False
        os.close(fd)
        try:
            if not self._stale():  # judged again, now that no one else can take it over
                return False
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            guard.unlink(missing_ok=True)

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _stale(self) -> bool:
        h = self.holder()
        if not h:  # torn or vanished: a writer died between create and write, or just released it
            return not self.path.exists() or time.time() - _mtime(self.path) > 60
        if h.get("host") != self.me["host"]:
            return time.time() - _mtime(self.path) > LEASE_TTL
        try:
            os.kill(int(h["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(h["pid"]) == self.me["pid"] and h.get("nonce") not in _HELD  # our pid, a previous life

    def held(self) -> bool:
        return self.holder().get("nonce") == self.me["nonce"]

    def beat(self) -> None:
        if self.held():
            os.utime(self.path)

    def clear_stale(self) -> None:
        if self.path.exists() and self._stale():
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)
        _HELD.discard(self.me["nonce"])


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def remove_partial(cache: Path, name: str) -> None:
    """Leftovers of an interrupted writer of this shard (call only while holding its lease): temporaries,
    a shard directory without a record, and a record whose files are not all there."""
    cache = Path(cache)
    final = shard_dir(cache, name)
    for p in [*cache.glob(f"{glob.escape(name)}.tmp-*"), *cache.glob(f"{glob.escape(name)}.done.json.tmp-*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # the shard's, or its record's (killed mid-write)
    record = read_record(cache, name)
    if record is not None and record_problems(cache, name, record):
        record_path(cache, name).unlink()
        record = None
    if final.exists() and record is None:
        shutil.rmtree(final)


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
    """The shard's index, memory-mapped (every process of a node shares the page cache; no pickle)."""
    path = shard_dir(cache, name) / "index.npy"
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable index ({e}); run `img2vec verify` on the cache") from None


# ---------------------------------------------------------------- writing

def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "img2vec", "img2vec"
    return info.tobuf(format=tarfile.GNU_FORMAT)


class FeatureShardWriter:
    """Writes one feature shard into `<name>.tmp-<pid>/`; `commit()` fsyncs, renames to `<name>/` and records it."""

    def __init__(self, cache: Path, name: str, fmt: str, codec: TokenCodec, views: int, tokens: int, channels: int):
        self.cache, self.name, self.fmt, self.codec = Path(cache), name, fmt, codec
        self.final = shard_dir(self.cache, name)
        self.tmp = self.cache / f"{name}.tmp-{unique_suffix()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.views, self.tokens, self.channels = views, tokens, channels
        self.rows: list[tuple] = []
        if fmt == "wds":
            self._files = [open(self.tmp / f"v{v:02d}.tar", "wb") for v in range(views)]
            self._hashes = [hashlib.sha256() for _ in range(views)]
            self._sizes = [0] * views
        else:
            self._buffer: list[np.ndarray] = []
            self._open_zarr()

    def _open_zarr(self) -> None:
        import zarr
        from zarr.codecs import BloscCodec, Crc32cCodec

        (t, c), dtype = self.codec.packed_spec(self.tokens, self.channels)
        comp = self.codec.blosc()
        shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}
        compressors = [Crc32cCodec()]  # checked by zarr on every read of a chunk
        if comp is not None:
            compressors.insert(0, BloscCodec(cname=comp.cname, clevel=comp.clevel, shuffle=shuffle[comp.shuffle],
                                             blocksize=comp.blocksize))
        group = zarr.open_group(str(self.tmp / "tokens.zarr"), mode="w", zarr_format=3)
        self._array = group.create_array("tokens", shape=(self.views, 0, t, c), chunks=(1, 1, t, c),
                                         shards=(1, SHARD_SAMPLES, t, c), dtype=dtype, fill_value=0,
                                         compressors=compressors)

    def add(self, key: str, views: np.ndarray, src: dict, hw, cls: int | None, tokens: np.ndarray) -> None:
        """One sample: its view records [V, 5], its image's place in the source tar (`offset`, `size`, `crc`),
        decoded size (h, w), label, and its teacher tokens [V, T, C] (fp32)."""
        self.add_batch([key], [views], [src], [hw], [cls], self.codec.encode(tokens)[None])

    def add_batch(self, keys, views, srcs, hws, clss, packed: np.ndarray, pool=None) -> None:
        """Samples in order; packed [b, V, T, C'] (codec.encode / encode_tensor). With a thread pool, the b x V views
        are compressed and checksummed in parallel (Blosc and zlib release the GIL); they are written in order, so
        the bytes do not depend on the pool."""
        for key in keys:
            if "." in key.rsplit("/", 1)[-1]:
                raise CacheError(f"key {key!r} contains a dot, which WebDataset would split")
        b = len(keys)
        flat = packed.reshape(b * self.views, *packed.shape[2:])  # [b*V, T, C']
        cuts = np.linspace(0, b * self.views, max(1, min(b * self.views, pool._max_workers if pool else 1)) + 1).astype(int)
        parts = list((pool.map if pool else map)(lambda i: self._compress(flat[cuts[i]:cuts[i + 1]]), range(len(cuts) - 1)))
        blobs = [bl for bls, _ in parts for bl in bls]
        crcs = [c for _, cs in parts for c in cs]
        if self.fmt == "wds":  # the V tars are appended in parallel, each in sample order
            placed = list((pool.map if pool else map)(lambda v: self._append(v, keys, blobs[v::self.views]),
                                                      range(self.views)))  # [V][b] (offset, size)
        for i, key in enumerate(keys):
            offsets, sizes = [0] * self.views, [0] * self.views
            if self.fmt == "wds":
                offsets, sizes = [p[i][0] for p in placed], [p[i][1] for p in placed]
            else:
                self._buffer.append(np.array(packed[i]))  # a copy: `packed` may be pinned memory, reused
                if len(self._buffer) == SHARD_SAMPLES:
                    self._flush()
            cls = clss[i]
            self.rows.append((key.encode(), -1 if cls is None else int(cls), srcs[i]["offset"], srcs[i]["size"],
                              srcs[i]["crc"], int(hws[i][0]), int(hws[i][1]), np.asarray(views[i], np.int32), offsets,
                              sizes, crcs[i * self.views:(i + 1) * self.views]))

    def _compress(self, packed: np.ndarray):
        """views [n, T, C'] -> (compressed bytes per view (wds), crc32 per view)."""
        blobs = [self.codec.compress(p) for p in packed] if self.fmt == "wds" else [None] * len(packed)
        return blobs, [view_crc32(p) for p in packed]

    def _append(self, v: int, keys: list[str], blobs: list[bytes]) -> list[tuple[int, int]]:
        """Append one member per sample to view v's tar: [(data offset, size)]."""
        placed = []
        for key, data in zip(keys, blobs):
            header = _tar_header(f"{key}.tokens", len(data))
            placed.append((self._sizes[v] + len(header), len(data)))
            self._write(v, header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        return placed

    def _write(self, v: int, data: bytes) -> None:
        """Append to view v's tar, hashing as it goes: commit records the sha256 without reading the file back."""
        self._files[v].write(data)
        self._hashes[v].update(data)
        self._sizes[v] += len(data)

    def _flush(self) -> None:
        if self._buffer:
            self._array.append(np.stack(self._buffer, axis=1), axis=1)  # [V, n, T, C']
            self._buffer = []

    def _close(self) -> None:
        if self.fmt == "wds":
            for v, f in enumerate(self._files):
                if not f.closed:
                    self._write(v, b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
                    f.close()
        else:
            self._flush()

    def commit(self, skipped: list[dict], source: str, stats: TokenStats, seekable: bool) -> dict:
        self._close()
        dtype = index_dtype(self.views, max((len(r[0]) for r in self.rows), default=1))
        index = np.array([(*r, 0) for r in self.rows], dtype=dtype)
        for row in index:
            row["row_crc"] = zlib.crc32(row.tobytes()[:-4])
        np.save(self.tmp / "index.npy", index, allow_pickle=False)
        fsync_tree(self.tmp)
        os.replace(self.tmp, self.final)  # one rename: the shard directory appears whole or not at all
        fsync_dir(self.cache)
        fault_point("commit", self.name)
        record = {"shard": self.name, "source": source, "format": self.fmt, "format_version": FORMAT_VERSION,
                  "samples": len(self.rows), "skipped": skipped, "seekable": seekable,
                  "files": tree_files(self.final, self._known()), "stats": stats.to_dict()}
        write_json_atomic(record_path(self.cache, self.name), record)
        return record

    def _known(self) -> dict[str, dict]:
        """The tars' sizes and sha256, as written (the index and Zarr's files are hashed from disk)."""
        if self.fmt != "wds":
            return {}
        return {f"v{v:02d}.tar": {"size": self._sizes[v], "sha256": h.hexdigest()} for v, h in enumerate(self._hashes)}

    def abort(self) -> None:
        if self.fmt == "wds":
            for f in self._files:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- reading

def check_recorded(cache: Path, name: str, record: dict | None = None) -> dict:
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


class FeatureShard:
    """Random access to one recorded feature shard: its index (memory-mapped), and one view of any samples.
    Cheap to open (training opens and drops many); `samples` is the recorded count, checked against the index."""

    def __init__(self, cache: Path, name: str, manifest: dict, samples: int | None = None):
        self.cache, self.name = Path(cache), name
        if samples is None:
            samples = check_recorded(cache, name)["samples"]
        self.fmt = manifest["cache_format"]
        self.codec = get_codec(manifest["codec"]["name"])
        self.tokens, self.channels = manifest["token_shape"]
        self.index = read_index(cache, name)
        if len(self.index) != samples:
            raise CacheError(f"cache {cache}: shard {name}: index holds {len(self.index)} samples, its record "
                             f"{samples}; run `img2vec verify`")
        self._array = None

    def key(self, i: int) -> str:
        return self.index["key"][i].decode()

    def read_views(self, ids, views) -> list[np.ndarray | CorruptSample]:
        """Packed arrays [T, C'] of view views[j] of sample ids[j], each checked against its crc32; a sample
        whose bytes are damaged comes back as a CorruptSample (the caller raises or skips it)."""
        ids, views = np.asarray(ids, np.int64), np.asarray(views, np.int64)
        out: list = [None] * len(ids)
        order = np.lexsort((ids, views))  # view file by view file, in file order: short seeks
        raw = self._read_wds(ids[order], views[order]) if self.fmt == "wds" else self._read_zarr(ids[order], views[order])
        for j, data in zip(order, raw):
            i, v = int(ids[j]), int(views[j])
            if not isinstance(data, CorruptSample) and view_crc32(data) != self.index["crc"][i, v]:
                data = CorruptSample(self.name, self.key(i), f"view {v}: crc32 differs from the index")
            out[j] = data
        return out

    def _read_wds(self, ids, views):
        out = []
        for i, v in zip(ids, views):
            if not row_ok(self.index[i]):  # its offset and size are not to be trusted: read nothing
                out.append(CorruptSample(self.name, self.key(i), f"index row {i}: crc32 differs"))
                continue
            size, offset = int(self.index["nbytes"][i, v]), int(self.index["offset"][i, v])
            data = pread(shard_dir(self.cache, self.name) / f"v{v:02d}.tar", size, offset)
            try:
                if len(data) != size:
                    raise ValueError(f"v{v:02d}.tar ends {size - len(data)} bytes early")
                out.append(self.codec.decompress(data, self.tokens, self.channels))
            except Exception as e:  # noqa: BLE001 - any failure to decode stored bytes is corruption
                out.append(CorruptSample(self.name, self.key(i), f"view {v}: {type(e).__name__}: {e}"))
        return out

    def _read_zarr(self, ids, views):
        import zarr

        if self._array is None:
            store = _random_read_store(shard_dir(self.cache, self.name) / "tokens.zarr")
            self._array = zarr.open_array(store=store, path="tokens", mode="r")
        try:  # one call for the lot: zarr's per-call overhead is large; one shard index read per file
            return list(self._array.get_coordinate_selection((views, ids)))
        except Exception:  # noqa: BLE001 - find the damaged chunk(s) one by one
            out = []
            for i, v in zip(ids, views):
                try:
                    out.append(self._array[int(v), int(i)])
                except Exception as e:  # noqa: BLE001
                    out.append(CorruptSample(self.name, self.key(i), f"view {v}: {type(e).__name__}: {e}"))
            return out

    def close(self) -> None:
        self._array = None


def _random_read_store(root: Path):
    """A read-only Zarr LocalStore whose byte-range reads (a shard's index, one inner chunk) are single
    preads with readahead off: the kernel reads the chunk asked for, not its neighbours (other samples)."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import LocalStore

    def pread_range(path: Path, byte_range) -> bytes:
        if isinstance(byte_range, RangeByteRequest):
            return pread(path, byte_range.end - byte_range.start, byte_range.start)
        size = path.stat().st_size
        if isinstance(byte_range, OffsetByteRequest):
            return pread(path, size - byte_range.offset, byte_range.offset)
        if isinstance(byte_range, SuffixByteRequest):
            start = max(0, size - byte_range.suffix)
            return pread(path, size - start, start)
        raise TypeError(f"unexpected byte range {byte_range!r}")

    class RandomReadStore(LocalStore):
        async def get(self, key, prototype=None, byte_range=None):
            if byte_range is None:
                return await super().get(key, prototype, byte_range)
            prototype = prototype or default_buffer_prototype()
            try:  # inline, not in a thread: one hop less per chunk, and these reads are small and local
                data = pread_range(self.root / key, byte_range)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            return prototype.buffer.from_bytes(data)

    return RandomReadStore(root, read_only=True)


def iter_feature_shard(cache: Path, name: str, manifest: dict) -> Iterator[dict]:
    """Every sample of a recorded shard with ALL its views (tools and tests; training reads one view):
    {"key", "cls", "views" [V, 5], "src_hw", "packed" [V, T, C']}. Raises CorruptSample on a damaged view."""
    shard = FeatureShard(cache, name, manifest)
    views = manifest["augment"]["views"]
    try:
        for i, meta in enumerate(shard.index):
            packed = shard.read_views(np.full(views, i), np.arange(views))
            bad = next((p for p in packed if isinstance(p, CorruptSample)), None)
            if bad is not None:
                raise bad
            yield {"key": meta["key"].decode(), "cls": int(meta["cls"]), "views": np.array(meta["views"]),
                   "src_hw": [int(meta["height"]), int(meta["width"])], "packed": np.stack(packed)}
    finally:
        shard.close()


_open_files: OrderedDict[str, int] = OrderedDict()
MAX_OPEN_FILES = 0  # per process, 0 = half of open_file_budget(): ImageNet's 1,282 x (V view files + a source)


@functools.lru_cache(maxsize=1)
def open_file_budget() -> int:
    """Descriptors this process may use: the soft RLIMIT_NOFILE, first raised to the hard limit (at most
    65,536), since a random reader keeps many files open (the LRUs of read descriptors and index maps)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(soft, 256)


def pread(path, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, through a small per-process LRU of open files read without readahead (the
    kernel reads what is asked, not the neighbouring samples or views). A forked worker starts with the
    parent's descriptors, which pread shares safely (no file position)."""
    path = str(path)
    try:
        fd = _open_files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            while len(_open_files) >= (MAX_OPEN_FILES or open_file_budget() // 2):
                os.close(_open_files.popitem(last=False)[1])
        _open_files[path] = fd
        return os.pread(fd, size, offset)
    except OSError as e:  # a vanished file, an I/O error: name it (a CacheError, not a traceback)
        raise CacheError(f"{path}: {e.strerror or e} while reading {size} bytes at {offset}; check the file "
                         "system, then `img2vec verify` the cache") from None


# ---------------------------------------------------------------- manifest

IDENTITY_FIELDS = ("format_version", "cache_format", "codec", "teacher", "augment", "token_shape", "shards")


def make_manifest(cfg, fingerprint: dict, token_shape: tuple[int, int], shard_urls: list[str]) -> dict:
    from shards.source import absolute_url, shard_names

    codec = get_codec(cfg.cache.codec)
    a = cfg.augment
    return {
        "format_version": FORMAT_VERSION,
        "cache_format": cfg.cache.format,
        "codec": {"name": codec.name, "error_bound": codec.error_bound},
        "teacher": {k: fingerprint[k] for k in ("arch", "layer", "sha256", "precision")},
        "augment": {"size": a.size, "scale": list(a.scale), "ratio": list(a.ratio), "flip": a.flip,
                    "views": a.views, "seed": a.seed, "interpolation": "bicubic", "cut": a.cut},
        # not identity: what this machine's libraries cut for a fixed probe; training checks its own against it
        "replay": replay_versions(a.cut),
        "token_shape": list(token_shape),
        "shards": [{"name": n, "source": absolute_url(u)} for n, u in zip(shard_names(shard_urls), shard_urls)],
        "teacher_weights": fingerprint["weights"],
        "teacher_seed": cfg.teacher.seed,  # what random weights were drawn from (the sha256 identifies them)
    }


def read_manifest(cache: Path) -> dict:
    p = Path(cache) / "manifest.json"
    if not p.exists():
        raise CacheError(f"{p} not found: is cache.path right, and has extract-features run?")
    manifest = json.loads(p.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache {cache} is format {manifest.get('format_version')}; this version reads format "
                         f"{FORMAT_VERSION} (view-major tokens and a per-sample index, so an epoch reads one view). "
                         "Re-extract it: extract-features --config <your config> --set cache.path=<new path>")
    return manifest


def manifest_cut(manifest: dict) -> str:
    """How the cache's views were cut (see common/augment.py); caches from before `augment.cut` used Pillow."""
    return manifest["augment"].get("cut", "pil")


def replay_versions(cut: str) -> dict:
    import PIL

    return {"cut": cut, "probe": replay_probe(cut), "torch": torch.__version__, "pillow": PIL.__version__}


def check_replay(manifest: dict) -> None:
    """A CacheError if this machine's libraries cut a fixed probe differently from the machine that extracted the
    cache: stage two would train on other pixels than the teacher saw."""
    cut, recorded = manifest_cut(manifest), manifest.get("replay")
    if cut not in CUTS:
        raise CacheError(f"manifest.json: augment.cut is {cut!r}; this version cuts views with {', '.join(CUTS)}")
    if recorded is None:
        return  # a cache from before the probe was recorded
    here = replay_versions(cut)
    if here["probe"] != recorded["probe"]:
        raise CacheError(f"this machine cuts views (augment.cut = {cut!r}) differently from the machine that "
                         f"extracted the cache: probe {here['probe']} here (torch {here['torch']}, Pillow "
                         f"{here['pillow']}), {recorded['probe']} there (torch {recorded['torch']}, Pillow "
                         f"{recorded['pillow']}). Training would pair the cached features with other pixels. Install "
                         "the versions the cache was made with, or re-extract with these")


def manifest_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    old = {**old, "augment": {**old.get("augment", {}), "cut": manifest_cut(old)}} if "augment" in old else old
    for f in IDENTITY_FIELDS:
        if old.get(f) != new.get(f):
            if isinstance(new.get(f), dict) and isinstance(old.get(f), dict):
                diffs += [f"{f}.{k}: cache has {old[f].get(k)!r}, config gives {new[f].get(k)!r}"
                          for k in sorted(set(old[f]) | set(new[f])) if old[f].get(k) != new[f].get(k)]
            elif f == "shards":
                diffs.append(f"shards: cache lists {len(old.get(f) or [])} shards "
                             f"({(old.get(f) or [{}])[0].get('source')}...), config gives {len(new[f])} "
                             f"({new[f][0]['source']}...)")
            else:
                diffs.append(f"{f}: cache has {old.get(f)!r}, config gives {new.get(f)!r}")
    return diffs


def source_urls(manifest: dict, shards_override=None, missing_ok: bool = False) -> dict[str, str | None]:
    """Feature shard name -> source URL: the manifest's, or the same names under `shards_override`
    (a brace pattern or list, for a dataset that moved since extraction)."""
    from shards.source import expand_shards, shard_names

    urls = {s["name"]: s["source"] for s in manifest["shards"]}
    if shards_override:
        moved_urls = expand_shards(shards_override)
        moved = dict(zip(shard_names(moved_urls), moved_urls))
        lost = sorted(set(urls) - set(moved))
        if lost and not missing_ok:
            raise CacheError(f"data.shards does not contain source shards {lost[:5]} named in the cache manifest")
        urls = {n: moved.get(n) for n in urls}
    return urls


def finalize_manifest(cache: Path) -> dict | None:
    """If every shard is recorded, merge their statistics into the manifest (idempotent; any rank may)."""
    manifest = read_manifest(cache)
    records = [read_record(cache, s["name"]) for s in manifest["shards"]]
    if any(r is None for r in records):
        return None
    stats = TokenStats()
    for r in records:
        stats.merge(TokenStats.from_dict(r["stats"]))
    manifest["stats"] = {"views": stats.td_count, "tokens": stats.count, "mean": stats.mean.tolist(),
                         "var": stats.var.tolist(), "token_diversity": stats.diversity}
    manifest["samples"] = sum(r["samples"] for r in records)
    manifest["skipped"] = sum(len(r["skipped"]) for r in records)
    write_json_atomic(Path(cache) / "manifest.json", manifest)
    return manifest
