"""Stage one's data: source shards -> decoded images -> V recorded views each, in batches of one shard.

DataLoader workers form teams (`pick_teams`): a team takes whole shards, and its members share each shard's
batches, so a rank with fewer shards than workers still uses every worker; `in_source_order` gives the main
process the batches back in source order, so the bytes do not depend on the worker count.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.augment import decode_image, decode_samples, replay_views, sample_views
from common.config import Config
from common.faults import fault_point
from common.signals import ignore_stop_signals
from shards.source import ShardError, iter_samples, local_tar


def unusable_key(sample: dict) -> str | None:
    """Why a sample's key cannot key the cache: not UTF-8 (keys are stored as UTF-8), or twice in its shard."""
    try:
        sample["key"].encode()
    except UnicodeEncodeError:  # a member name that is not UTF-8
        return "key is not valid UTF-8"
    if sample["duplicate"]:
        return "duplicate key: the shard holds this key twice; only its first sample is used"
    return None


class ViewBatches(IterableDataset):
    """Batches of `extract.batch_size` consecutive samples of one shard, each image decoded once and cut into its
    recorded views (a skipped sample leaves its batch one image short). Every shard ends with an item whose `last`
    is True, holding the samples after its last full batch (maybe none), and `error` if the shard broke.

    Which samples make a batch does not depend on the number of workers, so neither do the bytes written. The
    workers form `teams` (worker w is in team w % teams); team t takes shards t, t + teams, ...; its batches are
    numbered in order over its shards (`seq`), and its member j of m decodes those with seq % m == j. Every member
    reads every header of its team's shards but only its own samples' bytes from a local tar (a stream it reads
    whole). in_source_order puts the items back in order; outside a DataLoader worker, one process does it all."""

    def __init__(self, urls: list[str], names: dict[str, str], cfg: Config, teams: int = 1):
        self.urls, self.names, self.a, self.batch_size = urls, names, cfg.augment, cfg.extract.batch_size
        self.teams, self.stall_timeout = teams, cfg.extract.stall_timeout

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        teams = min(self.teams, n)
        team, member, members = w % teams, w // teams, len(range(w % teams, n, teams))
        seq = 0
        for url in self.urls[team::teams]:
            seq = yield from self.shard_batches(url, team, seq, member, members)

    def _batch(self, url, team, seq, rows, skipped, last, error=None):
        a = self.a
        return {"shard": self.names[url], "source": url, "team": team, "seq": seq, "keys": [r[0] for r in rows],
                "records": np.stack([r[1] for r in rows]) if rows else np.zeros((0, a.views, 5), np.int32),
                "views": torch.stack([r[2] for r in rows]) if rows else torch.zeros(0, a.views, 3, a.size, a.size,
                                                                                    dtype=torch.uint8),
                "src_hw": [r[3] for r in rows], "cls": [r[4] for r in rows], "src": [r[5] for r in rows],
                "skipped": skipped, "last": last, "error": error}

    def shard_batches(self, url: str, team: int = 0, first: int = 0, member: int = 0, members: int = 1):
        """Member `member` of `members`' batches of `url`, numbered from `first`; returns the number after them."""
        bs = self.batch_size
        mine = lambda batch: (first + batch) % members == member  # noqa: E731
        rows, skipped, n, error = [], [], 0, None
        try:
            for s in iter_samples(url, wanted=lambda i: mine(i // bs), stall_timeout=self.stall_timeout):
                if s is not None:
                    self.add(self.names[url], s, rows, skipped)
                n += 1
                if n % bs == 0 and mine(n // bs - 1):
                    yield self._batch(url, team, first + n // bs - 1, rows, skipped, last=False)
                    rows, skipped = [], []
        except ShardError as e:
            rows, error = [], e.reason
        if mine(n // bs):
            yield self._batch(url, team, first + n // bs, rows, skipped, last=True, error=error)
        return first + n // bs + 1

    def add(self, name: str, sample: dict, rows: list, skipped: list) -> None:
        """A sample decoded and cut into its views (a row), or skipped with its reason: a bad sample is data."""
        a = self.a

        def decode(data: bytes):
            fault_point("decode", name)  # the reliability tests kill or signal the process here
            return decode_image(data)

        for s, img, why in decode_samples([sample], reject=unusable_key, decode=decode):
            if img is None:
                skipped.append({"key": s["key"].encode(errors="backslashreplace").decode(), "reason": why})
                continue
            records = sample_views(a.seed, s["key"], img.height, img.width, a.views, a.scale, a.ratio, a.flip)
            src = {"offset": s["offset"], "size": len(s["image"]), "crc": zlib.crc32(s["image"])}
            rows.append((s["key"], records, replay_views(img, records, a.size, a.cut), (img.height, img.width), s["cls"],
                         src))


def in_source_order(items):
    """The loader's items in each team's order (`seq`): the DataLoader's round-robin over its workers gives that
    order already; an item that came early would wait here for the ones before it."""
    expected, early = {}, {}
    for item in items:
        team = item["team"]
        early[team, item["seq"]] = item
        while (team, expected.get(team, 0)) in early:
            yield early.pop((team, expected.get(team, 0)))
            expected[team] = expected.get(team, 0) + 1


# What a member pays for its team's samples it does not decode, per decode and cut of its own: a local tar's headers
# (~0.5 ms a sample here, by seeking, against ~20 ms to decode and cut one; docs/BENCHMARKS.md), or a stream's bytes
# (read whole by every member: m times the network traffic, so shards are shared only when there are too few)
SKIP_COST = {"local": 0.05, "stream": 0.5}


def pick_teams(shards: int, workers: int, skip_cost: float = SKIP_COST["local"]) -> int:
    """The number of worker teams that finishes `shards` first: team t takes shards t, t + T, ... with workers t,
    t + T, ..., each of which decodes 1 / m of its team's samples and skips the others at `skip_cost` each. For 10
    workers on local tars: 10, 20 or 1,282 shards, one worker a team (whole shards, no header read twice); 5 shards,
    5 teams of 2; 6 or 11 shards, 2 teams of 5 (6 or 10 teams would end on a worker alone with a last shard)."""
    def time(teams):
        return max(len(range(t, shards, teams)) * (1 / len(range(t, workers, teams)) + skip_cost)
                   for t in range(teams))

    return min(range(min(shards, workers), 0, -1), key=time, default=1)


def view_loader(cfg: Config, pending: list[str], names: dict[str, str], device) -> tuple[DataLoader, int, int]:
    """ViewBatches in a DataLoader of data.workers workers (none if nothing is pending), and their number of teams
    (see ViewBatches, pick_teams)."""
    workers = cfg.data.workers if pending else 0
    teams = pick_teams(len(pending), workers, SKIP_COST["local" if all(map(local_tar, pending)) else "stream"])
    # One worker a team: items as the workers make them, so a worker held up by a stalling source holds up no other
    # worker's shards (each worker's own items stay in order). Teams of several share a shard's batches and must
    # come round-robin: out of order, in_source_order would buffer a fast member's batches without bound.
    loader = DataLoader(ViewBatches(pending, names, cfg, teams), batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals, in_order=teams < workers)
    return loader, workers, teams
