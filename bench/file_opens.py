"""File opens of the training loader on a scaled cache, counted with `strace -f` (every process: the rank's main
process and its loader workers), by kind of file, for runs of 1 and 3 epochs; then the count extrapolated to
ImageNet on 64 GPUs (docs/BENCHMARKS.md, "File opens"). Prints markdown.

    python bench/file_opens.py [--shards 128] [--per-shard 8] [--views 10] [--workers 4] [--batch 8]

The scaled run keeps ImageNet's ratio of a worker's samples per epoch to shards (~2,000 / 1,282 = 1.6; here
128 x 8 / 4 workers / 128 shards = 2), so a per-worker pattern of opens shows as it would there. The loader is
train/data.py's as training runs it (RunData through make_loader); the tokens come from a small random pool.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

KINDS = [("view file", r"/v\d+\.tar$|/c/\d+/\d+/0/0$"), ("index", r"/index\.npy$"), ("record", r"\.done\.json$"),
         ("manifest", r"/manifest\.json$"), ("zarr metadata", r"zarr\.json$"), ("source tar", r"\.tar$")]


def strace_opens(log: Path, under: list[Path]) -> list[tuple[int, str, int]]:
    """(pid, path, line number) of every successful openat of a path under `under` in an `strace -f` log (a call
    another process interrupted is split: "<unfinished ...>", then "<... openat resumed>) = fd")."""
    roots, out, pending = tuple(str(p).rstrip("/") + "/" for p in under), [], {}
    for n, line in enumerate(log.read_text().splitlines()):
        pid, _, rest = line.partition(" ")
        call = re.match(r"\s*openat\([^,]+, \"([^\"]+)\"", rest)
        if call and "<unfinished" in rest:
            pending[pid] = (call.group(1), n)
            continue
        result = re.search(r"\)\s+=\s+(-?\d+)", rest)
        if call and result:
            path, at = call.group(1), n
        elif "<... openat resumed>" in rest and pid in pending and result:
            path, at = pending.pop(pid)
        else:
            continue
        if int(result.group(1)) >= 0 and path.startswith(roots):
            out.append((int(pid), path, at))
    return out


def kind(path: str) -> str:
    return next(name for name, pattern in KINDS + [("other", "")] if re.search(pattern, path))


def child(cache: Path, epochs: int, workers: int, batch: int) -> None:
    """The training loader over `epochs` epochs of this rank (world 1)."""
    import train.data as data
    from shards.manifest import read_manifest, source_urls

    manifest = read_manifest(cache)
    index = data.CacheIndex(cache, manifest, source_urls(manifest))
    deal = data.Deal(index.counts, seed=0, world=1, rank=0, batch_size=batch, mode="random", workers=workers)
    want = epochs * data.steps_per_epoch(len(index), 1, batch)
    for i, _ in enumerate(data.make_loader(data.RunData(index, deal, epoch=0), workers)):
        if i + 1 == want:
            break


def count(tmp: Path, cache: Path, src: Path, epochs: int, args) -> tuple[Counter, int, int]:
    """(opens by kind, opens by processes other than the main one, samples trained) of one traced run."""
    log = tmp / f"strace-{epochs}.log"
    cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=openat", "-e", "signal=none", "-o", str(log),
           sys.executable, __file__, "--child", str(cache), str(epochs), "--workers", str(args.workers),
           "--batch", str(args.batch)]
    subprocess.run(cmd, check=True, capture_output=True)
    opens = strace_opens(log, [cache, src])
    main = int(log.read_text().split(None, 1)[0])
    samples = epochs * (args.shards * args.per_shard // args.batch) * args.batch
    return Counter(kind(p) for _, p, _ in opens), sum(pid != main for pid, _, _ in opens), samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=128)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--format", default="wds", choices=["wds", "zarr"])
    p.add_argument("--child", nargs=2, metavar=("CACHE", "EPOCHS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(Path(args.child[0]), int(args.child[1]), args.workers, args.batch)
    import numpy as np
    from _common import header, make_source, table, write_cache

    header("File opens of the training loader (strace -f)", False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-opens-"))
    try:
        pattern = make_source(tmp / "src", args.shards, args.per_shard, sizes=(64, 96))
        pool = np.random.default_rng(0).standard_normal((args.views + 2, 16, 32)).astype(np.float32)
        teacher = {"arch": "resnet18", "layer": -1, "sha256": "0" * 64, "precision": "float32", "weights": "random"}
        write_cache(tmp / "cache", pattern, args.views, "bf16z-zstd", pool, teacher, fmt=args.format, size=32)
        files = sum(1 for f in (tmp / "cache").rglob("*") if f.is_file()) + args.shards
        print(f"{args.shards} shards x {args.per_shard} samples, V = {args.views} ({args.format}), {args.workers} "
              f"loader workers, batch {args.batch}: {files} files (cache + source tars).\n")
        rows = []
        for epochs in (1, 3):
            kinds, by_workers, samples = count(tmp, tmp / "cache", tmp / "src", epochs, args)
            total = sum(kinds.values())
            rows.append([epochs, *(kinds.get(k, 0) for k, _ in KINDS), total, by_workers, f"{total / samples:.3f}"])
        print(table(["epochs", *(k for k, _ in KINDS), "all", "by loader workers", "opens per trained sample"], rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
