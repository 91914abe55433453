"""`img2vec verify CACHE`: is this feature cache what its records say, and what its teacher computes?

Three layers of checks; every problem names the shard, and the key when there is one. The first two are
the cache format's own, without a teacher (shards/check.py: manifest and records, then every byte);
the third is this tool's:

3. `--recompute N`: N random (shard, key, view) triples are replayed from their source images and
   run through the teacher rebuilt from the manifest; the stored tokens must equal its output within
   the codec's error bound.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.codecs import token_cosines
from common.runtime import pick_device, write_json_output
from shards.check import REDO_HINT, Checks, Problem, check_manifest, check_records, check_shards
from shards.errors import CacheError
from shards.index import read_index
from shards.manifest import Manifest, source_urls
from shards.teacher import TeacherMismatch, cache_teacher
from shards.urlpath import as_path


@dataclass
class Report(Checks):
    recompute: list[dict] = field(default_factory=list)   # one row per recomputed view
    teacher: dict | None = None                            # the rebuilt teacher's fingerprint
    recompute_requested: int = 0
    teacher_error: str | None = None                       # why the manifest's teacher cannot be rebuilt (exit 2)

    def to_dict(self) -> dict:
        d = {"cache": self.cache, "ok": self.ok, "shards": self.shards, "recompute": self.recompute,
             "recompute_requested": self.recompute_requested,
             "teacher": self.teacher, "teacher_error": self.teacher_error,
             "problems": [asdict(p) for p in self.problems], "warnings": self.warnings,
             "refused": [p.line() for p in self.refused]}
        if self.recompute:
            d["max_abs_error"] = max(r["max_abs_err"] for r in self.recompute)
            d["min_cosine"] = min(r["min_cos"] for r in self.recompute)
        return d


# ---------------------------------------------------------------- codec error bounds

NOISE = "1e-5 * max|x| of the token + 1e-6"  # slack for float rounding and the teacher's run-to-run noise


def error_bound(codec, online: np.ndarray, extra_rtol: float = 0.0) -> np.ndarray:
    """How far stored tokens may be from the teacher's fp32 output `online` [..., T, C], elementwise: the
    codec's own bound (common/codecs.py) plus NOISE."""
    mag = np.abs(online)
    noise = 1e-5 * mag.max(-1, keepdims=True) + 1e-6
    return codec.max_abs_error(online) * 1.001 + noise + extra_rtol * mag


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
    if not total:
        return []
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    return [(*keys[i // views], int(i % views)) for i in flat]


REBUILD_HINT = ("A checkpoint that moved: pass --teacher-weights PATH. A teacher.arch this timm lacks, or a hub name "
                "(never fetched on a cache's word): verify the bytes only (no --recompute), or recompute where that "
                "timm model is installed")


def rebuild_teacher(manifest: Manifest, weights: str | None, seed: int | None, device, report: Report):
    """The cache's teacher (shards.teacher.cache_teacher), or None with the problem noted: one that cannot be
    built here is report.teacher_error (exit 2, the check was not done), weights that hash otherwise a problem."""
    from common.config import ConfigError

    try:
        teacher = cache_teacher(manifest, weights, seed, device)
    except ConfigError as e:
        report.teacher_error = str(e)
        report.problems.append(Problem(None, None, f"cannot rebuild the teacher for --recompute: {str(e).rstrip('.')}. "
                                                   f"{REBUILD_HINT}",
                                       False))
        return None
    except TeacherMismatch as e:
        report.teacher = e.fingerprint
        hint = (f"random weights depend on teacher.seed: pass the seed the cache was made with (--teacher-seed; "
                f"tried {e.seed})" if e.weights == "random" else f"{e.weights} is not the checkpoint the cache was "
                "made with")
        report.problems.append(Problem(None, None, f"teacher weights sha256 {e.fingerprint['sha256'][:12]}... "
                                                   f"differ from the manifest's {manifest.teacher.sha256[:12]}...: "
                                                   f"{hint}", False))
        return None
    report.teacher = dict(teacher.fingerprint)
    return teacher


def replay_from_source(name: str, url: str, want: dict[str, list[int]], captured: dict, size: int, cut: str,
                       report: Report) -> list[tuple]:
    """The wanted views of one shard's samples, replayed from its source images: [(shard, key, view, pixels
    [3, S, S])]. A source that changed since extraction (missing, other image, other size) is a problem."""
    from common.augment import decode_image, replay_views
    from shards.source import ShardError, iter_samples

    jobs, found = [], set()
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
        return []
    for key in sorted(set(want) - found):
        report.problems.append(Problem(name, key, f"not found in source shard {url}", False))
    return jobs


def recompute_views(manifest: Manifest, triples: list[tuple[str, str, int]], captured: dict, sources: dict,
                    refused: dict[str, str], teacher, device, extra_rtol: float, report: Report) -> None:
    """Replay each triple's view from its source, run the teacher, compare with the stored tokens."""
    import torch

    size, cut = manifest.augment.size, manifest.cut
    by_shard: dict[str, dict[str, list[int]]] = {}
    for name, key, view in triples:
        if (name, key) in captured:  # a sample that failed its byte checks is already a problem
            by_shard.setdefault(name, {}).setdefault(key, []).append(view)
    jobs = []  # (shard, key, view, pixels [3, S, S])
    for name, want in by_shard.items():
        if name in refused:
            continue  # reported when the sources were read
        if sources.get(name) is None:
            report.problems.append(Problem(name, None, "--source-shards has no shard of this name, cannot recompute",
                                           redo=False))
            continue
        jobs += replay_from_source(name, sources[name], want, captured, size, cut, report)
    outs = []
    with torch.no_grad():
        for i in range(0, len(jobs), 32):
            pixels = torch.stack([j[3] for j in jobs[i:i + 32]]).to(device)
            outs.append(teacher(pixels).cpu().numpy())  # [b, T, C]
    online_all = np.concatenate(outs) if outs else np.zeros((0,))
    codec = manifest.token_codec
    for (name, key, view, _), online in zip(jobs, online_all):
        compare_view(name, key, view, captured[(name, key)]["tokens"][view], online, codec, extra_rtol, report)


def compare_view(name: str, key: str, view: int, stored: np.ndarray, online: np.ndarray, codec, extra_rtol: float,
                 report: Report) -> None:
    """Stored tokens [T, C] against the teacher's `online` output: a row in report.recompute, a problem beyond
    the codec's bound."""
    import torch

    if stored.shape != online.shape:
        report.problems.append(Problem(name, key, f"teacher gives tokens {list(online.shape)}, the cache "
                                                  f"stores {list(stored.shape)}"))
        return
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
    cache = as_path(cache)  # a local folder, or a cache at a URL (read only: shards/urlpath.py)
    report = Report(str(cache))
    if not cache.is_dir():
        report.problems.append(Problem(None, None, f"{cache} is not a directory (give the cache.path of a cache)"))
        return report
    manifest = report.manifest = check_manifest(cache, report, replays=bool(recompute))
    if manifest is None:
        return report
    records = check_records(cache, manifest, report)
    triples = pick_triples(cache, records, manifest.views, recompute, seed)
    report.recompute_requested = len(triples)
    wanted: dict[str, dict[str, list[int]]] = {}
    for name, key, view in triples:
        wanted.setdefault(name, {}).setdefault(key, []).append(view)
    captured = check_shards(cache, manifest, records, report, wanted, progress)
    if triples:
        recompute_triples(manifest, triples, captured, source_shards, teacher_weights, teacher_seed, device,
                          extra_rtol, report)
    return report


def recompute_triples(manifest: Manifest, triples: list, captured: dict, source_shards: str | None,
                      teacher_weights: str | None, teacher_seed: int | None, device: str, extra_rtol: float,
                      report: Report) -> None:
    import torch

    device = pick_device(device)
    if device.type == "cuda":  # TF32 convolutions would exceed the bf16 codec's bound
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    refused: dict[str, str] = {}
    try:
        sources = source_urls(manifest, source_shards, missing_ok=True, refused=refused)
    except ValueError as e:  # ConfigError: an empty pattern
        report.problems.append(Problem(None, None, f"--source-shards: {e}", False))
        return
    wanted = {name for name, _, _ in triples}
    for name, why in refused.items():
        if name in wanted:
            report.problems.append(Problem(name, None, f"source {why}: not run (a cache is data; the commands it names "
                                                       "never run): name the sources yourself with --source-shards",
                                           redo=False, refused=True))
    teacher = rebuild_teacher(manifest, teacher_weights, teacher_seed, device, report)
    if teacher is not None:
        recompute_views(manifest, triples, captured, sources, refused, teacher, device, extra_rtol, report)


def format_report(report: Report, seed: int = 0) -> str:
    lines = [f"cache {report.cache}"]
    m = report.manifest
    if m:
        a, t = m.augment, m.teacher
        lines[0] += (f"  ({m.cache_format}, {m.codec.name}, teacher {t.arch} layer {t.layer}, "
                     f"{a.views} views of {a.size} px, tokens {m.tokens}x{m.channels})")
    if report.shards:
        w = max(12, *(len(r["shard"]) for r in report.shards))
        lines.append(f"{'shard':<{w}}  {'samples':>7}  {'skipped':>7}  {'sha256':<8}  {'samples ok':>10}  status")
        for r in report.shards:
            n = "-" if r["samples"] is None else r["samples"]
            ok = f"{r['samples_ok']}/{n}"
            lines.append(f"{r['shard']:<{w}}  {n!s:>7}  {'-' if r['skipped'] is None else r['skipped']!s:>7}  "
                         f"{r['sha256']:<8}  {ok:>10}  {r['status']}")
    if report.recompute:
        codec = m.token_codec
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
    if report.refused:
        lines.append(f"\nrefused ({len(report.refused)}): not opened, not run (a cache is data; see docs/RELIABILITY.md, "
                     "trust model):")
        lines += [f"  {p.line()}" for p in report.refused]
    if len(report.problems) > len(report.refused):
        lines.append(f"\nproblems ({len(report.problems) - len(report.refused)}):")
        lines += [f"  {p.line()}" for p in report.problems if not p.refused]
    if report.problems:
        redo = sorted({p.shard for p in report.problems if p.shard and p.redo})
        lines.append(f"FAILED: {len(report.problems)} problem(s)")
        if redo:
            lines.append(f"shards to redo ({len(redo)} of {len(m.shards)}): {', '.join(redo[:20])}"
                         + (" ..." if len(redo) > 20 else "") + f"\n{REDO_HINT}")
    else:
        samples = sum(r["samples"] for r in report.shards)
        skipped = sum(r["skipped"] for r in report.shards)
        n = len(report.shards)
        lines.append(f"\nOK: {n} shard{'s' if n != 1 else ''}, {samples} samples ({samples * m.views} "
                     f"views), {skipped} skipped at extraction"
                     + (f"; {len(report.recompute)} recomputed views within the codec's bound" if report.recompute
                        else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "img2vec verify") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Check a feature cache: manifest, completion records, "
                                "sha256 of every shard, crc32 of every sample, and (with --recompute) a random "
                                "sample of views recomputed with the teacher. Exit status 0 only if all is well, 1 "
                                "if a problem was found, 2 if a file was refused (torn, or naming something outside "
                                "the cache), a source is a command the cache names, or (--recompute) the teacher it "
                                "names cannot be rebuilt here.",
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
        write_json_output(args.json, report.to_dict())
    return 2 if report.refused or report.teacher_error else 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
