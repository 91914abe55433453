"""Stage-two loader: samples/s of the training loader (CachedViews through make_loader: read both
shards, decode the source image, replay the recorded view, decode the tokens) against the floor
(the same shards, workers, batch and shuffle buffer, reading and decoding the source image and
cutting the crop alone), then where the time goes per sample. Prints markdown tables.

    python bench/loader.py [--quick]

The caches hold real recorded views of every source image; their tokens are real ResNet-50
tokens (random init) drawn from a small pool, so no teacher runs per view (bench/_common.py).
"""
from __future__ import annotations

import argparse
import atexit
import cProfile
import pstats
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _common import header, make_source, median, random_teacher, source_views, table, teacher_tokens, write_cache
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import common.augment as augment
import shards.features as features
import train.data as data
from common.codecs import TokenCodec
from shards.features import iter_feature_shard
from shards.source import iter_samples


class FloorViews(IterableDataset):
    """The floor: CachedViews' slots, quotas, shuffle buffer and batches, but only source shard ->
    decode image -> replay the (pre-looked-up) view record. No feature shard is opened."""

    def __init__(self, ref: data.CachedViews, records: dict[str, np.ndarray]):
        self.ref, self.records = ref, records

    def __iter__(self):
        r = self.ref
        info = get_worker_info()
        slot = r.rank * r.workers + (info.id if info else 0)
        rng = random.Random(data._seed(r.seed, r.epoch, slot, "buffer"))
        quota, made, batch = r.plan.quotas[slot], 0, []

        def pairs():
            for name in r.plan.slots[slot]:
                for s in iter_samples(r.urls[name]):
                    yield s["key"], s["image"]

        for key, image in data.shuffle_buffer(pairs(), r.shuffle_buffer, rng):
            if made == quota:
                return
            batch.append((key, augment.replay(augment.decode_image(image), self.records[key], r.size)))
            if len(batch) == r.batch_size:
                yield {"images": torch.stack([b[1] for b in batch]), "tokens": None, "keys": [b[0] for b in batch]}
                made, batch = made + 1, []


class ShipBf16(data.CachedViews):
    """Prototype of a fix: a bf16 cache's tokens leave the worker as bf16 (the stored bits, no decode),
    half the bytes of fp32 through the worker -> main process queue; the device casts them."""

    def _decode(self, key, image, record, arrays):
        pixels = data.replay(data.decode_image(image), record, self.size)
        bits = np.array(arrays["q"][0]).view(np.int16)
        return key, pixels, torch.from_numpy(bits).view(torch.bfloat16)


def epoch_records(cache: Path, manifest: dict, epoch: int) -> dict[str, np.ndarray]:
    views, seed = manifest["augment"]["views"], manifest["augment"]["seed"]
    out = {}
    for s in manifest["shards"]:
        for f in iter_feature_shard(cache, s["name"], manifest, check=False):
            out[f["key"]] = f["views"][int(augment.view_order(seed, f["key"], views)[epoch % views])]
    return out


def build(cache: Path, epoch: int, workers: int, batch: int, buffer: int, cls=data.CachedViews) -> data.CachedViews:
    manifest = features.read_manifest(cache)
    counts = data.check_cache(cache, manifest)
    plan = data.plan_epoch(counts, epoch, 0, 1, workers, batch)
    return cls(cache, manifest, features.source_urls(manifest, None), plan, 0, workers, epoch, 0, batch,
                            buffer)


def loader_like(dataset: IterableDataset, ref: data.CachedViews) -> DataLoader:
    """make_loader's DataLoader settings for any dataset."""
    n = ref.workers if len(ref.plan.slots) > 1 or ref.workers > 1 else 0
    return DataLoader(dataset, batch_size=None, num_workers=n, persistent_workers=False,
                      prefetch_factor=4 if n else None, pin_memory=torch.cuda.is_available())


