"""Stage-two data, as small stages: sample index -> epoch plan -> per-worker reader -> decode/replay -> batch.

- `CacheIndex`: every recorded sample of a cache, numbered 0..N-1 shard by shard in manifest order.
- `epoch_plan`: this rank's batches of one epoch, [steps, B] global sample ids, in the order the
  DataLoader yields them. Every rank gets the same number of steps; less than one global batch is
  dropped; no sample is used twice. "random" mode (uncompressed tars, local or at URLs read by byte
  ranges): a permutation of all samples seeded by (seed, epoch), i.i.d. batches. "stream" mode (`pipe:`,
  compressed sources, servers without ranged reads):
  shards in a seeded order, cut into contiguous runs per (rank, worker), shuffled by a seeded buffer.
- `read_batch` / `stream_batches`: the samples of a batch, their image bytes (read at their recorded
  offsets, or streamed) checked against the recorded crc32, and this epoch's view of their tokens.
- `decode`: decode the image, check its size, replay the recorded view exactly, decode the tokens.
- `EpochData`: worker w of W yields batches start+w, start+w+W, ...; the DataLoader takes workers in
  turn, so batches come in plan order, and a resume at batch `start` continues the same sequence.

Each sample trains on one recorded view per epoch, `view_order(seed, key, V)[epoch % V]`.
"""
from __future__ import annotations

import hashlib
import random
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.augment import decode_image, replay, view_order
from common.runtime import seed_from, worker_slice
from common.signals import dead_workers, ignore_stop_signals, watch_workers
from shards.errors import CacheError, CorruptSample
from shards.index import check_recorded, read_record, row_ok
from shards.manifest import Manifest
from shards.reader import FeatureShard, open_file_budget, read_at
from shards.remote import RemoteError
from shards.source import ShardError, is_seekable, iter_samples
from shards.urlpath import as_path


# ---------------------------------------------------------------- the sample index

