"""The cache's manifest.json, typed: what made the cache (teacher, view recipe, codec, source shards) and what it
holds (token grid, merged statistics, sample counts).

`Manifest.from_dict` checks every field's JSON type (a damaged manifest is a CacheError naming the file and the
field); `to_dict` gives back the same JSON, key for key and in the same order, so manifest.json is byte-identical
for the same inputs. The fields that make two caches the same data are IDENTITY_FIELDS; extending a cache with
another recipe is refused naming each difference (`manifest_differences`). The teacher that made a cache is
rebuilt from it by shards/teacher.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.augment import CUTS, replay_probe
from common.codecs import FORMAT_VERSION, TokenCodec, codec_for, get_codec
from common.files import write_json_atomic
from common.teacher import grid_stride
from common.stats import TokenStats
from shards.errors import CacheError, RefusedFile
from shards.index import read_record
from shards.provenance import source_urls  # noqa: F401 - its home is shards.provenance; imported from here too
from shards.trust import MAX_VIEW_SIZE, MAX_VIEW_VALUES, MAX_VIEWS, name_problem, read_json
from shards.urlpath import as_path

IDENTITY_FIELDS = ("format_version", "cache_format", "codec", "teacher", "augment", "token_shape", "shards")
DEFAULT_CUT = "pil"  # caches from before `augment.cut` cut their views with Pillow


class _FieldError(ValueError):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where} {what}")


class _Part:
    """A part of the manifest as a dataclass: `from_dict` checks each field's JSON type; `to_dict` writes the
    fields in declaration order, leaves out an optional field the manifest did not have, and keeps keys this
    version does not know (in `extra`) after them."""

    extra: dict

    @classmethod
    def from_dict(cls, d, where: str = ""):
        if not isinstance(d, dict):
            raise _FieldError(where.rstrip(".") or "manifest", f"is {_show(d)}, expected an object")
        hints, kw = _hints(cls), {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            if f.name in d:
                kw[f.name] = _parse(d[f.name], hints[f.name], where + f.name)
            elif f.default is dataclasses.MISSING:
                raise _FieldError(where + f.name, "is missing")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.default is None):
                out[f.name] = _json(value)
        out.update(self.extra)
        return out


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _show(value) -> str:
    return f"{json.dumps(value)[:60]} ({type(value).__name__})"


def _parse(value, hint, where: str):
    """`value` (from JSON) checked against the type `hint`; nested parts become their dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        return None if value is None else _parse(value, next(a for a in args if a is not type(None)), where)
    if isinstance(hint, type) and issubclass(hint, _Part):
        return hint.from_dict(value, where + ".")
    if origin is list:
        if not isinstance(value, list):
            raise _FieldError(where, f"is {_show(value)}, expected a list")
        return [_parse(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool)}[hint]
    if not ok(value):
        raise _FieldError(where, f"is {_show(value)}, expected {hint.__name__}")
    return value  # as read, not converted: written back, it gives the same bytes


def _json(value):
    if isinstance(value, _Part):
        return value.to_dict()
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


