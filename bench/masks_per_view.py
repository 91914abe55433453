"""Several masks per view (`student.masks_per_view` = M): speed and loss of a tiny student for M = 1, 2, 4.

Each step loads B views and trains on B x M masked copies (targets shared), so a step costs about M
times the student compute of M = 1 and reads the same data. The table gives loaded views/s and masked
copies/s (median of interleaved repeats), the training loss along the way, and a held-out loss (fixed
views and masks, M = 1) after the same number of steps, and after the same number of masked copies.

Targets are real teacher tokens: timm's resnet18 (random weights, BatchNorm statistics recalibrated on
other images so its tokens are structured) on recorded views of synthetic JPEGs, layer-normalised per
token (`loss.target_norm = "layernorm"`).

    python bench/masks_per_view.py            # about 9 minutes on one CPU core
    python bench/masks_per_view.py --quick    # about a minute
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import header, median, random_teacher, recalibrate_bn, source_views, table  # noqa: E402
from common.augment import normalize_pixels  # noqa: E402
from train.losses import normalize_targets  # noqa: E402
from train.masking import unit_mask  # noqa: E402
from train.model import vit_tiny_patch16  # noqa: E402

SIZE = 96  # 3 x 3 teacher tokens (stride 32), 6 x 6 student patches


def student(m: int):
    torch.manual_seed(0)  # the same init for every M
    return vit_tiny_patch16(img_size=SIZE, depth=4, decoder_depth=2, decoder_dim=128, decoder_heads=4,
                            teacher_dim=512, head_hidden=256, mask_ratio=0.6, masks_per_view=m)


def train(m: int, images, targets, steps: int, batch: int, lr: float, log_at: set[int], held_out) -> dict:
    model = student(m).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)  # masks: the same stream for every M (M x as many drawn)
    order = torch.Generator().manual_seed(2)  # data: the same views in the same order for every M
    curve, busy = {}, 0.0
    perm = torch.randperm(len(images), generator=order)
    at = 0
    for step in range(1, steps + 1):
        if at + batch > len(perm):
            perm, at = torch.randperm(len(images), generator=order), 0
        idx = perm[at:at + batch]
        at += batch
        t0 = time.perf_counter()
        loss = model(images[idx], targets[idx], generator=gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        busy += time.perf_counter() - t0
        if step in log_at:
            curve[step] = loss.item()
    return {"views_per_s": steps * batch / busy, "copies_per_s": steps * batch * m / busy, "curve": curve,
            "held_out": evaluate(model, *held_out)}


@torch.no_grad()
def evaluate(model, images, targets, masks) -> float:
    m, model.masks_per_view = model.masks_per_view, 1
    model.eval()
    loss = model(images, targets, unit_mask=masks)["loss"].item()
    model.masks_per_view = m
    return loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="interleaved speed repeats (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 150)
    repeats = args.repeats or (1 if args.quick else 3)
    header("Several masks per view: tiny student, CPU", args.quick)

    n_train, n_held = (64, 32) if args.quick else (256, 64)
    views, _ = source_views(n_train + n_held, 1, SIZE, seed=1)
    teacher = random_teacher("resnet18")
    recalibrate_bn(teacher, source_views(16, 1, SIZE, seed=9)[0])
    with torch.no_grad():
        tokens = torch.cat([teacher(views[i:i + 32]) for i in range(0, len(views), 32)])  # [N, 9, 512]
    images, targets = normalize_pixels(views), normalize_targets(tokens, "layernorm")
    held = (images[n_train:], targets[n_train:],
            unit_mask(n_held, 3, 3, 0.6, generator=torch.Generator().manual_seed(3)))
    images, targets = images[:n_train], targets[:n_train]
    log_at = {s for s in (1, 10, steps // 4, steps // 2, steps) if s >= 1}
    print(f"student: ViT-Ti/16 width 192, 4 blocks, decoder 2 x 128, {SIZE} px; targets: resnet18 tokens 3x3x512 "
          f"(layernorm); {n_train} training views, {n_held} held out; batch {args.batch} views, AdamW lr 1e-3, "
          f"{steps} steps; torch threads {torch.get_num_threads()}\n")

    ms = (1, 2, 4)
    runs: dict[int, list[dict]] = {m: [] for m in ms}
    for _ in range(repeats):  # interleaved: M = 1, 2, 4, 1, 2, 4, ...
        for m in ms:
            runs[m].append(train(m, images, targets, steps, args.batch, 1e-3, log_at, held))
    # equal compute: M = 1 for 4x the steps (the same number of masked copies as M = 4)
    same_copies = train(1, images, targets, 4 * steps, args.batch, 1e-3, {4 * steps}, held)

    base = median(r["views_per_s"] for r in runs[1])
    rows = []
    for m in ms:
        r = runs[m][0]  # curves and held-out losses are deterministic; speeds vary
        vps = median(x["views_per_s"] for x in runs[m])
        rows.append([m, vps, vps / base, median(x["copies_per_s"] for x in runs[m]),
                     *(r["curve"][s] for s in sorted(log_at)), r["held_out"]])
    print(table(["M", "views/s", "vs M=1", "masked copies/s", *(f"loss @{s}" for s in sorted(log_at)),
                 f"held-out loss @{steps}"], rows))
    print(f"equal compute: M = 1 for {4 * steps} steps ({4 * steps * args.batch} masked copies, as M = 4 in {steps} "
          f"steps): held-out loss {same_copies['held_out']:.4f}, {same_copies['views_per_s']:.4g} views/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
