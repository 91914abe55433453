"""The typed config: one dataclass per TOML section, `--set section.key=value` overrides.

Every key is checked before any work starts: an unknown section or key, or a value of the
wrong type, is a ConfigError that names it. One coercion: a key typed list[str] (train.log_with) takes a
single string as the one-item list (`--set train.log_with=tensorboard`, as accelerate's log_with takes
a name); "" is the empty list.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
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
    cut: str = "torch"                     # how views are cut: "torch" (uint8 antialiased bicubic) or "pil"


@dataclass
class Teacher:
    arch: str = "resnet50"
    weights: str = "random"                # local .pth, http(s) URL, a packaged name (common/teacher.py), "random"
    layer: int = -1                        # convnet: feature stage, ViT: block giving the tokens; -1 = last
    norm: bool = True                      # ViT: the final norm on the block's patch tokens (convnets: unused)
    dtype: str = "bfloat16"                # autocast dtype on GPU; the CPU runs fp32
    seed: int = 0                          # init seed when weights = "random"
    compile: bool = False                  # torch.compile the teacher (extraction, the online baseline); eager if it fails


@dataclass
class Cache:
    path: str = "cache"
    format: str = "wds"                    # "wds" (tar) or "zarr" (Zarr v3 group)
    codec: str = "auto"                    # common/codecs.py CODECS; "auto": bf16z-zstd for convnets, bf16-zstd for ViTs


@dataclass
class Extract:
    batch_size: int = 64                   # images per teacher batch (x views)
    rank: int = -1                         # -1: from RANK / SLURM_PROCID, else 0
    world_size: int = -1                   # -1: from WORLD_SIZE / SLURM_NTASKS, else 1
    device: str = "auto"
    limit: int = 0                         # stop after this many shards (0 = all); for smoke tests
    encode_threads: int = 0                # threads that encode, compress and checksum tokens; 0 = the cores
                                           # left after data.workers and the main process (at least 1)
    lease_ttl: float = 60.0                # s: another host's shard lease silent this long is a dead node's (taken
                                           # over); this job beats its own every lease_ttl / 12 s
    wait_for_others: float = 300.0         # s: how long to wait for shards other live jobs hold before exiting 75
    stall_timeout: float = 300.0           # s: a pipe: source that sends nothing this long fails (its command is
                                           # stopped), naming it; the other shards go on


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
    reader: str = "auto"                   # "auto", "random" (tars read by ranges, global shuffle) or "stream"
    shuffle_buffer: int = 1000             # stream reader only
    seed: int = 0
    checkpoint_every: int = 1000           # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    targets: str = "cache"                 # "cache" or "online" (teacher in the step: baseline)
    on_corrupt: str = "error"              # "error" or "skip" a sample whose checksum fails
    on_nonfinite: str = "error"            # a non-finite loss: "error" (stop, keep the last checkpoint) or "skip" the step
    log_with: list[str] = field(default_factory=list)  # trackers by accelerate's names: "tensorboard", "wandb", ...
    eval_every: int = 0                    # steps between k-NN probes of the encoder (and at the last); 0 = off
    eval_shards: list[str] | str = ""      # labelled held-out source shards: the k-NN queries
    eval_bank_shards: list[str] | str = ""  # labelled shards of the k-NN memory bank; "": 4/5 of eval_shards by key
    eval_crop_pct: float = 0.875           # the probe's center crop: side / short side
    trace_keys: bool = False               # write <run_dir>/keys-rank<r>.txt: which samples each step saw
    device: str = "auto"
    compile: bool = False                  # torch.compile the student's blocks (forward and backward); eager if it fails


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
    "augment.cut": ("torch", "pil"),
    "loss.target_norm": ("none", "layernorm", "channel"),
    "train.targets": ("cache", "online"),
    "train.on_corrupt": ("error", "skip"),
    "train.reader": ("auto", "random", "stream"),
    "train.on_nonfinite": ("error", "skip"),
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


def _tensorboard(cfg: Config, value, origin: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{origin}: 'train.tensorboard' must be bool, got {value!r}")
    if value:  # the old switch: still honoured, named as what replaces it
        print(f"warning: {origin}: 'train.tensorboard' is deprecated: use train.log_with = [\"tensorboard\"]",
              file=sys.stderr)
        if "tensorboard" not in cfg.train.log_with:
            cfg.train.log_with.append("tensorboard")


DEPRECATED = {"train.tensorboard": _tensorboard}  # keys that older configs and run dirs' config.json still hold


def _set(cfg: Config, dotted: str, value, origin: str) -> None:
    if dotted in DEPRECATED:
        return DEPRECATED[dotted](cfg, value, origin)
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
    if isinstance(value, str) and hints[key] == list[str]:  # the module doc's one coercion: a name is its list
        value = [value] if value else []
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


# ---------------------------------------------------------------- ranges, checked before any work

def _ranges(cfg: Config, stage: str) -> list[tuple[bool, str, str, object]]:
    """(ok, key, allowed values, value) for every setting `stage` reads."""
    a, e, t, s, lo = cfg.augment, cfg.extract, cfg.train, cfg.student, cfg.loss
    pair = lambda v: len(v) == 2 and all(math.isfinite(x) for x in v) and 0 < v[0] <= v[1]  # noqa: E731
    if stage == "extract":
        return [
            (a.size >= 1, "augment.size", "an integer >= 1", a.size),
            (pair(a.scale) and a.scale[1] <= 1, "augment.scale", "[min, max] with 0 < min <= max <= 1", a.scale),
            (pair(a.ratio), "augment.ratio", "[min, max] with 0 < min <= max", a.ratio),
            (0 <= a.flip <= 1, "augment.flip", "a probability in [0, 1]", a.flip),
            (a.views >= 1, "augment.views", "an integer >= 1", a.views),
            (e.batch_size >= 1, "extract.batch_size", "an integer >= 1", e.batch_size),
            (e.limit >= 0, "extract.limit", "an integer >= 0 (0 = all shards)", e.limit),
            (e.encode_threads >= 0, "extract.encode_threads", "an integer >= 0 (0 = from the cores)", e.encode_threads),
            (cfg.data.workers >= 0, "data.workers", "an integer >= 0 (0 = decode in the main process)", cfg.data.workers),
            (math.isfinite(e.lease_ttl) and e.lease_ttl > 0, "extract.lease_ttl", "a number of seconds > 0", e.lease_ttl),
            (e.wait_for_others >= 0, "extract.wait_for_others", "a number of seconds >= 0", e.wait_for_others),
            (e.stall_timeout > 0, "extract.stall_timeout", "a number of seconds > 0 (inf = never)", e.stall_timeout),
            (not names_a_url(cfg.cache.path), "cache.path", "a local or shared file system path for extraction, which "
             "writes the cache (a cache at a URL is read only: extract to a file system, then upload it, e.g. `aws s3 "
             "sync cache s3://bucket/cache`, and train or verify from the URL; README, 'Sources at URLs')",
             cfg.cache.path),
        ]
    finite = math.isfinite
    return [
        (not names_a_url(t.run_dir), "train.run_dir", "a local or shared file system path (training writes its checkpoints, "
         "metrics and lock there; a URL would be written as a local folder named like it): train into a folder, "
         "then upload it, e.g. `aws s3 sync runs/x s3://bucket/runs/x`", t.run_dir),
        (t.batch_size >= 1, "train.batch_size", "an integer >= 1", t.batch_size),
        (t.grad_accum >= 1, "train.grad_accum", "an integer >= 1", t.grad_accum),
        (t.checkpoint_every >= 1, "train.checkpoint_every", "an integer >= 1 (steps)", t.checkpoint_every),
        (t.log_every >= 1, "train.log_every", "an integer >= 1 (steps)", t.log_every),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", "an integer >= 1", t.keep_checkpoints),
        (t.workers >= 0, "train.workers", "an integer >= 0 (0 = read in the main process)", t.workers),
        (t.shuffle_buffer >= 1, "train.shuffle_buffer", "an integer >= 1", t.shuffle_buffer),
        (t.epochs >= 1 or t.max_steps >= 1, "train.epochs", "an integer >= 1 (or set train.max_steps)", t.epochs),
        (t.max_steps >= 0, "train.max_steps", "an integer >= 0 (0 = train.epochs)", t.max_steps),
        (finite(t.lr) and t.lr >= 0, "train.lr", "a finite number >= 0 (0 keeps the initial weights)", t.lr),
        (finite(t.min_lr) and t.min_lr >= 0, "train.min_lr", "a finite number >= 0", t.min_lr),
        (finite(t.warmup_epochs) and t.warmup_epochs >= 0, "train.warmup_epochs", "a number >= 0", t.warmup_epochs),
        (finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", "a number >= 0", t.weight_decay),
        (finite(t.clip_grad) and t.clip_grad >= 0, "train.clip_grad", "a number >= 0 (0 = off)", t.clip_grad),
        (t.eval_every >= 0, "train.eval_every", "an integer >= 0 (steps; 0 = off)", t.eval_every),
        (bool(t.eval_shards) or not t.eval_every, "train.eval_shards", "labelled shards for the k-NN probe that "
         "train.eval_every asks for", t.eval_shards),
        (t.eval_every > 0 or not (t.eval_shards or t.eval_bank_shards), "train.eval_every",
         "an integer >= 1 (steps) when train.eval_shards is set", t.eval_every),
        (0 < t.eval_crop_pct <= 1, "train.eval_crop_pct", "a fraction in (0, 1]", t.eval_crop_pct),
        (0 < s.mask_ratio < 1, "student.mask_ratio", "a fraction in (0, 1)", s.mask_ratio),
        (s.decoder_depth >= 1, "student.decoder_depth", "an integer >= 1", s.decoder_depth),
        (s.decoder_dim >= 1, "student.decoder_dim", "an integer >= 1", s.decoder_dim),
        (s.decoder_heads >= 1 and s.decoder_dim % s.decoder_heads == 0, "student.decoder_heads",
         f"a divisor of student.decoder_dim ({s.decoder_dim})", s.decoder_heads),
        (s.head_hidden >= 1, "student.head_hidden", "an integer >= 1", s.head_hidden),
        (finite(lo.beta) and lo.beta >= 0, "loss.beta", "a finite number >= 0", lo.beta),
        (finite(lo.global_weight) and lo.global_weight >= 0, "loss.global_weight", "a finite number >= 0",
         lo.global_weight),
    ]


def names_a_url(where: str) -> bool:
    """`scheme://...` of any scheme (shards.remote.is_url: the schemes we read): a place no local file operation
    reaches (pathlib would make `./s3:/bucket/...` of it)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(where)) is not None


