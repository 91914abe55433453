"""`img2vec linprobe RUN_DIR --train-shards P --val-shards P`: MAE's linear probe of the student's encoder
(facebookresearch/mae: main_linprobe.py, util/lars.py, util/lr_sched.py; FINETUNE.md "Linear Probing").

The encoder is frozen (run without gradients). The classifier is BatchNorm1d without affine (eps 1e-6) and a
linear layer (weight trunc_normal std 0.01, bias 0), on the cls token after the final norm: MAE's `--cls_token`,
its linear-probe setting (`--pool avg`: the mean of the patch tokens, then the pretrained norm, the feature the
student's global head was trained on). LARS (MoCo v3's, as MAE: momentum 0.9, trust coefficient 0.001; a bias
gets neither weight decay nor the trust ratio) at base lr 0.1 per 256 images, weight decay 0; 90 epochs, 10 of
them a linear warmup from 0, then a half-cycle cosine to 0, set every iteration; cross-entropy. Train images:
RandomResizedCrop (bicubic, scale 0.08-1) and a horizontal flip; val: bicubic resize to size / 0.875, center
crop (MAE: 256, 224). The global batch is processes x --batch-size (MAE: 32 GPUs x 512 = 16,384), the lr
scaled linearly from the base lr.

    img2vec linprobe runs/img2vec --train-shards 'in1k/train-{000000..001281}.tar' --val-shards 'in1k/val-{000000..000049}.tar'
    accelerate launch --num_processes 8 -m img2vec.cli linprobe runs/img2vec --train-shards ... --val-shards ...
    img2vec linprobe encoder.safetensors --train-shards ... --val-shards ...  # a file img2vec export wrote
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.signals import StopSignals
from img2vec.evalrun import (check_arguments, halt, make_parser, result_fields, run_command, run_identity,
                             run_settings, start, train_epochs, update)
from img2vec.supervised import cosine_schedule, top1, train_data

LINPROBE = {"blr": 0.1, "epochs": 90, "warmup_epochs": 10, "weight_decay": 0.0, "min_lr": 0.0, "head_std": 0.01}
POOLS = {"cls": "token", "avg": "avg"}  # --pool -> the exported timm model's global_pool


class LARS(torch.optim.Optimizer):
    """MAE's util/lars.py (MoCo v3's LARS): SGD with momentum; a weight matrix's (ndim > 1) step, after weight
    decay, is scaled to trust_coefficient x |p| / |step|; a bias or norm parameter gets neither."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["trust_coefficient"] * param_norm
                                                                  / update_norm, one), one)
                    dp = dp.mul(q)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def probe_head(dim: int, classes: int) -> nn.Sequential:
    """MAE's linear-probe head: BatchNorm1d(affine=False, eps=1e-6), then Linear (weight trunc_normal std 0.01, bias 0)."""
    from timm.layers import trunc_normal_

    linear = nn.Linear(dim, classes)
    trunc_normal_(linear.weight, std=LINPROBE["head_std"])
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def train_transform(img_size: int):
    """MAE's linear-probe augmentation: RandomResizedCrop (bicubic) + horizontal flip, then normalise."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def settings(args: argparse.Namespace) -> dict:
    """What decides the probe's result, known before the shards are read (img2vec/evalrun.py run_settings)."""
    return run_settings("linprobe", args, pool=args.pool, optimizer="LARS", **LINPROBE)


def probe(args: argparse.Namespace, stop: StopSignals | None = None) -> tuple[dict, nn.Module]:
    """Train the probe as `args` say, resuming from --out's newest checkpoint (img2vec/evalrun.py), stopping when
    `stop` is; -> (the result, the classifier: frozen encoder + head, in eval mode)."""
    from img2vec.evalsource import source_info, source_model

    t0, accelerator, key = time.perf_counter(), start(args.seed), settings(args)
    size = source_info(args.path)["img_size"]
    data, plan = train_data(accelerator, args, train_transform(size), LINPROBE["epochs"], LINPROBE["warmup_epochs"],
                               LINPROBE["blr"])
    encoder, info = source_model(args.path, POOLS[args.pool])
    encoder.requires_grad_(False).eval().to(accelerator.device)
    head = probe_head(encoder.num_features, plan.classes)
    head, optimizer = accelerator.prepare(head, LARS(head.parameters(), lr=plan.lr, weight_decay=LINPROBE["weight_decay"]))
    scheduler = cosine_schedule(optimizer, plan.steps_per_epoch, plan.epochs, plan.warmup_epochs, LINPROBE["min_lr"])

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), accelerator.autocast():
            return encoder(images).float()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return update(accelerator, optimizer, F.cross_entropy(head(features(images)), labels))

    def evaluate() -> dict:
        head.eval()
        bare = accelerator.unwrap_model(head)  # no DDP: processes classify different numbers of batches
        result = top1(accelerator, lambda x: bare(features(x)), args.val_shards, size, plan.classes, plan.batch_size,
                      args.workers, partial(halt, stop))
        head.train()
        return result

    accelerator.print(f"linear probe of {info['arch']} ({args.pool} pooled) from {info['checkpoint']}: {plan}, LARS")
    head.train()
    history = train_epochs(accelerator, data, step, scheduler, plan, evaluate, args, run_identity(key, args, plan), stop)
    result = result_fields(info, evaluate(), plan, history, t0, protocol="linprobe (MAE main_linprobe.py)", pool=args.pool,
                           optimizer="LARS", weight_decay=LINPROBE["weight_decay"])
    return result, nn.Sequential(encoder, accelerator.unwrap_model(head)).eval()


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = make_parser(prog, "MAE's linear probe of a trained student's encoder on labelled shards: frozen encoder, "
                    "BatchNorm + linear head, LARS.", __doc__, batch_size=512)
    p.add_argument("--pool", choices=POOLS, default="cls",
                   help="the feature: cls (default, MAE's: the cls token after the final norm) or avg (the mean of the "
                        "patch tokens, then the final norm)")
    args = p.parse_args(argv)
    check_arguments(p, args)
    return args


def main(argv: list[str] | None = None, prog: str = "img2vec linprobe") -> int:
    return run_command(probe, settings, parse_args(argv, prog), "linprobe", prog)


if __name__ == "__main__":
    raise SystemExit(main())
