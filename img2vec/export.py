"""`img2vec export RUN_DIR_OR_CHECKPOINT --out encoder.safetensors`: student checkpoint -> timm ViT encoder.

The run dir's `config.json` rebuilds the student; the checkpoint's accelerate-saved `model.safetensors`
fills it; `encoder_state_dict()` (timm's keys) is written with safetensors, so no pickle is read or
written. The file loads with strict keys into the timm model that `img2vec export` prints:
`timm.create_model("vit_base_patch16_224", global_pool="avg", num_classes=0)` by default, the model
MAE-style fine-tuning uses (mean of the patch tokens, then `fc_norm`; the pretrained final norm is
written as `fc_norm`), or timm's default layout with `--global-pool token` (final `norm` on every token).
ViT-H/16 is timm's `vit_huge_patch14_224` built with `patch_size=16` (timm registers no ViT-H/16).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.config import ConfigError, config_from_dict
from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.teacher import strip_prefixes

WEIGHTS_FILE = "model.safetensors"      # accelerate's SAFE_WEIGHTS_NAME for the first prepared model
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"  # what save_state(safe_serialization=False) writes instead
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP (save_state keeps the wrapper), torch.compile
GLOBAL_POOLS = ("avg", "token")
TIMM_MODELS = {"vit_huge_patch16": ("vit_huge_patch14_224", {"patch_size": 16}),  # else <arch>_224
               **{f"vit_{s}_patch14": (f"vit_{s}_patch16_224", {"patch_size": 14}) for s in ("tiny", "small", "base")}}



class ExportError(ValueError):
    """A run dir or checkpoint that cannot be exported; the message says which file and what to do."""


def timm_model_args(arch: str, img_size: int = 224, global_pool: str = "avg") -> tuple[str, dict]:
    """Student arch -> (timm model name, create_model kwargs) of the same encoder: vit_base_patch16 ->
    ("vit_base_patch16_224", {"global_pool": "avg"}); vit_huge_patch16 -> vit_huge_patch14_224, patch_size=16."""
    if global_pool not in GLOBAL_POOLS:
        raise ExportError(f"global pool {global_pool!r}: choose one of {', '.join(GLOBAL_POOLS)}")
    name, kwargs = TIMM_MODELS.get(arch, (f"{arch}_224", {}))
    kwargs = dict(kwargs)
    if img_size != 224:
        kwargs["img_size"] = img_size
    if global_pool != "token":  # "token" is timm's default for these models
        kwargs["global_pool"] = global_pool
    return name, kwargs


def timm_keys(encoder: dict[str, torch.Tensor], global_pool: str) -> dict[str, torch.Tensor]:
    """With global_pool="avg" timm has no `norm` but an `fc_norm` after the pool: the pretrained final norm
    (the student's last LayerNorm, in front of its pooled global head) becomes fc_norm."""
    if global_pool != "avg":
        return dict(encoder)
    return {("fc_norm." + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in encoder.items()}


def _kwargs_text(kwargs: dict) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items()).replace("'", '"')


def timm_snippet(path: str | Path, model_name: str, kwargs: dict) -> str:
    """The create_model call that loads the file; the pixel mean/std are the student's (ImageNet's), not the
    0.5s that timm's ViT configs name, so timm's data config normalises as pretraining did."""
    return (f'timm.create_model("{model_name}", pretrained=True{_kwargs_text(kwargs)}, '
            f'pretrained_cfg_overlay=dict(file="{path}", num_classes=0, mean={tuple(IMAGENET_MEAN)}, '
            f'std={tuple(IMAGENET_STD)}))')


def finetune_command(path: str | Path, arch: str, model_name: str, kwargs: dict) -> str:
    """timm's train.py command line for MAE's fine-tuning recipe of this size (img2vec/finetune.py: RECIPES), on 8
    GPUs x 128 = batch 1024. Every choice that differs from timm's defaults is spelled out:
    - `--model-kwargs img_size=N` (and ViT-H/16's patch_size=16): train.py's `--img-size` sizes the data only;
    - `--epochs E-W --warmup-epochs W --warmup-prefix --warmup-lr 0 --sched-on-updates`: MAE's E epochs, W of them a
      linear warmup from 0, then a half-cycle cosine over the rest, set every iteration (timm: per epoch, from 1e-5);
    - `--head-init-scale`: MAE's head init std 2e-5 from timm's 0.02; `--train-interpolation bicubic` (timm: random);
    - `--aa rand-m9-mstd0.5-inc1-mmax9`: MAE's RandAugment with the magnitude capped at 9, not 10 (see TIMM_AA)."""
    from img2vec.finetune import HEAD_INIT_SCALE, MAE_FINETUNE, TIMM_AA, recipe_for
    from img2vec.supervised import eval_crop_pct

    r, size = recipe_for(arch), kwargs.get("img_size", 224)
    model_kwargs = {k: v for k, v in kwargs.items() if k != "global_pool"}
    extra = f" --model-kwargs {' '.join(f'{k}={v}' for k, v in model_kwargs.items())}" if model_kwargs else ""
    return (f"torchrun --nproc-per-node 8 train.py --data-dir /data/imagenet --model {model_name}{extra} "
            f"--img-size {size} --pretrained --pretrained-path {path} --gp {kwargs.get('global_pool', 'token')} "
            f"--num-classes 1000 --mean {' '.join(map(str, IMAGENET_MEAN))} --std {' '.join(map(str, IMAGENET_STD))} "
            f"--crop-pct {eval_crop_pct(size)} --train-interpolation bicubic --batch-size 128 --opt adamw "
            f"--opt-betas {' '.join(map(str, MAE_FINETUNE['betas']))} --weight-decay {MAE_FINETUNE['weight_decay']} "
            f"--lr-base {r.blr:g} --lr-base-size 256 --lr-base-scale linear --layer-decay {r.layer_decay} "
            f"--drop-path {r.drop_path} --head-init-scale {HEAD_INIT_SCALE:g} --epochs {r.epochs - r.warmup_epochs} "
            f"--warmup-epochs {r.warmup_epochs} --warmup-prefix --warmup-lr 0 --sched cosine --sched-on-updates "
            f"--min-lr {MAE_FINETUNE['min_lr']:g} --aa {TIMM_AA} --reprob {MAE_FINETUNE['reprob']} --remode pixel "
            f"--mixup {MAE_FINETUNE['mixup']} --cutmix {MAE_FINETUNE['cutmix']} --smoothing {MAE_FINETUNE['smoothing']} "
            f"--amp --amp-dtype bfloat16")

def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run dir (-> its latest complete checkpoint) or a checkpoint dir -> (checkpoint dir, run dir)."""
    from train.checkpoints import Checkpoints

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist (give a run dir, i.e. train.run_dir, or one of its "
                          "checkpoints/step_XXXXXXXX dirs)")
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        ckpt = Checkpoints(path, keep=0).latest()
        if ckpt is None:
            raise ExportError(f"run dir {path} has no complete checkpoint under {path / 'checkpoints'} (one with "
                              "position.json); train longer or wait for the first checkpoint (train.checkpoint_every)")
        return ckpt, path
    if (path / WEIGHTS_FILE).is_file() or (path / PICKLE_WEIGHTS_FILE).is_file():
        if not (path / "position.json").is_file():
            print(f"warning: {path} has no position.json: it may be a checkpoint whose writing was interrupted",
                  file=sys.stderr)
        return path, path.parent.parent
    raise ExportError(f"{path} is neither a run dir (with config.json and checkpoints/) nor a checkpoint dir "
                      f"(with {WEIGHTS_FILE})")


def read_run_config(run_dir: Path) -> tuple[dict, dict]:
    """-> (resolved config dict, cache_manifest excerpt) from `<run_dir>/config.json`."""
    p = run_dir / "config.json"
    if not p.is_file():
        raise ExportError(f"{p} not found: the student is rebuilt from the run's resolved config, which "
                          "train writes into the run dir (is this checkpoint still inside its run dir?)")
    d = json.loads(p.read_text())
    if "cache_manifest" not in d or "student" not in d:
        raise ExportError(f"{p} has no 'student' or 'cache_manifest' entry: not a config.json written by train")
    return d, d["cache_manifest"]


def read_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The accelerate-saved model state dict, wrapper prefixes removed. Never unpickles code."""
    if (ckpt / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        sd = load_file(str(ckpt / WEIGHTS_FILE), device="cpu")
    elif (ckpt / PICKLE_WEIGHTS_FILE).is_file():
        sd = torch.load(ckpt / PICKLE_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    else:
        found = ", ".join(sorted(p.name for p in ckpt.iterdir())) or "nothing"
        raise ExportError(f"checkpoint {ckpt} has no {WEIGHTS_FILE} (found: {found}); sharded or FSDP "
                          "checkpoints must be merged first (accelerate merge-weights)")
    return strip_prefixes(sd, _WRAPPER_PREFIXES)


def run_info(path: str | Path) -> dict:
    """Run dir or checkpoint dir -> {"arch", "img_size", "run_dir", "checkpoint"} from its config.json (no weights read)."""
    ckpt, run_dir = resolve_checkpoint(path)
    d, manifest = read_run_config(run_dir)
    return {"arch": config_from_dict({"student": d["student"]}).student.arch, "img_size": int(manifest["augment"]["size"]),
            "run_dir": str(run_dir), "checkpoint": str(ckpt)}


def load_student(path: str | Path, weights: bool = True):
    """Run dir or checkpoint dir -> (student in eval mode, info). `weights=False` gives the run's student at
    its initialisation (same arch, size and seed as the run started from)."""
    from train.model import build_student

    if weights:
        ckpt, run_dir = resolve_checkpoint(path)
    else:
        path = Path(path)
        ckpt, run_dir = None, path if (path / "config.json").is_file() else path.parent.parent
    d, manifest = read_run_config(run_dir)
    cfg = config_from_dict({"student": d["student"]})
    torch.manual_seed(int(d.get("train", {}).get("seed", 0)))  # train seeds before it builds the student
    student = build_student(cfg, manifest["token_shape"], manifest["augment"]["size"])  # config.json's excerpt
    info = {"arch": cfg.student.arch, "img_size": int(manifest["augment"]["size"]), "run_dir": str(run_dir),
            "checkpoint": str(ckpt) if ckpt else None, "step": None}
    if weights:
        sd = read_model_weights(ckpt)
        result = student.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ExportError(f"{ckpt / WEIGHTS_FILE} does not fit the student of {run_dir / 'config.json'} "
                              f"({cfg.student.arch}): missing {result.missing_keys[:5]}, unexpected "
                              f"{result.unexpected_keys[:5]}; was the config.json edited or the run dir reused?")
        if (ckpt / "position.json").is_file():
            info["step"] = json.loads((ckpt / "position.json").read_text()).get("step")
    return student.eval(), info


def timm_encoder(path: str | Path, global_pool: str = "avg", num_classes: int = 0, **create_kwargs):
    """Run dir or checkpoint dir -> (the timm ViT that `img2vec export` writes its file for, built in memory and
    holding the student's encoder, info). With num_classes > 0 its classifier `head` is timm's fresh one, the only
    tensors not from the student; create_kwargs go to timm.create_model (drop_path_rate=...)."""
    student, info = load_student(path)
    model = filled_timm_model(timm_keys(student.encoder_state_dict(), global_pool), info, global_pool, num_classes,
                              info["arch"], **create_kwargs)
    return model, info


def filled_timm_model(tensors: dict[str, torch.Tensor], info: dict, global_pool: str, num_classes: int, source: str,
                      **create_kwargs):
    """timm's ViT of info's arch and img_size with `global_pool`, holding `tensors` (timm's keys; every tensor but a
    new head's); info gets timm_model, timm_kwargs, global_pool. `source` names the tensors in the error."""
    import timm

    name, kwargs = timm_model_args(info["arch"], info["img_size"], global_pool)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs, **create_kwargs)
    result = model.load_state_dict(tensors, strict=False)
    fresh = {"head.weight", "head.bias"} if num_classes else set()
    if result.unexpected_keys or set(result.missing_keys) != fresh:
        raise ExportError(f"{source} does not fill timm {name}: missing {result.missing_keys[:5]}, unexpected "
                          f"{result.unexpected_keys[:5]}")
    info.update(timm_model=name, timm_kwargs=kwargs, global_pool=global_pool)
    return model


def export_encoder(path: str | Path, out: str | Path, check: bool = True, global_pool: str = "avg") -> dict:
    """Write the student's encoder under the keys of timm's model with `global_pool` to `out` (safetensors,
    with metadata); returns info, with the create_model call (`snippet`) and timm train.py command."""
    from safetensors.torch import save_file

    student, info = load_student(path)
    name, kwargs = timm_model_args(info["arch"], info["img_size"], global_pool)
    encoder = timm_keys({k: v.detach().contiguous().cpu() for k, v in student.encoder_state_dict().items()},
                        global_pool)
    if check:
        check_timm_keys(encoder, name, kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs), "global_pool": global_pool,
                "img_size": str(info["img_size"]), "student_arch": info["arch"], "checkpoint": str(info["checkpoint"]),
                "step": str(info["step"])}
    tmp = out.with_name(out.name + ".tmp")
    save_file(encoder, str(tmp), metadata=metadata)
    tmp.replace(out)
    info.update(out=str(out), tensors=len(encoder), params=sum(v.numel() for v in encoder.values()),
                timm_model=name, timm_kwargs=kwargs, global_pool=global_pool,
                snippet=timm_snippet(out, name, kwargs), finetune=finetune_command(out, info["arch"], name, kwargs))
    return info


def check_timm_keys(encoder: dict[str, torch.Tensor], model_name: str, kwargs: dict) -> None:
    """The encoder must have exactly the keys and shapes of the timm model (built on the meta device: no
    memory, so ViT-H is checked as fast as ViT-Ti)."""
    import timm

    if not timm.is_model(model_name):
        raise ExportError(f"timm {timm.__version__} has no model {model_name!r}")
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in encoder.items()}
    missing, unexpected = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
    wrong = [f"{k} {ours[k]} (timm {theirs[k]})" for k in sorted(ours.keys() & theirs.keys()) if ours[k] != theirs[k]]
    if missing or unexpected or wrong:
        raise ExportError(f"the exported encoder does not fit timm {model_name}({_kwargs_text(kwargs)[2:]}) with strict "
                          f"keys: missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:5]}")