def validate(cfg: Config, stage: str) -> None:
    """Every setting that `stage` ("extract" or "train") reads, in range, before any work: a ConfigError
    names the key and the values it allows. What needs the teacher or the cache is checked by
    check_crop_size and check_mask_ratio once those are known (before any shard is opened)."""
    for ok, key, allowed, value in _ranges(cfg, stage):
        if not ok:
            raise ConfigError(f"'{key}' must be {allowed}, got {value!r}")


def check_crop_size(size: int, stride: int, layer: int) -> None:
    """The crop must tile into whole teacher tokens: a multiple of the teacher's stride at `layer`."""
    if size % stride:
        lower, upper = max(size // stride, 1) * stride, (size // stride + 1) * stride
        raise ConfigError(f"'augment.size' must be a multiple of the teacher's stride {stride} at teacher.layer "
                          f"{layer} (e.g. {lower} or {upper}), got {size}")


def check_student_patch(arch: str, stride: int) -> None:
    """The student's patch (`vit_<size>_patch<p>`) must divide the teacher tokens' stride: one token is then
    (stride / p)^2 patches, the mask unit (32 -> 2 x 2 patches of 16, 16 -> 1, 14 -> 1 patch of 14)."""
    patch = int(arch.rsplit("_patch", 1)[-1]) if arch.rsplit("_patch", 1)[-1].isdigit() else 0
    if patch and stride % patch:
        fits = [p for p in (16, 14) if stride % p == 0]  # the students' patches
        hint = f"a /{fits[0]} student (e.g. {arch.rsplit('_patch', 1)[0]}_patch{fits[0]})" if fits else "another teacher"
        raise ConfigError(f"'student.arch' {arch} has {patch}-pixel patches, which do not tile the teacher's "
                          f"{stride}-pixel tokens (the cache's stride: crop size / token grid side); use {hint}")


def check_mask_ratio(ratio: float, units: int) -> None:
    """The mask must hide at least one of the `units` teacher tokens and leave at least one visible
    (the masking draws round(ratio x units) of them)."""
    masked = int(round(ratio * units))
    if not 1 <= masked <= units - 1:
        raise ConfigError(f"'student.mask_ratio' must mask between 1 and {units - 1} of the {units} teacher tokens "
                          f"(round(ratio x {units})), got {ratio!r}, which masks {masked}")
