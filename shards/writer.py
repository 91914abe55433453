"""Writing one feature shard (cache format 2): the V view files (wds tars or one Zarr array), the index, the record.

    <name>/v00.tar ... vNN.tar (wds) one tar per view: member `<key>.tokens` = one compressed packed view
    <name>/tokens.zarr         (zarr) array "tokens" [V, N, T, C'], one inner chunk per (view, sample), Zarr v3
                               sharding codec with all N samples of one view per shard file (V files, as the
                               tars); its attributes name the codec and the layout (`zarr_attributes`)

Both are streamed: each view is compressed as its sample arrives and appended to its view's file, so a writer
holds one batch, not a shard. A Zarr shard file gets its index (docs/FORMAT.md section 9) at the commit, and the
array's metadata then, with the final shape; its bytes are those zarr-python writes for the same array
(tests/test_extract.py). The shard is written under `<name>.tmp-<unique>/`, fsynced and renamed to `<name>/` in
one step; only then is its completion record written.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tarfile
import zlib
from array import array
from pathlib import Path

import numcodecs
import numpy as np

from common.codecs import FORMAT_VERSION, TokenCodec, view_crc32
from common.faults import fault_point
from common.files import fsync_dir, fsync_tree, unique_suffix, write_json_atomic
from common.stats import TokenStats
from shards.errors import CacheError
from shards.index import RecordedFile, ShardRecord, index_dtype, record_path, shard_dir, tree_files

NO_CHUNK = 2**64 - 1  # a Zarr shard index entry of a chunk not stored (all fill value, zeros)
_CRC32C = numcodecs.CRC32C()  # Zarr's crc32c codec: appends the 4 checksum bytes (little-endian)


class ShardTaken(CacheError):
    """The shard's directory was there when ours was renamed into place: another job wrote it meanwhile."""

    def __init__(self, name: str):
        super().__init__(f"shard {name}: another job wrote it meanwhile; this job's copy is dropped")
        self.name = name


ZARR_LAYOUT = "[view, sample, token, packed channel]"


def zarr_attributes(codec: TokenCodec, tokens: int, channels: int) -> dict:
    """What a reader needs beyond the array's shape and dtype: the packed channels C' mean nothing without
    the codec (docs/FORMAT.md gives its bytes); tokens x channels is the decoded view [T, C]."""
    return {"img2vec": {"codec": codec.name, "layout": ZARR_LAYOUT, "format_version": FORMAT_VERSION,
                        "tokens": tokens, "channels": channels}}


