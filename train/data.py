"""Stage-two data, as small stages: sample index -> epoch plan -> per-worker reader -> decode/replay -> batch.

- `CacheIndex`: every recorded sample of a cache, numbered 0..N-1 shard by shard in manifest order.
- `epoch_plan`: this rank's batches of one epoch, [steps, B] global sample ids, in the order the
  DataLoader yields them. Every rank gets the same number of steps; less than one global batch is
  dropped; no sample is used twice. "random" mode (uncompressed tars, local or at URLs read by byte
  ranges): a permutation of all samples seeded by (seed, epoch), i.i.d. batches. "stream" mode (`pipe:`,
  compressed sources, servers without ranged reads):
  shards in a seeded order, cut into contiguous runs per (rank, worker), shuffled by a seeded buffer.
- `Deal`: how this rank's batches are dealt each epoch (epoch_plan's arguments), and from a position.
- `RunData`: this rank's batches from a position on, epoch after epoch, for ONE DataLoader for the whole run:
  its workers persist across epochs, with the files they read, which the main process opens once before they
  fork (`CacheIndex.hold_open`): no worker opens a file, in any epoch (docs/BENCHMARKS.md, file opens). The
  sequence is the epochs' plans end to end; worker w of W yields its items w, w+W, ...; the DataLoader takes
  workers in turn, so batches come in that order, and a resume at any position continues the same sequence.
- train/batches.py reads, checks and decodes one batch.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.runtime import seed_from
from common.signals import dead_workers, ignore_stop_signals, watch_workers
from shards.errors import CacheError
from shards.index import ShardRecord, check_recorded, read_record
from shards.manifest import Manifest
from shards.reader import FeatureShard, hold_open, open_file_budget
from shards.remote import is_url
from shards.source import ShardError, seek_problem
from shards.urlpath import as_path
from train.batches import decode_batch, read_batch, stream_batches


# ---------------------------------------------------------------- the sample index

class CacheIndex:
    """The samples of a complete cache: global id -> (shard, row of its index). Shards are opened lazily (or all at
    once by `hold_open`) and at most `open_shards` at a time (an index is memory-mapped: the node's processes share
    its pages; one descriptor each)."""

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
        self.records = [ShardRecord(samples=r.samples, files={f: m for f, m in r.files.items() if "/" not in f})
                        for r in recorded]
        self.counts = np.array([r.samples for r in recorded], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.views = manifest.views
        self.open_shards = open_shards or open_file_budget() // 8
        self._shards: OrderedDict[int, FeatureShard] = OrderedDict()
        self.held = 0  # files hold_open opened

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

    def hold_open(self, tokens: bool = True, sources: bool = True) -> int:
        """Open, in this process, what its loader workers will read: every shard's index (memory-mapped; a Zarr
        array's metadata checked), its token files and its local source tar, as many as the budgets hold. Done
        before the workers fork, it is one open per file per rank for the whole run: the workers inherit the maps
        and descriptors (and with persistent workers keep them), so later epochs open nothing. Returns the files.
        A cache at a URL: its indexes only (read whole, once per rank); no remote client is made before a fork."""
        if not self.held:
            shards = [self.shard(s) for s in range(min(len(self.names), self.open_shards))]
            local = not is_url(str(self.cache))
            paths = [p for fs in shards if tokens and local for p in fs.token_files()]
            paths += [self.urls[n] for n in self.names if sources and self.urls[n]]  # local tars (not URLs)
            self.held = len(shards) + hold_open(paths)
        return self.held

    def plan_identity(self, mode: str, workers: int, buffer: int) -> dict:
        """What the epoch plans depend on besides seed, world size and batch size (a resume must match it)."""
        counts = hashlib.sha256(self.counts.tobytes()).hexdigest()[:16]
        return {"reader": mode, "samples_per_shard_sha256": counts,
                **({"workers": max(workers, 1), "shuffle_buffer": buffer} if mode == "stream" else {})}

    def not_seekable(self) -> str | None:
        """Why random access cannot be: the first source that cannot be read at its offsets, and why; None if all can."""
        for name, url in self.urls.items():
            if url is None:
                return f"shard {name} has no source in data.shards"
            if why := seek_problem(url):
                return why
        return None


# ---------------------------------------------------------------- the epoch plan

def steps_per_epoch(samples: int, world: int, batch_size: int) -> int:
    return samples // (world * batch_size)


def epoch_plan(counts: np.ndarray, *, epoch: int, seed: int, world: int, rank: int, batch_size: int,
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


@dataclass(frozen=True)
class Deal:
    """How this rank's batches are dealt each epoch: epoch_plan's arguments besides the epoch."""

    counts: np.ndarray
    _: KW_ONLY
    seed: int
    world: int
    rank: int
    batch_size: int
    mode: str = "random"
    workers: int = 0
    buffer: int = 1000

    def plan(self, epoch: int, consumed: int = 0) -> np.ndarray:
        """This rank's batches of `epoch` after the `consumed` samples all ranks have trained on. Random mode
        re-deals the rest of the epoch's permutation over this world and batch size; stream mode starts at that
        batch of the same plan (it resumes with the deal it started with: train/rundir.py)."""
        random_mode = self.mode == "random"
        plan = epoch_plan(self.counts, epoch=epoch, seed=self.seed, world=self.world, rank=self.rank,
                          batch_size=self.batch_size, mode=self.mode, workers=self.workers, buffer=self.buffer,
                          consumed=consumed if random_mode else 0)
        return plan if random_mode else plan[consumed // (self.world * self.batch_size):]


# ---------------------------------------------------------------- the dataset a DataLoader runs

class RunData(IterableDataset):
    """Batches (train/batches.py: decode_batch) of one rank from `consumed` samples into `epoch` on, epoch after
    epoch, without end: the dataset of the run's one DataLoader (see the module's docstring)."""

    def __init__(self, index: CacheIndex, deal: Deal, *, epoch: int, consumed: int = 0, with_tokens: bool = True,
                 on_corrupt: str = "error"):
        self.index, self.deal, self.epoch, self.consumed = index, deal, epoch, consumed
        self.seed, self.mode, self.with_tokens, self.on_corrupt = deal.seed, deal.mode, with_tokens, on_corrupt

    def segments(self) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, its batches in this dataset's sequence), in order: the rest of the first epoch, then whole ones."""
        epoch, plan = self.epoch, self.deal.plan(self.epoch, self.consumed)
        while len(plan) or epoch == self.epoch:
            yield epoch, plan
            epoch, plan = epoch + 1, self.deal.plan(epoch + 1)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        before = 0  # batches of the sequence before this epoch's
        try:
            for epoch, plan in self.segments():
                yield from self.batches(epoch, plan[(wid - before) % nw::nw])
                before += len(plan)
        except (CacheError, ShardError) as e:
            if info is None:
                raise
            yield WorkerError(e)  # raised as itself in the main process by Loader

    def batches(self, epoch: int, mine: np.ndarray) -> Iterator[dict]:
        """The batches `mine` [n, B] of `epoch`, read, checked and decoded."""
        m = self.index.manifest
        if self.mode == "random":
            raw = (read_batch(self.index, ids, epoch, self.seed, self.with_tokens) for ids in mine)
        else:
            raw = stream_batches(self.index, mine, epoch, self.seed, self.with_tokens,
                                 shard_order(len(self.index.names), self.seed, epoch))
        for samples, bits in raw:
            yield decode_batch(samples, bits, m.augment.size, m.token_codec, m.cut, self.on_corrupt)


