"""Reading feature shards: one view of any samples, each checked against its crc32 in the index.

Reading one view of a sample reads that view's bytes only (plus, in zarr, the shard file's index, 16 B per sample of
the file, once per file and call), so an epoch reads ~1/V of the cache. Files are read with pread through a
per-process LRU of open descriptors, readahead off: the kernel reads what is asked, not the neighbouring samples
or views. A training process opens every file its loader workers will read once, before they fork (`hold_open`):
they inherit the descriptors, so a worker opens nothing, in any epoch. Local Zarr shards are read by our own
reader of the sharding codec (docs/FORMAT.md section 9: the shard index, then the chunk, each checked by its
crc32c): zarr-python's asynchronous machinery cost ~1 ms per (shard, call) there.
"""
from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numcodecs
import numpy as np

from common.codecs import view_crc32
from shards.errors import CacheError, CorruptSample, RefusedFile
from shards.index import ShardRecord, check_recorded, index_dtype, read_index, record_path, row_ok, shard_dir
from shards.manifest import Manifest
from shards.remote import RemoteError, is_url, read_ranges
from shards.trust import check_index_values
from shards.urlpath import as_path, zarr_store
from shards.writer import NO_CHUNK

_open_files: OrderedDict[str, int] = OrderedDict()
_sizes: dict[str, int] = {}  # each open file's size when opened: what pread clamps to (no fstat a read)
MAX_OPEN_FILES = 0  # per process, 0 = 3/4 of open_file_budget(): ImageNet's 1,282 x (V view files + a source)
_CRC32C = numcodecs.CRC32C()  # Zarr's crc32c codec: decode checks and strips the 4 checksum bytes
LEGACY_SHARD_SAMPLES = 256  # Zarr shard files written before: 256 samples of one view each (now: all N)


@functools.lru_cache(maxsize=1)
def open_file_budget() -> int:
    """Descriptors this process may use: the soft RLIMIT_NOFILE, first raised to the hard limit (at most
    262,144), since a random reader keeps every file it reads open (the LRUs of read descriptors and index maps:
    ImageNet's wds cache is ~15 k files per rank, its Zarr cache as many; ~54 k when its shard files held 256
    samples)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 1 << 18, 1 << 18)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(soft, 256)


def _fd(path: str) -> int:
    """The open descriptor of a file, through the per-process LRU (readahead off); OSError if it cannot be opened."""
    fd = _open_files.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            _sizes[path] = os.fstat(fd).st_size
        except OSError:
            os.close(fd)  # not left open outside the LRU
            raise
        while len(_open_files) >= open_files_held():
            old, old_fd = _open_files.popitem(last=False)
            os.close(old_fd)
            _sizes.pop(old, None)
    _open_files[path] = fd
    return fd


def open_files_held() -> int:
    """How many descriptors the LRU keeps (MAX_OPEN_FILES, or 3/4 of the budget: the rest is for index maps,
    1/8, and everything else)."""
    return MAX_OPEN_FILES or open_file_budget() * 3 // 4


def hold_open(paths) -> int:
    """Open local files into the LRU, as many as it keeps: a process that forks its loader workers afterwards
    hands them the descriptors (shared, position-free with pread). A file that is missing is skipped (a Zarr
    shard file never written); a process out of descriptors stops there. Returns the files held."""
    held = 0
    for path in paths:
        if held >= open_files_held():
            break
        if is_url(str(path)):
            continue
        try:
            _fd(str(path))
            held += 1
        except FileNotFoundError:
            continue
        except OSError:  # EMFILE and the like: the rest is opened lazily by whoever reads it
            break
    return held


def file_size(path) -> int:
    _fd(str(path))
    return _sizes[str(path)]  # as seen when the file was opened (pread reads no further)


def pread(path, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, through the per-process LRU of open files read without readahead (the kernel
    reads what is asked, not the neighbouring samples or views). A forked worker starts with the parent's
    descriptors, which pread shares safely (no file position)."""
    path = str(path)
    try:
        fd = _fd(path)
        size = max(0, min(size, _sizes[path] - offset))  # never past the (opened) end: a short read, not a huge buffer
        return os.pread(fd, size, offset)
    except OSError as e:  # a vanished file, an I/O error: name it (a CacheError, not a traceback)
        raise CacheError(f"{path}: {e.strerror or e} while reading {size} bytes at {offset}; check the file "
                         "system, then `img2vec verify` the cache") from None