def main(argv: list[str] | None = None, prog: str = "img2vec export") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Export a trained student's encoder as timm ViT weights "
                                "(safetensors, timm key names, loadable with strict keys).")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run dir (its latest complete checkpoint is used) or a checkpoints/step_XXXXXXXX dir")
    p.add_argument("--out", required=True, help="output file, e.g. encoder.safetensors")
    p.add_argument("--global-pool", choices=GLOBAL_POOLS, default="avg",
                   help="the timm model the keys are for: avg (default; mean of the patch tokens, then fc_norm = the "
                        "pretrained final norm: MAE-style fine-tuning) or token (timm's default: final norm on every "
                        "token, cls token pooled)")
    p.add_argument("--no-check", action="store_true", help="skip the strict key and shape check against timm")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out!r}: name it *.safetensors (timm picks the loader by the file ending)")
    try:
        info = export_encoder(args.path, args.out, check=not args.no_check, global_pool=args.global_pool)
    except (ExportError, ConfigError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {info['arch']} encoder ({info['params'] / 1e6:.1f}M params, step {info['step']}) from "
          f"{info['checkpoint']}\n  -> {info['out']}\nload it with timm:\n  import timm\n  model = {info['snippet']}")
    if info["global_pool"] == "avg":
        print("fine-tune it as MAE does (README: Fine-tuning), with timm's train.py:\n  " + info["finetune"])
    return 0
