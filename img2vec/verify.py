"""`img2vec verify CACHE`: is this feature cache what its records say, and what its teacher computes?

Three layers of checks; every problem names the shard, and the key when there is one:

1. manifest and records: manifest.json parses; every listed shard has a completion record and its
   files; each record agrees with itself (statistics sized for the views) and the manifest's merged
   statistics and counts equal the records'.
2. bytes: every file of the shard has the size and sha256 its record lists, the index holds the
   recorded number of samples with unique keys, and every view of every sample decodes, holds
   finite tokens and has the crc32 its index lists. A file that matches its sha256 but not a crc32
   means the index changed; a sha256 mismatch with every crc32 intact means a byte outside the
   token arrays changed (tar headers) or the record's sha256 did.
3. `--recompute N`: N random (shard, key, view) triples are replayed from their source images and
   run through the teacher rebuilt from the manifest; the stored tokens must equal its output within
   the codec's error bound.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.codecs import get_codec, token_cosines
from shards.features import (
    CacheError,
    CorruptSample,
    FeatureShard,
    file_sha256,
    read_index,
    check_replay,
    manifest_cut,
    read_manifest,
    read_record,
    record_path,
    record_problems,
    row_ok,
    shard_dir,
    source_urls,
)

REDO_HINT = ("to redo a shard: delete <cache>/<shard>.done.json and rerun extract-features with the same config "
             "(complete shards are skipped)")
STAT_FIELDS = ("count", "sum", "sumsq", "td_sum", "td_count")
MANIFEST_FIELDS = ("format_version", "cache_format", "codec", "teacher", "augment", "token_shape", "shards")


@dataclass
class Problem:
    shard: str | None
    key: str | None
    what: str
    redo: bool = True  # fixed by re-extracting the shard (False: the source or the teacher is at fault)

    def line(self) -> str:
        where = self.shard or "cache"
        if self.key is not None:
            where += f" key {self.key!r}"
        return f"{where}: {self.what}"


@dataclass
class Report:
    cache: str
    manifest: dict | None = None
    shards: list[dict] = field(default_factory=list)      # one row per manifest shard
    recompute: list[dict] = field(default_factory=list)   # one row per recomputed view
    teacher: dict | None = None                            # the rebuilt teacher's fingerprint
    recompute_requested: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = {"cache": self.cache, "ok": self.ok, "shards": self.shards, "recompute": self.recompute,
             "recompute_requested": self.recompute_requested,
             "teacher": self.teacher, "problems": [asdict(p) for p in self.problems], "warnings": self.warnings}
        if self.recompute:
            d["max_abs_error"] = max(r["max_abs_err"] for r in self.recompute)
            d["min_cosine"] = min(r["min_cos"] for r in self.recompute)
        return d


# ---------------------------------------------------------------- codec error bounds

NOISE = "1e-5 * max|x| of the token + 1e-6"  # slack for float rounding and the teacher's run-to-run noise


def codec_bound(codec, online: np.ndarray) -> np.ndarray:
    """The codec's own elementwise bound on |decode(encode(x)) - x| for the teacher's fp32 output x."""
    if hasattr(codec, "max_abs_error"):
        return codec.max_abs_error(online)
    span = online.max(-1, keepdims=True) - online.min(-1, keepdims=True)  # codecs without the method
    return {"bf16": np.abs(online) * 2.0 ** -8, "u8": np.broadcast_to(span / 510, online.shape)}.get(
        codec.kind, np.zeros_like(online))


def error_bound(codec, online: np.ndarray, extra_rtol: float = 0.0) -> np.ndarray:
    """How far stored tokens may be from the teacher's fp32 output `online` [..., T, C], elementwise."""
    mag = np.abs(online)
    noise = 1e-5 * mag.max(-1, keepdims=True) + 1e-6
    return codec_bound(codec, online) * 1.001 + noise + extra_rtol * mag


# ---------------------------------------------------------------- layer 1: manifest and records

