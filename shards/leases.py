"""Shard leases: `<name>.lock`, held by the one extraction process that works on a shard, and the clean-up of
what an interrupted writer of that shard left behind."""
from __future__ import annotations

import glob
import shutil
import time
from pathlib import Path

from common.files import LockFile
from shards.index import read_record, record_path, record_problems, shard_dir

LEASE_TTL = 1800.0  # s without a heartbeat after which another host's lease counts as dead (a lost node)


class Lease(LockFile):
    """`<name>.lock` (common.files.LockFile): host, pid, nonce, start time; the holder beats (`beat()`) on every
    batch written, so another host's lease is dead after LEASE_TTL without one (a lost node)."""

    def __init__(self, cache: Path, name: str):
        super().__init__(Path(cache) / f"{name}.lock", ttl=LEASE_TTL, since=time.time())


def remove_partial(cache: Path, name: str) -> None:
    """Leftovers of an interrupted writer of this shard (call only while holding its lease): temporaries,
    a shard directory without a record, and a record whose files are not all there."""
    cache = Path(cache)
    final = shard_dir(cache, name)
    for p in [*cache.glob(f"{glob.escape(name)}.tmp-*"), *cache.glob(f"{glob.escape(name)}.done.json.tmp-*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # the shard's, or its record's (killed mid-write)
    record = read_record(cache, name)
    if record is not None and record_problems(cache, name, record):
        record_path(cache, name).unlink()
        record = None
    if final.exists() and record is None:
        shutil.rmtree(final)
