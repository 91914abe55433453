"""`img2vec knn`: k-nearest-neighbour probe of an encoder on labelled shards (DINO's eval_knn); the probe
itself is train/probe.py's, which training also runs every `train.eval_every` steps.

Each image is center-cropped (a centered square box, `crop_pct` of the short side) and resized to the
encoder's size; its feature is the mean of the patch tokens after the final norm (`forward_features`;
for a file exported with `--global-pool avg`, timm's fc_norm of the mean), L2-normalised. A query takes
the k most cosine-similar memory-bank images and votes with weights exp(similarity / T) (k = 20,
T = 0.07 as in DINO).

    img2vec knn --train-shards 'train-{0..9}.tar' --val-shards 'val-{0..1}.tar' --run runs/img2vec
    img2vec knn --shards 'data-{0..9}.tar' --val-fraction 0.2 --weights encoder.safetensors
    img2vec knn --train-shards ... --val-shards ... --random --arch vit_tiny_patch16 --img-size 96
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.augment import CENTER_CROP
from common.config import ConfigError
from common.runtime import pick_device, write_json_output
from shards.source import ShardError
from train.probe import knn_accuracy


def _student_arch(arch: str) -> str:
    return arch.removesuffix("_224")


def encoder_from_weights(path: str | Path, arch: str | None = None, img_size: int | None = None):
    """An exported encoder file (img2vec export) -> (timm model, img_size); arch and size default to the
    file's metadata."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights: no such file {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    from img2vec.export import timm_model_args

    size = img_size or int(meta.get("img_size", 224))
    if arch:
        name, kwargs = timm_model_args(_student_arch(arch), size, meta.get("global_pool", "token"))
    else:
        name, kwargs = meta.get("timm_model"), dict(json.loads(meta.get("timm_kwargs", "{}")), img_size=size)
    if not name:
        raise ConfigError(f"{path} carries no timm model name in its metadata: give --arch (e.g. vit_base_patch16)")
    if not timm.is_model(name):
        raise ConfigError(f"--arch: timm has no model {name!r}")
    model = timm.create_model(name, pretrained=False, num_classes=0, **{"img_size": size, **kwargs})
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path} does not load into {name} at img_size {size} with strict keys "
                          f"({str(e).splitlines()[0]}); check --arch and --img-size") from None
    return model.eval(), size


def random_student(arch: str, img_size: int, seed: int = 0):
    """An Img2Vec student encoder at its initialisation (the run's starting point for the same arch and seed)."""
    from train.model import STUDENTS

    arch = _student_arch(arch)
    if arch not in STUDENTS:
        raise ConfigError(f"--arch: unknown {arch!r} (choose from {', '.join(STUDENTS)})")
    patch = int(arch.rsplit("_patch", 1)[1])
    if img_size % patch:
        raise ConfigError(f"--img-size {img_size}: must be a multiple of the patch size {patch}")
    torch.manual_seed(seed)
    unit = 2 * patch if img_size % (2 * patch) == 0 else patch  # the decoder's unit; the encoder is the same
    return STUDENTS[arch](img_size=img_size, teacher_stride=unit).eval(), img_size


# --------------------------------------------------------------------------------------------------------


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="k-NN probe (DINO's weighted vote) of an encoder on labelled "
                                "WebDataset shards (.cls labels).", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + "\n".join(__doc__.splitlines()[-3:]))
    data = p.add_argument_group("data")
    data.add_argument("--train-shards", metavar="PATTERN", help="memory bank shards, brace pattern")
    data.add_argument("--val-shards", metavar="PATTERN", help="query shards, brace pattern")
    data.add_argument("--shards", metavar="PATTERN", help="one set of shards, split by key hash (see --val-fraction)")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share of --shards used as queries (0.2)")
    enc = p.add_argument_group("encoder (one of)")
    enc.add_argument("--run", metavar="RUN_DIR", help="a training run dir or checkpoint dir (latest checkpoint)")
    enc.add_argument("--weights", metavar="FILE", help="an exported encoder .safetensors (img2vec export)")
    enc.add_argument("--random", action="store_true",
                     help="a student at its initialisation: of --run if given, else of --arch/--img-size/--seed")
    enc.add_argument("--arch", help="student arch, e.g. vit_base_patch16 (default: from --weights' metadata)")
    enc.add_argument("--img-size", type=int, help="input size (default: the run's / the file's, else 224)")
    enc.add_argument("--seed", type=int, default=0, help="init seed for --random without --run; split seed")
    p.add_argument("-k", "--k", type=int, default=20, help="neighbours (20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature T (0.07)")
    p.add_argument("--crop-pct", type=float, default=CENTER_CROP,
                   help=f"center crop side / short side ({CENTER_CROP})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: list[str] | None, prog: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = make_parser(prog)
    args = p.parse_args(argv)
    if bool(args.shards) == bool(args.train_shards):
        p.error("give --train-shards and --val-shards, or --shards with --val-fraction")
    if args.train_shards and not args.val_shards:
        p.error("--train-shards needs --val-shards (or use --shards with --val-fraction)")
    if sum(map(bool, (args.run, args.weights, args.random and not args.run))) != 1:
        p.error("choose one encoder: --run RUN_DIR, --weights FILE, or --random --arch ARCH [--img-size N]")
    if args.random and not args.run and not args.arch:
        p.error("--random needs --arch (or --run, for that run's student at its initialisation)")
    if args.k < 1 or args.temperature <= 0 or not 0 < args.crop_pct <= 1:
        p.error("-k must be >= 1, --temperature > 0, and --crop-pct in (0, 1]")
    return p, args


def load_encoder(args: argparse.Namespace):
    """The encoder the arguments name -> (encoder, its img_size, what it is in words)."""
    from img2vec.export import load_student

    if args.run:
        encoder, info = load_student(args.run, weights=not args.random)
        return encoder, info["img_size"], f"{info['arch']} from {info['checkpoint'] or 'init of ' + args.run}"
    if args.weights:
        encoder, img_size = encoder_from_weights(args.weights, args.arch, args.img_size)
        return encoder, img_size, f"{args.weights}"
    encoder, img_size = random_student(args.arch, args.img_size or 224, args.seed)
    return encoder, img_size, f"{args.arch} at random init (seed {args.seed})"


def main(argv: list[str] | None = None, prog: str = "img2vec knn") -> int:
    p, args = parse_args(argv, prog)
    from img2vec.export import ExportError

    try:
        encoder, img_size, what = load_encoder(args)
        if args.img_size and args.img_size != img_size:
            p.error(f"--img-size {args.img_size}: the encoder was trained at {img_size}")
        encoder.to(pick_device(args.device))
        result = knn_accuracy(encoder, args.train_shards or args.shards, args.val_shards, img_size, args.k,
                              args.temperature, args.crop_pct, args.batch_size, args.workers,
                              args.val_fraction if args.shards else 0.0, args.seed, progress=not args.no_progress)
    except (ConfigError, ExportError, ShardError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    result = dict(result, encoder=what, img_size=img_size)
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    print(f"k-NN (k={result['k']}, T={result['temperature']}) {what}: top-1 {result['top1']:.2f}%{top5} "
          f"({result['val_samples']} queries, {result['train_samples']} in the memory bank, "
          f"{result['classes']} classes, {result['skipped']} skipped)")
    if args.json:
        write_json_output(args.json, result)
    return 0