def read_at(requests: list[tuple]) -> list[bytes]:
    """[(file or URL, offset, size)] -> their bytes: local files through pread, URLs through ranged reads
    (fetched concurrently, retried, never short; a RemoteError names a URL that keeps failing). Stage two
    reads every image and view at its recorded offset through here."""
    out = [b"" if is_url(str(f)) else pread(f, size, offset) for f, offset, size in requests]
    remote = [i for i, (f, _, _) in enumerate(requests) if is_url(str(f))]
    for i, data in zip(remote, read_ranges([(str(requests[i][0]), *requests[i][1:]) for i in remote])):
        out[i] = data
    return out



class FeatureShard:
    """Random access to one recorded feature shard: its index (memory-mapped), and one view of any samples.
    Cheap to open (training opens and drops many); `samples` is the recorded count, checked against the index."""

    def __init__(self, cache: Path, name: str, manifest: Manifest, record: ShardRecord | None = None):
        self.cache, self.name = as_path(cache), name
        record = record or check_recorded(cache, name)
        self.fmt, self.views = manifest.cache_format, manifest.views
        self.codec = manifest.token_codec
        self.tokens, self.channels = manifest.token_grid
        self.index = read_index(cache, name)
        if len(self.index) != record.samples:
            raise CacheError(f"cache {cache}: shard {name}: index holds {len(self.index)} samples, its record "
                             f"{record.samples}; run `img2vec verify`")
        self._check_index(record)
        self._array = None
        self._per_file = max(len(self.index), 1)  # zarr: samples per shard file, from zarr.json (_zarr_array)

    def _check_index(self, record: ShardRecord) -> None:
        """Every usable row points inside this shard's files (shards/trust.py): the view files' sizes come from the
        record, whose sizes were checked against the files (check_recorded)."""
        path = shard_dir(self.cache, self.name) / "index.npy"
        names = self.index.dtype.names or ()
        key_bytes = self.index.dtype["key"].itemsize if "key" in names else 0
        sizes = None
        if self.fmt == "wds":
            missing = [f"v{v:02d}.tar" for v in range(self.views) if f"v{v:02d}.tar" not in record.files]
            if missing:
                raise CacheError(f"{record_path(self.cache, self.name)} lists no {missing[0]}: the shard is not "
                                 "whole; run `img2vec verify`")
            sizes = [record.files[f"v{v:02d}.tar"].size for v in range(self.views)]
        check_index_values(self.index, index_dtype(self.views, key_bytes), self.fmt, sizes, path)

    def key(self, i: int) -> str:
        return self.index["key"][i].decode()

    def token_files(self) -> list[Path]:
        """The files read_views reads (wds: the view tars; zarr: the shard files, some of which may not exist; the
        array's metadata is opened and checked first, as reading needs it)."""
        root = shard_dir(self.cache, self.name)
        if self.fmt == "wds":
            return [root / f"v{v:02d}.tar" for v in range(self.views)]
        self._zarr_array()
        files = -(-len(self.index) // self._per_file)
        return [root / "tokens.zarr" / "tokens" / "c" / str(v) / str(k) / "0" / "0"
                for v in range(self.views) for k in range(files)]

    def read_views(self, ids, views, out: list[np.ndarray] | None = None) -> list[np.ndarray | CorruptSample]:
        """Packed arrays [T, C'] of view views[j] of sample ids[j] (decoded into out[j] when given: the loader's
        batch buffer), each checked against its crc32; a sample whose bytes are damaged comes back as a
        CorruptSample (the caller raises or skips it)."""
        ids, views = np.asarray(ids, np.int64), np.asarray(views, np.int64)
        res: list = [None] * len(ids)
        order = np.lexsort((ids, views))  # view file by view file, in file order: short seeks
        dest = [None if out is None else out[j] for j in order]
        read = self._read_wds if self.fmt == "wds" else self._read_zarr
        raw = read(ids[order], views[order], dest)
        for j, d, data in zip(order, dest, raw):
            i, v = int(ids[j]), int(views[j])
            if not isinstance(data, CorruptSample) and view_crc32(data) != self.index["crc"][i, v]:
                data = CorruptSample(self.name, self.key(i), f"view {v}: crc32 differs from the index")
            if d is not None and not isinstance(data, CorruptSample) and not np.may_share_memory(d, data):
                data = np.copyto(d, data) or d  # read elsewhere (zarr-python, for a cache at a URL)
            res[j] = data
        return res

    def _read_wds(self, ids, views, dest):
        ok = [row_ok(self.index[i]) for i in ids]  # a damaged row's offset and size are not trusted: read nothing
        root = shard_dir(self.cache, self.name)
        try:
            raw = iter(read_at([(root / f"v{v:02d}.tar", int(self.index["offset"][i, v]), int(self.index["nbytes"][i, v]))
                                for i, v, good in zip(ids, views, ok) if good]))
        except RemoteError as e:
            raise CacheError(f"cache {self.cache}: {e}") from None
        out = []
        for i, v, good, d in zip(ids, views, ok, dest):
            if not good:
                out.append(CorruptSample(self.name, self.key(i), f"index row {i}: crc32 differs"))
                continue
            size, data = int(self.index["nbytes"][i, v]), next(raw)
            try:
                if len(data) != size:
                    raise ValueError(f"v{v:02d}.tar ends {size - len(data)} bytes early")
                out.append(self.codec.decompress(data, self.tokens, self.channels, out=d))
            except Exception as e:  # noqa: BLE001 - any failure to decode stored bytes is corruption
                out.append(CorruptSample(self.name, self.key(i), f"view {v}: {type(e).__name__}: {e}"))
        return out

    def _zarr_array(self):
        """The Zarr array's metadata, checked once against the manifest and index: for a cache at a URL, the
        zarr-python array that reads it; locally its zarr.json, parsed here (chunks are read by _zarr_view: no
        zarr machinery, no thread)."""
        if self._array is None:
            root = shard_dir(self.cache, self.name) / "tokens.zarr"
            want = (root, self.views, len(self.index), self.codec.packed_spec(self.tokens, self.channels))
            if is_url(str(root)):  # zarr-python reads any shard files
                import zarr

                array = zarr.open_array(store=zarr_store(str(root)), path="tokens", mode="r")
                _check_layout((tuple(array.shape), tuple(array.chunks), array.dtype), *want)
                self._array = array
            else:
                layout, self._per_file = _local_layout(root, len(self.index))
                _check_layout(layout, *want)
                self._array = root
        return self._array

    def _read_zarr(self, ids, views, dest):
        root = shard_dir(self.cache, self.name) / "tokens.zarr"
        array = self._zarr_array()
        if not is_url(str(root)):
            indexes: dict = {}  # shard file -> its index, read once per call
            return [self._zarr_view(root / "tokens" / "c", int(i), int(v), d, indexes) for i, v, d in zip(ids, views, dest)]
        try:  # one call for the lot: zarr's per-call overhead is large; one shard index read per file
            return list(array.get_coordinate_selection((views, ids)))
        except Exception:  # noqa: BLE001 - find the damaged chunk(s) one by one
            out = []
            for i, v in zip(ids, views):
                try:
                    out.append(array[int(v), int(i)])
                except Exception as e:  # noqa: BLE001
                    out.append(CorruptSample(self.name, self.key(i), f"view {v}: {type(e).__name__}: {e}"))
            return out

    def _zarr_view(self, chunks: Path, i: int, v: int, dest, indexes: dict) -> np.ndarray | CorruptSample:
        """View v of sample i from its local Zarr shard file (docs/FORMAT.md section 9): the file's index (once per
        call, crc32c checked), then the chunk by one pread (crc32c checked), Blosc-decoded (into dest when given)."""
        path = chunks / str(v) / str(i // self._per_file) / "0" / "0"
        try:
            if path not in indexes:
                indexes[path] = _zarr_shard_index(path, self._per_file)
            entry = indexes[path]
            offset, nbytes = (NO_CHUNK, NO_CHUNK) if entry is None else (int(x) for x in entry[i % self._per_file])
            if offset == NO_CHUNK:  # never stored: the fill value
                shape, dtype = self.codec.packed_spec(self.tokens, self.channels)
                out = np.zeros(shape, dtype) if dest is None else dest
                out[...] = 0
                return out
            stored = _CRC32C.decode(pread(path, nbytes, offset))
            return self.codec.decompress(stored, self.tokens, self.channels, out=dest)
        except CacheError:  # the file system, not the bytes
            raise
        except Exception as e:  # noqa: BLE001 - any failure to decode stored bytes is corruption
            return CorruptSample(self.name, self.key(i), f"view {v}: {type(e).__name__}: {e}")

    def close(self) -> None:
        self._array = None


def _zarr_shard_index(path: Path, per_file: int) -> np.ndarray | None:
    """The (offset, nbytes) entries [per_file, 2] of a Zarr shard file, checked by their crc32c; None for a file
    never written (it held no stored chunk)."""
    try:
        size = file_size(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"{path}: {e.strerror or e}; check the file system, then `img2vec verify` the cache") from None
    n = 16 * per_file + 4
    if size < n:
        raise ValueError(f"{size} bytes, shorter than a shard index")
    return np.frombuffer(_CRC32C.decode(pread(path, n, size - n)), "<u8").reshape(per_file, 2)


def _check_layout(layout: tuple, root, views: int, samples: int, spec) -> None:
    """The Zarr array's (shape, chunks, dtype) as the manifest and index describe it ([V, N, T, C'], one (view,
    sample) per chunk, the codec's dtype): its own metadata is the cache's, and a chunk shape believed unchecked
    sizes every read."""
    (t, c), dtype = spec
    want = ((views, samples, t, c), (1, 1, t, c), np.dtype(dtype))
    shape, chunks, got = layout
    if (shape, chunks, got) != want:
        raise RefusedFile(f"{root}: array tokens is {shape} {got} in chunks {chunks}; "
                          f"the manifest and index say {want[0]} {want[2]} in chunks {want[1]}: refused")


def _local_layout(root: Path, samples: int) -> tuple[tuple, int]:
    """((shape, inner chunk shape, dtype), samples per shard file) from a local tokens.zarr/tokens/zarr.json, which
    must describe the shard files docs/FORMAT.md section 9 does: one view of all N samples each (or of 256, as
    written before), the shard index at the end."""
    path = root / "tokens" / "zarr.json"
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read(1 << 20))  # bounded: a metadata file is a few KiB
        (codec,) = meta["codecs"]
        shards, conf = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]), codec["configuration"]
        layout = (tuple(meta["shape"]), tuple(conf["chunk_shape"]), np.dtype(meta["data_type"]))
    except OSError as e:
        raise CacheError(f"{path}: {e.strerror or e}; run `img2vec verify` on the cache") from None
    except (ValueError, KeyError, TypeError) as e:
        raise RefusedFile(f"{path}: not the Zarr metadata docs/FORMAT.md describes ({type(e).__name__}: {e}): refused") from None
    per_file = shards[1] if len(shards) == 4 else -1
    if codec.get("name") != "sharding_indexed" or per_file not in (max(samples, 1), LEGACY_SHARD_SAMPLES) \
            or shards != (1, per_file, *layout[1][2:]) or conf.get("index_location") != "end":
        raise RefusedFile(f"{path}: shard files of {shards} with the index at {conf.get('index_location')!r}, not the "
                          f"layout docs/FORMAT.md describes ([1, N = {samples}, T, C'] or, written before, "
                          f"[1, {LEGACY_SHARD_SAMPLES}, T, C'], index at the end): refused")
    return layout, per_file


def iter_feature_shard(cache: Path, name: str, manifest: Manifest) -> Iterator[dict]:
    """Every sample of a recorded shard with ALL its views (tools and tests; training reads one view):
    {"key", "cls", "views" [V, 5], "src_hw", "packed" [V, T, C']}. Raises CorruptSample on a damaged view."""
    shard = FeatureShard(cache, name, manifest)
    views = manifest.views
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
