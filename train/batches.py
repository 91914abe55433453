"""One batch of stage two, in a DataLoader worker: its samples' image bytes and this epoch's view of their tokens
read, checked and decoded, then the batch made (train/data.py plans the batches and runs the workers).

- `read_batch` (random access: image bytes at their recorded offsets) / `stream_batches` (source shards read in
  order): the samples of a batch, and their tokens decoded by the reader straight into the batch's token buffer.
- `decode`: check the image bytes against the recorded crc32, decode, check the size, replay the recorded view.
- `decode_batch`: the batch `{"images": uint8 [B, 3, S, S], "tokens": [B, T, C'] as stored or None, "keys"}`; a
  corrupt sample is raised, or (on_corrupt = "skip") named and its place taken by another sample of the batch.

A batch's tensors are made in shared memory inside a worker (as torch's default_collate makes its own), so handing
them to the main process copies nothing, and the tokens are decompressed into theirs: one write per byte.
Each sample trains on one recorded view per epoch, `view_order(seed, key, V)[epoch % V]`.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import get_worker_info

from common.augment import decode_image, replay, view_order
from shards.errors import CacheError, CorruptSample
from shards.index import row_ok
from shards.reader import read_at
from shards.remote import RemoteError
from shards.source import ShardError, iter_samples

if TYPE_CHECKING:
    from train.data import CacheIndex

BITS = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.int16, np.dtype(np.float32): torch.float32}


def shared_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory: the batch then reaches the main process
    without the copy into shared memory that sending it would make."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    return empty.new(empty._typed_storage()._new_shared(math.prod(shape), device="cpu")).view(shape)


# ---------------------------------------------------------------- reading

def sample_view(index: CacheIndex, key: str, epoch: int, seed: int) -> int:
    return int(view_order(seed, key, index.views)[epoch % index.views])


def _sample(index: CacheIndex, s: int, row: int, image: bytes | None, view: int, packed) -> dict:
    meta = index.shard(s).index[row]
    if not row_ok(meta):
        packed = CorruptSample(index.names[s], meta["key"].decode(errors="replace"), f"index row {row}: crc32 "
                               "differs (crop box, offsets or key damaged)")
    return {"key": meta["key"].decode(), "shard": index.names[s], "image": image, "view": view,
            "record": np.array(meta["views"][view]), "hw": (int(meta["height"]), int(meta["width"])),
            "src_crc": int(meta["src_crc"]), "packed": packed}


def _tokens(index: CacheIndex, shards, rows, views) -> tuple[list, torch.Tensor]:
    """Each sample's view of the tokens, read shard by shard into the batch's buffer: (per sample its row of the
    buffer or a CorruptSample, the buffer: a tensor of the packed bits [B, T, C'])."""
    codec = index.manifest.token_codec
    shape, dtype = codec.packed_spec(*index.manifest.token_grid)
    bits = shared_empty((len(rows), *shape), BITS[np.dtype(dtype)])
    buffer = bits.numpy().view(dtype)
    packed: list = [None] * len(rows)
    for s in np.unique(shards):
        at = np.flatnonzero(shards == s)
        read = index.shard(int(s)).read_views(rows[at], [views[j] for j in at], out=[buffer[j] for j in at])
        for j, p in zip(at, read):
            packed[j] = p
    return packed, bits


def read_batch(index: CacheIndex, ids: np.ndarray, epoch: int, seed: int,
               with_tokens: bool) -> tuple[list[dict], torch.Tensor | None]:
    """Random access: each sample's image bytes read at their recorded place, and its view's tokens."""
    shards, rows = index.locate(np.asarray(ids))
    images = [b""] * len(rows)  # a row that fails its own crc32 is not used to read anything
    at, requests = [], []
    for j in np.lexsort((rows, shards)):  # in file order
        meta = index.shard(int(shards[j])).index[int(rows[j])]
        if row_ok(meta):
            at.append(j)
            requests.append((index.urls[index.names[int(shards[j])]], int(meta["src_offset"]), int(meta["src_size"])))
    for j, data in zip(at, read_sources(requests)):
        images[j] = data
    return _samples(index, shards, rows, images, epoch, seed, with_tokens)


def read_sources(requests: list[tuple[str, int, int]]) -> list[bytes]:
    """[(source, offset, size)] -> their bytes (shards.reader.read_at: pread, or a batch's ranged reads at URLs,
    concurrent and retried); a source URL that keeps failing is a ShardError naming it."""
    try:
        return read_at(requests)
    except RemoteError as e:
        raise ShardError(e.url, e.reason) from None


def stream_batches(index: CacheIndex, batches: np.ndarray, epoch: int, seed: int, with_tokens: bool,
                   order: np.ndarray) -> Iterator[tuple[list[dict], torch.Tensor | None]]:
    """Streaming: read the source shards that hold these batches' samples, in `order` (the epoch's shard order),
    keep the samples the batches need (at most a shuffle buffer's worth waits), and emit each batch once it is
    complete."""
    ids = np.unique(batches)
    shard_of = index.locate(ids)[0]
    needed = set(shard_of.tolist())  # the shards that hold these batches' samples
    ready: dict[int, tuple] = {}
    b = 0
    for s in (int(x) for x in order if int(x) in needed):
        fs, base = index.shard(s), int(index.starts[s])
        want = {int(i) - base for i in ids[shard_of == s]}  # rows of this shard the batches need
        keys = {fs.key(r): r for r in want}
        url = index.urls[index.names[s]]
        for src in iter_samples(url):
            r = keys.pop(src["key"], None)
            if r is None or src["duplicate"]:
                continue
            ready[base + r] = (s, r, src["image"])
            while b < len(batches) and all(int(i) in ready for i in batches[b]):
                in_shard, in_row, images = zip(*(ready.pop(int(i)) for i in batches[b]))
                yield _samples(index, in_shard, in_row, images, epoch, seed, with_tokens)
                b += 1
            if not keys:
                break  # every sample this worker needs from the shard is in: read no further
        if keys:  # at once, not after buffering the rest of the run
            raise ShardError(url, f"samples {sorted(keys)[:3]} recorded at extraction are not in the shard any "
                                  "more (the source changed: restore it or re-extract the shard)")


def _samples(index: CacheIndex, shards, rows, images, epoch: int, seed: int,
             with_tokens: bool) -> tuple[list[dict], torch.Tensor | None]:
    """A batch's (shard, row) pairs with their image bytes -> (samples with this epoch's view, the token buffer)."""
    shards, rows = np.asarray(shards), np.asarray(rows)
    keys = [index.shard(int(s)).key(int(r)) for s, r in zip(shards, rows)]
    views = [sample_view(index, k, epoch, seed) for k in keys]
    packed, bits = _tokens(index, shards, rows, views) if with_tokens else ([None] * len(rows), None)
    return [_sample(index, int(s), int(r), img, views[j], packed[j])
            for j, (s, r, img) in enumerate(zip(shards, rows, images))], bits


# ---------------------------------------------------------------- decode and replay

def decode(sample: dict, size: int, cut: str) -> tuple[str, torch.Tensor]:
    """A read sample -> (key, replayed view uint8 [3, S, S]); raises CorruptSample when the source bytes or the
    tokens are not what extraction recorded."""
    key, shard = sample["key"], sample["shard"]
    if isinstance(sample["packed"], CorruptSample):
        raise sample["packed"]
    image = sample["image"]
    if zlib.crc32(image) != sample["src_crc"]:
        raise CorruptSample(shard, key, "image bytes differ from those extracted (crc32); replaced, re-encoded or "
                                        "truncated source", what="source shard")
    try:
        img = decode_image(image)
    except Exception as e:  # noqa: BLE001
        raise CorruptSample(shard, key, f"image no longer decodes: {type(e).__name__}", what="source shard") from None
    if (img.height, img.width) != sample["hw"]:
        raise CorruptSample(shard, key, f"decoded size {img.height}x{img.width}, extraction saw "
                                        f"{sample['hw'][0]}x{sample['hw'][1]}", what="source shard")
    return key, replay(img, sample["record"], size, cut)


def decode_batch(samples: list[dict], bits: torch.Tensor | None, size: int, codec, cut: str,
                 on_corrupt: str = "error") -> dict:
    """Decode a batch; with on_corrupt = "skip", a corrupt sample is named and its place taken by another sample
    of the batch, so every step keeps its batch size (and every rank its step count)."""
    good, bad = [], []
    for j, sample in enumerate(samples):
        try:
            good.append((j, *decode(sample, size, cut)))
        except CorruptSample as e:
            if on_corrupt == "error":
                raise
            print(f"warning: skipping: {e}", flush=True)
            bad.append(e)
    if not good:
        raise CacheError(f"every sample of a batch is corrupt (first: {bad[0]}); run `img2vec verify`")
    entries = good + [good[i % len(good)] for i in range(len(bad))]
    images = shared_empty((len(entries), *entries[0][2].shape), torch.uint8)
    torch.stack([e[2] for e in entries], out=images)
    if bits is not None and bad:  # the good samples' tokens first, then those of the stand-ins
        bits.copy_(bits[torch.tensor([e[0] for e in entries])])
    return {"images": images, "tokens": None if bits is None else codec.as_loaded(bits), "keys": [e[1] for e in entries]}
