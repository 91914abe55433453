"""Stage-two loader: samples/s of the training loader (read image bytes and this epoch's view of the tokens,
check both, decode, replay the view, hand the tokens over as stored) against the floor (the same plan, workers
and batches with the tokens left out: read, check and decode the image, cut the view), random access against
streaming, and the cache bytes the kernel reads per trained sample (counted with fincore after evicting
the cache from the page cache, not timed). Prints markdown tables.

    python bench/loader.py [--quick] [--imagenet-like]

Each row runs the loader as training does (train/data.py RunData: one DataLoader whose workers persist across
epochs) and measures it after its first batch, over --batches batches: samples per second of wall-clock, and
samples per CPU-second of the main process and its workers (from /proc): on a shared, loaded machine the CPU
ratio is the steadier one; the loader is CPU-bound, so on a free machine the two agree.

The caches hold real recorded views of every source image; their tokens are real ResNet-50 tokens
(random init) drawn from a small pool, so no teacher runs per view (bench/_common.py).
"""
from __future__ import annotations

import argparse
import atexit
import os
import resource
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
    """One epoch's loader (the bytes-read count)."""
    manifest = read_manifest(cache)
    index = data.CacheIndex(cache, manifest, source_urls(manifest))
    plan = data.epoch_plan(index.counts, epoch=epoch, seed=0, world=1, rank=0, batch_size=batch, mode=mode,
                           workers=workers, buffer=256)
    return data.make_loader(data.EpochData(index, plan, epoch=epoch, seed=0, mode=mode, with_tokens=with_tokens),
                            workers)


def run_loader(cache: Path, seed: int, workers: int, batch: int, mode: str, with_tokens: bool = True):
    """The loader as training runs it: epoch after epoch, its workers persisting (seed: another order per round)."""
    manifest = read_manifest(cache)
    index = data.CacheIndex(cache, manifest, source_urls(manifest))
    deal = data.Deal(index.counts, seed=seed, world=1, rank=0, batch_size=batch, mode=mode, workers=workers,
                     buffer=256)
    return data.make_loader(data.RunData(index, deal, epoch=0, with_tokens=with_tokens), workers)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its children (the loader's workers): live ones from /proc,
    ended ones from getrusage."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick, total = os.sysconf("SC_CLK_TCK"), time.process_time() + ended.ru_utime + ended.ru_stime
    for pid in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def steady_rates(batches, count: int) -> tuple[float, float]:
    """(samples per second, samples per CPU-second) over `count` batches after the first (worker start-up
    excluded); the workers keep their prefetch queue full at both ends of the window."""
    it = iter(batches)
    next(it)
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    for _ in range(count):
        n += len(next(it)["keys"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del it
    return n / wall, n / cpu


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
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    p.add_argument("--batches", type=int, help="batches measured per row and round (default: two epochs' worth)")
    p.add_argument("--imagenet-like", action="store_true", help="sources of ImageNet's size and JPEG bytes "
                   "(~400 x 350, ~110 KB: bench/_common.py IMAGENET_LIKE) instead of --sizes")
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
    pattern = make_source(tmp / "src", shards, per_shard, sizes=sizes, imagenet_like=args.imagenet_like)
    teacher = random_teacher()
    pool = teacher_tokens(teacher, source_views(max(view_counts) + 2, 1, seed=3)[0])
    caches = {}
    for v in view_counts:
        for c in codecs:
            for fmt in ("wds", "zarr"):
                caches[(v, c, fmt)] = tmp / f"cache-{c}-v{v}-{fmt}"
                write_cache(caches[(v, c, fmt)], pattern, v, c, pool, teacher.fingerprint, fmt=fmt)
    n = shards * per_shard
    count = args.batches or 2 * (n // args.batch)
    what = "ImageNet-like (~400 x 350, ~110 KB)" if args.imagenet_like else f"sides {sizes[0]}-{sizes[1]} px, JPEG q90"
    print(f"{n} source images in {shards} shards ({what}), crops of 224, batch {args.batch}, {args.workers} "
          f"DataLoader workers persisting across epochs; {count} batches after the first, median of {rounds} rounds "
          f"(range in brackets), rows interleaved within each round; 1-min load average now "
          f"{os.getloadavg()[0]:.1f}.\n")

    rates, cpus = defaultdict(list), defaultdict(list)
    rows_of = [("floor", None, "random", False)] + [(f"`{c}` {fmt}", (c, fmt), "random", True)
                                                    for c in codecs for fmt in ("wds", "zarr")]
    rows_of.append((f"`{codecs[0]}` wds, stream reader", (codecs[0], "wds"), "stream", True))
    for r in range(rounds):
        for v in view_counts:
            for label, key, mode, tokens in rows_of:
                cache = caches[(v, *(key or (codecs[0], "wds")))]
                wall, cpu = steady_rates(run_loader(cache, r, args.workers, args.batch, mode, tokens), count)
                rates[(v, label)].append(wall)
                cpus[(v, label)].append(cpu)
    rows = []
    for v in view_counts:
        for label, *_ in rows_of:
            ratios = sorted(a / b for a, b in zip(rates[(v, label)], rates[(v, "floor")]))
            cpu_ratios = sorted(a / b for a, b in zip(cpus[(v, label)], cpus[(v, "floor")]))
            rows.append([v, "floor: image read + check + decode + crop (no tokens)" if label == "floor" else label,
                         f"{median(rates[(v, label)]):.1f}", f"{median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                         f"{median(cpus[(v, label)]):.1f}",
                         f"{median(cpu_ratios):.2f} ({cpu_ratios[0]:.2f}-{cpu_ratios[-1]:.2f})"])
    print(table(["views per sample", "loader", "samples/s", "vs floor (per-round ratios)", "samples per CPU-s",
                 "vs floor, CPU (per-round ratios)"], rows))

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
