"""The frozen teacher: a timm convnet whose feature map becomes the target tokens [T, C]."""
from __future__ import annotations

import argparse
import hashlib
import os
import urllib.request
from pathlib import Path

import torch
from torch import nn

from common.config import ConfigError
from common.config import Teacher as TeacherConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DROP_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def read_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True; a pickle that would run code is refused with a clear error."""
    if path.startswith(("http://", "https://")):
        cache_dir = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "img2vec"
        cache_dir.mkdir(parents=True, exist_ok=True)
        local = cache_dir / Path(path).name
        if not local.exists():
            tmp = local.with_suffix(".part")
            urllib.request.urlretrieve(path, tmp)
            tmp.rename(local)
        path = str(local)
    if not Path(path).is_file():
        raise ConfigError(f"teacher.weights: no such file {path!r} (give a local checkpoint path, a URL, "
                          "or 'random' to start from random weights on purpose)")
    try:
        # DINO's full checkpoints carry their argparse.Namespace; allow exactly that, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ConfigError(f"teacher.weights: {path} cannot be loaded safely with weights_only=True "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Re-save it as a plain "
                          "state dict of tensors.") from None


def backbone_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """DINO's layouts -> a plain backbone state dict: the published backbone-only file, or a full
    training checkpoint with 'teacher'/'student' dicts whose keys carry 'module.' / 'backbone.'."""
    for name in ("teacher", "student", "state_dict", "model"):
        if name in ckpt and isinstance(ckpt[name], dict):
            ckpt = ckpt[name]
            break
    out = {}
    for key, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.startswith(("head.", "module.head.")):
            continue  # DINO projection head, not part of the backbone
        for prefix in _DROP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenTeacher(nn.Module):
    """uint8 views [B, 3, H, W] -> teacher tokens [B, T, C] (fp32), frozen and without grad."""

    def __init__(self, model: nn.Module, layer: int, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.layer = layer
        self.autocast_dtype = autocast_dtype
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.fingerprint: dict = {}
        self.eval()

    def train(self, mode: bool = True):  # always eval: BN statistics are part of the teacher
        return super().train(False)

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        x = (views.float() - self.mean) / self.std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None and x.is_cuda):
            if self.layer == -1:
                fmap = self.model.forward_features(x)  # [B, C, h, w]
            else:
                fmap = self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True)[0]
        return fmap.flatten(2).transpose(1, 2).float()  # [B, T=h*w, C]


def layer_stride(model: nn.Module, arch: str, layer: int) -> int:
    """The input pixels per token side at `layer` (timm's feature_info reductions): 32 for a ResNet's last stage."""
    stages = [info["reduction"] for info in model.feature_info]
    if not -len(stages) <= layer < len(stages):
        raise ConfigError(f"'teacher.layer' must be -1 (the last stage) or a stage index in [{-len(stages)}, "
                          f"{len(stages) - 1}] for {arch} (strides {stages}), got {layer}")
    return stages[layer]


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> FrozenTeacher:
    import timm

    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is neither reset nor consumed
            if cfg.weights == "random":
                torch.manual_seed(cfg.seed)  # every rank and every rerun builds the same random teacher
            model = timm.create_model(cfg.arch, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as e:
        raise ConfigError(f"teacher.arch: {e}") from None
    stride = layer_stride(model, cfg.arch, cfg.layer)
    if cfg.weights != "random":
        sd = backbone_state_dict(read_checkpoint(cfg.weights))
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.fc.", "classifier."))}
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in sd and sd[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise ConfigError(
                f"teacher.weights: {cfg.weights} does not match timm '{cfg.arch}': {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                f"{len(shapes)} of another shape (e.g. {shapes[:2]}). Is teacher.arch the checkpoint's architecture?")
        model.load_state_dict(sd, strict=True)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[cfg.dtype]
    teacher = FrozenTeacher(model, cfg.layer, dtype).to(device)
    on_gpu = torch.device(device).type == "cuda"
    teacher.stride = stride
    teacher.fingerprint = {"arch": cfg.arch, "layer": cfg.layer, "weights": cfg.weights,
                           "sha256": state_dict_sha256(model.state_dict()),
                           # the effective precision: autocast runs on a GPU only, a CPU computes in fp32
                           "precision": cfg.dtype if on_gpu else "float32"}
    if str(device).startswith("cuda"):
        teacher.model.to(memory_format=torch.channels_last)
    return teacher