@dataclass(kw_only=True)
class CodecEntry(_Part):
    name: str                       # common/codecs.py CODECS
    error_bound: str | None = None  # what the codec promised when the cache was written
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class TeacherIdentity(_Part):
    arch: str       # timm model name
    layer: int      # feature stage, -1 = the last
    sha256: str     # of its weights (common.teacher.state_dict_sha256)
    precision: str  # the effective one: a GPU's autocast dtype, float32 on a CPU
    norm: bool | None = None  # ViTs only: the final norm on the block's tokens (absent for convnets)
    stride: int | None = None  # ViTs only: pixels per token side, the patch (convnets: Manifest.stride derives it)
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class ViewRecipe(_Part):
    """How the views were cut (common/augment.py): RandomResizedCrop's size, scale and ratio, flips, V views."""
    size: int
    scale: list[float]
    ratio: list[float]
    flip: float  # probability of a horizontal flip
    views: int
    seed: int
    interpolation: str
    cut: str | None = None  # None: a cache from before the setting, cut with Pillow
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Replay(_Part):
    """Not identity: what the extracting machine's libraries cut for a fixed probe (check_replay)."""
    cut: str
    probe: str
    torch: str
    pillow: str
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class ShardEntry(_Part):
    name: str    # the feature shard's name (unique in the cache)
    source: str  # the source shard's URL at extraction
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class CacheStats(_Part):
    """Merged over every shard's record (finalize_manifest): per-channel mean and variance, token diversity."""
    views: int
    tokens: int
    mean: list[float]
    var: list[float]
    token_diversity: float
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Manifest(_Part):
    format_version: int
    cache_format: str  # "wds" or "zarr"
    codec: CodecEntry
    teacher: TeacherIdentity
    augment: ViewRecipe
    replay: Replay | None = None
    token_shape: list[int]  # [T, C]: tokens per view, channels per token
    shards: list[ShardEntry]
    teacher_weights: str | None = None  # the checkpoint, or "random"
    teacher_seed: int | None = None     # what random weights were drawn from (the sha256 identifies them)
    stats: CacheStats | None = None     # these three once every shard is recorded
    samples: int | None = None
    skipped: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str = "", path: Path | str = "manifest.json") -> Manifest:
        """A CacheError naming `path` and the field if `d` is not a manifest of this format."""
        try:
            m = super().from_dict(d, where)
            if len(m.token_shape) != 2:
                raise _FieldError("token_shape", f"is {m.token_shape}, expected [tokens, channels]")
            _check_names_and_sizes(m)
            if m.teacher.stride not in (None, m.stride):
                raise _FieldError("teacher.stride", f"is {m.teacher.stride}, but {m.token_shape[0]} tokens of a "
                                  f"{m.augment.size}-pixel crop have stride {m.stride}")
        except _FieldError as e:
            raise RefusedFile(f"{path}: {e}: damaged, or not a manifest written by extract-features; re-extract "
                              "into a new cache") from None
        return m

    @property
    def token_codec(self) -> TokenCodec:
        """The codec the tokens are stored with."""
        return get_codec(self.codec.name)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(tokens T, channels C) of one view."""
        return self.token_shape[0], self.token_shape[1]

    @property
    def tokens(self) -> int:
        return self.token_shape[0]

    @property
    def stride(self) -> int:
        """Input pixels per token side (the mask unit): 32 for a ResNet's last stage, 16 for a /16 ViT."""
        return grid_stride(self.augment.size, self.tokens)

    @property
    def channels(self) -> int:
        return self.token_shape[1]

    @property
    def views(self) -> int:
        """V: recorded views per sample."""
        return self.augment.views

    @property
    def cut(self) -> str:
        """How the views were cut (common/augment.py CUTS)."""
        return self.augment.cut or DEFAULT_CUT

    @property
    def shard_names(self) -> list[str]:
        return [s.name for s in self.shards]


def _check_names_and_sizes(m: Manifest) -> None:
    """Shard names are plain names inside the cache, each once; sizes are within bounds a real cache keeps
    (shards/trust.py): a manifest is data, and nothing it says may lead outside the cache or exhaust memory."""
    seen = set()
    for i, s in enumerate(m.shards):
        why = name_problem(s.name) or ("is listed twice" if s.name in seen else None)
        if why:
            raise _FieldError(f"shards[{i}].name", f"{s.name[:80]!r} {why}")
        seen.add(s.name)
    t, c = m.token_shape
    for where, value, top in (("augment.views", m.augment.views, MAX_VIEWS), ("augment.size", m.augment.size,
                              MAX_VIEW_SIZE), ("token_shape", t * c, MAX_VIEW_VALUES)):
        if not 1 <= value <= top or (where == "token_shape" and t < 1):
            raise _FieldError(where, f"is out of range ({m.token_shape if where == 'token_shape' else value}; "
                                     f"at most {top})")
    if m.stats is not None and not len(m.stats.mean) == len(m.stats.var) == c:
        raise _FieldError("stats", f"has {len(m.stats.mean)} means and {len(m.stats.var)} variances for {c} channels")


# ---------------------------------------------------------------- making, reading, finishing

def make_manifest(cfg, fingerprint: dict, token_shape: tuple[int, int], shard_urls: list[str]) -> Manifest:
    from shards.source import absolute_url, shard_names

    vit = fingerprint.get("kind") == "vit"  # a convnet's manifest names neither norm nor stride, as before ViTs
    codec = codec_for(cfg.cache.codec, "vit" if vit else "convnet")
    a = cfg.augment
    return Manifest(
        format_version=FORMAT_VERSION, cache_format=cfg.cache.format,
        codec=CodecEntry(name=codec.name, error_bound=codec.error_bound),
        teacher=TeacherIdentity(**{k: fingerprint[k] for k in ("arch", "layer", "sha256", "precision")},
                                norm=fingerprint["norm"] if vit else None, stride=fingerprint["stride"] if vit else None),
        augment=ViewRecipe(size=a.size, scale=list(a.scale), ratio=list(a.ratio), flip=a.flip, views=a.views,
                           seed=a.seed, interpolation="bicubic", cut=a.cut),
        replay=Replay(**replay_versions(a.cut)),
        token_shape=list(token_shape),
        shards=[ShardEntry(name=n, source=absolute_url(u)) for n, u in zip(shard_names(shard_urls), shard_urls)],
        teacher_weights=fingerprint["weights"], teacher_seed=cfg.teacher.seed)


def write_manifest(cache: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(cache) / "manifest.json", manifest.to_dict())