def check_manifest(cache: Path, report: Report, recompute: int = 0) -> dict | None:
    try:
        manifest = read_manifest(cache)
    except CacheError as e:
        report.problems.append(Problem(None, None, str(e)))
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.problems.append(Problem(None, None, f"{cache / 'manifest.json'} is not valid JSON ({e}); "
                                                   "the cache's identity is lost: re-extract into a new cache"))
        return None
    missing = [f for f in MANIFEST_FIELDS if f not in manifest]
    if missing:
        report.problems.append(Problem(None, None, f"{cache / 'manifest.json'} lacks {', '.join(missing)}: "
                                                   "not a manifest written by extract-features"))
        return None
    try:
        codec = get_codec(manifest["codec"]["name"])
    except (KeyError, TypeError, ValueError) as e:
        report.problems.append(Problem(None, None, f"manifest.json: codec: {e}"))
        return None
    try:
        check_replay(manifest)
    except CacheError as e:  # the cache is fine; this machine would replay it wrong (a problem only if it does)
        if recompute:
            report.problems.append(Problem(None, None, str(e), redo=False))
        else:
            report.warnings.append(f"{e} (not a problem of the cache: training on this machine would refuse it)")
    if manifest["codec"].get("error_bound", codec.error_bound) != codec.error_bound:
        report.warnings.append(f"codec {codec.name}: the cache was written when it promised "
                               f"'{manifest['codec']['error_bound']}'; this version promises '{codec.error_bound}' "
                               "(the recompute checks the latter)")
    return manifest


def check_record(cache: Path, name: str, manifest: dict, report: Report) -> dict | None:
    """The record of one shard, or None (with the problem noted) when it cannot be used."""
    try:
        record = read_record(cache, name)
    except CacheError as e:
        report.problems.append(Problem(name, None, str(e)))
        return None
    if record is None:
        report.problems.append(Problem(name, None, f"no completion record {record_path(cache, name).name} "
                                                   "(extraction unfinished or interrupted): rerun extract-features "
                                                   "with the same config to finish it"))
        return None
    bad = []
    missing = [f for f in ("samples", "files", "stats", "skipped") if f not in record]
    if missing:
        bad.append(f"record lacks {', '.join(missing)}")
    else:
        views, (tokens, channels) = manifest["augment"]["views"], manifest["token_shape"]
        stats = record["stats"]
        if record.get("shard", name) != name:
            bad.append(f"record names shard {record['shard']!r}")
        if record.get("format", manifest["cache_format"]) != manifest["cache_format"]:
            bad.append(f"record format {record['format']!r} but the manifest says {manifest['cache_format']!r}")
        if not isinstance(record["samples"], int):
            bad.append(f"record says {record['samples']!r} samples")
        if not isinstance(stats, dict) or any(f not in stats for f in STAT_FIELDS):
            bad.append(f"record statistics missing or incomplete (need {', '.join(STAT_FIELDS)})")
        elif isinstance(record["samples"], int):
            n = record["samples"]
            if stats["td_count"] != n * views or stats["count"] != n * views * tokens:
                bad.append(f"record statistics count {stats['count']} tokens / {stats['td_count']} views, expected "
                           f"{n * views * tokens} / {n * views} for {n} samples x {views} views")
            if n and (len(stats["sum"]) != channels or len(stats["sumsq"]) != channels):
                bad.append(f"record statistics have {len(stats['sum'])} channels, tokens have {channels}")
            elif not all(map(math.isfinite, [stats["td_sum"], *stats["sum"], *stats["sumsq"]])):
                bad.append("record statistics are not finite (the teacher produced inf/nan?)")
    for what in bad:
        report.problems.append(Problem(name, None, what))
    return None if missing else record


def check_merged_stats(manifest: dict, records: dict[str, dict], report: Report) -> None:
    """The manifest's statistics and counts are the merge of its records' (finalize_manifest)."""
    from common.stats import TokenStats

    if len(records) != len(manifest["shards"]):
        return  # the shards without a usable record are reported one by one
    if "stats" not in manifest:
        report.problems.append(Problem(None, None, "manifest.json has no merged statistics although every shard is "
                                                   "recorded: rerun extract-features with the same config to merge "
                                                   "them"))
        return
    stats = TokenStats()
    try:
        for r in records.values():
            stats.merge(TokenStats.from_dict(r["stats"]))
    except (KeyError, TypeError, ValueError):
        return  # already reported per shard
    m = manifest["stats"]
    want = {"samples": sum(r["samples"] for r in records.values()),
            "skipped": sum(len(r["skipped"]) for r in records.values())}
    for k, v in want.items():
        if manifest.get(k) != v:
            report.problems.append(Problem(None, None, f"manifest.json says {k} = {manifest.get(k)!r}, the records "
                                                       f"sum to {v}: a record or the manifest was changed"))
    differ = [k for k, ok in (
        ("views", m.get("views") == stats.td_count), ("tokens", m.get("tokens") == stats.count),
        ("mean", np.allclose(m.get("mean", []), stats.mean, rtol=1e-9, atol=0)),
        ("var", np.allclose(m.get("var", []), stats.var, rtol=1e-9, atol=0)),
        ("token_diversity", math.isclose(m.get("token_diversity", math.nan), stats.diversity, rel_tol=1e-9)))
        if not ok]
    if differ:
        report.problems.append(Problem(None, None, f"manifest.json statistics ({', '.join(differ)}) differ from the "
                                                   "merge of the shard records' statistics: a record or the manifest "
                                                   "was changed"))


