"""Stage-two loader: samples/s of the training loader (read image bytes and this epoch's view of the tokens,
check both, decode, replay the view, decode the tokens) against the floor (the same plan, workers and
batches with the tokens left out: read, check and decode the image, cut the view), random access against
streaming, and the cache bytes the kernel reads per trained sample (counted with fincore after evicting
the cache from the page cache, not timed). Prints markdown tables.

    python bench/loader.py [--quick]

The caches hold real recorded views of every source image; their tokens are real ResNet-50 tokens
(random init) drawn from a small pool, so no teacher runs per view (bench/_common.py).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import header, make_source, median, random_teacher, source_views, table, teacher_tokens, write_cache

import train.data as data
from shards.manifest import read_manifest, source_urls


def loader(cache: Path, epoch: int, workers: int, batch: int, mode: str, with_tokens: bool = True):
    manifest = read_manifest(cache)
    index = data.CacheIndex(cache, manifest, source_urls(manifest))
    plan = data.epoch_plan(index.counts, epoch, 0, 1, 0, batch, mode, workers, buffer=256)
    return data.make_loader(data.EpochData(index, plan, epoch, 0, 0, mode, with_tokens), workers)


def steady_rate(batches) -> float:
    """Samples/s after the first batch (worker start-up excluded), over one epoch."""
    it = iter(batches)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += len(b["keys"])
    return n / (time.perf_counter() - t0)


def token_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and p.name != "index.npy" and not p.name.endswith(".json")]


def bytes_read(cache: Path, epoch: int, batch: int) -> tuple[int, int, int]:
    """(token bytes the kernel read for one epoch, one view's share of the token files for every trained sample
    (file bytes / (samples x V): tar headers and Zarr indexes included), trained samples)."""
    files = token_files(cache)
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    n = sum(len(b["keys"]) for b in loader(cache, epoch, 0, batch, "random"))
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    manifest = read_manifest(cache)
    per_view = sum(p.stat().st_size for p in files) / (manifest.samples * manifest.views)
    return sum(int(x) for x in out.split()), int(per_view * n), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples and rounds (about two minutes)")
    p.add_argument("--shards", type=int, help="source shards (default 8, quick 4)")
    p.add_argument("--per-shard", type=int, help="images per shard (default 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, help="interleaved epochs per row (default 5, quick 3)")
    p.add_argument("--views", default="10,1", help="augment.views of the caches, comma separated")
    p.add_argument("--codecs", default="bf16z-zstd,bf16-zstd,u8-zstd")
    p.add_argument("--sizes", default="192,320", help="smallest,largest side of the source images (ImageNet's "
                   "photos are about 333,500)")
    args = p.parse_args()
    shards, per_shard = args.shards or (4 if args.quick else 8), args.per_shard or 64
    rounds = args.rounds or (3 if args.quick else 5)
    view_counts = [int(v) for v in args.views.split(",")]
    codecs = args.codecs.split(",")

    header("Stage-two loader vs the decode-and-crop floor", args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-", dir="/var/tmp"))  # a disk, not a tmpfs: fincore counts
    atexit.register(shutil.rmtree, tmp, True)
    sizes = tuple(int(x) for x in args.sizes.split(","))
    pattern = make_source(tmp / "src", shards, per_shard, sizes=sizes)
    teacher = random_teacher()
    pool = teacher_tokens(teacher, source_views(max(view_counts) + 2, 1, seed=3)[0])
    caches = {}
    for v in view_counts:
        for c in codecs:
            for fmt in ("wds", "zarr"):
                caches[(v, c, fmt)] = tmp / f"cache-{c}-v{v}-{fmt}"
                write_cache(caches[(v, c, fmt)], pattern, v, c, pool, teacher.fingerprint, fmt=fmt)
    n = shards * per_shard
    print(f"{n} source images in {shards} shards (sides {sizes[0]}-{sizes[1]} px, JPEG q90), crops of 224, batch "
          f"{args.batch}, {args.workers} DataLoader workers; samples/s after the first batch of an epoch, median of "
          f"{rounds} rounds, rows interleaved within each round.\n")

    rates = defaultdict(list)
    rows_of = [("floor", None, "random", False)] + [(f"`{c}` {fmt}", (c, fmt), "random", True)
                                                    for c in codecs for fmt in ("wds", "zarr")]
    rows_of.append((f"`{codecs[0]}` wds, stream reader", (codecs[0], "wds"), "stream", True))
    for r in range(rounds):
        for v in view_counts:
            for label, key, mode, tokens in rows_of:
                cache = caches[(v, *(key or (codecs[0], "wds")))]
                rates[(v, label)].append(steady_rate(loader(cache, r, args.workers, args.batch, mode, tokens)))
    rows = []
    for v in view_counts:
        for label, *_ in rows_of:
            ratios = [a / b for a, b in zip(rates[(v, label)], rates[(v, "floor")])]
            rows.append([v, "floor: image read + check + decode + crop (no tokens)" if label == "floor" else label,
                         f"{median(rates[(v, label)]):.1f}", f"{median(ratios):.2f}",
                         "" if label == "floor" else "yes" if median(ratios) >= 0.85 else "no"])
    print(table(["views per sample", "loader", "samples/s", "vs floor (median of per-round ratios)", ">= 0.85"],
                rows))

    print("### Cache bytes read per trained sample (one epoch, page cache evicted first, counted with fincore)\n")
    rows = []
    for v in view_counts:
        for c in codecs:
            for fmt in ("wds", "zarr"):
                read, want, k = bytes_read(caches[(v, c, fmt)], 0, args.batch)
                total = sum(f.stat().st_size for f in token_files(caches[(v, c, fmt)]))
                rows.append([v, f"`{c}`", fmt, f"{want / k / 1024:.1f}", f"{read / k / 1024:.1f}",
                             f"{read / want:.3f}", f"{total / (n * 1024):.1f}", f"{read / total:.3f}"])
    print(table(["V", "codec", "format", "one view, KiB", "read per trained sample, KiB", "read / one view",
                 "format 1 read per sample (all V views), KiB", "read / whole cache"], rows))


if __name__ == "__main__":
    main()