def read_manifest(cache: Path) -> Manifest:
    p = as_path(cache) / "manifest.json"  # a local path, or a RemotePath for a cache at a URL (read only)
    if not p.exists():
        raise CacheError(f"{p} not found: is cache.path right, and has extract-features run?")
    try:
        d = read_json(p, "manifest")
    except RefusedFile as e:
        raise RefusedFile(f"{e}; the cache's identity is lost: re-extract into a new cache") from None
    if not isinstance(d, dict):
        raise RefusedFile(f"{p}: is {type(d).__name__}, not a manifest (a JSON object); re-extract into a new cache")
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RefusedFile(f"{p}: format_version is {'missing' if version is None else _show(version)}, not a format "
                          f"number; this version reads format {FORMAT_VERSION} (the integer {FORMAT_VERSION}): "
                          "damaged, or not a manifest written by extract-features; re-extract into a new cache")
    if version != FORMAT_VERSION:
        raise CacheError(f"cache {cache} is format {version}; this version reads format "
                         f"{FORMAT_VERSION} (view-major tokens and a per-sample index, so an epoch reads one view). "
                         "Re-extract it: extract-features --config <your config> --set cache.path=<new path>")
    return Manifest.from_dict(d, path=p)


def finalize_manifest(cache: Path) -> Manifest | None:
    """If every shard is recorded, merge their statistics into the manifest (idempotent; any rank may)."""
    manifest = read_manifest(cache)
    records = [read_record(cache, name) for name in manifest.shard_names]
    if any(r is None for r in records):
        return None
    before = manifest.to_dict()
    stats = TokenStats()
    for r in records:
        stats.merge(TokenStats.from_dict(r.stats))
    manifest.stats = CacheStats(views=stats.td_count, tokens=stats.count, mean=stats.mean.tolist(),
                                var=stats.var.tolist(), token_diversity=stats.diversity)
    manifest.samples = sum(r.samples for r in records)
    manifest.skipped = sum(len(r.skipped) for r in records)
    if manifest.to_dict() != before:  # a finished cache is not written again (it may be on a read-only mount)
        write_manifest(cache, manifest)
    return manifest


def _as_json(manifest: Manifest | dict) -> dict:
    return manifest.to_dict() if isinstance(manifest, Manifest) else manifest


def manifest_cut(manifest: Manifest | dict) -> str:
    """How the cache's views were cut (see common/augment.py); caches from before `augment.cut` used Pillow."""
    return _as_json(manifest)["augment"].get("cut", DEFAULT_CUT)


def manifest_differences(old: Manifest | dict, new: Manifest | dict) -> list[str]:
    """Each identity field (a dict's keys one by one) where the cache `old` and the config's `new` differ. Shards
    are identified by their names: the same shards reached through another path are the same cache (whether a
    recorded shard's source is still that shard is shards.provenance.source_differs' question)."""
    old, new = _as_json(old), _as_json(new)
    diffs = []
    old = {**old, "augment": {**old.get("augment", {}), "cut": manifest_cut(old)}} if "augment" in old else old
    for f in IDENTITY_FIELDS:
        a, b = old.get(f), new.get(f)
        if f == "shards":
            a, b = ([s.get("name") for s in x or []] for x in (a, b))
        if a != b:
            if isinstance(b, dict) and isinstance(a, dict):
                diffs += [f"{f}.{k}: cache has {a.get(k)!r}, config gives {b.get(k)!r}"
                          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif f == "shards":
                diffs.append(f"shards: cache lists {len(a)} shards ({', '.join(map(str, a[:3]))}...), config gives "
                             f"{len(b)} ({', '.join(b[:3])}...)")
            else:
                diffs.append(f"{f}: cache has {a!r}, config gives {b!r}")
    return diffs


# ---------------------------------------------------------------- replay

def replay_versions(cut: str) -> dict:
    import PIL

    return {"cut": cut, "probe": replay_probe(cut), "torch": torch.__version__, "pillow": PIL.__version__}


def check_replay(manifest: Manifest) -> None:
    """A CacheError if this machine's libraries cut a fixed probe differently from the machine that extracted the
    cache: stage two would train on other pixels than the teacher saw."""
    cut, recorded = manifest.cut, manifest.replay
    if cut not in CUTS:
        raise CacheError(f"manifest.json: augment.cut is {cut!r}; this version cuts views with {', '.join(CUTS)}")
    if recorded is None:
        return  # a cache from before the probe was recorded
    here = replay_versions(cut)
    if here["probe"] != recorded.probe:
        raise CacheError(f"this machine cuts views (augment.cut = {cut!r}) differently from the machine that "
                         f"extracted the cache: probe {here['probe']} here (torch {here['torch']}, Pillow "
                         f"{here['pillow']}), {recorded.probe} there (torch {recorded.torch}, Pillow "
                         f"{recorded.pillow}). Training would pair the cached features with other pixels. Install "
                         "the versions the cache was made with, or re-extract with these")
