"""A cache at a URL, read like a folder: `as_path(cache.path)` gives a pathlib.Path for a local path and a
RemotePath for an http(s)://, s3://, gs:// or hf:// URL, with the few pathlib methods that reading a cache uses
(training, `img2vec verify`). Reads go through shards.remote (retries, exact sizes); nothing writes here."""
from __future__ import annotations

import os
from pathlib import Path

from shards.remote import (
    RemoteError,
    backend_options,
    filesystem,
    is_url,
    open_stream,
    read_range,
    retry,
    retry_async,
    scheme,
)

class RemotePath:
    """A file or folder at a URL with the few pathlib methods that reading a cache uses (training, verify);
    nothing writes through it. Sizes on object stores come from one listing per folder (cached per process:
    a cache read is a snapshot), over HTTP from a HEAD each (HTTP has no listing)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")

    def __truediv__(self, part) -> RemotePath:
        return RemotePath(f"{self.url}/{str(part).strip('/')}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __lt__(self, other) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0])

    def _listed(self) -> bool:
        return scheme(self.url) not in ("http", "https")

    def _info(self) -> dict | None:
        """{"size", "type"} or None when there is nothing at the URL."""
        if self._listed():
            return _listing(self.parent.url).get(self.name)
        fs, path = filesystem(self.url)
        try:
            info = retry(self.url, "reading its size", lambda: fs.info(path))
        except RemoteError as e:
            if e.missing:
                return None
            raise
        return {"size": info.get("size"), "type": "file"}

    def exists(self) -> bool:
        return self._info() is not None

    def is_file(self) -> bool:
        return (self._info() or {}).get("type") == "file"

    def is_dir(self) -> bool:
        """Object stores: a prefix with objects under it. HTTP has no folders: any URL that is not a file."""
        return bool(_listing(self.url)) if self._listed() else self._info() is None

    def stat(self):
        info = self._info()
        if info is None:
            raise FileNotFoundError(self.url)
        return os.stat_result((0, 0, 0, 0, 0, 0, info.get("size") or 0, 0, 0, 0))

    def iterdir(self) -> list[RemotePath]:
        """What the folder holds (nothing over HTTP, which cannot list)."""
        return [self / name for name in _listing(self.url)] if self._listed() else []

    def read_bytes(self) -> bytes:
        info = self._info()
        if info is None:
            raise FileNotFoundError(self.url)
        size = info.get("size")
        return read_range(self.url, 0, size) if size else open_stream(self.url).read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise PermissionError(f"{self.url}: a cache at a URL is read only")
        return open_stream(self.url)


_listings: dict[tuple[int, str], dict[str, dict]] = {}


def _listing(url: str) -> dict[str, dict]:
    """name -> {"size", "type"} of what a folder of an object store holds ({} for none), listed once per process."""
    key = (os.getpid(), url)
    if key not in _listings:
        fs, path = filesystem(url)
        try:
            entries = retry(url, "listing it", lambda: fs.ls(path, detail=True))
        except RemoteError as e:
            if not e.missing:
                raise
            entries = []
        _listings[key] = {e["name"].rstrip("/").rsplit("/", 1)[-1]: {"size": e.get("size"), "type": e.get("type")}
                          for e in entries if e["name"].rstrip("/") != path.rstrip("/")}
    return _listings[key]


def as_path(where):
    """A cache location: a RemotePath for a URL, else a pathlib.Path."""
    return where if isinstance(where, (RemotePath, Path)) else RemotePath(where) if is_url(where) else Path(where)


def zarr_store(url: str):
    """A read-only Zarr store at a URL (fsspec's, asynchronous) whose reads are retried as the others here."""
    from zarr.storage import FsspecStore

    class RetryingStore(FsspecStore):
        async def get(self, key, prototype=None, byte_range=None):
            return await retry_async(f"{url}/{key}", "reading it", lambda: FsspecStore.get(self, key, prototype, byte_range))

    return RetryingStore.from_url(url, storage_options=backend_options(scheme(url)), read_only=True)