def steady_rate(loader) -> float:
    """Samples/s after the first batch (worker start-up excluded), over one epoch."""
    it = iter(loader)
    first = next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += len(b["keys"])
    dt = time.perf_counter() - t0
    del it, first
    return n / dt


# ---------------------------------------------------------------- where the time goes (in process)

def instrument(totals: dict[str, float]):
    """Wrap the stage's pieces with timers; returns an undo function."""
    patches = []

    def wrap(obj, name, label):
        orig = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                totals[label] += time.perf_counter() - t0
        setattr(obj, name, timed)
        patches.append((obj, name, orig))

    wrap(augment, "decode_image", "decode source image")
    wrap(augment, "replay", "replay view (crop, bicubic resize, flip)")
    wrap(data, "decode_image", "decode source image")
    wrap(data, "replay", "replay view (crop, bicubic resize, flip)")
    wrap(features, "_wds_sample", "parse feature sample (json + decompress all V views)")
    wrap(TokenCodec, "from_bytes", "  of which: Blosc decompress of all V views")
    wrap(data, "arrays_crc32", "crc32 of all V views' arrays")
    wrap(TokenCodec, "decode", "codec decode of the one view")

    def undo():
        for obj, name, orig in reversed(patches):
            setattr(obj, name, orig)
    return undo


