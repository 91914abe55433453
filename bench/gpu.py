"""One command for a GPU node: extraction and training speed in about 5 minutes, as markdown and `--json OUT`.

    python bench/gpu.py --json gpu.json                # one H100/H200, 16 cores, no network: ~5 minutes
    python bench/gpu.py --tiny --json tiny.json        # the same code on a CPU, tiny models: about a minute
    python bench/gpu.py --sections extract,train_base  # a subset

It makes its own data (synthetic ImageNet-like JPEGs, ~400 x 350 px, ~110 KB, in 16 shards) and needs no weights
(the teacher is random unless --weights names a checkpoint: its speed is the same). Sections:

- extract: extract-features' views/s against the teacher alone and against decode + cut alone, at V = 10 and 16,
  `bf16z-zstd` and `u8-zstd`, with the workers the cores allow (bench/_extract_speed.py);
- train_base, train_large: training steps/s of ViT-B/16 and ViT-L/16 at 224 (bf16 on a GPU, the recipe's decoder),
  synthetic in-memory batches (the ceiling) vs the cache vs the online teacher in the cache's recorded precision,
  eager and compiled, with the data-wait share and peak GPU memory of each run (bench/_train_speed.py).

A section that fails prints its error and the others still run; the JSON is rewritten after every section, and
runs that would start past --budget seconds are skipped (and listed), so the command ends near its budget.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from _common import cores, machine, machine_info, make_source

from common.config import load_config
from common.runtime import pick_device, write_json_output

# the sections' own modules (extraction, training) are imported when a section runs: the command line is checked
# first, and a section whose imports fail is reported as that section's error

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipeline.toml"
SECTIONS = ("extract", "train_base", "train_large")


@dataclass
class Sizes:
    teacher: str                    # timm arch, random weights unless --weights
    size: int                       # crop side
    views: tuple[int, ...]          # V of the extraction section
    codecs: tuple[str, ...]
    shards: int                     # source shards (extraction and the training cache)
    per_shard: int                  # images per shard
    extract_batch: int              # extract.batch_size (images; x V views per teacher batch)
    rounds: int                     # interleaved extraction rounds
    teacher_batches: int            # batches timed for the teacher alone
    students: dict = field(default_factory=dict)  # section -> (student.arch, train.batch_size)
    warmup: int = 3                 # steps dropped per training run
    steps: int = 10                 # steps timed per training run
    train_rounds: int = 1
    budget: float = 290.0           # seconds; 0 = none
    compile_backend: str | None = None  # of train.compile / teacher.compile: None = torch's default (inductor)
    threads: int = 0                # OMP_NUM_THREADS of the training process (0 = torch's default)


FULL = Sizes(teacher="resnet50", size=224, views=(10, 16), codecs=("bf16z-zstd", "u8-zstd"), shards=16, per_shard=64,
             extract_batch=64, rounds=3, teacher_batches=4,
             students={"train_base": ("vit_base_patch16", 128), "train_large": ("vit_large_patch16", 64)})
TINY = Sizes(teacher="resnet18", size=64, views=(2, 3), codecs=("bf16z-zstd", "u8-zstd"), shards=2, per_shard=4,
             extract_batch=4, rounds=2, teacher_batches=2, warmup=1, steps=2, budget=0.0, compile_backend="eager", threads=1,
             students={"train_base": ("vit_tiny_patch16", 4), "train_large": ("vit_small_patch16", 4)})


class Bench:
    """The sources, the training cache and the base config, made when a section first needs them."""

    def __init__(self, args, sizes: Sizes, tmp: Path):
        self.args, self.sizes, self.tmp = args, sizes, tmp
        self.t0 = time.time()
        self.device = pick_device(args.device)
        n = cores()
        self.extract_workers = args.extract_workers or max(1, min(8, n // 2))
        self.train_workers = args.train_workers or max(1, min(10, n - 2))
        self._sources: dict[str, str] = {}
        self.estimates = [0.0, 0.0]  # seconds of the first eager and first compiled run of the last training section
        self._cache: Path | None = None

    def deadline(self) -> float | None:
        return self.t0 + self.sizes.budget if self.sizes.budget else None

    def overrides(self, pattern: str) -> list[str]:
        """The recipe (pipeline.toml) with the bench's data, teacher, sizes, workers and devices."""
        s = self.sizes
        return [f"data.shards={json.dumps(pattern)}", f"teacher.arch={s.teacher}",
                f"teacher.weights={json.dumps(self.args.weights or 'random')}", f"augment.size={s.size}",
                f"extract.batch_size={s.extract_batch}", f"data.workers={self.extract_workers}",
                f"extract.device={json.dumps(str(self.device))}", f"train.device={json.dumps(self.device.type)}",
                f"train.workers={self.train_workers}"]

    def config(self, pattern: str):
        return load_config(RECIPE, self.overrides(pattern))

    def source(self, name: str, per_shard: int) -> str:
        if name not in self._sources:
            self._sources[name] = make_source(self.tmp / name, self.sizes.shards, per_shard, seed=len(self._sources),
                                              imagenet_like=True, procs=cores())
        return self._sources[name]

    def training_cache(self) -> tuple[Path, str]:
        """A cache made by extract-features on this device (its manifest records the teacher's precision here) at
        the first V and codec (the recipe's V and default codec), over the extraction section's source."""
        from extract.pipeline import run_extraction

        pattern = self.source("src", self.sizes.per_shard)
        if self._cache is None:
            cfg = self.config(pattern)
            cfg.augment.views = self.sizes.views[0]
            cfg.cache.path, cfg.cache.codec = str(self.tmp / "train-cache"), self.sizes.codecs[0]
            run_extraction(cfg, progress=False)
            self._cache = Path(cfg.cache.path)
        return self._cache, pattern