class EpochData(RunData):
    """The batches of one given plan of one epoch, from batch `start` on (tests and benches; training runs RunData)."""

    def __init__(self, index: CacheIndex, plan: np.ndarray, *, epoch: int, seed: int, start: int = 0,
                 mode: str = "random", with_tokens: bool = True, on_corrupt: str = "error"):
        self.index, self.plan, self.epoch, self.seed, self.start = index, plan, epoch, seed, start
        self.mode, self.with_tokens, self.on_corrupt = mode, with_tokens, on_corrupt

    def segments(self) -> Iterator[tuple[int, np.ndarray]]:
        yield self.epoch, self.plan[self.start:]


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


def make_loader(dataset: RunData, workers: int) -> Loader:
    """The DataLoader of a RunData (or EpochData). With workers, the cache's files are opened here first, before
    the workers fork from this process (CacheIndex.hold_open)."""
    if workers:
        dataset.index.hold_open(tokens=dataset.with_tokens, sources=dataset.mode == "random")
    # its own generator: making an iterator must not draw from the global RNG
    # workers leave SIGTERM / SIGUSR1 / SIGINT to the main process, which stops at a step (common/signals.py)
    return Loader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                  prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available(),
                  worker_init_fn=ignore_stop_signals,
                  generator=torch.Generator().manual_seed(seed_from(dataset.seed, dataset.epoch) % 2**63))


RANDOM_NEEDS = ("every source shard to be an uncompressed tar, local or at a URL whose server reads byte ranges "
                "(HTTP Range, S3/GCS ranged GETs)")


def reader_mode(index: CacheIndex, wanted: str) -> str:
    """"auto": random access when every source is an uncompressed tar read by ranges, else streaming, saying why
    (on the main process)."""
    why = index.not_seekable() if wanted != "stream" else None
    if wanted == "random" and why:
        raise CacheError(f"train.reader = 'random' needs {RANDOM_NEEDS}, but {why}; use 'stream' (or 'auto') for "
                         "pipe: URLs, compressed tars and servers without ranged reads")
    if wanted == "auto" and why and int(os.environ.get("RANK", 0)) == 0:
        print(f"data: train.reader = 'auto' chose the stream reader (batches only as mixed as train.shuffle_buffer): "
              f"{why}; the random reader needs {RANDOM_NEEDS}", file=sys.stderr)
    return ("stream" if why else "random") if wanted == "auto" else wanted