def zarr_file(v: int) -> str:
    """View v's shard file in a shard directory (all its samples: chunk key c/<v>/0/0/0)."""
    return f"tokens.zarr/tokens/c/{v}/0/0/0"


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
        # wds: the tars; zarr: the shard files, streamed here and moved into tokens.zarr at the commit
        self._names = [f"v{v:02d}.tar" if fmt == "wds" else f"v{v:02d}.zarr-shard" for v in range(views)]
        self._files = [open(self.tmp / n, "wb") for n in self._names]
        self._hashes = [hashlib.sha256() for _ in range(views)]
        self._sizes = [0] * views
        self._chunks = [array("Q") for _ in range(views)]  # zarr: (offset, nbytes) of each sample's chunk, per view

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
        append = self._append if self.fmt == "wds" else self._append_chunks
        # the V files are appended in parallel, each in sample order: [V][b] (offset, size)
        placed = list((pool.map if pool else map)(lambda v: append(v, keys, blobs[v::self.views]), range(self.views)))
        for i, key in enumerate(keys):
            offsets, sizes = [p[i][0] for p in placed], [p[i][1] for p in placed]
            cls = clss[i]
            self.rows.append((key.encode(), -1 if cls is None else int(cls), srcs[i]["offset"], srcs[i]["size"],
                              srcs[i]["crc"], int(hws[i][0]), int(hws[i][1]), np.asarray(views[i], np.int32), offsets,
                              sizes, crcs[i * self.views:(i + 1) * self.views]))

    def _compress(self, packed: np.ndarray):
        """views [n, T, C'] -> (stored bytes per view, crc32 per view). wds: the compressed view; zarr: the inner
        chunk zarr-python writes (the same bytes + their crc32c), None for a view of zero bytes, which zarr-python
        does not store (its fill value, 0; it compares bit patterns, so a -0.0 is stored, as here)."""
        if self.fmt == "wds":
            blobs = [self.codec.compress(p) for p in packed]
        else:
            blobs = [bytes(_CRC32C.encode(self.codec.compress(p))) if np.ascontiguousarray(p).view(np.uint8).any()
                     else None for p in packed]
        return blobs, [view_crc32(p) for p in packed]

    def _append(self, v: int, keys: list[str], blobs: list[bytes]) -> list[tuple[int, int]]:
        """Append one member per sample to view v's tar: [(data offset, size)]."""
        placed = []
        for key, data in zip(keys, blobs):
            header = _tar_header(f"{key}.tokens", len(data))
            placed.append((self._sizes[v] + len(header), len(data)))
            self._write(v, header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        return placed

    def _append_chunks(self, v: int, keys: list[str], blobs: list[bytes | None]) -> list[tuple[int, int]]:
        """Append each sample's inner chunk to view v's Zarr shard file, its place to the file's index (an unstored
        chunk: NO_CHUNK). Returns the index.npy offsets and sizes: 0 in zarr."""
        for data in blobs:
            self._chunks[v].extend((NO_CHUNK, NO_CHUNK) if data is None else (self._sizes[v], len(data)))
            if data is not None:
                self._write(v, data)
        return [(0, 0)] * len(keys)

    def _write(self, v: int, data: bytes) -> None:
        """Append to view v's file, hashing as it goes: commit records the sha256 without reading the file back."""
        self._files[v].write(data)
        self._hashes[v].update(data)
        self._sizes[v] += len(data)

    def _close(self) -> None:
        """wds: each tar's end-of-archive marker. zarr: each shard file's index and its crc32c; a file of no stored
        chunk is dropped (Zarr writes none); then the array's metadata, and the files moved under it."""
        for v, f in enumerate(self._files):
            if f.closed:
                continue
            if self.fmt == "wds":
                self._write(v, b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
            elif self._sizes[v]:  # a stored chunk: the index (offset, nbytes uint64 little-endian) + its crc32c
                self._write(v, bytes(_CRC32C.encode(np.frombuffer(self._chunks[v], np.uint64).astype("<u8").tobytes())))
            f.close()
        if self.fmt == "zarr" and not (self.tmp / "tokens.zarr").exists():
            self._place_zarr()

    def _place_zarr(self) -> None:
        """tokens.zarr's metadata as zarr-python writes it (shape [V, N, T, C'], shard files [1, N, T, C']), and
        the streamed shard files moved to their keys c/<v>/0/0/0."""
        import zarr
        from zarr.codecs import BloscCodec, Crc32cCodec

        (t, c), dtype = self.codec.packed_spec(self.tokens, self.channels)
        comp, n = self.codec.blosc(), len(self.rows)
        shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}
        compressors = [Crc32cCodec()]  # checked by zarr on every read of a chunk
        if comp is not None:
            compressors.insert(0, BloscCodec(cname=comp.cname, clevel=comp.clevel, shuffle=shuffle[comp.shuffle],
                                             blocksize=comp.blocksize))
        group = zarr.open_group(str(self.tmp / "tokens.zarr"), mode="w", zarr_format=3)
        group.create_array("tokens", shape=(self.views, n, t, c), chunks=(1, 1, t, c), shards=(1, max(n, 1), t, c),
                           dtype=dtype, fill_value=0, compressors=compressors,
                           dimension_names=("view", "sample", "token", "packed_channel"),
                           attributes=zarr_attributes(self.codec, self.tokens, self.channels))
        for v, name in enumerate(self._names):
            if self._sizes[v]:
                (self.tmp / zarr_file(v)).parent.mkdir(parents=True)
                os.replace(self.tmp / name, self.tmp / zarr_file(v))
            else:
                (self.tmp / name).unlink()

    def commit(self, skipped: list[dict], source: str, stats: TokenStats, seekable: bool,
               source_size: int | None = None) -> ShardRecord:
        """Index, fsync, rename into place, then the completion record. A ShardTaken if another job took the shard
        over meanwhile: its copy got there first, or it removed our temporary (ours is dropped)."""
        try:
            self._close()
            dtype = index_dtype(self.views, max((len(r[0]) for r in self.rows), default=1))
            index = np.array([(*r, 0) for r in self.rows], dtype=dtype)
            for row in index:
                row["row_crc"] = zlib.crc32(row.tobytes()[:-4])
            np.save(self.tmp / "index.npy", index, allow_pickle=False)
            fsync_tree(self.tmp)
            os.replace(self.tmp, self.final)  # one rename: the shard directory appears whole or not at all
        except OSError as e:
            self.taken(e)
            raise
        fsync_dir(self.cache)
        fault_point("commit", self.name)
        files = {rel: RecordedFile(**meta) for rel, meta in tree_files(self.final, self._known()).items()}
        record = ShardRecord(shard=self.name, source=source, format=self.fmt, format_version=FORMAT_VERSION,
                             samples=len(self.rows), skipped=skipped, seekable=seekable, source_size=source_size,
                             files=files, stats=stats.to_dict())
        write_json_atomic(record_path(self.cache, self.name), record.to_dict())
        return record

    def _known(self) -> dict[str, dict]:
        """The view files' sizes and sha256, as written (the index and Zarr's metadata are hashed from disk)."""
        names = self._names if self.fmt == "wds" else [zarr_file(v) for v in range(self.views)]
        return {n: {"size": self._sizes[v], "sha256": h.hexdigest()} for v, (n, h) in enumerate(zip(names, self._hashes))}

    def taken(self, e: OSError) -> None:
        """A ShardTaken if `e` means another job took the shard over (our temporary is gone, or the shard is in place
        before ours): it found our lease silent for its ttl (this process paused, or cut off) and redid the shard."""
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) or not self.tmp.exists():
            self.abort()
            raise ShardTaken(self.name) from None

    def abort(self) -> None:
        for f in self._files:
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
