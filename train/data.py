"""Stage-two data: each source shard streamed beside its feature shard, paired by key.

Per epoch, shards are dealt to (rank, worker) slots balancing sample counts (known from the
completion records), every rank runs the same number of batches (`EpochPlan.steps`), and each
sample trains on one recorded view, `view_order(seed, key, V)[epoch % V]`, whose exact pixels the
shared `replay` rebuilds. No WebDataset loader goes through `accelerator.prepare()`.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.augment import decode_image, replay, view_order
from common.codecs import arrays_crc32, get_codec
from shards.features import CacheError, CorruptSample, iter_feature_shard, read_record
from shards.source import iter_samples


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def check_cache(cache: Path, manifest: dict) -> dict[str, int]:
    """Every shard of the manifest must be recorded; returns name -> sample count."""
    counts, missing = {}, []
    for s in manifest["shards"]:
        record = read_record(cache, s["name"])
        if record is None:
            missing.append(s["name"])
        else:
            counts[s["name"]] = record["samples"]
    if missing:
        raise CacheError(f"cache {cache} is incomplete: {len(missing)} of {len(manifest['shards'])} shards have no "
                         f"completion record ({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}); "
                         "finish it with extract-features (same config) before training")
    return counts


@dataclass
class EpochPlan:
    """Which shards each (rank, worker) slot reads this epoch, and how many batches each slot yields."""
    slots: list[list[str]]     # [world * workers][shard names]
    quotas: list[int]          # full batches per slot
    steps: int                 # batches every rank runs this epoch (the smallest rank's total)


def plan_epoch(counts: dict[str, int], epoch: int, seed: int, world: int, workers: int, batch_size: int) -> EpochPlan:
    names = sorted(counts)
    random.Random(_seed(seed, epoch, "shards")).shuffle(names)
    n_slots = world * max(workers, 1)
    slots, loads = [[] for _ in range(n_slots)], [0] * n_slots
    for name in sorted(names, key=lambda n: -counts[n]):  # greedy: largest shard to the lightest slot
        i = min(range(n_slots), key=lambda s: (loads[s], s))
        slots[i].append(name)
        loads[i] += counts[name]
    for s in slots:  # deal order is by size; reading order is the shuffled one
        s.sort(key=names.index)
    quotas = [load // batch_size for load in loads]
    per_rank = [sum(quotas[r * max(workers, 1):(r + 1) * max(workers, 1)]) for r in range(world)]
    return EpochPlan(slots, quotas, min(per_rank))


def batches_before(quotas: list[int], start: int) -> list[int]:
    """How many batches each worker has yielded once `start` batches came out of a DataLoader, which
    takes batches round-robin from the workers that still have some."""
    return _round_robin(quotas, start)[0]


def next_worker(quotas: list[int], start: int) -> int:
    """The worker whose turn comes after `start` batches (it may have none left; the loader then skips it)."""
    return _round_robin(quotas, start)[1]


def _round_robin(quotas: list[int], start: int) -> tuple[list[int], int]:
    if start > sum(quotas):
        raise ValueError(f"{start} batches asked of workers that hold {sum(quotas)}")
    done = [0] * len(quotas)
    w = 0
    for _ in range(start):
        while done[w] >= quotas[w]:
            w = (w + 1) % len(quotas)
        done[w] += 1
        w = (w + 1) % len(quotas)
    return done, w


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


class CachedViews(IterableDataset):
    """Batches `{"images": uint8 [B, 3, S, S], "tokens": fp32 [B, T, C] or None, "keys"}` for one rank and epoch."""

    def __init__(self, cache: Path, manifest: dict, urls: dict[str, str], plan: EpochPlan, rank: int, workers: int,
                 epoch: int, seed: int, batch_size: int, shuffle_buffer: int, skip_batches: int = 0,
                 with_tokens: bool = True, on_corrupt: str = "error"):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.workers = max(workers, 1)
        self.codec = get_codec(manifest["codec"]["name"])
        self.views = manifest["augment"]["views"]
        self.size = manifest["augment"]["size"]

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info else 0
        if info is None and self.workers > 1:
            raise RuntimeError("CachedViews with several workers must run inside a DataLoader")
        quotas = self.plan.quotas[self.rank * self.workers:(self.rank + 1) * self.workers]
        # a fresh DataLoader starts its round-robin at worker 0: after a fast-forward, worker 0 plays the
        # slot whose turn is next, so the batches come in the order of an uninterrupted epoch
        wid = (wid + next_worker(quotas, self.skip_batches)) % self.workers
        slot = self.rank * self.workers + wid
        quota = self.plan.quotas[slot]
        skip = batches_before(quotas, self.skip_batches)[wid] * self.batch_size
        made, batch, last_good, owed = 0, [], None, 0
        for sample in self._shuffled(self.plan.slots[slot], slot):
            if made == quota:
                return
            if skip:
                skip -= 1  # fast-forward on resume: nothing is decoded
                last_good = sample or last_good
                continue
            # a corrupt sample (on_corrupt = "skip") takes the last good one's place, or the next good one's
            # before any: every place of the stream fills one batch entry, so the quota and resume hold
            if sample is None:
                if last_good is None:
                    owed += 1
                    continue
                sample = last_good
            last_good = sample
            entry = self._decode(*sample)
            for _ in range(owed + 1):
                batch.append(entry)
                if len(batch) == self.batch_size:
                    yield {"images": torch.stack([b[1] for b in batch]),
                           "tokens": torch.stack([b[2] for b in batch]) if self.with_tokens else None,
                           "keys": [b[0] for b in batch]}
                    made, batch = made + 1, []
                    if made == quota:
                        return
            owed = 0

    def _pairs(self, name: str):
        """(key, image bytes, view record, arrays of that view) for this epoch's view of each sample,
        paired by key: feature keys are the source keys minus those skipped at extraction."""
        source = iter_samples(self.urls[name])
        record_crc = read_record(self.cache, name)["crc32"]
        for feat in iter_feature_shard(self.cache, name, self.manifest, check=False):
            key = feat["key"]
            for src in source:
                if src["key"] == key:
                    break
            else:
                raise CacheError(f"feature shard {name}: key {key!r} is not in source shard {self.urls[name]} "
                                 "(in that order); was the source shard changed after extraction?")
            if feat.get("error") or arrays_crc32(feat["arrays"]) != record_crc[key]:
                err = CorruptSample(name, key, feat.get("error") or "crc32 differs from the completion record")
                if self.on_corrupt == "error":
                    raise err
                print(f"warning: skipping: {err}", flush=True)
                yield None
                continue
            v = int(view_order(self.seed, key, self.views)[self.epoch % self.views])
            arrays = {n: a[v:v + 1] for n, a in feat["arrays"].items()} if self.with_tokens else None
            yield key, src["image"], feat["views"][v], arrays

    def _shuffled(self, names: list[str], slot: int):
        rng = random.Random(_seed(self.seed, self.epoch, slot, "buffer"))
        return shuffle_buffer((pair for name in names for pair in self._pairs(name)), self.shuffle_buffer, rng)

    def _decode(self, key: str, image: bytes, record, arrays):
        pixels = replay(decode_image(image), record, self.size)
        tokens = torch.from_numpy(self.codec.decode(arrays)[0]) if arrays is not None else None
        return key, pixels, tokens


def make_loader(dataset: CachedViews) -> DataLoader:
    n = dataset.workers if len(dataset.plan.slots) > 1 or dataset.workers > 1 else 0
    # its own generator: making an iterator must not draw from the global RNG (masks must not depend
    # on where a run was resumed)
    return DataLoader(dataset, batch_size=None, num_workers=n, persistent_workers=False,
                      prefetch_factor=4 if n else None, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(_seed(dataset.seed, dataset.epoch) % 2**63))