def extract_section(bench: Bench) -> tuple[dict, str]:
    from _extract_speed import markdown, measure

    s = bench.sizes
    pattern = bench.source("src", s.per_shard)
    result = measure(bench.config(pattern), list(s.views), list(s.codecs), s.rounds, bench.tmp, s.teacher_batches)
    result.update(images=s.shards * s.per_shard, shards=s.shards, rounds=s.rounds, batch_size=s.extract_batch,
                  teacher=s.teacher, device=str(bench.device))
    weights = bench.args.weights or "random weights"
    text = (f"{result['images']} ImageNet-like JPEGs in {s.shards} shards, teacher {s.teacher} ({weights}), "
            f"{result['workers']} data workers, extract.batch_size {s.extract_batch}, device {bench.device}; median "
            f"(min-max) over {s.rounds} interleaved rounds; the teacher alone runs {s.teacher_batches} batches of "
            "extraction's shape on pixels already on the device.\n\n")
    return result, text + markdown(result, cores())


def train_section(bench: Bench, name: str) -> tuple[dict, str]:
    from _train_speed import COMPILED, MODES, markdown, plan, run_child, summarize

    from shards.manifest import read_manifest
    from train.model import describe_student, resolve_student

    s = bench.sizes
    arch, batch = s.students[name]
    batch = bench.args.batch or batch
    cache, pattern = bench.training_cache()
    sets = bench.overrides(pattern) + [f"cache.path={json.dumps(str(cache))}", f"student.arch={arch}",
                                       f"train.batch_size={batch}", f"train.max_steps={s.warmup + s.steps + 1}",
                                       "train.log_every=1000000", "train.checkpoint_every=1000000",
                                       "train.warmup_epochs=0"]
    runs = plan(MODES, [False, True], s.train_rounds, bench.tmp / f"runs-{name}")
    results = run_child(RECIPE, sets, runs, bench.tmp / f"child-{name}", bench.deadline(), s.compile_backend,
                        threads=s.threads, estimates=tuple(bench.estimates))
    for kind in (0, 1):  # the next section's first runs are expected to take as long
        bench.estimates[kind] = next((r["seconds"] for r in results if r["compiled"] == kind and "seconds" in r),
                                     bench.estimates[kind])
    summary = summarize(results, s.warmup, batch)
    student = resolve_student(load_config(RECIPE, [f"student.arch={arch}"]).student)
    how = " and ".join(f"`{c}`" for c in COMPILED) + (f", backend {s.compile_backend!r}" if s.compile_backend else
                                                       " (inductor)")
    summary.update(arch=arch, batch=batch, workers=bench.train_workers, warmup=s.warmup, steps=s.steps,
                   compile=how, student=describe_student(student), device=str(bench.device),
                   teacher_precision=read_manifest(cache).teacher.precision)
    text = (f"{summary['student']}; batch {batch}, {bench.train_workers} loader workers, device {bench.device}"
            f"{' (bf16 autocast)' if bench.device.type == 'cuda' else ''}; cache of {s.views[0]} views, "
            f"`{s.codecs[0]}`, teacher precision {summary['teacher_precision']} (the online teacher's too); compiled: "
            f"{how}. Steps/s: median (min-max) over {s.steps} steps after {s.warmup} dropped; the first step (loader "
            "start, compilation) apart.\n\n")
    return summary, text + markdown(summary, bench.device.type == "cuda")


