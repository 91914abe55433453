"""The training benches' runs, in one process: `python -m train` as it runs (train/__main__.py through runpy, one
run after another), with these hooks:

- every batch request of the loop is timed (`train.data.make_loader`'s loader, wrapped): the steps' wall-clock
  intervals and the time spent waiting for data;
- mode "synthetic" replaces the loader by its first batch, held in memory and handed out again at every step: the
  same step, model and targets with no data path (the ceiling);
- the final checkpoint is not written (`Checkpoints.save` does nothing): no step is timed after it;
- `compile_backend`, if given, is the backend of every torch.compile (`train.compile`, `teacher.compile`): --tiny
  uses "eager" (Dynamo's tracing without inductor's code generation, seconds instead of minutes on a CPU);
- a compiled run that fell back to eager (common/compiled.py's warning) says so in its `note`.

    python bench/_train_child.py SPEC.json OUT.json

SPEC: {"config", "overrides", "runs": [{"name", "mode", "compiled", "overrides"}], "deadline" (a time.time(), or
null), "estimates" ([eager, compiled] seconds a first run is expected to take), "compile_backend" (or null:
inductor)}. A run starts only if it is expected to end by the deadline (as long as the last run of its kind, or its
estimate); OUT is rewritten after every run.
"""
from __future__ import annotations

import gc
import itertools
import json
import runpy
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train.data  # noqa: E402
from train.checkpoints import Checkpoints  # noqa: E402

NOW = {"mode": "cache", "requests": []}  # the run in progress


class Timed:
    """A loader whose every batch request is recorded as (asked, got) perf_counter seconds."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        it = iter(self.loader)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            NOW["requests"].append((asked, time.perf_counter()))
            yield batch


def held_in_memory(loader):
    """The loader's first batch, handed out forever; the loader's workers are shut down."""
    it = iter(loader)
    batch = next(it)
    del it
    gc.collect()
    return itertools.repeat(batch)


def make_loader(dataset, workers):
    loader = MAKE_LOADER(dataset, workers)
    return Timed(held_in_memory(loader) if NOW["mode"] == "synthetic" else loader)


MAKE_LOADER = train.data.make_loader
train.data.make_loader = make_loader
Checkpoints.save = lambda self, *args, **kwargs: None


def run_one(spec: dict, run: dict, log: Path) -> dict:
    NOW.update(mode=run["mode"], requests=[])
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sys.argv = ["train", "--config", spec["config"], "--no-progress"]
    for item in spec["overrides"] + run["overrides"]:
        sys.argv += ["--set", item]
    out = {**run, "rc": None, "error": None, "note": None}
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runpy.run_module("train", run_name="__main__")
        except SystemExit as e:
            out["rc"] = e.code
        except BaseException:  # noqa: BLE001 - a run's failure is its row's, the other runs go on
            out["error"] = traceback.format_exc()[-3000:]
    fallback = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    if fallback:
        out["note"] = "ran eager: " + fallback[0][:300]
    if out["rc"] not in (0, None):
        out["error"] = f"train exited with status {out['rc']}; its log: {log}"
    out["seconds"] = time.time() - t0
    out["requests"] = NOW["requests"]
    out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return out


def main() -> None:
    spec, out_path = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    if spec["compile_backend"]:
        torch.compile = partial(torch.compile, backend=spec["compile_backend"])
    results, took = [], dict(enumerate(spec["estimates"]))  # seconds of the last run, eager / compiled
    for run in spec["runs"]:
        if spec["deadline"] and time.time() + took[run["compiled"]] > spec["deadline"]:
            results.append({**run, "skipped": "it would end past the time budget (--budget)"})
        else:
            results.append(run_one(spec, run, out_path.with_suffix(".log")))
            took[run["compiled"]] = results[-1]["seconds"]
        out_path.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
