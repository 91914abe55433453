"""`extract-features --config pipeline.toml [--set section.key=value ...] [--rank R --world-size W]`"""
from __future__ import annotations

import argparse
import errno
import json
import sys

from common.config import ConfigError, add_config_args, load_config
from common.signals import PREEMPTED, status_of
from shards.errors import CacheError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="extract-features", description=__doc__.split("`")[0] or None,
                                epilog="Rank and world size come from flags, else RANK/WORLD_SIZE (torchrun, "
                                       "accelerate), else SLURM_PROCID/SLURM_NTASKS, else 0/1.")
    add_config_args(p)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.rank is not None:
            cfg.extract.rank = args.rank
        if args.world_size is not None:
            cfg.extract.world_size = args.world_size
        from extract.pipeline import run_extraction

        summary = run_extraction(cfg, progress=not args.no_progress)
    except (ConfigError, CacheError) as e:
        print(f"extract-features: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = e.filename or f"into the cache at {cfg.cache.path if cfg else '?'}"  # a write() names no file
        if e.errno == errno.ENOSPC:
            print(f"extract-features: error: no space left on the device while writing {where}. Nothing partial "
                  "was recorded as complete; free space and rerun the same command to finish.", file=sys.stderr)
            return 3
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            print(f"extract-features: error: cannot write {where} ({e.strerror}): the cache still has shards to "
                  "extract. Make it writable, or use another cache.path", file=sys.stderr)
            return 2
        raise
    print(json.dumps(summary, indent=1))
    if summary["preempted"]:
        print(f"extract-features: stopped on {summary['preempted']}: {summary['shards_done']} shards finished and "
              "recorded, shards in flight dropped; rerun the same command to finish", file=sys.stderr)
        return status_of(summary["preempted"])  # 75, or 130 on SIGINT
    if summary["shards_failed"]:
        print("extract-features: error: these source shards could not be read and were not written:\n  "
              + "\n  ".join(summary["shards_failed"]) + "\nFix or replace them (a file not found: is data.shards "
              "right?) and rerun: complete shards are skipped.", file=sys.stderr)
        return 1
    if summary["shards_busy_elsewhere"]:  # never 0 with this rank's shards incomplete
        print(f"extract-features: {len(summary['shards_busy_elsewhere'])} shard(s) are still held by other live jobs "
              f"after waiting {summary['waited_s']:g} s (extract.wait_for_others): "
              + "; ".join(summary["shards_busy_elsewhere"][:5]) + ". Rerun the same command once they finish (it "
              "skips complete shards) or to take over those whose job died", file=sys.stderr)
        return PREEMPTED
    return 0
