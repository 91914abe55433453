"""`img2vec export RUN_DIR_OR_CHECKPOINT --out encoder.safetensors`: student checkpoint -> timm ViT encoder.

The run dir's `config.json` rebuilds the student; the checkpoint's accelerate-saved `model.safetensors`
fills it; `encoder_state_dict()` (timm's keys) is written with safetensors, so no pickle is read or
written. The file loads with strict keys into `timm.create_model("vit_*_patch16_224", num_classes=0)`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.config import ConfigError, config_from_dict

WEIGHTS_FILE = "model.safetensors"      # accelerate's SAFE_WEIGHTS_NAME for the first prepared model
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"  # what save_state(safe_serialization=False) writes instead
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP (save_state keeps the wrapper), torch.compile


class ExportError(ValueError):
    """A run dir or checkpoint that cannot be exported; the message says which file and what to do."""


def timm_name(arch: str) -> str:
    """Student factory name -> timm model name: vit_base_patch16 -> vit_base_patch16_224."""
    return f"{arch}_224"


def timm_snippet(path: str | Path, model_name: str, img_size: int) -> str:
    size = "" if img_size == 224 else f", img_size={img_size}"
    return (f'timm.create_model("{model_name}", pretrained=True{size}, '
            f'pretrained_cfg_overlay=dict(file="{path}", num_classes=0))')


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run dir (-> its latest complete checkpoint) or a checkpoint dir -> (checkpoint dir, run dir)."""
    from train.loop import Checkpoints

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
    out = {}
    for key, value in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_student(path: str | Path, weights: bool = True):
    """Run dir or checkpoint dir -> (student in eval mode, info). `weights=False` gives the run's student at
    its initialisation (same arch, size and seed as the run started from)."""
    from train.loop import build_student

    if weights:
        ckpt, run_dir = resolve_checkpoint(path)
    else:
        path = Path(path)
        ckpt, run_dir = None, path if (path / "config.json").is_file() else path.parent.parent
    d, manifest = read_run_config(run_dir)
    cfg = config_from_dict({"student": d["student"]})
    torch.manual_seed(int(d.get("train", {}).get("seed", 0)))  # train seeds before it builds the student
    student = build_student(cfg, manifest)
    info = {"arch": cfg.student.arch, "timm_model": timm_name(cfg.student.arch),
            "img_size": int(manifest["augment"]["size"]), "run_dir": str(run_dir),
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


def export_encoder(path: str | Path, out: str | Path, check: bool = True) -> dict:
    """Write the student's encoder under timm's keys to `out` (safetensors, with metadata); returns info."""
    from safetensors.torch import save_file

    student, info = load_student(path)
    encoder = {k: v.detach().contiguous().cpu() for k, v in student.encoder_state_dict().items()}
    if check:
        check_timm_keys(encoder, info["timm_model"], info["img_size"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model": info["timm_model"], "img_size": str(info["img_size"]),
                "student_arch": info["arch"], "checkpoint": str(info["checkpoint"]), "step": str(info["step"])}
    tmp = out.with_name(out.name + ".tmp")
    save_file(encoder, str(tmp), metadata=metadata)
    tmp.replace(out)
    info.update(out=str(out), tensors=len(encoder), params=sum(v.numel() for v in encoder.values()),
                snippet=timm_snippet(out, info["timm_model"], info["img_size"]))
    return info


def check_timm_keys(encoder: dict[str, torch.Tensor], model_name: str, img_size: int) -> None:
    """The encoder must load into the timm model with strict keys and equal shapes."""
    import timm

    if not timm.is_model(model_name):
        raise ExportError(f"timm {timm.__version__} has no model {model_name!r}")
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size)
    try:
        model.load_state_dict(encoder, strict=True)
    except RuntimeError as e:
        raise ExportError(f"the exported encoder does not load into timm {model_name} with strict keys: "
                          f"{str(e).splitlines()[0]}") from None


def main(argv: list[str] | None = None, prog: str = "img2vec export") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Export a trained student's encoder as timm ViT weights "
                                "(safetensors, timm key names, loadable with strict keys).")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run dir (its latest complete checkpoint is used) or a checkpoints/step_XXXXXXXX dir")
    p.add_argument("--out", required=True, help="output file, e.g. encoder.safetensors")
    p.add_argument("--no-check", action="store_true", help="skip the strict-key load into timm before writing")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        p.error(f"--out {args.out!r}: name it *.safetensors (timm picks the loader by the file ending)")
    try:
        info = export_encoder(args.path, args.out, check=not args.no_check)
    except (ExportError, ConfigError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {info['arch']} encoder ({info['params'] / 1e6:.1f}M params, step {info['step']}) from "
          f"{info['checkpoint']}\n  -> {info['out']}\nload it with timm:\n  import timm\n  model = {info['snippet']}")
    return 0