def run_sections(bench: Bench, names: list[str], out: dict) -> None:
    for name in names:
        t0 = time.time()
        print(f"## {name}\n", flush=True)
        entry = {"status": "ok", "error": None, "result": None}
        try:
            if bench.deadline() and t0 > bench.deadline():
                entry.update(status="skipped", error="past the time budget (--budget)")
            else:
                entry["result"], text = extract_section(bench) if name == "extract" else train_section(bench, name)
                print(text, flush=True)
        except Exception:  # noqa: BLE001 - a section's failure is reported, the others still run
            entry.update(status="error", error=traceback.format_exc()[-4000:])
        if entry["error"]:
            print(f"**{entry['status']}**:\n```\n{entry['error'].strip()}\n```\n", flush=True)
        entry["seconds"] = time.time() - t0
        print(f"_{name}: {entry['seconds']:.0f} s_\n", flush=True)
        out["sections"][name] = entry
        out["total_seconds"] = time.time() - bench.t0
        if bench.args.json:
            write_json_output(bench.args.json, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here (rewritten after every section)")
    p.add_argument("--tiny", action="store_true", help="tiny models and data on a CPU, about a minute: checks the code")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--weights", help="teacher checkpoint (default: random weights, same speed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", type=float, help="seconds after which no run starts (default 290; --tiny: none)")
    p.add_argument("--rounds", type=int, help="interleaved extraction rounds (default 3; --tiny 2)")
    p.add_argument("--steps", type=int, help="timed steps per training run (default 10; --tiny 2)")
    p.add_argument("--batch", type=int, help="train.batch_size of both students (default 128 ViT-B, 64 ViT-L)")
    p.add_argument("--extract-workers", type=int, help="data.workers (default: half the cores, at most 8)")
    p.add_argument("--train-workers", type=int, help="train.workers (default: the cores less 2, at most 10)")
    p.add_argument("--tmp", help="where the data and caches go (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(SECTIONS)):
        p.error(f"--sections: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    sizes = TINY if args.tiny else FULL
    sizes = replace(sizes, **{k: v for k, v in (("budget", args.budget), ("rounds", args.rounds),
                                                ("steps", args.steps)) if v is not None})
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench-gpu-"))
    tmp.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, sizes, tmp)
    if args.tiny:
        torch.set_num_threads(1)  # a small shared CPU: more threads than free cores make timings erratic
    print(f"# GPU node benchmark{' (--tiny)' if args.tiny else ''}\n\n- machine: {machine()}\n"
          f"- command: `python {' '.join(sys.argv)}`\n", flush=True)
    out = {"command": " ".join(sys.argv), "tiny": args.tiny, "machine": machine_info(), "sizes": asdict(sizes),
           "sections": {}, "total_seconds": 0.0}
    try:
        run_sections(bench, names, out)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"total: {out['total_seconds']:.0f} s", flush=True)
    return 0 if all(s["status"] != "error" for s in out["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
