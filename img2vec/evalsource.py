"""What `img2vec linprobe` and `img2vec finetune` evaluate: a training run dir (its latest complete checkpoint), one
of its `checkpoints/step_XXXXXXXX` dirs, or a file `img2vec export` wrote (the exported student, read with
safetensors: never a pickle). Either way the same timm ViT: the file's tensors are the run's encoder under timm's
keys, and its metadata names the student's arch, size and pool (img2vec/export.py). A file exported for one pool
serves the other: with `avg` the pretrained final norm is stored as `fc_norm`, which `token` (the cls feature)
wants back as `norm`.

For a file, its folder stands in for the run dir: the result JSON and the default output dir go there.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

def is_exported(path: str | Path) -> bool:
    """A file (`img2vec export`'s *.safetensors) rather than a run or checkpoint dir."""
    return Path(path).is_file()


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    from img2vec.export import GLOBAL_POOLS, ExportError

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise ExportError(f"{path} is a file but not one `img2vec export` writes ({e}); give a run dir, one of its "
                          "checkpoints/step_XXXXXXXX dirs or an exported *.safetensors") from e
    if not {"student_arch", "img_size", "global_pool"} <= meta.keys():
        raise ExportError(f"{path}: its safetensors metadata has no student_arch, img_size and global_pool: not a "
                          "file written by `img2vec export` (re-export the run: img2vec export RUN_DIR --out FILE)")
    numbers = [meta["img_size"], *([meta["step"]] if meta.get("step", "None") != "None" else [])]
    if not all(n.isdigit() for n in numbers) or meta["global_pool"] not in GLOBAL_POOLS:
        raise ExportError(f"{path}: its metadata (img_size {meta['img_size']!r}, step {meta.get('step')!r}, "
                          f"global_pool {meta['global_pool']!r}) is not what `img2vec export` writes (re-export the run)")
    return meta


def source_info(path: str | Path) -> dict:
    """-> {"arch", "img_size", "run_dir", "checkpoint", "step"}: run_info of a run or checkpoint dir (step None: read
    with the weights); for an exported file, from its metadata, run_dir its folder, checkpoint the file itself,
    and "exported_from" the checkpoint it was exported from."""
    from img2vec.export import run_info

    path = Path(path)
    if not is_exported(path):
        return dict(run_info(path), step=None)
    meta = _metadata(path)
    step = meta.get("step", "None")
    return {"arch": meta["student_arch"], "img_size": int(meta["img_size"]), "run_dir": str(path.parent),
            "checkpoint": str(path), "step": None if step == "None" else int(step),
            "exported_from": meta.get("checkpoint"), "global_pool_exported": meta["global_pool"]}


def student_identity(path: str | Path) -> tuple[str, dict]:
    """-> (the path pinned: a run dir's latest checkpoint now, not one pretraining writes later; what identifies the
    student's weights in run.json: the checkpoint's step and a digest of its position.json, or the file's digest)."""
    info = source_info(path)
    pinned = Path(info["checkpoint"])
    if is_exported(pinned):
        return str(pinned), {"arch": info["arch"], "step": info["step"], "checkpoint": pinned.name,
                             "file_sha256": _file_sha256(pinned)}
    position = pinned / "position.json"
    at = position.read_bytes() if position.is_file() else None
    return str(pinned), {"arch": info["arch"], "step": json.loads(at).get("step") if at else None,
                         "checkpoint": pinned.name, "position_sha256": hashlib.sha256(at).hexdigest() if at else None}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_keys(tensors: dict[str, torch.Tensor], exported_pool: str, global_pool: str) -> dict[str, torch.Tensor]:
    """An exported file's tensors (keys for `exported_pool`) -> the keys of timm's model with `global_pool`: back to
    the student's layout (fc_norm -> norm when exported for avg), then export's timm_keys."""
    from img2vec.export import timm_keys

    if exported_pool == "avg":
        tensors = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in tensors.items()}
    return timm_keys(tensors, global_pool)


def source_model(path: str | Path, global_pool: str = "avg", num_classes: int = 0, **create_kwargs):
    """-> (the timm ViT with `global_pool` holding the student's encoder, info): export's timm_encoder for a run or
    checkpoint dir; for an exported file the same model, filled from the file. With num_classes > 0 its classifier
    `head` is timm's fresh one; create_kwargs go to timm.create_model (drop_path_rate=...)."""
    from safetensors.torch import load_file

    from img2vec.export import filled_timm_model, timm_encoder

    if not is_exported(path):
        return timm_encoder(path, global_pool, num_classes=num_classes, **create_kwargs)
    info = source_info(path)
    tensors = file_keys(load_file(str(path), device="cpu"), info["global_pool_exported"], global_pool)
    return filled_timm_model(tensors, info, global_pool, num_classes, f"{path} ({info['arch']})", **create_kwargs), info
