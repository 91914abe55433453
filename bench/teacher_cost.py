"""Cached vs online teacher: training steps/s of one student from the cache, from synthetic in-memory batches
(the ceiling: its first batch held in memory) and with the cache's teacher run in every step
(`train.targets = "online"`), then FLOP accounting per image at 224 for ViT-B / ViT-L students against the
teacher, and over an ablation campaign.

    python bench/teacher_cost.py [--quick] [--device cuda --student vit_base_patch16 --batch 128]

Steps/s come from real `python -m train` runs over one cache (bench/_train_speed.py: runs interleaved, the step
time a batch request's wall-clock interval, median (min-max) over steps); the student is the recipe's
(pipeline.toml: its decoder from the arch), the loader has the workers the cores allow, and the cache's manifest
records the teacher's precision on --device (bf16 on a GPU), so the online teacher runs in the precision the
cache was made in. FLOPs come from torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add, so
ResNet-50's "4.1 GFLOPs" of the literature, which are multiply-adds, read 8.2 here).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from _common import header, make_source, random_teacher, source_views, table, teacher_tokens, write_cache
from _train_speed import MODES, markdown, plan, run_child, summarize

from common.config import load_config
from common.runtime import pick_device
from img2vec import flops
from train.model import describe_student, resolve_student

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "pipeline.toml"
IMAGENET_TRAIN = 1_281_167


def student_flops(arch: str, size: int = 224) -> tuple[float, float, str]:
    """(forward, forward + backward) FLOPs per image of the recipe's student `arch` (pipeline.toml, its decoder from
    the arch) against a ResNet-50's 2048-channel tokens at stride 32, and its description; counted by
    img2vec/flops.py, as `img2vec diversity` counts them (attention included on a CPU too)."""
    cfg = load_config(RECIPE, [f"student.arch={arch}"])
    fwd, step = flops.student_flops(arch, size, (size // 32) ** 2, 2048)
    return fwd, step, describe_student(resolve_student(cfg.student))


def teacher_flops(size: int = 224) -> float:
    return flops.teacher_flops(random_teacher(), size)


def make_cache(tmp: Path, args, device: torch.device) -> tuple[Path, str]:
    """A cache over 8 shards with enough samples for each run's steps in one epoch; its tokens from a pool made by
    the teacher on `device`, whose fingerprint (precision: bf16 on a GPU, fp32 on a CPU) the manifest records."""
    images = args.batch * (args.warmup + args.steps + 1)
    pattern = make_source(tmp / "src", 8, -(-images // 8), procs=os.cpu_count() or 1)
    teacher = random_teacher(device=str(device))
    pool = teacher_tokens(teacher, source_views(args.views + 2, 1, size=args.size, seed=3)[0])
    write_cache(tmp / "cache", pattern, args.views, "bf16z-zstd", pool, teacher.fingerprint, size=args.size)
    return tmp / "cache", pattern


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, one round (about two minutes)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 6, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each run")
    p.add_argument("--rounds", type=int, help="rounds of synthetic / cache / online runs (default 2, quick 1)")
    p.add_argument("--batch", type=int, help="images per step (default 8, quick 4)")
    p.add_argument("--student", default="vit_tiny_patch16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, help="train.workers (default: the recipe's, at most the cores)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process (default 1: "
                   "on a small shared CPU more threads than free cores make timings erratic; 0 = torch's default)")
    p.add_argument("--runs", type=int, default=10, help="R: student runs of the ablation campaign")
    p.add_argument("--epochs", type=int, default=800, help="E: epochs per run")
    p.add_argument("--views", type=int, default=10, help="V: views extracted per image")
    args = p.parse_args()
    args.steps = args.steps or (3 if args.quick else 6)
    args.batch = args.batch or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 2)
    device = pick_device(args.device)
    workers = args.workers or min(load_config(RECIPE).train.workers, len(os.sched_getaffinity(0)))

    header("Cached vs online teacher", args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    atexit.register(shutil.rmtree, tmp, True)  # caches and runs can take hundreds of MB
    cache, pattern = make_cache(tmp, args, device)
    sets = [f"data.shards={json.dumps(pattern)}", f"cache.path={json.dumps(str(cache))}", f"student.arch={args.student}",
            f"train.batch_size={args.batch}", f"train.workers={workers}", f"train.device={device.type}",
            f"train.max_steps={args.warmup + args.steps + 1}", "train.log_every=1000000",
            "train.checkpoint_every=1000000", "train.warmup_epochs=0"]
    results = run_child(RECIPE, sets, plan(MODES, [False], rounds, tmp / "runs"), tmp / "child", threads=args.threads)
    summary = summarize(results, args.warmup, args.batch)
    _, train_flops, described = student_flops(args.student, args.size)
    ft = teacher_flops(args.size)
    print(f"{described}; at {args.size} px, batch {args.batch}, {workers} loader workers, device {device}, "
          f"OMP_NUM_THREADS {args.threads or 'default'}; teacher ResNet-50 (random init), cache `bf16z-zstd` of "
          f"{args.views} views, teacher precision {'bfloat16' if device.type == 'cuda' else 'float32'}. Steps/s: "
          f"median (min-max) over {args.steps} steps per run after {args.warmup} dropped, {rounds} interleaved "
          f"round(s); FLOP-predicted cache / online: {(train_flops + ft) / train_flops:.2f}x.\n")
    print(markdown(summary, device.type == "cuda"))

    print("### FLOPs per image at 224 (FlopCounterMode: 2 FLOPs per multiply-add)\n")
    ft = teacher_flops()
    rows, per = [], {}
    for name, arch in (("ViT-B/16", "vit_base_patch16"), ("ViT-L/16", "vit_large_patch16"), (args.student, args.student)):
        fwd, train_flops, described = student_flops(arch)
        what = described.split(";")[0].split(": ", 1)[1]  # "decoder 2 blocks x 512 wide, 16 heads"
        if arch == args.student:
            what += " (the student of the steps/s table)"
        else:
            per[name] = train_flops
        rows.append([f"{name}: {what}", f"{fwd / 1e9:.2f}", f"{train_flops / 1e9:.2f}", f"{ft / 1e9:.2f}",
                     f"{ft / (train_flops + ft):.0%}"])
    rows.append(["ResNet-50 teacher (forward only, frozen)", f"{ft / 1e9:.2f}", "-", "-", "-"])
    print("Students of the recipe (encoder on 40% visible patches, decoder from the arch, heads):\n")
    print(table(["model", "forward GFLOPs", "train step (fwd + bwd) GFLOPs", "teacher fwd GFLOPs",
                 "teacher share of an online step"], rows))

    r, e, v = args.runs, args.epochs, args.views
    print(f"### Ablation campaign: R = {r} runs x E = {e} epochs over ImageNet-1k ({IMAGENET_TRAIN:,} images), "
          f"cache of V = {v} views\n")
    rows = []
    online = r * e * IMAGENET_TRAIN * ft
    cached = v * IMAGENET_TRAIN * ft
    for name, train_flops in per.items():
        student = r * e * IMAGENET_TRAIN * train_flops
        rows.append([name, f"{online / 1e18:.0f}", f"{cached / 1e18:.2f}", f"{online / cached:.0f}x",
                     f"{student / 1e18:.0f}", f"{(student + online) / (student + cached):.2f}x"])
    print(table(["student", "teacher EFLOPs, online", "teacher EFLOPs, cached (one extraction)",
                 "teacher FLOPs saved", "student EFLOPs (all runs)", "campaign total, online / cached"], rows))
    print(f"Teacher forwards: online R x E = {r * e} per image, cached V = {v} per image, "
          f"so the cache does {r * e / v:.0f}x fewer.\n")


if __name__ == "__main__":
    main()
