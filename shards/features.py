"""Feature shards (WebDataset tar or Zarr v3 group), their completion records, and the cache manifest.

Layout of a cache directory:

    manifest.json          teacher fingerprint, view recipe, codec, format version, shard list, stats
    <name>.tar | <name>.zarr   one feature shard per source shard, same keys in the same order
    <name>.done.json       completion record: samples, per-key crc32, skipped keys + reasons, sha256, stats

A shard is written under a temporary name, fsynced, renamed, and only then recorded; a shard
without a record is never read. A sample is `{"key", "views" [V,5] int32, "src_hw" [2], "cls",
"arrays" (codec arrays)}`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from common.codecs import FORMAT_VERSION, TokenCodec, arrays_crc32, get_codec
from common.faults import fault_point
from common.stats import TokenStats

ZARR_CHUNK = 16  # samples per Zarr chunk: one file per 16 samples, not per sample


class CacheError(RuntimeError):
    """A cache that cannot be used as it is; the message names the file, shard or key."""


# ---------------------------------------------------------------- atomic files

def fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative path + bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(Path(r) / f for r, _, fs in os.walk(path) for f in fs)
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- paths and records

def shard_path(cache: Path, name: str, fmt: str) -> Path:
    return Path(cache) / f"{name}.{'tar' if fmt == 'wds' else 'zarr'}"


def record_path(cache: Path, name: str) -> Path:
    return Path(cache) / f"{name}.done.json"


def read_record(cache: Path, name: str) -> dict | None:
    p = record_path(cache, name)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{p}: completion record is not valid JSON ({e}); delete it to redo shard {name}") from None


def remove_partial(cache: Path, name: str, fmt: str) -> None:
    """Leftovers of an interrupted writer of this shard: temporaries, and a shard without a record."""
    cache = Path(cache)
    final = shard_path(cache, name, fmt)
    for p in cache.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if final.exists() and not record_path(cache, name).exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()


# ---------------------------------------------------------------- writing

class FeatureShardWriter:
    """Writes one feature shard under a temporary name; `commit()` fsyncs, renames and records it."""

    def __init__(self, cache: Path, name: str, fmt: str, codec: TokenCodec, views: int, tokens: int, channels: int):
        self.cache, self.name, self.fmt, self.codec = Path(cache), name, fmt, codec
        self.final = shard_path(self.cache, name, fmt)
        self.tmp = self.final.with_name(f"{self.final.name}.tmp-{os.getpid()}")
        self.specs = codec.array_specs(views, tokens, channels)
        self.views = views
        self.crcs: dict[str, int] = {}
        self.stats = TokenStats()
        if fmt == "wds":
            import webdataset as wds
            self._file = open(self.tmp, "wb")
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, user="img2vec", group="img2vec")
        else:
            self._buffer: list[dict] = []
            self._keys: list[str] = []
            self._open_zarr()

    def _open_zarr(self) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        self._group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        shuffle = {None: None, 0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}
        specs = dict(self.specs, views=((self.views, 5), "int32"), src_hw=((2,), "int32"), cls=((), "int32"))
        for name, (shape, dtype) in specs.items():
            comp = self.codec.blosc(name) if name in self.specs else None
            blosc = BloscCodec(cname="zstd", clevel=comp.clevel, shuffle=shuffle[comp.shuffle]) if comp else None
            self._group.create_array(name, shape=(0, *shape), chunks=(ZARR_CHUNK, *shape), dtype=dtype,
                                     fill_value=0, compressors=blosc)

    def add(self, key: str, views: np.ndarray, src_hw, cls: int | None, tokens: np.ndarray) -> None:
        """One sample: its view records [V, 5] and its teacher tokens [V, T, C] (fp32)."""
        if "." in key.rsplit("/", 1)[-1]:
            raise CacheError(f"key {key!r} contains a dot, which WebDataset would split")
        arrays = self.codec.encode(tokens)
        self.crcs[key] = arrays_crc32(arrays)
        cls = -1 if cls is None else int(cls)
        if self.fmt == "wds":
            meta = {"views": np.asarray(views).tolist(), "src_hw": [int(x) for x in src_hw], "cls": cls}
            sample = {"__key__": key, "json": json.dumps(meta).encode()}
            sample.update({f"{n}.bin": self.codec.to_bytes(n, a) for n, a in arrays.items()})
            self._tar.write(sample)
        else:
            self._buffer.append(dict(arrays, views=np.asarray(views, np.int32), src_hw=np.asarray(src_hw, np.int32),
                                     cls=np.int32(cls)))
            self._keys.append(key)
            if len(self._buffer) == ZARR_CHUNK:
                self._flush()

    def _flush(self) -> None:
        if self._buffer:
            for name in self._buffer[0]:
                self._group[name].append(np.stack([s[name] for s in self._buffer]), axis=0)
            self._buffer = []

    def _close_tar(self) -> None:
        self._tar.close()   # TarWriter leaves a file it was given open:
        self._file.close()  # close it, so nothing sits in Python's buffer at fsync and hash time

    def commit(self, skipped: list[dict], source: str, stats: TokenStats) -> dict:
        if self.fmt == "wds":
            self._close_tar()
        else:
            self._flush()
            self._group.attrs["keys"] = self._keys
        fsync_tree(self.tmp)
        os.replace(self.tmp, self.final)
        fsync_dir(self.cache)
        fault_point("commit", self.name)
        record = {"shard": self.name, "source": source, "format": self.fmt, "samples": len(self.crcs),
                  "skipped": skipped, "sha256": tree_sha256(self.final), "crc32": self.crcs,
                  "stats": stats.to_dict()}
        write_json_atomic(record_path(self.cache, self.name), record)
        return record

    def abort(self) -> None:
        if self.fmt == "wds":
            self._close_tar()
        shutil.rmtree(self.tmp, ignore_errors=True) if self.tmp.is_dir() else self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading

class CorruptSample(CacheError):
    def __init__(self, shard: str, key: str | None = None, reason: str | None = None):
        if key is None:  # re-raised from a DataLoader worker with its message only
            super().__init__(shard)
            return
        super().__init__(f"feature shard {shard}: sample {key!r} is corrupt ({reason}); "
                         f"run `img2vec verify` and re-extract that shard (delete {shard}.done.json)")
        self.shard, self.key = shard, key


def iter_feature_shard(cache: Path, name: str, manifest: dict, check: bool = True) -> Iterator[dict]:
    """Samples of a recorded feature shard, in order. With `check`, each sample's crc32 is compared
    with its record and a mismatch raises CorruptSample naming shard and key; without, a sample whose
    bytes do not decode comes with `arrays` None and an `error`, for the caller to judge."""
    cache = Path(cache)
    record = read_record(cache, name)
    if record is None:
        raise CacheError(f"cache {cache}: shard {name} has no completion record (extraction unfinished or "
                         "interrupted); rerun extract-features with the same config to finish it")
    codec = get_codec(manifest["codec"]["name"])
    views, (tokens, channels) = manifest["augment"]["views"], manifest["token_shape"]
    specs = codec.array_specs(views, tokens, channels)
    fmt = manifest["cache_format"]
    path = shard_path(cache, name, fmt)
    if not path.exists():
        raise CacheError(f"cache {cache}: shard file {path.name} is missing although it is recorded")
    samples = _iter_wds(path, name, codec, specs) if fmt == "wds" else _iter_zarr(path, specs)
    seen = 0
    for sample in samples:
        expected = record["crc32"].get(sample["key"])
        if expected is None:
            raise CorruptSample(name, sample["key"], "key not in the completion record")
        if check and sample.get("error"):
            raise CorruptSample(name, sample["key"], sample["error"])
        if check and arrays_crc32(sample["arrays"]) != expected:
            raise CorruptSample(name, sample["key"], "crc32 differs from the completion record")
        seen += 1
        yield sample
    if seen != record["samples"]:
        raise CacheError(f"feature shard {name}: {seen} samples read, record says {record['samples']}")


def _iter_wds(path: Path, name: str, codec: TokenCodec, specs) -> Iterator[dict]:
    from shards.source import ShardError, iter_groups

    try:
        for key, members in iter_groups(str(path)):
            yield _wds_sample(key, members, name, codec, specs)
    except ShardError as e:
        raise CacheError(f"feature shard {path}: unreadable tar ({e.reason})") from None


def _wds_sample(key: str, raw: dict, name: str, codec: TokenCodec, specs) -> dict:
    try:
        meta = json.loads(raw["json"])
        arrays = {n: codec.from_bytes(n, raw[f"{n}.bin"], shape, dtype) for n, (shape, dtype) in specs.items()}
    except Exception as e:  # noqa: BLE001 - any decode failure of stored bytes is corruption
        return {"key": key, "views": None, "src_hw": None, "cls": None, "arrays": None,
                "error": f"undecodable: {type(e).__name__}: {e}"}
    return {"key": key, "views": np.asarray(meta["views"], np.int32), "src_hw": meta["src_hw"],
            "cls": meta["cls"], "arrays": arrays}


def _iter_zarr(path: Path, specs) -> Iterator[dict]:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    keys = group.attrs["keys"]
    names = list(specs) + ["views", "src_hw", "cls"]
    for start in range(0, len(keys), ZARR_CHUNK):
        block = {n: group[n][start:start + ZARR_CHUNK] for n in names}
        for i, key in enumerate(keys[start:start + ZARR_CHUNK]):
            yield {"key": key, "views": block["views"][i], "src_hw": block["src_hw"][i].tolist(),
                   "cls": int(block["cls"][i]), "arrays": {n: block[n][i] for n in specs}}


# ---------------------------------------------------------------- manifest

IDENTITY_FIELDS = ("format_version", "cache_format", "codec", "teacher", "augment", "token_shape", "shards")


def make_manifest(cfg, fingerprint: dict, token_shape: tuple[int, int], shard_urls: list[str]) -> dict:
    from shards.source import absolute_url, shard_name

    codec = get_codec(cfg.cache.codec)
    a = cfg.augment
    return {
        "format_version": FORMAT_VERSION,
        "cache_format": cfg.cache.format,
        "codec": {"name": codec.name, "error_bound": codec.error_bound},
        "teacher": {k: fingerprint[k] for k in ("arch", "layer", "sha256")},
        "augment": {"size": a.size, "scale": list(a.scale), "ratio": list(a.ratio), "flip": a.flip,
                    "views": a.views, "seed": a.seed, "interpolation": "bicubic"},
        "token_shape": list(token_shape),
        "shards": [{"name": shard_name(u), "source": absolute_url(u)} for u in shard_urls],
        "teacher_weights": fingerprint["weights"],
        "teacher_seed": cfg.teacher.seed,  # what random weights were drawn from (the sha256 identifies them)
    }


def read_manifest(cache: Path) -> dict:
    p = Path(cache) / "manifest.json"
    if not p.exists():
        raise CacheError(f"{p} not found: is cache.path right, and has extract-features run?")
    return json.loads(p.read_text())


def manifest_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for f in IDENTITY_FIELDS:
        if old.get(f) != new.get(f):
            if isinstance(new.get(f), dict) and isinstance(old.get(f), dict):
                diffs += [f"{f}.{k}: cache has {old[f].get(k)!r}, config gives {new[f].get(k)!r}"
                          for k in sorted(set(old[f]) | set(new[f])) if old[f].get(k) != new[f].get(k)]
            elif f == "shards":
                diffs.append(f"shards: cache lists {len(old.get(f) or [])} shards "
                             f"({(old.get(f) or [{}])[0].get('source')}...), config gives {len(new[f])} "
                             f"({new[f][0]['source']}...)")
            else:
                diffs.append(f"{f}: cache has {old.get(f)!r}, config gives {new.get(f)!r}")
    return diffs


def source_urls(manifest: dict, shards_override=None, missing_ok: bool = False) -> dict[str, str | None]:
    """Feature shard name -> source URL: the manifest's, or the same names under `shards_override`
    (a brace pattern or list, for a dataset that moved since extraction)."""
    from shards.source import expand_shards, shard_name

    urls = {s["name"]: s["source"] for s in manifest["shards"]}
    if shards_override:
        moved = {shard_name(u): u for u in expand_shards(shards_override)}
        lost = sorted(set(urls) - set(moved))
        if lost and not missing_ok:
            raise CacheError(f"data.shards does not contain source shards {lost[:5]} named in the cache manifest")
        urls = {n: moved.get(n) for n in urls}
    return urls


def finalize_manifest(cache: Path) -> dict | None:
    """If every shard is recorded, merge their statistics into the manifest (idempotent; any rank may)."""
    manifest = read_manifest(cache)
    records = [read_record(cache, s["name"]) for s in manifest["shards"]]
    if any(r is None for r in records):
        return None
    stats = TokenStats()
    for r in records:
        stats.merge(TokenStats.from_dict(r["stats"]))
    manifest["stats"] = {"views": stats.td_count, "tokens": stats.count, "mean": stats.mean.tolist(),
                         "var": stats.var.tolist(), "token_diversity": stats.diversity}
    manifest["samples"] = sum(r["samples"] for r in records)
    manifest["skipped"] = sum(len(r["skipped"]) for r in records)
    write_json_atomic(Path(cache) / "manifest.json", manifest)
    return manifest
