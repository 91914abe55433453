#!/usr/bin/env python3
"""Read one view of an img2vec feature cache (format 2) with stock packages only: numpy, numcodecs, json, tarfile.

    python docs/read_cache.py CACHE SHARD KEY VIEW OUT.npy

writes the teacher tokens of view VIEW of sample KEY of feature shard SHARD as float32 [T, C] (np.save).
Every step follows docs/FORMAT.md (section numbers below), and nothing of the img2vec package is imported:
this file is the proof that the format can be read from its description. Both storage formats (wds tars,
Zarr v3 shards, the latter parsed byte by byte) and every codec are read; the index row's crc32, the view's
crc32 and, in Zarr, the crc32c of the chunk and of the shard index are checked. Exit status 1 with a
message on any problem (a missing key, a damaged row or view, an unknown codec).
"""
from __future__ import annotations

import json
import sys
import tarfile
import zlib
from pathlib import Path

import numcodecs
import numpy as np

FORMAT_VERSION = 2
# codec name -> (packed kind, Blosc-compressed): FORMAT.md section 6
CODECS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-zstd": ("bf16", True),
          "bf16-lz4": ("bf16", True), "bf16z-zstd": ("bf16z", True), "u8-zstd": ("u8", True),
          "u8lin-zstd": ("u8", True)}
NO_CHUNK = 2 ** 64 - 1  # a Zarr shard index entry of an inner chunk that was never written (all fill value)


class FormatError(Exception):
    """The cache cannot give this view; the message says why."""