class CacheIndex:
    """The samples of a complete cache: global id -> (shard, row of its index). Shards are opened lazily and
    at most `open_shards` at a time (an index is memory-mapped: the node's processes share its pages, and
    ImageNet's 1,282 maps, one descriptor each, would pass a process's open-file limit)."""

    def __init__(self, cache: Path, manifest: Manifest, urls: dict[str, str | None], open_shards: int | None = None):
        self.cache, self.manifest, self.urls = as_path(cache), manifest, urls
        self.names = manifest.shard_names
        records = {name: read_record(cache, name) for name in self.names}  # each read once
        missing = [name for name, record in records.items() if record is None]
        if missing:
            raise CacheError(f"cache {cache} is incomplete: {len(missing)} of {len(self.names)} shards have no "
                             f"completion record ({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); "
                             "finish it with extract-features (same config) before training")
        recorded = [check_recorded(cache, n, records[n]) for n in self.names]
        # what opening a shard checks its index against: samples and the top-level files' sizes (kept small: the
        # index travels to every DataLoader worker)
        self.records = [{"samples": r["samples"], "files": {f: m for f, m in r["files"].items() if "/" not in f}}
                        for r in recorded]
        self.counts = np.array([r["samples"] for r in recorded], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.views = manifest.views
        self.open_shards = open_shards or open_file_budget() // 4
        self._shards: OrderedDict[int, FeatureShard] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """global ids -> (shard number, row in that shard's index)."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        return shard, ids - self.starts[shard]

    def shard(self, s: int) -> FeatureShard:
        shard = self._shards.pop(s, None)
        if shard is None:
            shard = FeatureShard(self.cache, self.names[s], self.manifest, record=self.records[s])
            while len(self._shards) >= self.open_shards:
                self._shards.popitem(last=False)[1].close()
        self._shards[s] = shard
        return shard

    def plan_identity(self, mode: str, workers: int, buffer: int) -> dict:
        """What the epoch plans depend on besides seed, world size and batch size (a resume must match it)."""
        counts = hashlib.sha256(self.counts.tobytes()).hexdigest()[:16]
        return {"reader": mode, "samples_per_shard_sha256": counts,
                **({"workers": max(workers, 1), "shuffle_buffer": buffer} if mode == "stream" else {})}

    def seekable(self) -> bool:
        """Random access needs every source to be an uncompressed tar, local or at a URL read by ranges."""
        return all(u is not None and is_seekable(u) for u in self.urls.values())


# ---------------------------------------------------------------- the epoch plan

def steps_per_epoch(samples: int, world: int, batch_size: int) -> int:
    return samples // (world * batch_size)


def epoch_plan(counts: np.ndarray, epoch: int, seed: int, world: int, rank: int, batch_size: int,
               mode: str = "random", workers: int = 0, buffer: int = 1000, consumed: int = 0) -> np.ndarray:
    """This rank's batches of one epoch: [steps, batch_size] global sample ids, in loader order. Random mode: after k
    steps the epoch has used exactly perm[:k * world * batch_size], so a resume `consumed` samples into the epoch,
    with any world size and batch size, deals perm[consumed:] (the same batches when neither changed)."""
    counts = np.asarray(counts, np.int64)
    if mode == "random":
        perm = np.random.default_rng(seed_from(seed, epoch, "samples")).permutation(int(counts.sum()))[consumed:]
        steps = steps_per_epoch(len(perm), world, batch_size)
        return perm[:steps * world * batch_size].reshape(steps, world, batch_size)[:, rank].copy()
    if consumed:
        raise ValueError("a streamed epoch is resumed by its batch (EpochData's start), with the same deal")
    steps = steps_per_epoch(int(counts.sum()), world, batch_size)
    # stream: shards in a seeded order; the rank's run of steps x B samples is cut into one contiguous
    # run per worker (whole batches; the loader takes batch j from worker j % W), each shuffled by a buffer
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = shard_order(len(counts), seed, epoch)
    sequence = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order] or [np.zeros(0, np.int64)])
    mine = sequence[rank * steps * batch_size:(rank + 1) * steps * batch_size]
    nw = max(workers, 1)
    plan = np.zeros((steps, batch_size), np.int64)
    at = 0
    for w in range(nw):
        rows = np.arange(w, steps, nw)  # the batches worker w yields
        run = mine[at:at + len(rows) * batch_size]
        at += len(run)
        rng = random.Random(seed_from(seed, epoch, rank, w, "buffer"))
        plan[rows] = np.array(list(shuffle_buffer(run.tolist(), buffer, rng)), np.int64).reshape(-1, batch_size)
    return plan


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order streaming mode reads the shards in, one epoch."""
    return np.random.default_rng(seed_from(seed, epoch, "shards")).permutation(n_shards)


def shuffle_buffer(items, size: int, rng: random.Random):
    """WebDataset-style shuffle: fill a buffer of `size`, then emit a random element for each new one."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------- readers

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


def _tokens(index: CacheIndex, shards, rows, keys, epoch, seed, with_tokens) -> tuple[list[int], list]:
    """This epoch's view of each sample, and its packed tokens (None without tokens), read shard by shard."""
    views = [sample_view(index, k, epoch, seed) for k in keys]
    packed: list = [None] * len(rows)
    if with_tokens:
        for s in np.unique(shards):
            at = np.flatnonzero(shards == s)
            for j, p in zip(at, index.shard(int(s)).read_views(rows[at], [views[j] for j in at])):
                packed[j] = p
    return views, packed


def read_batch(index: CacheIndex, ids: np.ndarray, epoch: int, seed: int, with_tokens: bool) -> list[dict]:
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


def stream_batches(index: CacheIndex, batches: np.ndarray, epoch: int, seed: int,
                   with_tokens: bool) -> Iterator[list[dict | CorruptSample]]:
    """Streaming: read the source shards that hold these batches' samples, in order, keep the samples
    the batches need (at most a shuffle buffer's worth waits), and emit each batch once it is complete."""
    ids = np.unique(batches)
    shard_of = index.locate(ids)[0]
    ready: dict[int, tuple] = {}
    b = 0
    for s in (int(x) for x in shard_order(len(index.names), seed, epoch) if int(x) in set(shard_of.tolist())):
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


def _samples(index: CacheIndex, shards, rows, images, epoch: int, seed: int, with_tokens: bool) -> list[dict]:
    """A batch's (shard, row) pairs with their image bytes -> samples with this epoch's view and its tokens."""
    shards, rows = np.asarray(shards), np.asarray(rows)
    keys = [index.shard(int(s)).key(int(r)) for s, r in zip(shards, rows)]
    views, packed = _tokens(index, shards, rows, keys, epoch, seed, with_tokens)
    return [_sample(index, int(s), int(r), img, views[j], packed[j])
            for j, (s, r, img) in enumerate(zip(shards, rows, images))]


# ---------------------------------------------------------------- decode and replay

def decode(sample: dict, size: int, codec, cut: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """A read sample -> (key, replayed view uint8 [3, S, S], tokens [T, C] (see to_tensor) or None); raises
    CorruptSample when the source bytes or the tokens are not what extraction recorded."""
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
    pixels = replay(img, sample["record"], size, cut)
    tokens = codec.to_tensor(sample["packed"]) if sample["packed"] is not None else None
    return key, pixels, tokens


def collate(entries: list[tuple]) -> dict:
    return {"images": torch.stack([e[1] for e in entries]),
            "tokens": torch.stack([e[2] for e in entries]) if entries[0][2] is not None else None,
            "keys": [e[0] for e in entries]}


# ---------------------------------------------------------------- the dataset a DataLoader runs

class EpochData(IterableDataset):
    """Batches `{"images": uint8 [B, 3, S, S], "tokens": [B, T, C] (bf16 or fp32) or None, "keys"}` of one rank and
    epoch, from batch `start` of `plan` on."""

    def __init__(self, index: CacheIndex, plan: np.ndarray, epoch: int, seed: int, start: int = 0,
                 mode: str = "random", with_tokens: bool = True, on_corrupt: str = "error"):
        self.index, self.plan, self.epoch, self.seed, self.start = index, plan, epoch, seed, start
        self.mode, self.with_tokens, self.on_corrupt = mode, with_tokens, on_corrupt
        self.codec = index.manifest.token_codec
        self.size, self.cut = index.manifest.augment.size, index.manifest.cut

    def __iter__(self):
        mine = worker_slice(self.plan[self.start:])
        if self.mode == "random":
            raw = (read_batch(self.index, ids, self.epoch, self.seed, self.with_tokens) for ids in mine)
        else:
            raw = stream_batches(self.index, mine, self.epoch, self.seed, self.with_tokens)
        try:
            for samples in raw:
                yield collate(self._decode_all(samples))
        except (CacheError, ShardError) as e:
            if get_worker_info() is None:
                raise
            yield WorkerError(e)  # raised as itself in the main process by Loader

    def _decode_all(self, samples: list[dict]) -> list[tuple]:
        """Decode a batch; with on_corrupt = "skip", a corrupt sample is named and its place taken by another
        sample of the batch, so every step keeps its batch size (and every rank its step count)."""
        out, bad = [], []
        for sample in samples:
            try:
                out.append(decode(sample, self.size, self.codec, self.cut))
            except CorruptSample as e:
                if self.on_corrupt == "error":
                    raise
                print(f"warning: skipping: {e}", flush=True)
                bad.append(e)
        if not out:
            raise CacheError(f"every sample of a batch is corrupt (first: {bad[0]}); run `img2vec verify`")
        return out + [out[i % len(out)] for i in range(len(bad))]


class WorkerError:
    """A CacheError or ShardError of a DataLoader worker, sent to the main process as an item: raised, it would
    reach the main process rebuilt from its traceback's text, not with its own message."""

    def __init__(self, error: Exception):
        self.error = error


class WorkerDied(RuntimeError):
    """A DataLoader worker killed by a signal (SIGKILL: most often the kernel's out-of-memory killer)."""


def raise_if_a_worker_died(error: RuntimeError, workers: int, batch_size: int, checkpoint) -> None:
    """torch's "DataLoader worker (pid N) is killed by signal" as a WorkerDied saying what to do, if a worker of this
    process's loaders did die of a signal (common.signals.dead_workers); else nothing."""
    dead = dead_workers()
    if not dead:
        return
    pid, name = dead[0]
    why = ("SIGKILL is what the kernel's out-of-memory killer sends (see `dmesg` or the job's memory limit): each "
           f"worker holds its prefetched batches; lower train.workers (now {workers}) or train.batch_size (now "
           f"{batch_size})") if name == "SIGKILL" else "a decoder or reader crashed in it"
    raise WorkerDied(f"DataLoader worker (pid {pid}) was killed by {name}: {why}. Then rerun the same command: it "
                     f"resumes from the last checkpoint ({checkpoint or 'none yet: from the start'})") from error


class Loader(DataLoader):
    """A DataLoader whose workers' CacheError and ShardError are raised in the main process as they were raised."""

    def __iter__(self):
        return _RaisingWorkerErrors(watch_workers(super().__iter__()))


class _RaisingWorkerErrors:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.it)
        if isinstance(batch, WorkerError):
            raise batch.error
        return batch


def make_loader(dataset: EpochData, workers: int) -> Loader:
    # its own generator: making an iterator must not draw from the global RNG
    # workers leave SIGTERM / SIGUSR1 / SIGINT to the main process, which stops at a step (common/signals.py)
    return Loader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                  prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available(),
                  worker_init_fn=ignore_stop_signals,
                  generator=torch.Generator().manual_seed(seed_from(dataset.seed, dataset.epoch) % 2**63))


def reader_mode(index: CacheIndex, wanted: str) -> str:
    """"auto": random access when every source is an uncompressed tar read by ranges, else streaming."""
    seekable = wanted != "stream" and index.seekable()
    if wanted == "random" and not seekable:
        raise CacheError("train.reader = 'random' needs every source shard to be an uncompressed tar, local or at a "
                         "URL whose server reads byte ranges; use 'stream' (or 'auto') for pipe: URLs, compressed "
                         "tars and servers without ranged reads")
    return ("random" if seekable else "stream") if wanted == "auto" else wanted
