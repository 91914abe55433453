"""Shared pieces of the benchmarks: machine description, markdown tables, synthetic sources, teachers,
and a feature cache written without running the teacher on every view (for the stage-two benches)."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZES = (192, 320)  # source images "224-ish": sides drawn in [192, 320], as small ImageNet photos


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def machine_info() -> dict:
    """What a figure was measured on: CPU, cores, GPU and its memory, library versions, the load at the start."""
    import timm

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.is_available()
    return {"cpu": cpu, "cores": cores(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if gpu else None,
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "timm": timm.__version__,
            "python": platform.python_version(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def machine() -> str:
    m = machine_info()
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']:.0f} GiB)" if m["gpu"] else "no GPU"
    load = f"{m['load_average']:.1f}" if m["load_average"] is not None else "?"
    return (f"{m['cpu']}, {m['cores']} cores visible, torch {m['torch']} ({m['torch_threads']} threads), timm "
            f"{m['timm']}, python {m['python']}, {gpu}; 1-min load average at start {load}")


def header(title: str, quick: bool) -> None:
    print(f"## {title}\n")
    print(f"- machine: {machine()}")
    print(f"- command: `python {' '.join(sys.argv)}`{' (quick mode)' if quick else ''}\n")


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def median(xs) -> float:
    return float(statistics.median(xs))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


# ---------------------------------------------------------------- sources and teachers

IMAGENET_LIKE = {"size": (250, 450), "width": (300, 500), "noise": 24, "quality": 95}  # ~400 x 350, ~110 KB


def make_source(out: Path, shards: int, per_shard: int, seed: int = 0, classes: int = 8,
                sizes: tuple[int, int] = IMAGE_SIZES, imagenet_like: bool = False, procs: int = 1) -> str:
    """Synthetic JPEG shards `out/src-000000.tar ...` with sides in `sizes` (or ImageNet's typical size and JPEG
    bytes: IMAGENET_LIKE); returns the brace pattern. Shard i holds `per_shard` images of every class in turn, drawn
    from seed (seed, i), so `procs` processes make the same shards as one."""
    from concurrent.futures import ProcessPoolExecutor

    kw = IMAGENET_LIKE if imagenet_like else {"size": sizes}
    jobs = [(out, i, per_shard, seed * 1000 + i, classes, kw) for i in range(shards)]
    if procs > 1 and shards > 1:
        with ProcessPoolExecutor(min(procs, shards)) as pool:
            list(pool.map(_make_shard, jobs))
    else:
        for job in jobs:
            _make_shard(job)
    return str(out / f"src-{{000000..{shards - 1:06d}}}.tar")


def _make_shard(job: tuple) -> None:
    from shards.source import write_shards
    from shards.synthetic import synthetic_samples

    out, i, per_shard, seed, classes, kw = job
    part = out / f"part-{i}"
    (path,) = write_shards(synthetic_samples(per_shard, classes=classes, seed=seed, **kw), part, prefix="src",
                           maxcount=per_shard, progress=False)
    path.replace(out / f"src-{i:06d}.tar")
    part.rmdir()


def spread(xs) -> dict:
    """Median and range of repeated measurements (rounds, steps): what every comparison here prints."""
    xs = [float(x) for x in xs]
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def show(s: dict | None, digits: int = 3) -> str:
    """A spread as `median (min-max)`; '-' for none."""
    if not s:
        return "-"
    f = f"{{:.{digits}g}}".format
    return f(s["median"]) if s["n"] == 1 else f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def random_teacher(arch: str = "resnet50", device: str = "cpu", weights: str = "random"):
    """The project's own teacher as extraction builds it: `weights = "random"` (seed 0) unless a checkpoint is given."""
    from common.config import Teacher
    from common.teacher import build_teacher

    return build_teacher(Teacher(arch=arch, weights=weights), device)


