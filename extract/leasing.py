"""Extraction on a cache other jobs share: a job launched twice, a requeue while the old job still runs, a requeue
after its node died, jobs on several hosts.

A job leases every pending shard it can (`<name>.lock`, shards/leases.py; a dead job's lease is taken over) and a
heartbeat thread keeps each lease alive until that shard is committed, so another host never takes a shard from
a live job, however long it stays queued. A shard another live job holds is left to it; when this job's own work
is done it waits for them (`extract.wait_for_others` seconds, saying so), taking over any whose holder dies
(silent for its lease's ttl) and redoing any released unfinished. It never reports success with its shards
incomplete: what other jobs still hold after the wait is `shards_busy_elsewhere`, and the command exits 75 (rerun).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from common.config import Extract
from common.files import Heartbeat
from common.signals import StopSignals
from shards.index import read_record, record_problems
from shards.leases import Lease, beat_interval, remove_partial

SAY_EVERY = 60.0  # s between two "waiting for" messages


def complete(cache: Path, name: str) -> bool:
    """Recorded, and every recorded file there with its recorded size (else it is redone)."""
    record = read_record(cache, name)
    return record is not None and not record_problems(cache, name, record)


def take_leases(cache: Path, urls: list[str], names: dict[str, str], ttl: float,
                heartbeat: Heartbeat) -> dict[str, Lease]:
    """The leases of `urls`' shards that this job could take (free, or a dead job's), each on the heartbeat and
    its shard's leftovers cleaned; a shard finished since it was found pending is let go. On an error (a lease
    path or a leftover that is no job's: a CacheError naming it) every lease taken here is released first."""
    leases = {}
    try:
        for u in urls:
            lease = Lease(cache, names[u], ttl)
            if not lease.acquire():
                continue  # a live job holds it
            leases[names[u]] = lease
            if complete(cache, names[u]):  # another job finished it since we looked
                del leases[names[u]]
                lease.release()
                continue
            heartbeat.add(lease)
            remove_partial(cache, names[u])
    except BaseException:
        for lease in leases.values():
            heartbeat.discard(lease)
            lease.release()
        raise
    return leases


def extract_shared(cache: Path, todo: list[str], names: dict[str, str], e: Extract,
                   extract: Callable[[list[str], dict[str, Lease]], dict]) -> dict:
    """Run `extract(urls, leases)` on the shards of `todo` this job can lease, then wait for the ones other jobs
    hold (up to e.wait_for_others seconds) and do any that come free unfinished. Returns the passes' results
    summed, with `shards_not_done` (of `todo`: failed, stopped in flight, or another job's), `shards_busy_elsewhere`
    (held by other live jobs when last looked at: never the ones this job held when it stopped) and `waited_s`."""
    total = {"preempted": None, "shards_done": 0, "shards_failed": [], "images": 0, "views": 0, "skipped_samples": 0,
             "seconds": 0.0}
    deadline, said, t0, pending = None, -SAY_EVERY, time.monotonic(), todo
    with Heartbeat(beat_interval(e.lease_ttl)) as heartbeat, StopSignals() as stop:
        while todo:
            leases = take_leases(cache, todo, names, e.lease_ttl, heartbeat)
            if leases:
                try:
                    result = extract([u for u in todo if names[u] in leases], leases)
                finally:
                    for lease in leases.values():
                        lease.release()
                _add(total, result)
            todo = [u for u in todo if names[u] not in leases and not complete(cache, names[u])]  # others' only
            if total["preempted"]:  # what it leased and did not finish is not done, not busy elsewhere
                break
            now = time.monotonic()
            deadline = deadline or now + e.wait_for_others
            if not todo or stop.requested or now >= deadline:
                break
            if now - said >= SAY_EVERY:
                said = now
                _say_waiting(cache, todo, names, e, deadline - now)
            time.sleep(min(beat_interval(e.lease_ttl), max(deadline - now, 0.0)))
        total["preempted"] = total["preempted"] or stop.received
    waited = time.monotonic() - t0 - total["seconds"]
    total["images_per_s"] = round(total["images"] / total["seconds"], 2) if total["seconds"] > 0 else 0.0
    return {**total, "shards_not_done": [names[u] for u in pending if not complete(cache, names[u])],
            "shards_busy_elsewhere": [Lease(cache, names[u]).describe() for u in todo],
            "waited_s": round(max(waited, 0.0), 1)}


def _say_waiting(cache: Path, todo: list[str], names: dict[str, str], e: Extract, left: float) -> None:
    held = [Lease(cache, names[u]).describe() for u in todo[:3]]
    print(f"extract-features: waiting for {len(todo)} shard(s) that other jobs hold: {'; '.join(held)}"
          f"{' ...' if len(todo) > 3 else ''}. A holder silent for {e.lease_ttl:g} s (extract.lease_ttl) is taken "
          f"over; after {left:.0f} s more (extract.wait_for_others) this job exits 75 to be rerun", file=sys.stderr)


def _add(total: dict, result: dict) -> None:
    for k in ("shards_done", "images", "views", "skipped_samples", "seconds"):
        total[k] += result.get(k, 0)
    total["shards_failed"] += result.get("shards_failed", [])
    total["preempted"] = total["preempted"] or result.get("preempted")
    for k, v in result.items():  # what one pass reports (data_workers, ...)
        total.setdefault(k, v)
