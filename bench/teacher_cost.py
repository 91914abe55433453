"""Cached vs online teacher: training steps/s of one small student with targets from the cache vs
the ResNet-50 teacher run in every step (`train.targets = "online"`), then FLOP accounting per
image at 224 for ViT-B / ViT-L students against the teacher, and over an ablation campaign.

    python bench/teacher_cost.py [--quick]

Steps/s come from real `python -m train` runs (subprocesses, interleaved cache / online / cache /
online ...) over one cache; FLOPs from torch.utils.flop_counter.FlopCounterMode (2 FLOPs per
multiply-add, so ResNet-50's "4.1 GFLOPs" of the literature, which are multiply-adds, read 8.2 here).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import header, make_source, median, random_teacher, source_views, table, teacher_tokens, write_cache
from torch.utils.flop_counter import FlopCounterMode

from train.model import STUDENTS

REPO = Path(__file__).resolve().parent.parent
IMAGENET_TRAIN = 1_281_167


def run_train(cfg_path: Path, run_dir: Path, targets: str, steps: int, extra: list[str], threads: int) -> list[float]:
    """One `python -m train` run; returns its per-step samples/s (log_every = 1)."""
    sets = [f"train.run_dir={json.dumps(str(run_dir))}", f"train.targets={targets}", f"train.max_steps={steps}",
            "train.log_every=1", "train.checkpoint_every=1000000", "train.keep_checkpoints=1", *extra]
    cmd = [sys.executable, "-m", "train", "--config", str(cfg_path), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in rows]


def student_flops(arch: str, decoder_depth: int, decoder_dim: int = 512, decoder_heads: int = 16,
                  head_hidden: int = 2048, batch: int = 1) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of the Img2Vec student at 224, 60% of units masked."""
    model = STUDENTS[arch](img_size=224, teacher_dim=2048, teacher_stride=32, decoder_depth=decoder_depth,
                           decoder_dim=decoder_dim, decoder_heads=decoder_heads, head_hidden=head_hidden,
                           mask_ratio=0.6)
    imgs, tokens = torch.randn(batch, 3, 224, 224), torch.randn(batch, 49, 2048)
    with FlopCounterMode(display=False) as fwd:
        out = model(imgs, tokens)
    with FlopCounterMode(display=False) as both:
        out = model(imgs, tokens)
        out["loss"].backward()
    return fwd.get_total_flops() / batch, both.get_total_flops() / batch


def teacher_flops() -> float:
    teacher = random_teacher()
    with FlopCounterMode(display=False) as c:
        teacher(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    return float(c.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, one round (about a minute and a half)")
    p.add_argument("--steps", type=int, help="steps per run (default 6, quick 3); the first is warm-up")
    p.add_argument("--rounds", type=int, help="cache/online pairs of runs (default 2, quick 1)")
    p.add_argument("--batch", type=int, help="images per step (default 8, quick 4)")
    p.add_argument("--student", default="vit_tiny_patch16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="train.device (cpu, cuda or auto)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training processes (default 1: "
                   "on a small shared CPU more threads than free cores make timings erratic; 0 = torch's default)")
    p.add_argument("--runs", type=int, default=10, help="R: student runs of the ablation campaign")
    p.add_argument("--epochs", type=int, default=800, help="E: epochs per run")
    p.add_argument("--views", type=int, default=10, help="V: views extracted per image")
    args = p.parse_args()
    steps = args.steps or (3 if args.quick else 6)
    args.batch = args.batch or (4 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 2)

    header("Cached vs online teacher", args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    atexit.register(shutil.rmtree, tmp, True)  # caches and runs can take hundreds of MB
    images = args.batch * steps * 2
    pattern = make_source(tmp / "src", 2, images // 2)
    teacher = random_teacher()
    pool = teacher_tokens(teacher, source_views(args.views + 2, 1, size=args.size, seed=3)[0])
    write_cache(tmp / "cache", pattern, args.views, "bf16-zstd", pool, teacher.fingerprint, size=args.size)
    cfg = tmp / "bench.toml"
    cfg.write_text(f"""
[cache]
path = "{tmp / 'cache'}"
[student]
arch = "{args.student}"
decoder_dim = 256
decoder_heads = 8
decoder_depth = 2
head_hidden = 1024
[train]
batch_size = {args.batch}
workers = 2
shuffle_buffer = 16
warmup_epochs = 0
device = "{args.device}"
""")
    rates = {"cache": [], "online": []}
    for r in range(rounds):
        for targets in ("cache", "online"):
            per_step = run_train(cfg, tmp / f"run-{targets}-{r}", targets, steps, [], args.threads)
            rates[targets] += per_step[1:]  # the first step warms up allocators and workers
    sps = {k: median(v) / args.batch for k, v in rates.items()}
    print(f"Student `{args.student}` at {args.size} px (decoder 2 x 256, head 1024 -> 2048 channels), batch "
          f"{args.batch}, 2 loader workers, device {args.device}, OMP_NUM_THREADS {args.threads or 'default'}; "
          f"teacher ResNet-50 (random init). Steps/s: median over {rounds} round(s) x {steps - 1} steps per run "
          f"(first step of each run dropped), runs interleaved.\n")
    print(table(["targets", "steps/s", "s/step", "images/s", "speed-up of cached"],
                [["cached (`train.targets=cache`, bf16-zstd, 10 views)", f"{sps['cache']:.3f}",
                  f"{1 / sps['cache']:.2f}", f"{sps['cache'] * args.batch:.2f}",
                  f"{sps['cache'] / sps['online']:.2f}x"],
                 ["online ResNet-50 (`train.targets=online`)", f"{sps['online']:.3f}", f"{1 / sps['online']:.2f}",
                  f"{sps['online'] * args.batch:.2f}", "1.00x"]]))

    print("### FLOPs per image at 224 (FlopCounterMode: 2 FLOPs per multiply-add)\n")
    ft = teacher_flops()
    rows, per = [], {}
    for name, arch, depth in (("ViT-B/16", "vit_base_patch16", 2), ("ViT-L/16", "vit_large_patch16", 4)):
        fwd, train_flops = student_flops(arch, depth)
        per[name] = train_flops
        rows.append([f"{name} student (encoder on 40% visible patches + {depth}-block decoder + heads)",
                     f"{fwd / 1e9:.2f}", f"{train_flops / 1e9:.2f}", f"{ft / 1e9:.2f}",
                     f"{ft / (train_flops + ft):.0%}"])
    fwd, train_flops = student_flops(args.student, 2, 256, 8, 1024)
    rows.append([f"{args.student} student of the steps/s table above", f"{fwd / 1e9:.2f}", f"{train_flops / 1e9:.2f}",
                 f"{ft / 1e9:.2f}", f"{ft / (train_flops + ft):.0%} (FLOP-predicted speed-up of cached: "
                 f"{(train_flops + ft) / train_flops:.2f}x)"])
    rows.append(["ResNet-50 teacher (forward only, frozen)", f"{ft / 1e9:.2f}", "-", "-", "-"])
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
