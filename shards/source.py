"""Source shards: ImageNet-style WebDataset tars (local paths, `pipe:` commands, or http(s)://, s3://, gs://,
hf:// URLs read through shards.remote), read as raw samples.

A sample is `{"key", "image" (bytes or None), "ext", "cls" (int or None)}`; decoding happens later,
in the stage that owns it. Members are grouped by WebDataset's rule (key = path up to the first dot
of the file name). Only plain bytes are read: nothing from a shard is ever unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import braceexpand
from tqdm import tqdm
from webdataset.gopen import gopen

from common.files import atomic_file
from shards.pipes import Command, CommandFailed
from shards.remote import RemoteError, is_url, open_stream, probe_range
from shards.trust import name_problem

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


TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst")


def _tar_stem(word: str) -> str | None:
    base = word.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[:-len(suffix)]
    return None


def shard_name(url: str) -> str:
    """A feature shard's name: the stem of the last word of the URL that names a tar file
    (`pipe:aws s3 cp s3://b/train-000123.tar -` -> `train-000123`), else a hash of the whole URL."""
    words = url.removeprefix("pipe:").split()
    stems = [stem for w in words if (stem := _tar_stem(w))]
    name = stems[-1] if stems else words[0].rstrip("/").rsplit("/", 1)[-1] if len(words) == 1 and ":" not in url else ""
    if name_problem(name):  # a name that is no plain file name: never a path in the cache
        return "shard-" + hashlib.sha1(url.encode()).hexdigest()[:12]
    return name


def shard_names(urls: list[str]) -> list[str]:
    """Unique names for a list of source URLs. A URL listed twice is refused; two URLs whose file names
    agree (`a/train-0.tar`, `b/train-0.tar`) get the name plus a hash of their whole URL."""
    from common.config import ConfigError

    seen: dict[str, int] = {}
    for i, u in enumerate(urls):
        if absolute_url(u) in seen:
            raise ConfigError(f"data.shards lists {u!r} twice (entries {seen[absolute_url(u)]} and {i}): "
                              "each source shard may appear once")
        seen[absolute_url(u)] = i
    names = [shard_name(u) for u in urls]
    counts = Counter(names)
    return [f"{n}-{hashlib.sha1(absolute_url(u).encode()).hexdigest()[:8]}" if counts[n] > 1 else n
            for n, u in zip(names, urls)]


def _split_member(path: str) -> tuple[str, str]:
    directory, base = os.path.split(path)
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext.lower()


def local_tar(url: str) -> bool:
    """A local, uncompressed tar: read by seeking from header to header, so a reader that wants only some samples
    never reads the bytes of the others."""
    if url.startswith("pipe:") or is_url(url) or ":" in url.split("/")[0] or not Path(url).is_file():
        return False
    return is_seekable(url)


def iter_members(url: str, stall_timeout: float | None = None) -> Iterator[tuple[str, str, Callable[[], bytes], int]]:
    """(key, ext, read, data offset) of each regular member, in order; `read()` gives its bytes (call it before
    the next member, or not at all). Raises ShardError on a broken tar, including one cut at a member boundary (no
    end-of-archive marker) or inside a member, whether or not its bytes were read. The offset is into the
    uncompressed tar: with an uncompressed tar it is where a ranged read finds the bytes again (pread, or
    remote.read_range). A local uncompressed tar is read by seeking (only the headers and the members read);
    `pipe:` commands through shards.pipes, compressed tars through webdataset's gopen, http(s)://, s3://, gs://,
    hf:// through shards.remote, as streams that read every byte. A `pipe:` command that sends nothing for
    `stall_timeout` seconds is stopped and the shard fails (a ShardError saying so), so one stalled source never
    holds up the others for good. The stream is closed however the generator ends: closed early (a reader that
    needed only some samples, `close()`, or dropped), a `pipe:` command is stopped at once, not waited for."""
    if not url.startswith("pipe:") and not is_url(url) and not Path(url).exists():
        raise ShardError(url, "file not found (check data.shards)")
    stream = None
    try:
        seek = local_tar(url)
        stream = open(url, "rb") if seek else open_stream(url) if is_url(url) else \
            Command(url, stall_timeout) if url.startswith("pipe:") else gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r:" if seek else "r|*") as tar:
            for info in tar:  # "r:" checks that the previous member's bytes are all there before each header
                if not info.isreg():
                    continue
                key, ext = _split_member(info.name)
                data = None if seek else _member_bytes(url, tar, info)  # a stream reads past them anyway
                read = partial(_member_bytes, url, tar, info) if seek else (lambda d=data: d)
                yield key, ext, read, info.offset_data
            end = tar.offset
            if seek:
                size = os.fstat(stream.fileno()).st_size
            else:
                while tar.fileobj.read(1 << 16):  # to the end: a command's exit status is checked there
                    pass
                size = tar.fileobj.pos
            if size < end + 2 * tarfile.BLOCKSIZE:
                raise ShardError(url, f"truncated: no end-of-archive marker after {end} bytes (the tar was cut "
                                      "at a member boundary); re-copy the shard")
        stream.close()
    except RemoteError as e:
        raise ShardError(url, e.reason) from None
    except (tarfile.TarError, OSError, EOFError) as e:
        if isinstance(stream, Command) and stream.stalled:
            raise ShardError(url, f"stalled: its command sent nothing for {stream.timeout:g} s "
                                  "(extract.stall_timeout) and was stopped; check that the source is reachable, "
                                  "then rerun: complete shards are skipped") from None
        if isinstance(e, CommandFailed):
            raise ShardError(url, f"{e} (its own messages, if any, are above)") from None
        raise ShardError(url, f"{type(e).__name__}: {e} (truncated or not a tar?)") from None
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):  # closing never hides why the generator ended
                stream.close()


def _member_bytes(url: str, tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    try:
        data = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(url, f"{type(e).__name__}: {e} (truncated or not a tar?)") from None
    if len(data) != info.size:
        raise ShardError(url, f"truncated at member {info.name}")
    return data


def is_seekable(url: str) -> bool:
    """An uncompressed tar, local or at a URL whose server reads ranges: samples can be read at their recorded
    offsets."""
    return seek_problem(url) is None


def seek_problem(url: str) -> str | None:
    """Why the source cannot be read at its samples' offsets, or None if it can. A URL is probed with one ranged
    read of its tar magic (bytes 257-262)."""
    if is_url(url):
        try:
            head = probe_range(url, 257, 5)
        except RemoteError as e:
            raise ShardError(url, e.reason) from None
        return None if head == b"ustar" else \
            f"source {url} is served without ranged reads (a Range request got the whole file)" if head is None else \
            f"source {url} is not an uncompressed tar (compressed?)"
    if url.startswith("pipe:") or ":" in url.split("/")[0]:
        return f"source {url[:100]} is a {url.split(':')[0]}: command, read once from start to end"
    with open(url, "rb") as f:
        head = f.read(512)
    return None if len(head) == 512 and head[257:262] == b"ustar" else \
        f"source {url} is not an uncompressed tar (compressed?)"


def iter_groups(url: str, wanted: Callable[[int], bool] | None = None, stall_timeout: float | None = None
                ) -> Iterator[tuple[str, dict[str, tuple[bytes, int]] | None]]:
    """(key, {ext: (bytes, offset)}) per sample, in order; members of one key are adjacent, as in
    WebDataset. A key met again later, or one ext twice, yields the key again with "__duplicate__".
    With `wanted`, sample i's members are read only if wanted(i); the others yield (key, None)."""
    key, members, seen, i = None, {}, set(), -1
    with contextlib.closing(iter_members(url, stall_timeout)) as stream:  # closed with this generator
        for k, ext, read, offset in stream:
            new = not members or k != key or ext in members  # a new key, or this key's ext again: a new group
            if new and members:
                yield key, members if wanted is None or wanted(i) else None
                members = {}
            i += new
            if k in seen and not members:
                members["__duplicate__"] = (ext.encode(), offset)
            key = k
            seen.add(k)
            members.setdefault(ext, (read() if wanted is None or wanted(i) else b"", offset))
    if members:
        yield key, members if wanted is None or wanted(i) else None


