"""The typed config: one dataclass per TOML section, `--set section.key=value` overrides.

Every key is checked before any work starts: an unknown section or key, or a value of the
wrong type, is a ConfigError that names it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file or key."""


@dataclass
class Data:
    shards: list[str] | str = ""          # brace pattern or list; local paths or pipe: URLs
    workers: int = 4                       # DataLoader workers that decode and cut views


@dataclass
class Augment:
    size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: float = 0.5
    views: int = 4
    seed: int = 0


@dataclass
class Teacher:
    arch: str = "resnet50"
    weights: str = "random"                # local .pth, http(s) URL, or the word "random"
    layer: int = -1                        # feature stage giving the tokens; -1 = last (stride 32)
    dtype: str = "bfloat16"                # autocast dtype on GPU; the CPU runs fp32
    seed: int = 0                          # init seed when weights = "random"


@dataclass
class Cache:
    path: str = "cache"
    format: str = "wds"                    # "wds" (tar) or "zarr" (Zarr v3 group)
    codec: str = "bf16-zstd"               # see common/codecs.py: CODECS


@dataclass
class Extract:
    batch_size: int = 64                   # images per teacher batch (x views)
    rank: int = -1                         # -1: from RANK / SLURM_PROCID, else 0
    world_size: int = -1                   # -1: from WORLD_SIZE / SLURM_NTASKS, else 1
    device: str = "auto"
    limit: int = 0                         # stop after this many shards (0 = all); for smoke tests


@dataclass
class Student:
    arch: str = "vit_base_patch16"
    mask_ratio: float = 0.6
    masks_per_view: int = 1                # M: each loaded view trains with M independent masks per step
    decoder_depth: int = 0                 # 0: from student.arch (2 for ViT-B, 4 for ViT-L and ViT-H)
    decoder_dim: int = 0                   # 0: from student.arch (512)
    decoder_heads: int = 0                 # 0: from student.arch (16)
    multi_block: str = "mean"              # "mean" of all blocks, "last", or e.g. "4,8,11"
    head_hidden: int = 2048


@dataclass
class Loss:
    beta: float = 2.0
    global_weight: float = 0.5
    target_norm: str = "none"              # "none", "layernorm" (per token), "channel" (manifest stats)


@dataclass
class Train:
    run_dir: str = "runs/img2vec"
    epochs: int = 800
    max_steps: int = 0                     # 0 = epochs x steps per epoch
    batch_size: int = 64                   # per process
    lr: float = 1.5e-4                     # base lr, scaled by global batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    weight_decay: float = 0.05
    grad_accum: int = 1
    clip_grad: float = 3.0                 # 0 = off
    workers: int = 4
    shuffle_buffer: int = 1000
    seed: int = 0
    checkpoint_every: int = 1000           # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    targets: str = "cache"                 # "cache" or "online" (teacher in the step: baseline)
    on_corrupt: str = "error"              # "error" or "skip" a sample whose checksum fails
    tensorboard: bool = False
    trace_keys: bool = False               # write <run_dir>/keys-rank<r>.txt: which samples each step saw
    device: str = "auto"


@dataclass
class Config:
    data: Data = field(default_factory=Data)
    augment: Augment = field(default_factory=Augment)
    teacher: Teacher = field(default_factory=Teacher)
    cache: Cache = field(default_factory=Cache)
    extract: Extract = field(default_factory=Extract)
    student: Student = field(default_factory=Student)
    loss: Loss = field(default_factory=Loss)
    train: Train = field(default_factory=Train)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "cache.format": ("wds", "zarr"),
    "loss.target_norm": ("none", "layernorm", "channel"),
    "train.targets": ("cache", "online"),
    "train.on_corrupt": ("error", "skip"),
    "teacher.dtype": ("bfloat16", "float16", "float32"),
}


MINIMUM = {  # integers with a lower bound (0 means "from the architecture" for the decoder keys)
    "student.masks_per_view": 1,
    "student.decoder_depth": 0,
    "student.decoder_dim": 0,
    "student.decoder_heads": 0,
}


def _type_ok(value, typ) -> bool:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(typ))
    if origin is list:
        (inner,) = typing.get_args(typ)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _set(cfg: Config, dotted: str, value, origin: str) -> None:
    section, _, key = dotted.partition(".")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(sections)})")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{origin}: unknown key '{dotted}' (keys of [{section}]: {', '.join(hints)})")
    if isinstance(value, float) and hints[key] is int and value.is_integer():
        value = int(value)
    if not _type_ok(value, hints[key]):
        raise ConfigError(f"{origin}: '{dotted}' must be {_type_name(hints[key])}, got {value!r}")
    if isinstance(value, int) and hints[key] is float:
        value = float(value)
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(f"{origin}: '{dotted}' must be one of {CHOICES[dotted]}, got {value!r}")
    if dotted in MINIMUM and value < MINIMUM[dotted]:
        raise ConfigError(f"{origin}: '{dotted}' must be >= {MINIMUM[dotted]}, got {value!r}")
    setattr(obj, key, value)


def _type_name(typ) -> str:
    return str(typ).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_value(text: str):
    """A --set value as TOML (`3`, `0.5`, `true`, `[0.2, 1.0]`, `"x"`); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for section, keys in raw.items():
            if not isinstance(keys, dict):
                raise ConfigError(f"{path}: '{section}' must be a [section] table")
            for key, value in keys.items():
                _set(cfg, f"{section}.{key}", value, str(path))
    for item in overrides:
        dotted, eq, text = item.partition("=")
        if not eq or "." not in dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(cfg, dotted.strip(), parse_value(text.strip()), "--set")
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (a run dir's resolved config)."""
    cfg = Config()
    for section, keys in d.items():
        for key, value in keys.items():
            _set(cfg, f"{section}.{key}", value, "resolved config")
    return cfg


def add_config_args(parser) -> None:
    parser.add_argument("--config", default=None, help="TOML config (e.g. pipeline.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key with a typed value; repeatable")