def packed_spec(kind: str, tokens: int, channels: int) -> tuple[tuple[int, int], np.dtype]:
    """Shape and dtype of one stored (packed) view: FORMAT.md section 6."""
    if kind == "fp32":
        return (tokens, channels), np.dtype("<f4")
    if kind == "bf16":
        return (tokens, channels), np.dtype("<u2")
    if kind == "bf16z":
        return (tokens, 2 * channels + (channels + 7) // 8), np.dtype("u1")
    return (tokens, channels + 8), np.dtype("u1")  # u8, u8lin: q and 8 trailing bytes per token


def decode(kind: str, packed: np.ndarray, channels: int) -> np.ndarray:
    """packed [T, C'] -> tokens [T, C] float32."""
    if kind == "fp32":
        return packed.astype(np.float32)
    if kind == "bf16":
        return (packed.astype(np.uint32) << 16).view(np.float32)  # bf16 is the high half of an fp32
    if kind == "bf16z":
        return (unpack_zero_bitmap(packed, channels).astype(np.uint32) << 16).view(np.float32)
    q = packed[:, :channels].astype(np.float32)
    side = np.ascontiguousarray(packed[:, channels:]).view("<f4")  # [T, 2]: lo, scale
    lo, scale = side[:, 0:1], side[:, 1:2]
    y = q * np.abs(scale) + lo
    return np.where(scale < 0, y * np.abs(y), y).astype(np.float32)  # scale < 0: square-root companded token


def unpack_zero_bitmap(packed: np.ndarray, channels: int) -> np.ndarray:
    """The bf16z layout over the whole view, [bitmap | high bytes | low bytes | zeros] -> bf16 bits [T, C] uint16."""
    t, c, b = packed.shape[0], channels, (channels + 7) // 8
    flat = packed.reshape(-1)
    nonzero = np.unpackbits(flat[:t * b].reshape(t, b), axis=1)[:, :c].reshape(-1).astype(bool)  # MSB first
    n = int(nonzero.sum())
    hi, lo = flat[t * b:t * b + n].astype(np.uint16), flat[t * b + n:t * b + 2 * n].astype(np.uint16)
    if flat[t * b + 2 * n:].any():
        raise FormatError("bf16z view: bytes after the two planes of nonzero values are not zero")
    bits = np.zeros(t * c, np.uint16)
    bits[nonzero] = (hi << 8) | lo
    return bits.reshape(t, c)


def find_row(cache: Path, shard: str, key: str) -> tuple[int, np.void]:
    """(row number, row) of the sample in <shard>/index.npy, its row_crc checked: FORMAT.md section 4."""
    record_path = cache / f"{shard}.done.json"
    if not record_path.exists():
        raise FormatError(f"{record_path} not found: shard {shard!r} is not in the cache or not complete")
    record = json.loads(record_path.read_text())
    index = np.load(cache / shard / "index.npy", mmap_mode="r", allow_pickle=False)
    hits = np.flatnonzero(index["key"] == key.encode())
    if len(hits) == 0:
        why = next((s["reason"] for s in record.get("skipped", []) if s["key"] == key), None)
        raise FormatError(f"shard {shard!r} has no sample {key!r}" + (f" (skipped at extraction: {why})" if why
                          else f" ({len(index)} samples, e.g. {index['key'][0].decode()!r})" if len(index) else ""))
    row = index[hits[0]]
    if zlib.crc32(row.tobytes()[:-4]) != int(row["row_crc"]):
        raise FormatError(f"shard {shard!r}: index row {hits[0]} ({key!r}) fails its crc32: the row is damaged")
    return int(hits[0]), row


def read_wds(cache: Path, shard: str, key: str, row: np.void, view: int, compressed: bool) -> bytes:
    """The view's member of v<VV>.tar, found at the index's data offset: FORMAT.md section 8."""
    offset, size = int(row["offset"][view]), int(row["nbytes"][view])
    with open(cache / shard / f"v{view:02d}.tar", "rb") as f:
        f.seek(offset - tarfile.BLOCKSIZE)
        header, data = f.read(tarfile.BLOCKSIZE), f.read(size)
    info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    name = f"{key}.tokens"
    if info.size != size or (len(name.encode()) < 100 and info.name != name) or len(data) != size:
        raise FormatError(f"v{view:02d}.tar: no member {name!r} of {size} bytes at data offset {offset}")
    return blosc_decode(data, f"v{view:02d}.tar member {name!r}") if compressed else data


def read_zarr(cache: Path, shard: str, row_id: int, view: int, spec, codec: str) -> bytes:
    """Inner chunk (view, sample) of tokens.zarr/tokens, read through its shard file's index: FORMAT.md section 9."""
    root = cache / shard / "tokens.zarr" / "tokens"
    meta = json.loads((root / "zarr.json").read_text())
    named = meta.get("attributes", {}).get("img2vec", {}).get("codec", codec)  # absent in older caches
    if named != codec:
        raise FormatError(f"{root}/zarr.json names codec {named!r}, the manifest {codec!r}")
    sharding = meta["codecs"][0]
    if sharding["name"] != "sharding_indexed" or sharding["configuration"]["index_location"] != "end":
        raise FormatError(f"{root}/zarr.json: expected one sharding_indexed codec with its index at the end")
    per_file = meta["chunk_grid"]["configuration"]["chunk_shape"][1]
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    path = root / sep.join(["c", str(view), str(row_id // per_file), "0", "0"])
    if not path.exists():
        return b"\0" * int(np.prod(spec[0]) * spec[1].itemsize)  # a shard file never written: all fill value (0)
    with open(path, "rb") as f:
        f.seek(-(16 * per_file + 4), 2)
        index = check_crc32c(f.read(16 * per_file + 4), f"{path} (shard index)")
        offset, nbytes = np.frombuffer(index, "<u8").reshape(per_file, 2)[row_id % per_file]
        if offset == NO_CHUNK:  # an all-zero chunk is not stored
            return b"\0" * int(np.prod(spec[0]) * spec[1].itemsize)
        f.seek(int(offset))
        chunk = f.read(int(nbytes))
    if "crc32c" in inner:
        chunk = check_crc32c(chunk, f"{path} (chunk of sample {row_id})")
    return blosc_decode(chunk, f"{path} (chunk of sample {row_id})") if "blosc" in inner else chunk


def blosc_decode(data: bytes, what: str) -> bytes:
    """One Blosc(1) frame -> its bytes; the 16-byte header names the compressor, shuffle and type size."""
    try:
        return bytes(numcodecs.Blosc().decode(data))
    except Exception as e:  # noqa: BLE001 - damaged stored bytes
        raise FormatError(f"{what}: not a valid Blosc frame ({e})") from None


def check_crc32c(data: bytes, what: str) -> bytes:
    """data = payload + crc32c(payload) as 4 little-endian bytes -> payload."""
    try:
        return bytes(numcodecs.CRC32C().decode(data))
    except Exception as e:  # noqa: BLE001 - a mismatch or a short buffer
        raise FormatError(f"{what}: crc32c check failed ({e})") from None


def read_view(cache, shard: str, key: str, view: int) -> np.ndarray:
    """Tokens [T, C] float32 of one view: FORMAT.md section 11."""
    cache = Path(cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{cache}: format {manifest.get('format_version')}, this reader reads {FORMAT_VERSION}")
    codec, views = manifest["codec"]["name"], manifest["augment"]["views"]
    tokens, channels = manifest["token_shape"]
    if codec not in CODECS:
        raise FormatError(f"unknown codec {codec!r}")
    if not 0 <= view < views:
        raise FormatError(f"view {view} out of range: the cache holds {views} views per sample")
    kind, compressed = CODECS[codec]
    spec = packed_spec(kind, tokens, channels)
    row_id, row = find_row(cache, shard, key)
    if manifest["cache_format"] == "wds":
        raw = read_wds(cache, shard, key, row, view, compressed)
    else:
        raw = read_zarr(cache, shard, row_id, view, spec, codec)
    if len(raw) != np.prod(spec[0]) * spec[1].itemsize:
        raise FormatError(f"view {view} of {key!r}: {len(raw)} bytes, a packed view has "
                          f"{np.prod(spec[0]) * spec[1].itemsize}")
    if zlib.crc32(raw) != int(row["crc"][view]):
        raise FormatError(f"view {view} of {key!r}: crc32 differs from the index (damaged view)")
    return decode(kind, np.frombuffer(raw, spec[1]).reshape(spec[0]), channels)


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: python docs/read_cache.py CACHE SHARD KEY VIEW OUT.npy", file=sys.stderr)
        return 2
    cache, shard, key, view, out = argv
    try:
        tokens = read_view(cache, shard, key, int(view))
    except (FormatError, OSError, ValueError, KeyError) as e:
        print(f"read_cache: {type(e).__name__ + ': ' if not isinstance(e, FormatError) else ''}{e}", file=sys.stderr)
        return 1
    np.save(out, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
