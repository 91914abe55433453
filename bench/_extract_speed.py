"""Extraction's views/s against its two stages alone, in interleaved rounds: the teacher's forward alone (views
already on its device), and decode + cut alone (extraction's own loader and workers, no teacher). Used by
bench/gpu.py and the headline of bench/extraction.py.

Each round runs, for each V: the teacher alone, decode + cut alone, then extract-features once per codec; the
ratios are taken within a round and printed as median (min-max) over rounds. Rates are steady ones, from the first
batch to the last (loader start and the last shards' commit excluded: at ImageNet scale they are spread over
1,282 shards, here over 16); each run's whole-run rate is kept beside.
"""
from __future__ import annotations

import copy
import resource
import shutil
import time
from pathlib import Path

import torch
from _common import show, spread, table

from common.config import Config
from common.teacher import build_teacher
from extract import pipeline
from extract.pipeline import run_extraction
from extract.views import view_loader
from shards.source import expand_shards, shard_names

IMAGENET_IMAGES = 1_281_167


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_alone(teacher, views: int, cfg: Config, batches: int, device: torch.device) -> float:
    """Views/s of the teacher's forward on batches of extraction's shape (extract.batch_size x V views), uint8 pixels
    already on the device. The pixels are random: a convnet's speed does not depend on them."""
    b, size = cfg.extract.batch_size, cfg.augment.size
    x = torch.randint(0, 256, (b * views, 3, size, size), dtype=torch.uint8, device=device)
    teacher(x)  # warm-up at this shape (cudnn / oneDNN plans, the allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        teacher(x)
    sync(device)
    return batches * b * views / (time.perf_counter() - t0)


def rates(stamps: list[tuple[float, int]], seconds: float) -> dict:
    """(time, views) of each batch as it reached the main loop, and the run's seconds -> views/s from the first batch
    to the last (the views after the first batch over that time; the whole run's rate if there is one batch) and
    over the whole run."""
    whole = sum(v for _, v in stamps) / seconds
    span = stamps[-1][0] - stamps[0][0] if len(stamps) > 1 else 0.0
    return {"views_per_s": sum(v for _, v in stamps[1:]) / span if span > 0 else whole, "whole_run": whole}


def cut_alone(cfg: Config, device: torch.device) -> dict:
    """Views/s of extraction's loader alone: its workers read, decode once and cut V views; nothing else runs."""
    urls = expand_shards(cfg.data.shards)
    t0, stamps = time.perf_counter(), []
    loader, _, _ = view_loader(cfg, urls, dict(zip(urls, shard_names(urls))), device)
    for item in loader:
        stamps.append((time.perf_counter(), item["views"].shape[0] * item["views"].shape[1]))
    return rates(stamps, time.perf_counter() - t0)


def extraction(cfg: Config, device: torch.device) -> dict:
    """One extract-features run: its own views/s (teacher construction excluded), the cores it kept busy (CPU seconds
    of this process and its reaped workers per wall second) and its peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps, push = [], pipeline.ShardsInFlight.push

    def timed(self, item, launched):  # each batch, launched on the device, as the main loop hands it on
        stamps.append((time.perf_counter(), len(item["keys"]) * cfg.augment.views))
        return push(self, item, launched)

    before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    pipeline.ShardsInFlight.push = timed
    try:
        s = run_extraction(cfg, progress=False)
    finally:
        pipeline.ShardsInFlight.push = push
    after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    return {**rates(stamps, s["seconds"]), "cores_busy": cpu / s["seconds"],
            "workers": s.get("data_workers", cfg.data.workers),
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def measure(base: Config, views: list[int], codecs: list[str], rounds: int, tmp: Path, teacher_batches: int,
            keep: Path | None = None) -> dict:
    """Rows (V, what, codec) with views/s, its ratio to the teacher alone and to decode + cut alone, cores busy and
    peak GPU memory, each a spread over `rounds` interleaved rounds. The cache of (views[0], codecs[0]) of the last
    round is moved to `keep` (the training benches read it)."""
    device = torch.device(base.extract.device)
    teacher = build_teacher(base.teacher, device)
    got: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        for v in views:
            cfg = copy.deepcopy(base)
            cfg.augment.views = v
            with torch.no_grad():
                alone = teacher_alone(teacher, v, cfg, teacher_batches, device)
            got.setdefault((v, "teacher"), []).append({"views_per_s": alone})
            got.setdefault((v, "cut"), []).append(cut_alone(cfg, device))
            for codec in codecs:
                cfg.cache.path, cfg.cache.codec = str(tmp / f"cache-v{v}-{codec}-{r}"), codec
                got.setdefault((v, codec), []).append(extraction(cfg, device))
                if keep is not None and (v, codec, r) == (views[0], codecs[0], rounds - 1):
                    shutil.move(cfg.cache.path, keep)
                shutil.rmtree(cfg.cache.path, ignore_errors=True)
    return {"rows": [row(v, what, got, rounds) for v in views for what in ("teacher", "cut", *codecs)],
            "workers": got[views[0], codecs[0]][0]["workers"]}


def row(v: int, what: str, got: dict, rounds: int) -> dict:
    runs = got[v, what]
    teacher, cut = got[v, "teacher"], got[v, "cut"]
    rate = [x["views_per_s"] for x in runs]
    out = {"views": v, "what": {"teacher": "teacher alone", "cut": "decode + cut alone"}.get(what, "extract-features"),
           "codec": None if what in ("teacher", "cut") else what, "views_per_s": spread(rate),
           "whole_run": spread([x["whole_run"] for x in runs]) if "whole_run" in runs[0] else None,
           "vs_teacher": spread([x / t["views_per_s"] for x, t in zip(rate, teacher)]),
           "vs_cut": spread([x / c["views_per_s"] for x, c in zip(rate, cut)]),
           "cores_busy": None, "peak_gpu_mib": None}
    if "cores_busy" in runs[0]:
        out["cores_busy"] = spread([x["cores_busy"] for x in runs])
        peaks = [x["peak_gpu_mib"] for x in runs if x["peak_gpu_mib"] is not None]
        out["peak_gpu_mib"] = max(peaks) if peaks else None
    return out


def markdown(result: dict, cores: int) -> str:
    """The rows as a table, and what the default codec's rate means for ImageNet x V on one such machine."""
    rows = []
    for r in result["rows"]:
        what = f"extract-features, `{r['codec']}`" if r["codec"] else r["what"]
        rows.append([r["views"], what, show(r["views_per_s"], 4), show(r["whole_run"], 4), show(r["vs_teacher"]),
                     show(r["vs_cut"]),
                     f"{show(r['cores_busy'])} of {cores}" if r["cores_busy"] else "-",
                     f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"])
    text = table(["V", "what", "views/s, steady", "views/s, whole run", "/ teacher alone", "/ decode + cut alone",
                  "cores busy", "peak GPU MiB"], rows)
    first = {}  # each V's first codec
    for r in result["rows"]:
        if r["codec"]:
            first.setdefault(r["views"], r)
    for r in first.values():
        rate, total = r["views_per_s"]["median"], IMAGENET_IMAGES * r["views"]
        text += (f"\nImageNet x {r['views']} with `{r['codec']}` at {rate:.0f} views/s: {total / rate / 3600:.2f} h "
                 f"on one such device (an hour needs {total / 3600:.0f} views/s).")
    return text + "\n"
