"""Shard leases: `<name>.lock`, held by the one extraction process that works on a shard, and the clean-up of
what an interrupted writer of that shard left behind.

A job holds the leases of the shards it will write from its start to each shard's commit, and a heartbeat thread
(common.files.Heartbeat) touches every one of them each `ttl / BEATS_PER_TTL` seconds, so none goes quiet while
the job lives; another host's lease silent for its `ttl` (written in the lease) is a dead node's and is taken
over. On this host a lease is stale as soon as its process is gone."""
from __future__ import annotations

import glob
import os
import shutil
import time
from pathlib import Path

from common.files import LockFile, mtime
from shards.errors import CacheError
from shards.index import read_record, record_path, record_problems, shard_dir

LEASE_TTL = 60.0   # s without a heartbeat after which another host's lease counts as dead (extract.lease_ttl)
BEATS_PER_TTL = 12  # heartbeats in a ttl: a lease is taken over only after 12 missed beats (5 s apart by default)


def beat_interval(ttl: float) -> float:
    return ttl / BEATS_PER_TTL


class Lease(LockFile):
    """`<name>.lock` (common.files.LockFile): host, pid, nonce, start time and ttl; kept alive by the holder's
    heartbeat thread, so another host's lease silent for its ttl is a lost node's."""

    def __init__(self, cache: Path, name: str, ttl: float = LEASE_TTL):
        self.name = name
        super().__init__(Path(cache) / f"{name}.lock", ttl=ttl, since=time.time())

    def describe(self) -> str:
        """Who holds it, and when it last beat: for the messages of a job that waits for it."""
        h, beat = self.holder(), mtime(self.path)
        if not beat:  # gone: released, or never taken
            return f"{self.name} (no lease: no job holds it now)"
        if not h:
            return f"{self.name} (a lease being written or torn, last touched {time.time() - beat:.0f} s ago)"
        return f"{self.name} (host {h.get('host')} pid {h.get('pid')}, last heartbeat {time.time() - beat:.0f} s ago)"


def remove_partial(cache: Path, name: str) -> None:
    """Leftovers of an interrupted writer of this shard (call only while holding its lease): temporaries,
    a shard directory without a record, and a record whose files are not all there. A symbolic link among them
    (or a file where the shard's directory goes) is no writer's: a CacheError naming it, before anything is
    removed, so nothing outside the cache is ever followed or deleted."""
    cache = Path(cache)
    final = shard_dir(cache, name)
    leftovers = [*cache.glob(f"{glob.escape(name)}.tmp-*"), *cache.glob(f"{glob.escape(name)}.done.json.tmp-*")]
    for p in leftovers:
        _check_ours(p)
    _check_ours(final, directory=True)
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # the shard's, or its record's (killed mid-write)
    record = read_record(cache, name)
    if record is not None and record_problems(cache, name, record):
        record_path(cache, name).unlink()
        record = None
    if final.exists() and record is None:
        shutil.rmtree(final)


def _check_ours(p: Path, directory: bool = False) -> None:
    """A CacheError if `p` is a symbolic link, or (`directory`: a shard's) not a directory: extract-features makes
    neither, and removing what a link points to could delete files outside the cache."""
    if p.is_symlink():
        what = f"a symbolic link (to {os.readlink(p)})"
    elif directory and p.exists() and not p.is_dir():
        what = "not a directory, where the shard's directory goes"
    else:
        return
    raise CacheError(f"{p} is {what}, not something extract-features wrote; it is neither followed nor deleted. "
                     "Nothing was removed: move it out of the cache (deleting a link leaves what it points to "
                     "alone), then rerun")
