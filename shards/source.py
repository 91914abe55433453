"""Source shards: ImageNet-style WebDataset tars (local paths or `pipe:` URLs), read as raw samples.

A sample is `{"key", "image" (bytes or None), "ext", "cls" (int or None)}`; decoding happens later,
in the stage that owns it. Members are grouped by WebDataset's rule (key = path up to the first dot
of the file name). Only plain bytes are read: nothing from a shard is ever unpickled.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset.gopen import gopen

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardError(RuntimeError):
    """A source shard that cannot be read to its end (missing, truncated, not a tar)."""

    def __init__(self, shard: str, reason: str | None = None):
        super().__init__(shard if reason is None else f"source shard {shard}: {reason}")  # 1 arg: re-raised
        self.shard, self.reason = shard, reason


def expand_shards(spec: list[str] | str) -> list[str]:
    """Brace patterns and lists -> the ordered list of shard URLs."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out = [url for s in specs if s for url in braceexpand.braceexpand(s)]
    if not out:
        from common.config import ConfigError
        raise ConfigError("data.shards is empty: name the source shards, e.g. '/data/imagenet/train-{0000..1023}.tar'")
    return out


def absolute_url(url: str) -> str:
    """Local paths become absolute (a cache is read from anywhere); pipe: and other URLs stay as given."""
    return url if ":" in url.split("/")[0] else os.path.abspath(url)


def shard_name(url: str) -> str:
    """The name a feature shard shares with its source shard: the file name without '.tar'."""
    name = url.rstrip("/").split("/")[-1].split(" ")[-1]
    return name.removesuffix(".tar")


def _split_member(path: str) -> tuple[str, str]:
    directory, base = os.path.split(path)
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext.lower()


def iter_members(url: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, ext, bytes) of each regular member, streamed; raises ShardError on a broken tar."""
    if not url.startswith("pipe:") and not Path(url).exists():
        raise ShardError(url, "file not found")
    try:
        stream = gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = _split_member(info.name)
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise ShardError(url, f"truncated at member {info.name}")
                yield key, ext, data
        stream.close()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(url, f"{type(e).__name__}: {e} (truncated or not a tar?)") from None


def iter_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in order; members of one key are adjacent, as in WebDataset."""
    key, members = None, {}
    for k, ext, data in iter_members(url):
        if members and k != key:
            yield key, members
            members = {}
        key = k
        members.setdefault(ext, data)
    if members:
        yield key, members


def iter_samples(url: str) -> Iterator[dict]:
    """Samples of one source shard: the first image entry and the `.cls` label of each key."""
    for key, members in iter_groups(url):
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        try:
            cls = int(members["cls"].decode().strip()) if "cls" in members else None
        except ValueError:
            cls = None
        yield {"key": key, "image": members.get(ext), "ext": ext, "cls": cls}


def rank_shards(urls: list[str], rank: int, world: int) -> list[str]:
    """Rank r of W takes shards i with i % W == r: no collectives, each output has one writer."""
    return [u for i, u in enumerate(urls) if i % world == rank]


def rank_and_world(rank: int = -1, world: int = -1) -> tuple[int, int]:
    """Flags win, then torchrun/accelerate (RANK, WORLD_SIZE), then SLURM, then a single process."""
    env = os.environ
    if rank < 0:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world < 0:
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        from common.config import ConfigError
        raise ConfigError(f"rank {rank} is not in [0, world size {world})")
    return rank, world