def iter_samples(url: str, wanted: Callable[[int], bool] | None = None,
                 stall_timeout: float | None = None) -> Iterator[dict | None]:
    """Samples of one source shard: the first image entry (bytes, data offset in the tar) and the `.cls`
    label of each key; `duplicate` is True for a key already seen in this shard. With `wanted`, sample i is
    read only if wanted(i); the others yield None (counted, their bytes not read from a local tar)."""
    with contextlib.closing(iter_groups(url, wanted, stall_timeout)) as groups:  # closed with this generator
        for key, members in groups:
            if members is None:
                yield None
                continue
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            try:
                cls = int(members["cls"][0].decode().strip()) if "cls" in members else None
            except ValueError:
                cls = None
            image, offset = members[ext] if ext else (None, -1)
            yield {"key": key, "image": image, "ext": ext, "cls": cls, "offset": offset,
                   "duplicate": "__duplicate__" in members}


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


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000,
                 total: int | None = None, progress: bool = True) -> list[Path]:
    """samples: dicts with `key` (no dots), `image` (bytes), `ext`, `cls` and optional `meta`.
    Shards are written as `<prefix>-000000.tar`, ... (each atomically: common/files.py atomic_file)."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    stream = iter(tqdm(samples, total=total, unit="img", disable=not progress, desc="make-shards"))
    for first in stream:  # a shard: this sample and the next maxcount - 1
        paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
        with atomic_file(paths[-1]) as f:
            tar = wds.TarWriter(f, encoder=False, mtime=0.0)
            for s in itertools.chain([first], itertools.islice(stream, maxcount - 1)):
                entry = {"__key__": s["key"], s["ext"]: s["image"], "cls": str(s["cls"]).encode()}
                if s.get("meta") is not None:
                    entry["json"] = json.dumps(s["meta"]).encode()
                tar.write(entry)
            tar.close()
    return paths