def check_strays(cache: Path, manifest: dict, report: Report) -> None:
    names = {s["name"] for s in manifest["shards"]}
    for p in sorted(cache.iterdir()):
        if ".tmp-" in p.name:
            report.warnings.append(f"{p.name}: leftover temporary of an interrupted writer (harmless; extract-features "
                                   "removes it when it redoes that shard)")
        elif p.name.endswith(".lock"):
            report.warnings.append(f"{p.name}: an extraction job holds (or held) this shard: {p.read_text()[:200]}")
        elif p.name != "manifest.json" and p.name.removesuffix(".done.json") not in names:
            report.warnings.append(f"{p.name}: not a shard of this cache's manifest (ignored by training)")


# ---------------------------------------------------------------- layer 2: bytes

def check_shard(cache: Path, name: str, manifest: dict, record: dict, wanted: dict[str, list[int]],
                report: Report, captured: dict) -> dict:
    """Files (size, sha256), the index, then every view of every sample: decodes, finite, crc32 as indexed.
    Samples in `wanted` (key -> views) keep their view records and decoded tokens in `captured` for recompute."""
    codec = get_codec(manifest["codec"]["name"])
    row = {"shard": name, "samples": record["samples"], "skipped": len(record["skipped"]), "sha256": "-",
           "samples_ok": 0, "status": "FAILED"}
    missing = record_problems(cache, name, record)
    if missing:
        report.problems += [Problem(name, None, f"{m} although it is recorded") for m in missing]
        return row
    root = shard_dir(cache, name)
    changed = [rel for rel, meta in record["files"].items() if file_sha256(root / rel) != meta["sha256"]]
    row["sha256"] = "MISMATCH" if changed else "ok"
    before = len(report.problems)
    try:
        shard = FeatureShard(cache, name, manifest)
    except CacheError as e:
        report.problems.append(Problem(name, None, str(e)))
        return row
    keys = [k.decode(errors="replace") for k in shard.index["key"]]
    for i, index_row in enumerate(shard.index):
        if not row_ok(index_row):
            report.problems.append(Problem(name, keys[i], f"index row {i}: crc32 differs (crop box, offsets or key "
                                                          "damaged)"))
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        report.problems.append(Problem(name, key, "key listed twice in the index"))
    views = manifest["augment"]["views"]
    bad = np.zeros(len(keys), bool)
    tokens_of: dict[int, np.ndarray] = {}
    ids = np.arange(len(keys))
    try:
        for v in range(views):
            for i, packed in zip(ids, shard.read_views(ids, np.full(len(ids), v))):
                if isinstance(packed, CorruptSample):
                    reason = str(packed).split("is corrupt (", 1)[-1].rsplit("); run", 1)[0]
                    report.problems.append(Problem(name, keys[i], reason + (
                        " (the files match their recorded sha256, so the index was changed)" if not changed else "")))
                    bad[i] = True
                    continue
                tokens = codec.decode(packed)
                if not np.isfinite(tokens).all():
                    report.problems.append(Problem(name, keys[i], f"view {v}: stored tokens are not finite (inf/nan "
                                                                  "from the teacher: was it run in float16?)"))
                    bad[i] = True
                elif keys[i] in wanted and v in wanted[keys[i]]:
                    tokens_of.setdefault(i, np.zeros((views, *tokens.shape), np.float32))[v] = tokens
    except Exception as e:  # noqa: BLE001 - a broken Zarr group raises the library's own errors
        report.problems.append(Problem(name, None, f"unreadable: {type(e).__name__}: {e}"))
        bad[:] = True
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


# ---------------------------------------------------------------- layer 3: recompute views

