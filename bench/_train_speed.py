"""Training steps/s of one student in three modes, from real `python -m train` runs over one cache
(bench/_train_child.py): "synthetic" (its first batch held in memory: the ceiling), "cache" (the loader) and
"online" (`train.targets = "online"`: the cache's teacher, rebuilt in its recorded precision, run in every step).
Used by bench/gpu.py and bench/teacher_cost.py.

A step's time is the wall-clock interval between two batch requests of the loop; the first `warmup` are dropped
(loader start, allocator, compilation: the first is reported apart). Ratios are taken within a round of
interleaved runs; every figure is a median (min-max) over steps, or over rounds for the ratios.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _common import show, spread, table

REPO = Path(__file__).resolve().parent.parent
MODES = ("synthetic", "cache", "online")


COMPILED = ["train.compile=true", "teacher.compile=true"]  # the student, and the online teacher


def plan(modes, compiled: list[bool], rounds: int, run_dir: Path) -> list[dict]:
    """Runs in order: per round, eager then compiled, each mode in turn."""
    runs = []
    for r in range(rounds):
        for c in compiled:
            for mode in modes:
                name = f"{mode}{'-compiled' if c else ''}-{r}"
                sets = [f"train.targets={'online' if mode == 'online' else 'cache'}",
                        f"train.run_dir={json.dumps(str(run_dir / name))}"]
                if c:
                    sets += COMPILED
                runs.append({"name": name, "mode": mode, "compiled": c, "round": r, "overrides": sets})
    return runs


def run_child(config: Path, overrides: list[str], runs: list[dict], tmp: Path, deadline: float | None = None,
              compile_backend: str | None = None, threads: int = 0, estimates: tuple[float, float] = (0.0, 0.0),
              timeout: float | None = None) -> list[dict]:
    """The runs in one child process (OMP_NUM_THREADS `threads`, 0 = torch's default); its results (a run that
    failed has `error`, one not started before `deadline` `skipped`; `estimates`: bench/_train_child.py)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec, out = tmp / "spec.json", tmp / "runs.json"
    spec.write_text(json.dumps({"config": str(config), "overrides": overrides, "runs": runs, "deadline": deadline,
                                "estimates": list(estimates), "compile_backend": compile_backend}))
    with open(out.with_suffix(".log"), "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(REPO / "bench" / "_train_child.py"), str(spec), str(out)],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    done = json.loads(out.read_text()) if out.exists() else []
    for run in runs[len(done):]:
        done.append({**run, "error": f"the child process ended ({rc}) before this run; log {out.with_suffix('.log')}"})
    return done


def summarize(results: list[dict], warmup: int, batch: int) -> dict:
    """Per run: steps/s over its timed steps, samples/s and the data-wait share over their total time, peak GPU
    memory, the first step's seconds; and the ratios of median steps/s within each round, spread over rounds."""
    rows, by_round = [], {}
    for r in results:
        row = {k: r.get(k) for k in ("name", "mode", "compiled", "round", "error", "skipped", "note", "peak_gpu_mib")}
        req = r.get("requests") or []
        steps = [b[0] - a[0] for a, b in zip(req, req[1:])]
        if len(steps) > warmup and not r.get("error"):
            kept, waits = steps[warmup:], [got - asked for asked, got in req[warmup:-1]]
            row.update(steps_per_s=spread([1 / s for s in kept]), samples_per_s=batch * len(kept) / sum(kept),
                       data_wait=sum(waits) / sum(kept), first_step_s=steps[0], run_seconds=r.get("seconds"))
            by_round.setdefault(r["round"], {})[r["mode"], r["compiled"]] = row["steps_per_s"]["median"]
        elif not r.get("error") and not r.get("skipped"):
            row["error"] = f"only {len(steps)} steps timed"
        rows.append(row)
    ratios = {}
    for name, (a, b) in {"cache / synthetic": (("cache", False), ("synthetic", False)),
                         "cache / online": (("cache", False), ("online", False)),
                         "compiled cache / synthetic": (("cache", True), ("synthetic", True)),
                         "compiled cache / online": (("cache", True), ("online", True)),
                         "compiled / eager, cache": (("cache", True), ("cache", False))}.items():
        xs = [got[a] / got[b] for got in by_round.values() if a in got and b in got]
        if xs:
            ratios[name] = spread(xs)
    return {"runs": rows, "ratios": ratios}


def markdown(summary: dict, gpu: bool) -> str:
    rows = []
    for r in summary["runs"]:
        what = f"{r['mode']}{', compiled' if r['compiled'] else ''}"
        if r.get("skipped") or r.get("error"):
            note = r.get("skipped") or r["error"].strip().splitlines()[-1][:160]
            rows.append([what, r["round"], "-", "-", "-", "-", "-", ("skipped: " if r.get("skipped") else "error: ") + note])
            continue
        rows.append([what, r["round"], show(r["steps_per_s"]), f"{r['samples_per_s']:.4g}", f"{r['data_wait']:.1%}",
                     f"{r['peak_gpu_mib']:.0f}" if gpu and r["peak_gpu_mib"] is not None else "-",
                     f"{r['first_step_s']:.2f}", r.get("note") or ""])
    text = table(["mode", "round", "steps/s", "samples/s", "data wait", "peak GPU MiB", "first step, s", "note"], rows)
    if summary["ratios"]:
        text += "\n" + table(["ratio (per round, steps/s)", "value"],
                             [[k, show(v)] for k, v in summary["ratios"].items()])
    return text