def recalibrate_bn(teacher, views: torch.Tensor) -> None:
    """Give a random-init teacher trained-like BatchNorm statistics: reset every BN's running mean/var
    and recompute them (cumulative average) on `views` (uint8 [N, 3, S, S]). Each BN then normalises
    its input as a trained network's does, so post-ReLU outputs have a trained-like zero fraction."""
    model = teacher.model
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    x = (views.float() - teacher.mean) / teacher.std
    model.train(True)
    with torch.no_grad():
        model.forward_features(x)
    model.train(False)


def source_views(n_images: int, views: int, size: int = 224, seed: int = 1,
                 cut: str = "torch") -> tuple[torch.Tensor, list[str]]:
    """Recorded views of synthetic images, cut as extraction cuts them: uint8 [n_images * views, 3, S, S]."""
    from common.augment import decode_image, replay_views, sample_views
    from shards.synthetic import synthetic_samples

    out, keys = [], []
    for s in synthetic_samples(n_images, classes=8, seed=seed, size=IMAGE_SIZES):
        img = decode_image(s["image"])
        records = sample_views(0, s["key"], img.height, img.width, views)
        out.append(replay_views(img, records, size, cut))
        keys.append(s["key"])
    return torch.cat(out), keys


def teacher_tokens(teacher, views: torch.Tensor, batch: int = 8) -> np.ndarray:
    """[N, 3, S, S] uint8 -> tokens [N, T, C] fp32, computed on the teacher's device."""
    device = teacher.mean.device
    with torch.no_grad():
        return torch.cat([teacher(views[i:i + batch].to(device)).cpu() for i in range(0, len(views), batch)]).numpy()


# ---------------------------------------------------------------- a cache without the teacher in the loop

def write_cache(cache: Path, shards_pattern: str, views: int, codec: str, token_pool: np.ndarray,
                fingerprint: dict, fmt: str = "wds", size: int = 224, seed: int = 0) -> dict:
    """A complete feature cache over `shards_pattern` with real recorded views (the same records
    extraction would make) but tokens drawn from `token_pool` [P, T, C] (P >= views): each sample gets
    `views` distinct pool entries. Stage two cannot tell it from an extracted cache, and the benches
    that read it need no teacher forward per view. Returns the manifest."""
    from common.augment import decode_image, sample_views
    from common.config import Config
    from common.stats import TokenStats
    from shards.manifest import finalize_manifest, make_manifest, write_manifest
    from shards.writer import FeatureShardWriter
    from shards.source import expand_shards, is_seekable, iter_samples, shard_names

    cfg = Config()
    cfg.data.shards = shards_pattern
    cfg.augment.views, cfg.augment.size, cfg.augment.seed = views, size, seed
    cfg.cache.path, cfg.cache.codec, cfg.cache.format = str(cache), codec, fmt
    urls = expand_shards(shards_pattern)
    token_shape = token_pool.shape[1:]
    cache.mkdir(parents=True, exist_ok=True)
    write_manifest(cache, make_manifest(cfg, fingerprint, token_shape, urls))
    rng = np.random.default_rng(seed)
    a = cfg.augment
    stats = TokenStats()
    stats.update(torch.from_numpy(token_pool))
    import zlib

    from common.codecs import get_codec

    for url, name in zip(urls, shard_names(urls)):
        writer = FeatureShardWriter(cache, name, fmt, get_codec(codec), views, *token_shape)
        for s in iter_samples(url):
            img = decode_image(s["image"])
            records = sample_views(a.seed, s["key"], img.height, img.width, views, a.scale, a.ratio, a.flip)
            pick = rng.choice(len(token_pool), views, replace=False)
            src = {"offset": s["offset"], "size": len(s["image"]), "crc": zlib.crc32(s["image"])}
            writer.add(s["key"], records, src, (img.height, img.width), s["cls"], token_pool[pick])
        writer.commit([], url, stats, is_seekable(url))
    return finalize_manifest(cache)
