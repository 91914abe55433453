"""A cache's format checks, without its teacher; `img2vec verify` runs them (and may then recompute views).

Every problem names the shard, and the key when there is one:

1. manifest and records: manifest.json parses; every listed shard has a completion record and its
   files; each record agrees with itself (statistics sized for the views) and the manifest's merged
   statistics and counts equal the records'.
2. bytes: every file of the shard has the size and sha256 its record lists, the index holds the
   recorded number of samples with unique keys, and every view of every sample decodes, holds
   finite tokens and has the crc32 its index lists. A file that matches its sha256 but not a crc32
   means the index changed; a sha256 mismatch with every crc32 intact means a byte outside the
   token arrays changed (tar headers) or the record's sha256 did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.files import file_sha256
from shards.errors import CacheError, CorruptSample, RefusedFile
from shards.index import ShardRecord, read_record, record_path, record_problems, row_ok, shard_dir
from shards.manifest import Manifest, check_replay, read_manifest
from shards.reader import FeatureShard

REDO_HINT = ("to redo a shard: delete <cache>/<shard>.done.json and rerun extract-features with the same config "
             "(complete shards are skipped)")
STAT_FIELDS = ("count", "sum", "sumsq", "td_sum", "td_count")


@dataclass
class Problem:
    shard: str | None
    key: str | None
    what: str
    redo: bool = True  # fixed by re-extracting the shard (False: the source or the teacher is at fault)
    refused: bool = False  # a torn or hostile file, or a source that is a command: not opened, not run

    def line(self) -> str:
        where = self.shard or "cache"
        if self.key is not None:
            where += f" key {self.key!r}"
        return f"{where}: {self.what}"


@dataclass
class Checks:
    """What the format checks found: one row per manifest shard, the problems and the warnings."""
    cache: str
    manifest: Manifest | None = None
    shards: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def refused(self) -> list[Problem]:
        return [p for p in self.problems if p.refused]

    def add_error(self, shard: str | None, e: CacheError) -> None:
        """A CacheError as a problem; a RefusedFile (torn or hostile) is marked refused."""
        self.problems.append(Problem(shard, None, str(e), refused=isinstance(e, RefusedFile)))


# ---------------------------------------------------------------- layer 1: manifest and records

def check_manifest(cache: Path, report: Checks, replays: bool = False) -> Manifest | None:
    """The manifest, or None (with the problem noted). `replays`: views will be replayed on this machine, so a
    replay probe that differs is a problem, not a warning."""
    try:
        manifest = read_manifest(cache)  # not JSON, a field missing or of another type: a CacheError naming it
    except CacheError as e:
        report.add_error(None, e)
        return None
    try:
        codec = manifest.token_codec
    except ValueError as e:  # ConfigError: a codec this version does not know
        report.problems.append(Problem(None, None, f"manifest.json: codec: {e}"))
        return None
    try:
        check_replay(manifest)
    except CacheError as e:  # the cache is fine; this machine would replay it wrong (a problem only if it does)
        if replays:
            report.problems.append(Problem(None, None, str(e), redo=False))
        else:
            report.warnings.append(f"{e} (not a problem of the cache: training on this machine would refuse it)")
    if manifest.codec.error_bound not in (None, codec.error_bound):
        report.warnings.append(f"codec {codec.name}: the cache was written when it promised "
                               f"'{manifest.codec.error_bound}'; this version promises '{codec.error_bound}' "
                               "(the recompute checks the latter)")
    return manifest


def check_records(cache: Path, manifest: Manifest, report: Checks) -> dict[str, ShardRecord]:
    """Stray files, each shard's completion record, the manifest's merged statistics: {shard: usable record}."""
    check_strays(cache, manifest, report)
    records = {}
    for name in manifest.shard_names:
        record = check_record(cache, name, manifest, report)
        if record is not None:
            records[name] = record
    check_merged_stats(manifest, records, report)
    return records


def check_record(cache: Path, name: str, manifest: Manifest, report: Checks) -> ShardRecord | None:
    """The record of one shard, or None (with the problem noted) when it cannot be used."""
    try:
        record = read_record(cache, name)
    except CacheError as e:
        report.add_error(name, e)
        return None
    if record is None:
        report.problems.append(Problem(name, None, f"no completion record {record_path(cache, name).name} "
                                                   "(extraction unfinished or interrupted): rerun extract-features "
                                                   "with the same config to finish it"))
        return None
    missing = [f for f in ("samples", "files", "stats", "skipped") if getattr(record, f) is None]
    bad = [f"record lacks {', '.join(missing)}"] if missing else record_self_problems(record, name, manifest)
    for what in bad:
        report.problems.append(Problem(name, None, what))
    return None if missing else record


def record_self_problems(record: ShardRecord, name: str, manifest: Manifest) -> list[str]:
    """Where a record (with every field) disagrees with itself or the manifest: name, format, sizes, statistics."""
    views, (tokens, channels) = manifest.views, manifest.token_grid
    stats, bad = record.stats, []
    if record.shard not in (None, name):
        bad.append(f"record names shard {record.shard!r}")
    if record.format not in (None, manifest.cache_format):
        bad.append(f"record format {record.format!r} but the manifest says {manifest.cache_format!r}")
    if not isinstance(record.samples, int):
        bad.append(f"record says {record.samples!r} samples")
    if not isinstance(stats, dict) or any(f not in stats for f in STAT_FIELDS):
        bad.append(f"record statistics missing or incomplete (need {', '.join(STAT_FIELDS)})")
    elif isinstance(record.samples, int):
        n = record.samples
        if stats["td_count"] != n * views or stats["count"] != n * views * tokens:
            bad.append(f"record statistics count {stats['count']} tokens / {stats['td_count']} views, expected "
                       f"{n * views * tokens} / {n * views} for {n} samples x {views} views")
        if n and (len(stats["sum"]) != channels or len(stats["sumsq"]) != channels):
            bad.append(f"record statistics have {len(stats['sum'])} channels, tokens have {channels}")
        elif not all(map(math.isfinite, [stats["td_sum"], *stats["sum"], *stats["sumsq"]])):
            bad.append("record statistics are not finite (the teacher produced inf/nan?)")
    return bad


def check_merged_stats(manifest: Manifest, records: dict[str, ShardRecord], report: Checks) -> None:
    """The manifest's statistics and counts are the merge of its records' (finalize_manifest)."""
    from common.stats import TokenStats

    if len(records) != len(manifest.shards):
        return  # the shards without a usable record are reported one by one
    if manifest.stats is None:
        report.problems.append(Problem(None, None, "manifest.json has no merged statistics although every shard is "
                                                   "recorded: rerun extract-features with the same config to merge "
                                                   "them"))
        return
    stats = TokenStats()
    try:
        for r in records.values():
            stats.merge(TokenStats.from_dict(r.stats))
    except (KeyError, TypeError, ValueError):
        return  # already reported per shard
    m = manifest.stats
    want = {"samples": sum(r.samples for r in records.values()),
            "skipped": sum(len(r.skipped) for r in records.values())}
    for k, v in want.items():
        if getattr(manifest, k) != v:
            report.problems.append(Problem(None, None, f"manifest.json says {k} = {getattr(manifest, k)!r}, the records "
                                                       f"sum to {v}: a record or the manifest was changed"))
    differ = [k for k, ok in (
        ("views", m.views == stats.td_count), ("tokens", m.tokens == stats.count),
        ("mean", np.allclose(m.mean, stats.mean, rtol=1e-9, atol=0)),
        ("var", np.allclose(m.var, stats.var, rtol=1e-9, atol=0)),
        ("token_diversity", math.isclose(m.token_diversity, stats.diversity, rel_tol=1e-9)))
        if not ok]
    if differ:
        report.problems.append(Problem(None, None, f"manifest.json statistics ({', '.join(differ)}) differ from the "
                                                   "merge of the shard records' statistics: a record or the manifest "
                                                   "was changed"))


def check_strays(cache: Path, manifest: Manifest, report: Checks) -> None:
    names = set(manifest.shard_names)
    for p in sorted(cache.iterdir()):
        if ".tmp-" in p.name:
            report.warnings.append(f"{p.name}: leftover temporary of an interrupted writer (harmless; extract-features "
                                   "removes it when it redoes that shard)")
        elif p.name.endswith(".lock"):
            report.warnings.append(f"{p.name}: an extraction job holds (or held) this shard: {_head(p)}")
        elif p.name != "manifest.json" and p.name.removesuffix(".done.json") not in names:
            report.warnings.append(f"{p.name}: not a shard of this cache's manifest (ignored by training)")


def _head(path: Path, n: int = 200) -> str:
    """The first n bytes of a file, as text (a lock's holder); never the whole of a file someone made large."""
    try:
        with path.open("rb") as f:  # also a cache's RemotePath
            return f.read(n).decode(errors="replace")
    except OSError as e:
        return f"unreadable ({e.strerror})"


# ---------------------------------------------------------------- layer 2: bytes

def check_shards(cache: Path, manifest: Manifest, records: dict[str, ShardRecord], report: Checks,
                 wanted: dict[str, dict[str, list[int]]] | None = None, progress: bool = False) -> dict:
    """check_shard for every shard of the manifest, a row each in `report.shards`. Returns the captured samples
    {(shard, key): {"views", "tokens", "src_hw"}} of `wanted` ({shard: {key: views}}) that passed."""
    from tqdm import tqdm

    captured: dict = {}
    for name in tqdm(manifest.shard_names, desc="verify", unit="shard", disable=not progress, dynamic_ncols=True):
        if name in records:
            report.shards.append(check_shard(cache, name, manifest, records[name], (wanted or {}).get(name, {}),
                                             report, captured))
        else:
            report.shards.append({"shard": name, "samples": None, "skipped": None, "sha256": "-",
                                  "samples_ok": 0, "status": "FAILED"})
    return captured


def check_shard(cache: Path, name: str, manifest: Manifest, record: ShardRecord, wanted: dict[str, list[int]],
                report: Checks, captured: dict) -> dict:
    """Files (size, sha256), the index, then every view of every sample: decodes, finite, crc32 as indexed.
    Samples in `wanted` (key -> views) keep their view records and decoded tokens in `captured` for recompute."""
    row = {"shard": name, "samples": record.samples, "skipped": len(record.skipped), "sha256": "-",
           "samples_ok": 0, "status": "FAILED"}
    missing = record_problems(cache, name, record)
    if missing:
        report.problems += [Problem(name, None, f"{m} although it is recorded") for m in missing]
        return row
    root = shard_dir(cache, name)
    changed = [rel for rel, meta in record.files.items() if file_sha256(root / rel) != meta.sha256]
    row["sha256"] = "MISMATCH" if changed else "ok"
    before = len(report.problems)
    try:
        shard = FeatureShard(cache, name, manifest, record)
    except CacheError as e:
        report.add_error(name, e)
        return row
    try:
        keys = check_index(shard, report)
        bad, tokens_of = check_views(shard, keys, manifest, wanted, bool(changed), report)
    finally:
        shard.close()
    row["samples_ok"] = int((~bad).sum())
    for i, tokens in tokens_of.items():
        if not bad[i]:
            meta = shard.index[i]
            captured[(name, keys[i])] = {"views": np.array(meta["views"]), "tokens": tokens,
                                         "src_hw": [int(meta["height"]), int(meta["width"])]}
    if changed:
        why = ("every view's crc32 matches, so a byte outside the token arrays (tar header) or the record's sha256 "
               "changed" if len(report.problems) == before else "the file changed after it was recorded")
        report.problems.append(Problem(name, None, f"sha256 of {', '.join(changed)} differs from its record ({why})"))
    if len(report.problems) == before:
        row["status"] = "ok"
    return row


def check_index(shard: FeatureShard, report: Checks) -> list[str]:
    """Each index row's own crc32 and unique keys; returns the keys, in index order."""
    keys = [k.decode(errors="replace") for k in shard.index["key"]]
    for i, index_row in enumerate(shard.index):
        if not row_ok(index_row):
            report.problems.append(Problem(shard.name, keys[i], f"index row {i}: crc32 differs (crop box, offsets or "
                                                                "key damaged)"))
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        report.problems.append(Problem(shard.name, key, "key listed twice in the index"))
    return keys


def check_views(shard: FeatureShard, keys: list[str], manifest: Manifest, wanted: dict[str, list[int]],
                files_changed: bool, report: Checks) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Every view of every sample: its crc32 as indexed, decodes, finite. -> (bad [N] bool, the decoded tokens
    [V, T, C] of the `wanted` samples by index row)."""
    codec, views = manifest.token_codec, manifest.views
    bad = np.zeros(len(keys), bool)
    tokens_of: dict[int, np.ndarray] = {}
    ids = np.arange(len(keys))
    try:
        for v in range(views):
            for i, packed in zip(ids, shard.read_views(ids, np.full(len(ids), v))):
                if isinstance(packed, CorruptSample):
                    report.problems.append(Problem(shard.name, keys[i], packed.reason + (
                        "" if files_changed else " (the files match their recorded sha256, so the index was changed)")))
                    bad[i] = True
                    continue
                tokens = codec.decode(packed)
                if not np.isfinite(tokens).all():
                    report.problems.append(Problem(shard.name, keys[i], f"view {v}: stored tokens are not finite "
                                                                        "(inf/nan from the teacher: was it run in "
                                                                        "float16?)"))
                    bad[i] = True
                elif keys[i] in wanted and v in wanted[keys[i]]:
                    tokens_of.setdefault(i, np.zeros((views, *tokens.shape), np.float32))[v] = tokens
    except Exception as e:  # noqa: BLE001 - a broken Zarr group raises the library's own errors
        report.problems.append(Problem(shard.name, None, f"unreadable: {type(e).__name__}: {e}"))
        bad[:] = True
    return bad, tokens_of
