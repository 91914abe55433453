"""`img2vec finetune RUN_DIR --train-shards P --val-shards P`: MAE's end-to-end fine-tuning of the student
(facebookresearch/mae: main_finetune.py, util/lr_decay.py, util/lr_sched.py, util/datasets.py; FINETUNE.md),
built from timm's pieces.

The model is the one `img2vec export` writes (timm's ViT with global average pooling: the mean of the patch
tokens, then `fc_norm`, which holds the pretrained final norm), built at the student's size with the recipe's
drop path and a new linear head (weight trunc_normal std 2e-5, bias 0: MAE's init). AdamW (0.9, 0.999), weight
decay 0.05 (none on biases, norms, pos_embed, cls_token), layer-wise lr decay (timm's create_optimizer_v2: the
groups and scales of MAE's param_groups_lrd); a linear warmup from 0, then a half-cycle cosine to 1e-6, set every
iteration. Train images through timm's create_transform: RandomResizedCrop (bicubic, scale 0.08-1), flip,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode); then timm's Mixup (mixup 0.8, cutmix 1.0,
switched per batch, label smoothing 0.1 in the soft targets) and SoftTargetCrossEntropy. Val: bicubic resize to
size / 0.875, center crop. The global batch is processes x --batch-size (MAE: 1024), the lr scaled linearly.

Per size, RECIPES: MAE's values for ViT-B, ViT-L and ViT-H. MAE fine-tunes no smaller ViT; ViT-Ti takes MAE's
recipe as MAE-Lite retuned it for ViT-Tiny (Wang et al., "A Closer Look at Self-Supervised Lightweight Vision
Transformers", ICML 2023: finetuning_mae_exp.py), ViT-S the same with MAE-Lite's ViT-S layer decay (0.75).

RandAugment and Pillow 13: with `-inc1`, timm's PosterizeIncreasing keeps 4 - int(m / 10 x 4) bits, and m is drawn
from N(9, 0.5) clipped to [0, 10]: at m = 10 (2% of its draws) it asks for a 0-bit posterize, which Pillow >= 13
refuses ("bits must be between or equal to 1 and 8") and older Pillow, on which MAE ran, answered with a black
image. Here that op gives the black image (posterize_any_bits); the printed timm train.py command, which cannot
patch timm, uses TIMM_AA instead.

    img2vec finetune runs/img2vec --train-shards 'in1k/train-{000000..001281}.tar' --val-shards 'in1k/val-{000000..000049}.tar'
    accelerate launch --num_processes 8 -m img2vec.cli finetune runs/img2vec --train-shards ... --val-shards ...
    img2vec finetune encoder.safetensors --train-shards ... --val-shards ...  # a file img2vec export wrote
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.config import ConfigError
from common.signals import StopSignals
from img2vec.evalrun import (check_arguments, halt, make_parser, result_fields, run_command, run_identity,
                             run_settings, start, train_epochs, update)
from img2vec.supervised import cosine_schedule, top1, train_data

@dataclass(frozen=True)
class Recipe:
    blr: float            # base lr per 256 images
    layer_decay: float
    drop_path: float
    epochs: int           # warmup included
    warmup_epochs: int
    source: str


RECIPES = {
    "vit_tiny_patch16": Recipe(1e-3, 0.85, 0.1, 100, 5, "MAE-Lite (Wang et al., ICML 2023) finetuning_mae_exp.py: "
                               "MAE's recipe retuned for ViT-Tiny"),
    "vit_small_patch16": Recipe(1e-3, 0.75, 0.1, 100, 5, "MAE-Lite's ViT-Tiny recipe with its ViT-S layer decay "
                                "(SMALL.md: 0.75)"),
    "vit_base_patch16": Recipe(5e-4, 0.65, 0.1, 100, 5, "MAE FINETUNE.md, ViT-Base"),
    "vit_large_patch16": Recipe(1e-3, 0.75, 0.2, 50, 5, "MAE FINETUNE.md, ViT-Large"),
    "vit_huge_patch16": Recipe(1e-3, 0.75, 0.3, 50, 5, "MAE FINETUNE.md, ViT-Huge"),
}
# what every size shares (main_finetune.py's defaults and FINETUNE.md's flags)
MAE_FINETUNE = {"batch": 1024, "betas": (0.9, 0.999), "weight_decay": 0.05, "min_lr": 1e-6, "aa": "rand-m9-mstd0.5-inc1",
                "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "head_std": 2e-5}
TIMM_HEAD_STD = 0.02  # timm's ViT head weight init (init_weights_vit_timm)
HEAD_INIT_SCALE = MAE_FINETUNE["head_std"] / TIMM_HEAD_STD  # train.py --head-init-scale: 1e-3
# for timm's train.py: the magnitude clipped at 9, not 10, so PosterizeIncreasing keeps >= 1 bit (int only: timm
# parses mmax with int()); every op's magnitude is then drawn from N(9, 0.5) clipped to [0, 9] instead of [0, 10]
TIMM_AA = MAE_FINETUNE["aa"] + "-mmax9"


def recipe_for(arch: str) -> Recipe:
    """The student arch's recipe (a patch-14 student takes its patch-16 size's)."""
    key = arch.removesuffix("_224").replace("_patch14", "_patch16")
    if key not in RECIPES:
        raise ConfigError(f"no fine-tuning recipe for {arch!r} (known: {', '.join(RECIPES)})")
    return RECIPES[key]


def posterize_any_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits as Pillow < 13 did it (mask 0: a black image) where Pillow 13 raises."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kwargs)


def train_transform(img_size: int):
    """MAE's fine-tuning augmentation (util/datasets.py build_transform) from timm's create_transform, its
    posterize op taking 0 bits."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment, posterize

    t = create_transform(img_size, is_training=True, color_jitter=None, auto_augment=MAE_FINETUNE["aa"],
                         interpolation="bicubic", re_prob=MAE_FINETUNE["reprob"], re_mode="pixel", re_count=1,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for op in (op for step in t.transforms if isinstance(step, RandAugment) for op in step.ops):
        if op.aug_fn is posterize:
            op.aug_fn = posterize_any_bits
    return t


def adamw(model: nn.Module, lr: float, layer_decay: float):
    """MAE's optimizer (util/lr_decay.py param_groups_lrd + AdamW) from timm's create_optimizer_v2: weight decay 0.05
    but on 1-d parameters and the model's no_weight_decay() (pos_embed, cls_token); a block's lr scaled by
    layer_decay ** (depth + 1 - its 1-based index), the patch embedding, pos_embed and cls_token as block 0, the
    final norm and the head unscaled."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=MAE_FINETUNE["weight_decay"], layer_decay=layer_decay,
                               betas=MAE_FINETUNE["betas"])


def settings(args: argparse.Namespace) -> dict:
    """What decides the fine-tuning's result, known before the shards are read (img2vec/evalrun.py run_settings)."""
    from img2vec.evalsource import source_info

    recipe = dataclasses.asdict(recipe_for(source_info(args.path)["arch"]))
    return run_settings("finetune", args, recipe=recipe, **MAE_FINETUNE)


def finetune(args: argparse.Namespace, stop: StopSignals | None = None) -> tuple[dict, nn.Module]:
    """Fine-tune as `args` say, resuming from --out's newest checkpoint (img2vec/evalrun.py), stopping when `stop`
    is; -> (the result, the fine-tuned timm model in eval mode)."""
    from timm.data import Mixup
    from timm.layers import trunc_normal_
    from timm.loss import SoftTargetCrossEntropy

    from img2vec.evalsource import source_info, source_model

    t0, accelerator, key = time.perf_counter(), start(args.seed), settings(args)
    run = source_info(args.path)
    recipe, size = recipe_for(run["arch"]), run["img_size"]
    data, plan = train_data(accelerator, args, train_transform(size), recipe.epochs, recipe.warmup_epochs, recipe.blr,
                               multiple=2)  # mixup pairs a batch's images
    model, info = source_model(args.path, "avg", num_classes=plan.classes, drop_path_rate=recipe.drop_path)
    trunc_normal_(model.head.weight, std=MAE_FINETUNE["head_std"])
    nn.init.zeros_(model.head.bias)
    model, optimizer = accelerator.prepare(model, adamw(model, plan.lr, recipe.layer_decay))
    scheduler = cosine_schedule(optimizer, plan.steps_per_epoch, plan.epochs, plan.warmup_epochs, MAE_FINETUNE["min_lr"])
    mixup = Mixup(mixup_alpha=MAE_FINETUNE["mixup"], cutmix_alpha=MAE_FINETUNE["cutmix"],
                  label_smoothing=MAE_FINETUNE["smoothing"], num_classes=plan.classes)
    criterion = SoftTargetCrossEntropy()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images, targets = mixup(images, labels)
        return update(accelerator, optimizer, criterion(model(images), targets))

    def evaluate() -> dict:
        model.eval()
        result = top1(accelerator, accelerator.unwrap_model(model), args.val_shards, size, plan.classes, plan.batch_size,
                      args.workers, partial(halt, stop))
        model.train()
        return result

    accelerator.print(f"fine-tuning {info['arch']} from {info['checkpoint']} ({recipe.source}): {plan}, AdamW, layer "
                      f"decay {recipe.layer_decay}, drop path {recipe.drop_path}")
    model.train()
    history = train_epochs(accelerator, data, step, scheduler, plan, evaluate, args, run_identity(key, args, plan), stop)
    result = result_fields(info, evaluate(), plan, history, t0, protocol="finetune (MAE main_finetune.py)",
                           recipe=dataclasses.asdict(recipe), **{k: v for k, v in MAE_FINETUNE.items() if k != "batch"})
    return result, accelerator.unwrap_model(model).eval()


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = make_parser(prog, "MAE's end-to-end fine-tuning of a trained student on labelled shards (the recipe of its "
                    "size), with timm's model, optimizer, augmentation and mixup.", __doc__, batch_size=128)
    args = p.parse_args(argv)
    check_arguments(p, args)
    if args.batch_size % 2:
        p.error(f"--batch-size {args.batch_size}: mixup and cutmix pair the images of a batch, give an even size")
    return args


def main(argv: list[str] | None = None, prog: str = "img2vec finetune") -> int:
    return run_command(finetune, settings, parse_args(argv, prog), "finetune", prog)


if __name__ == "__main__":
    raise SystemExit(main())