def profile_epoch(dataset: IterableDataset) -> tuple[float, int, dict[str, float]]:
    totals: dict[str, float] = defaultdict(float)
    undo = instrument(totals)
    try:
        t0, n = time.perf_counter(), 0
        for b in dataset:
            n += len(b["keys"])
        return time.perf_counter() - t0, n, totals
    finally:
        undo()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and rounds (about a minute)")
    p.add_argument("--shards", type=int, help="source shards (default 8, quick 4)")
    p.add_argument("--per-shard", type=int, help="images per shard (default 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, help="interleaved epochs per row (default 5, quick 3)")
    p.add_argument("--views", default="10,1", help="augment.views of the caches, comma separated")
    p.add_argument("--codecs", default="bf16-zstd,u8-zstd")
    p.add_argument("--buffer", type=int, default=64, help="train.shuffle_buffer")
    p.add_argument("--sizes", default="192,320", help="smallest,largest side of the source images (ImageNet's "
                   "photos are about 333,500)")
    args = p.parse_args()
    shards, per_shard = args.shards or (4 if args.quick else 8), args.per_shard or 64
    rounds = args.rounds or (3 if args.quick else 5)
    view_counts = [int(v) for v in args.views.split(",")]
    codecs = args.codecs.split(",")

    header("Stage-two loader vs the decode-and-crop floor", args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    atexit.register(shutil.rmtree, tmp, True)  # caches and runs can take hundreds of MB
    sizes = tuple(int(x) for x in args.sizes.split(","))
    pattern = make_source(tmp / "src", shards, per_shard, sizes=sizes)
    teacher = random_teacher()
    pool = teacher_tokens(teacher, source_views(max(view_counts) + 2, 1, seed=3)[0])
    caches = {}
    for v in view_counts:
        for c in codecs:
            caches[(v, c)] = tmp / f"cache-{c}-v{v}"
            write_cache(caches[(v, c)], pattern, v, c, pool, teacher.fingerprint)
    n = shards * per_shard
    print(f"{n} source images in {shards} shards (sides {sizes[0]}-{sizes[1]} px, JPEG q90), crops of 224, batch "
          f"{args.batch}, {args.workers} DataLoader workers, shuffle buffer {args.buffer}; samples/s after the first "
          f"batch of an epoch, median of {rounds} rounds, rows interleaved within each round.\n")

    rates = defaultdict(list)
    for r in range(rounds):
        for v in view_counts:
            ref = build(caches[(v, codecs[0])], r, args.workers, args.batch, args.buffer)
            records = epoch_records(ref.cache, ref.manifest, r)
            rates[(v, "floor")].append(steady_rate(loader_like(FloorViews(ref, records), ref)))
            for c in codecs:
                rates[(v, c)].append(steady_rate(data.make_loader(build(caches[(v, c)], r, args.workers, args.batch,
                                                                        args.buffer))))
            if "bf16-zstd" in codecs:
                rates[(v, "ship")].append(steady_rate(data.make_loader(
                    build(caches[(v, "bf16-zstd")], r, args.workers, args.batch, args.buffer, ShipBf16))))
    rows = []
    for v in view_counts:
        floor = median(rates[(v, "floor")])
        rows.append([v, "floor: decode + crop only", f"{floor:.1f}", "1.00", ""])
        for c in codecs:
            ratios = [a / b for a, b in zip(rates[(v, c)], rates[(v, "floor")])]
            rows.append([v, f"CachedViews + make_loader, `{c}`", f"{median(rates[(v, c)]):.1f}",
                         f"{median(ratios):.2f}", "yes" if median(ratios) >= 0.85 else "no"])
        if rates[(v, "ship")]:
            ratios = [a / b for a, b in zip(rates[(v, "ship")], rates[(v, "floor")])]
            rows.append([v, "prototype: `bf16-zstd`, tokens leave the worker as bf16",
                         f"{median(rates[(v, 'ship')]):.1f}", f"{median(ratios):.2f}",
                         "yes" if median(ratios) >= 0.85 else "no"])
    print(table(["views per sample", "loader", "samples/s", "vs floor (median of per-round ratios)",
                 ">= 0.85"], rows))

    torch.set_num_threads(1)  # as in a DataLoader worker (on a busy CPU, 2 threads make torch.stack 100x slower)
    print(f"### Where the time goes: one process, no workers, one torch thread (as a DataLoader worker), "
          f"ms per sample (one epoch of {n} samples)\n")
    cols, results = [], {}
    for v in view_counts:
        ref = build(caches[(v, codecs[0])], 0, 1, args.batch, args.buffer)
        records = epoch_records(ref.cache, ref.manifest, 0)
        results[f"floor, V={v}"] = profile_epoch(FloorViews(ref, records))
        for c in codecs:
            results[f"`{c}`, V={v}"] = profile_epoch(build(caches[(v, c)], 0, 1, args.batch, args.buffer))
    cols = list(results)
    labels = sorted({k for _, _, t in results.values() for k in t}, key=lambda k: (
        ["decode source image", "replay view (crop, bicubic resize, flip)",
         "parse feature sample (json + decompress all V views)", "  of which: Blosc decompress of all V views",
         "crc32 of all V views' arrays", "codec decode of the one view"].index(k)))
    rows = []
    for label in labels:
        rows.append([label] + [f"{results[c][2].get(label, 0.0) / results[c][1] * 1e3:.2f}" for c in cols])
    rest = []
    for c in cols:
        wall, k, t = results[c]
        timed = sum(v for name, v in t.items() if not name.startswith("  "))
        rest.append(f"{(wall - timed) / k * 1e3:.2f}")
    rows.append(["rest: tar reads, pairing, shuffle buffer, batching"] + rest)
    rows.append(["**total**"] + [f"**{results[c][0] / results[c][1] * 1e3:.2f}**" for c in cols])
    print(table(["ms per sample"] + cols, rows))

    worst = f"`{codecs[0]}`, V={view_counts[0]}"
    print(f"### cProfile of the loader ({worst}, in process): top functions by own time\n")
    prof = cProfile.Profile()
    ds = build(caches[(view_counts[0], codecs[0])], 1, 1, args.batch, args.buffer)
    prof.enable()
    for _ in ds:
        pass
    prof.disable()
    stats = pstats.Stats(prof)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:10]
    total = sum(v[2] for v in stats.stats.values())
    print(table(["function", "own time s", "share", "calls"],
                [[f"`{Path(f).name}:{line}({fn})`", f"{v[2]:.3f}", f"{v[2] / total:.0%}", v[1]]
                 for (f, line, fn), v in top]))


if __name__ == "__main__":
    main()