def pick_triples(cache: Path, records: dict[str, dict], views: int, n: int, seed: int) -> list[tuple[str, str, int]]:
    """n distinct (shard, key, view) triples, uniform over all cached views, in shard and key order."""
    if n <= 0:
        return []
    keys = []
    for name in records:
        try:
            keys += [(name, k.decode()) for k in read_index(cache, name)["key"]]
        except CacheError:
            continue  # reported by check_shard
    total = len(keys) * views
    if not total or n <= 0:
        return []
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    return [(*keys[i // views], int(i % views)) for i in flat]


def rebuild_teacher(manifest: dict, weights: str | None, seed: int, device: str, report: Report):
    from common.config import ConfigError
    from common.config import Teacher as TeacherConfig
    from common.teacher import build_teacher

    t = manifest["teacher"]
    weights = weights or manifest.get("teacher_weights", "random")
    cfg = TeacherConfig(arch=t["arch"], layer=t["layer"], weights=weights, dtype="float32", seed=seed)
    try:
        teacher = build_teacher(cfg, device)
    except ConfigError as e:
        report.problems.append(Problem(None, None, f"cannot rebuild the teacher for --recompute: {e} "
                                                   "(a checkpoint that moved: pass --teacher-weights PATH)", False))
        return None
    report.teacher = dict(teacher.fingerprint)
    if teacher.fingerprint["sha256"] != t["sha256"]:
        hint = (f"random weights depend on teacher.seed: pass the seed the cache was made with (--teacher-seed; "
                f"tried {seed})" if weights == "random" else f"{weights} is not the checkpoint the cache was made with")
        report.problems.append(Problem(None, None, f"teacher weights sha256 {teacher.fingerprint['sha256'][:12]}... "
                                                   f"differ from the manifest's {t['sha256'][:12]}...: {hint}",
                                       False))
        return None
    return teacher


def recompute_views(manifest: dict, triples: list[tuple[str, str, int]], captured: dict, sources: dict,
                    teacher, device: str, extra_rtol: float, report: Report) -> None:
    import torch

    from common.augment import decode_image, replay_views
    from shards.source import ShardError, iter_samples

    size, codec, cut = manifest["augment"]["size"], get_codec(manifest["codec"]["name"]), manifest_cut(manifest)
    by_shard: dict[str, dict[str, list[int]]] = {}
    for name, key, view in triples:
        if (name, key) in captured:  # a sample that failed its byte checks is already a problem
            by_shard.setdefault(name, {}).setdefault(key, []).append(view)
    jobs = []  # (shard, key, view, pixels [3, S, S])
    for name, want in by_shard.items():
        url = sources.get(name)
        if url is None:
            report.problems.append(Problem(name, None, "--source-shards has no shard of this name, cannot recompute",
                                           redo=False))
            continue
        found = set()
        try:
            for s in iter_samples(url):
                if s["key"] not in want:
                    continue
                found.add(s["key"])
                cap = captured[(name, s["key"])]
                try:
                    img = decode_image(s["image"] or b"")
                except Exception as e:  # noqa: BLE001 - the source changed since extraction
                    report.problems.append(Problem(name, s["key"], f"source image does not decode ({e})", False))
                    continue
                if [img.height, img.width] != list(cap["src_hw"]):
                    report.problems.append(Problem(name, s["key"], f"source image is {img.height}x{img.width}, the "
                                                   f"cache recorded {cap['src_hw'][0]}x{cap['src_hw'][1]}: "
                                                   f"{url} is not the source this cache was made from", False))
                    continue
                pixels = replay_views(img, np.asarray([cap["views"][v] for v in want[s["key"]]]), size, cut)
                jobs += [(name, s["key"], v, p) for v, p in zip(want[s["key"]], pixels)]
                if len(found) == len(want):
                    break
        except ShardError as e:
            report.problems.append(Problem(name, None, f"{e.shard}: {e.reason}; if the dataset moved, pass "
                                                       "--source-shards with its new location", False))
            continue
        for key in sorted(set(want) - found):
            report.problems.append(Problem(name, key, f"not found in source shard {url}", False))
    outs = []
    with torch.no_grad():
        for i in range(0, len(jobs), 32):
            pixels = torch.stack([j[3] for j in jobs[i:i + 32]]).to(device)
            outs.append(teacher(pixels).cpu().numpy())  # [b, T, C]
    online_all = np.concatenate(outs) if outs else np.zeros((0,))
    for (name, key, view, _), online in zip(jobs, online_all):
        stored = captured[(name, key)]["tokens"][view]  # [T, C]
        if stored.shape != online.shape:
            report.problems.append(Problem(name, key, f"teacher gives tokens {list(online.shape)}, the cache "
                                                      f"stores {list(stored.shape)}"))
            continue
        err = np.abs(stored - online)
        ratio = float((err / error_bound(codec, online, extra_rtol)).max())
        row = {"shard": name, "key": key, "view": view, "max_abs_err": float(err.max()),
               "err_over_bound": ratio,
               "min_cos": float(token_cosines(torch.from_numpy(stored), torch.from_numpy(online)).min()),
               "status": "ok" if ratio <= 1 else "FAILED"}
        report.recompute.append(row)
        if ratio > 1:
            report.problems.append(Problem(name, key, f"view {view}: stored tokens differ from the teacher's by up "
                                                      f"to {row['max_abs_err']:.3g}, {ratio:.3g}x the {codec.name} "
                                                      f"codec's bound ({codec.error_bound}); min cosine "
                                                      f"{row['min_cos']:.6f}"))


# ---------------------------------------------------------------- the whole check

def verify_cache(cache: str | Path, recompute: int = 0, source_shards: str | None = None, seed: int = 0,
                 teacher_weights: str | None = None, teacher_seed: int | None = None, device: str = "cpu",
                 extra_rtol: float = 0.0, progress: bool = True) -> Report:
    from tqdm import tqdm

    cache = Path(cache)
    report = Report(str(cache))
    if not cache.is_dir():
        report.problems.append(Problem(None, None, f"{cache} is not a directory (give the cache.path of a cache)"))
        return report
    manifest = report.manifest = check_manifest(cache, report, recompute)
    if manifest is None:
        return report
    check_strays(cache, manifest, report)
    names = [s["name"] for s in manifest["shards"]]
    records = {}
    for name in names:
        record = check_record(cache, name, manifest, report)
        if record is not None:
            records[name] = record
    check_merged_stats(manifest, records, report)
    triples = pick_triples(cache, records, manifest["augment"]["views"], recompute, seed)
    report.recompute_requested = len(triples)
    wanted: dict[str, dict[str, list[int]]] = {}
    for name, key, view in triples:
        wanted.setdefault(name, {}).setdefault(key, []).append(view)
    captured: dict = {}
    for name in tqdm(names, desc="verify", unit="shard", disable=not progress, dynamic_ncols=True):
        if name in records:
            report.shards.append(check_shard(cache, name, manifest, records[name], wanted.get(name, {}), report,
                                             captured))
        else:
            report.shards.append({"shard": name, "samples": None, "skipped": None, "sha256": "-",
                                  "samples_ok": 0, "status": "FAILED"})
    if triples:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):  # TF32 convolutions would exceed the bf16 codec's bound
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            sources = source_urls(manifest, source_shards, missing_ok=True)
        except ValueError as e:  # ConfigError: an empty pattern
            report.problems.append(Problem(None, None, f"--source-shards: {e}", False))
            return report
        if teacher_seed is None:
            teacher_seed = manifest.get("teacher_seed", 0)
        teacher = rebuild_teacher(manifest, teacher_weights, teacher_seed, device, report)
        if teacher is not None:
            recompute_views(manifest, triples, captured, sources, teacher, device, extra_rtol, report)
    return report


def format_report(report: Report, seed: int = 0) -> str:
    lines = [f"cache {report.cache}"]
    m = report.manifest
    if m:
        a, t = m["augment"], m["teacher"]
        lines[0] += (f"  ({m['cache_format']}, {m['codec']['name']}, teacher {t['arch']} layer {t['layer']}, "
                     f"{a['views']} views of {a['size']} px, tokens {m['token_shape'][0]}x{m['token_shape'][1]})")
    if report.shards:
        w = max(12, *(len(r["shard"]) for r in report.shards))
        lines.append(f"{'shard':<{w}}  {'samples':>7}  {'skipped':>7}  {'sha256':<8}  {'samples ok':>10}  status")
        for r in report.shards:
            n = "-" if r["samples"] is None else r["samples"]
            ok = f"{r['samples_ok']}/{n}"
            lines.append(f"{r['shard']:<{w}}  {n!s:>7}  {'-' if r['skipped'] is None else r['skipped']!s:>7}  "
                         f"{r['sha256']:<8}  {ok:>10}  {r['status']}")
    if report.recompute:
        codec = get_codec(m["codec"]["name"])
        tw = report.teacher or {}
        lines.append(f"\nrecompute: {len(report.recompute)} views (seed {seed}) with teacher {tw.get('arch')} "
                     f"(weights {tw.get('weights')}, sha256 matches the manifest)\nbound: {codec.name}: "
                     f"{codec.error_bound}; + {NOISE}")
        w = max(12, *(len(r["shard"]) for r in report.recompute))
        kw = max(3, *(len(r["key"]) for r in report.recompute))
        lines.append(f"{'shard':<{w}}  {'key':<{kw}}  view  {'max|err|':>9}  {'err/bound':>9}  {'min cos':>9}  status")
        for r in report.recompute:
            lines.append(f"{r['shard']:<{w}}  {r['key']:<{kw}}  {r['view']:>4}  {r['max_abs_err']:>9.3g}  "
                         f"{r['err_over_bound']:>9.3f}  {r['min_cos']:>9.6f}  {r['status']}")
        worst = max(report.recompute, key=lambda r: r["max_abs_err"])
        lines.append(f"largest absolute error {worst['max_abs_err']:.4g} ({worst['shard']} {worst['key']} view "
                     f"{worst['view']}); smallest per-token cosine "
                     f"{min(r['min_cos'] for r in report.recompute):.6f}")
    if report.recompute_requested > len(report.recompute):
        lines.append(f"recompute: {report.recompute_requested - len(report.recompute)} of the "
                     f"{report.recompute_requested} picked views were not recomputed (see problems)")
    for w_ in report.warnings:
        lines.append(f"warning: {w_}")
    if report.problems:
        lines.append(f"\nproblems ({len(report.problems)}):")
        lines += [f"  {p.line()}" for p in report.problems]
        redo = sorted({p.shard for p in report.problems if p.shard and p.redo})
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
        if redo:
            lines.append(f"shards to redo ({len(redo)} of {len(m['shards'])}): {', '.join(redo[:20])}"
                         + (" ..." if len(redo) > 20 else "") + f"\n{REDO_HINT}")
    else:
        samples = sum(r["samples"] for r in report.shards)
        skipped = sum(r["skipped"] for r in report.shards)
        n = len(report.shards)
        lines.append(f"\nOK: {n} shard{'s' if n != 1 else ''}, {samples} samples ({samples * m['augment']['views']} "
                     f"views), {skipped} skipped at extraction"
                     + (f"; {len(report.recompute)} recomputed views within the codec's bound" if report.recompute
                        else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "img2vec verify") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Check a feature cache: manifest, completion records, "
                                "sha256 of every shard, crc32 of every sample, and (with --recompute) a random "
                                "sample of views recomputed with the teacher. Exit status 0 only if all is well.",
                                epilog=REDO_HINT)
    p.add_argument("cache", metavar="CACHE", help="cache directory (the cache.path of extract-features)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="replay N random (shard, key, view) triples from the source images and compare the teacher's "
                        "output with the stored tokens (default 0: bytes only)")
    p.add_argument("--source-shards", metavar="PATTERN", default=None,
                   help="brace pattern of the source shards, for a dataset that moved since extraction (shards are "
                        "matched by file name); default: the sources named in the manifest")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed that picks the recomputed views (default 0)")
    p.add_argument("--teacher-weights", metavar="PATH", default=None,
                   help="teacher checkpoint, if it moved since extraction (default: the manifest's teacher_weights)")
    p.add_argument("--teacher-seed", type=int, default=None, metavar="S",
                   help="teacher.seed the cache was made with, for random teacher weights (default: the manifest's)")
    p.add_argument("--device", default="cpu", help="device for --recompute: cpu (default), cuda, or auto")
    p.add_argument("--extra-rtol", type=float, default=0.0, metavar="R",
                   help="add R*|x| to the codec's bound, e.g. 0.05 for a cache extracted with bf16 autocast on a GPU "
                        "and recomputed here in float32 (default 0)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.recompute < 0 or args.extra_rtol < 0:
        p.error("--recompute and --extra-rtol must be >= 0")
    report = verify_cache(args.cache, args.recompute, args.source_shards, args.seed, args.teacher_weights,
                          args.teacher_seed, args.device, args.extra_rtol, progress=not args.no_progress)
    print(format_report(report, args.seed))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
