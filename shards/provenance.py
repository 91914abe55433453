"""Where a cache's samples came from, and whether a source is still that shard.

- `source_urls`: feature shard name -> the source its images are read from: the manifest's, or the same names
  under the user's own `data.shards` / `--source-shards`. A source the cache names is opened only if it is data
  (shards.trust.source_problem): a `pipe:` command from a manifest is never run, the user must name it again.
- `source_differs`: whether a source at another URL (a symlinked folder, a staged copy, another mount point) is
  the shard a completion record describes: its size, and the crc32 of a few recorded images read back at their
  recorded offsets. Extraction finishes a cache through another path with it, and refuses another shard that
  has the same name.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from shards.errors import RefusedFile
from shards.index import ShardRecord, read_index, read_record, row_ok
from shards.remote import is_url
from shards.trust import source_problem

if TYPE_CHECKING:
    from shards.manifest import Manifest

PROBES = 3  # recorded images read back to recognise a source at another path: the first, the middle, the last


def source_urls(manifest: Manifest, shards_override=None, missing_ok: bool = False,
                refused: dict[str, str] | None = None) -> dict[str, str | None]:
    """Feature shard name -> source URL: the manifest's, or the same names under `shards_override` (a brace
    pattern or list: the dataset moved, or its sources are commands the user names). A manifest's source that is
    not data (`pipe:`, another scheme) is a RefusedFile, or, given a `refused` dict, left out (None) and noted
    there (name -> why)."""
    from shards.errors import CacheError
    from shards.source import expand_shards, shard_names

    urls = {s.name: s.source for s in manifest.shards}
    if shards_override:
        moved_urls = expand_shards(shards_override)
        moved = dict(zip(shard_names(moved_urls), moved_urls))
        lost = sorted(set(urls) - set(moved))
        if lost and not missing_ok:
            raise CacheError(f"data.shards does not contain source shards {lost[:5]} named in the cache manifest")
        return {n: moved.get(n) for n in urls}  # the user's own: nothing of the cache's is opened
    bad = {n: f"{u[:100]!r} {why}" for n, u in urls.items() if (why := source_problem(u))}
    if bad and refused is None:
        name, why = next(iter(bad.items()))
        raise RefusedFile(f"manifest.json names sources that are not data ({len(bad)} of {len(urls)}; shard {name}: "
                          f"{why}). A cache is data: a command it names is never run. If you trust these sources, "
                          "name them yourself: data.shards in the training config (or --source-shards for "
                          "`img2vec verify`), a brace pattern or list whose file names match the shards")
    if refused is not None:
        refused.update(bad)
    return {n: None if n in bad else u for n, u in urls.items()}


def _local(url: str) -> bool:
    return not url.startswith("pipe:") and not is_url(url) and ":" not in url.split("/")[0]


def source_size(url: str) -> int | None:
    """A local source's size in bytes (recorded, to recognise it at another path), else None."""
    return os.path.getsize(url) if _local(url) and os.path.isfile(url) else None


def source_differs(cache: Path, name: str, record: ShardRecord, url: str) -> str | None:
    """Why `url` is not the source the recorded shard `name` was extracted from, or None if it is (or cannot be
    told apart: a `pipe:` command or a compressed tar is recognised by its name only)."""
    from shards.source import absolute_url, is_seekable

    recorded = record.source
    if recorded is None or absolute_url(url) == recorded:
        return None
    local = _local(url)
    if local and not Path(url).is_file():
        return None  # not there: extraction names it when it reads it
    size, here = record.source_size, source_size(url)
    if size is not None and here is not None and here != size:
        return f"{url} has {here} bytes; the shard was extracted from {size} bytes ({recorded})"
    if not (record.seekable and (local or is_url(url)) and is_seekable(url)):
        return None
    return _images_differ(cache, name, url)


def _images_differ(cache: Path, name: str, url: str) -> str | None:
    """The first, middle and last recorded images read from `url` at their recorded offsets, against their
    recorded crc32."""
    from shards.reader import read_at

    index = read_index(cache, name)
    rows = sorted({0, len(index) // 2, len(index) - 1} & set(range(len(index))))[:PROBES]
    rows = [i for i in rows if row_ok(index[i])]
    data = read_at([(url, int(index["src_offset"][i]), int(index["src_size"][i])) for i in rows])
    for i, got in zip(rows, data):
        if zlib.crc32(got) != int(index["src_crc"][i]):
            return (f"{url}: the image of key {index['key'][i].decode(errors='replace')!r} at byte "
                    f"{int(index['src_offset'][i])} is not the one the cache recorded")
    return None


def sources_differ(cache: Path, manifest: Manifest, sources: dict[str, str]) -> list[str]:
    """"<shard>: why" for each recorded shard of `sources` (name -> the URL given now, data.shards) at another path
    than the manifest's that is not the same shard (source_differs). Each rank checks its own shards (a few
    images read back from each); shards at their recorded URL cost nothing."""
    from shards.source import absolute_url

    recorded = {s.name: s.source for s in manifest.shards}
    out = []
    for name, url in sources.items():
        if absolute_url(url) != recorded.get(name) and (record := read_record(cache, name)) is not None:
            why = source_differs(cache, name, record, url)
            if why:
                out.append(f"{name}: {why}")
    return out
