"""Sources and caches at URLs: `http(s)://`, `s3://`, `gs://` and `hf://` objects read through fsspec, with retries.

Two ways to read: `open_stream(url)` reads an object from start to end (a source shard streamed), and
`read_range` / `read_ranges` read byte ranges (a sample at the offset the cache recorded: HTTP Range, S3 and
GCS ranged GETs). Credentials come from the environment, as each backend reads them: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL (an S3-compatible store) for s3:// (s3fs);
GOOGLE_APPLICATION_CREDENTIALS for gs:// (gcsfs); HF_TOKEN for hf:// (huggingface_hub).

A read that fails on a dropped connection, a timeout, a 5xx or a short body is retried, at most
IMG2VEC_REMOTE_TRIES times in all (default 5), waiting IMG2VEC_REMOTE_BACKOFF seconds (default 0.5), then twice
that, and so on; then a RemoteError names the URL. A read is never used short.
"""
from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable, Sequence

from shards.errors import CacheError

SCHEMES = ("http", "https", "s3", "gs", "gcs", "hf")
PACKAGES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}
STREAM_BLOCK = 8 << 20  # the ranged GET size when an object store's file is read from start to end


class RemoteError(CacheError):
    """A URL that cannot be read (after retries, where retrying can help). A CacheError, so that a cache at a
    URL that fails ends a command with its message; a source's read turns it into a ShardError."""

    def __init__(self, url: str, reason: str | None = None, missing: bool = False):
        super().__init__(url if reason is None else f"{url}: {reason}")  # 1 arg: re-raised from a worker
        self.url, self.reason, self.missing = url, reason, missing


class _ShortRead(OSError):
    """Fewer bytes than asked: a body cut without the transport noticing. Retried like a dropped connection."""


def scheme(url: str) -> str | None:
    """The URL's scheme if it is one read here (`https://...` -> "https"), else None (a path, `pipe:`)."""
    head, sep, _ = str(url).partition("://")
    return head.lower() if sep and head.lower() in SCHEMES else None


def is_url(url: str) -> bool:
    return scheme(url) is not None


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def backend_options(proto: str) -> dict:
    """Constructor options per backend: timeouts for HTTP (a stalled server is a retried failure, not a
    hang), the S3 endpoint from AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (botocore reads them too)."""
    if proto in ("http", "https"):
        import aiohttp

        t = _env_number("IMG2VEC_REMOTE_TIMEOUT", 60)
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}
    if proto == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def install_hint(package: str) -> str:
    """How to install a backend: the package itself, or this checkout's `remote` extra that holds it (PyPI's
    "img2vec" is another project)."""
    extra = " (or pip install -e '.[remote]' in this checkout)" if package in ("s3fs", "gcsfs") else ""
    return f"pip install {package}{extra}"


_filesystems: dict[tuple[int, str], object] = {}  # (pid, scheme) -> filesystem: a forked worker makes its own


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; one filesystem per scheme and process."""
    proto = scheme(url)
    if proto is None:
        raise RemoteError(url, f"not a URL read here (schemes: {', '.join(SCHEMES)})")
    key = (os.getpid(), proto)
    fs = _filesystems.get(key)
    if fs is None:
        try:
            import fsspec

            fs = fsspec.filesystem(proto, **backend_options(proto))
        except ImportError as e:
            raise RemoteError(url, f"reading {proto}:// needs the {PACKAGES[proto]} package ({e}): "
                                   f"{install_hint(PACKAGES[proto])}") from None
        _filesystems[key] = fs
    return fs, fs._strip_protocol(url)


def _transient(e: BaseException) -> bool:
    """Worth another try: a dropped or refused connection, a timeout, a 5xx, 408 or 429, a short body.
    Not: a missing object, a refused permission, a 4xx, a server without ranged reads (ValueError)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, ValueError, RemoteError)):
        return False
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False
    return isinstance(e, Exception)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _schedule() -> tuple[int, float]:
    return max(int(_env_number("IMG2VEC_REMOTE_TRIES", 5)), 1), _env_number("IMG2VEC_REMOTE_BACKOFF", 0.5)


def _give_up(url: str, what: str, e: Exception, attempt: int, tries: int) -> RemoteError | None:
    """The RemoteError that failure `e` of try `attempt` ends in, or None to try again."""
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, FileNotFoundError):
        return RemoteError(url, f"{what}: not found (check the URL)", missing=True)
    if not _transient(e):
        denied = isinstance(e, PermissionError) or getattr(e, "status", None) in (401, 403)
        hint = " (credentials in the environment? see the README, 'Sources at URLs')" if denied else ""
        return RemoteError(url, f"{what}: {_describe(e)}{hint}")
    if attempt == tries - 1:
        return RemoteError(url, f"{what} failed {tries} times, last with {_describe(e)}; the server or the network "
                                "keeps failing: check that the URL is reachable from here, then rerun "
                                "(IMG2VEC_REMOTE_TRIES / IMG2VEC_REMOTE_BACKOFF allow more)")
    return None


def retry(url: str, what: str, fn: Callable):
    """fn() with retries and exponential backoff; a RemoteError naming the URL when it keeps failing."""
    tries, delay = _schedule()
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted by _give_up; every failure ends named
            error = _give_up(url, what, e, attempt, tries)
            if error is not None:
                raise error from None
            time.sleep(delay * 2 ** attempt)


async def retry_async(url: str, what: str, fn: Callable):
    """`await fn()` with the retries of `retry` (for a Zarr store's reads, in Zarr's event loop)."""
    tries, delay = _schedule()
    for attempt in range(tries):
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001
            error = _give_up(url, what, e, attempt, tries)
            if error is not None:
                raise error from None
            await asyncio.sleep(delay * 2 ** attempt)


def _checked(data: bytes, offset: int, size: int) -> bytes:
    if len(data) > size:
        raise ValueError(f"the server answered {len(data)} bytes for a range of {size}: it ignores ranged reads "
                         "(read this source with train.reader = 'stream')")
    if len(data) < size:
        raise _ShortRead(f"got {len(data)} of {size} bytes at offset {offset} (the object is shorter than "
                         "recorded, or the body was cut)")
    return data


def read_range(url: str, offset: int, size: int) -> bytes:
    """Exactly `size` bytes at `offset` of the object at `url` (one ranged GET), or a RemoteError."""
    if size == 0:
        return b""

    def once():
        fs, path = filesystem(url)
        return _checked(fs.cat_file(path, start=offset, end=offset + size), offset, size)

    return retry(url, f"reading {size} bytes at offset {offset}", once)


def read_ranges(requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
    """[(url, offset, size)] -> their bytes, in order. Fetched concurrently where the backend can (one
    cat_ranges per scheme); a request that fails there is read again alone, with retries."""
    out: list[bytes | None] = [None] * len(requests)
    by_scheme: dict[str, list[int]] = {}
    for i, (url, _, _) in enumerate(requests):
        by_scheme.setdefault(scheme(url) or "", []).append(i)
    for at in by_scheme.values():
        try:
            fs, _ = filesystem(requests[at[0]][0])
            paths = [filesystem(requests[i][0])[1] for i in at]
            got = fs.cat_ranges(paths, [requests[i][1] for i in at], [requests[i][1] + requests[i][2] for i in at],
                                on_error="return")
        except Exception:  # noqa: BLE001 - every request is read again alone, with retries
            got = [None] * len(at)
        for i, data in zip(at, got):
            ok = isinstance(data, bytes) and len(data) == requests[i][2]
            out[i] = data if ok else read_range(*requests[i])
    return out


def probe_range(url: str, offset: int, size: int) -> bytes | None:
    """`size` bytes at `offset` through a ranged read, or None when the server cannot read ranges (it
    answers a whole object to a Range request); no body is downloaded to find out."""
    def once():
        fs, path = filesystem(url)
        with fs.open(path, "rb", block_size=max(size, 512), cache_type="none") as f:
            try:
                f.seek(offset)
                return _checked(f.read(size), offset, size)
            except ValueError:  # fsspec's "no range requests" / "cannot seek a stream", or a whole body
                return None

    return retry(url, f"probing a ranged read at offset {offset}", once)


def _skip(f, n: int) -> None:
    left = n
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise _ShortRead(f"the object ended at {n - left} bytes on reopening at {n}")
        left -= len(chunk)


class _Stream(io.RawIOBase):
    """An object read from start to end. A dropped connection reopens it where it stopped: by a seek where
    the backend reads ranges, else by reading the object again up to there."""

    def __init__(self, url: str):
        self.url, self.pos, self.f, self.done = url, 0, None, False
        self.size = retry(url, "reading its size", lambda: filesystem(url)[0].size(filesystem(url)[1]))

    def readable(self) -> bool:
        return True

    def _drop(self) -> None:
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass

    def _open(self) -> None:
        fs, path = filesystem(self.url)
        # HTTP: one plain GET (block_size 0); object stores: large ranged GETs, resumable by a seek
        f = fs.open(path, "rb", block_size=0 if scheme(self.url) in ("http", "https") else STREAM_BLOCK)
        try:
            f.seek(self.pos)
        except (ValueError, OSError):  # a streaming HTTP body cannot seek: read up to where we were
            _skip(f, self.pos)
        self.f = f

    def _read_once(self, n: int) -> bytes:
        if self.done:
            return b""
        try:
            if self.f is None:
                self._open()
            data = self.f.read(n)
            if not data and n:
                if self.size is not None and self.pos < self.size:
                    raise _ShortRead(f"the body ended at byte {self.pos} of {self.size}")
                self.done = True
                self._drop()  # at the end: the connection goes back now, not when the reader is collected
            return data
        except BaseException:
            self._drop()
            raise

    def readinto(self, b) -> int:
        data = retry(self.url, f"reading at byte {self.pos}", lambda: self._read_once(len(b)))
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str) -> io.BufferedReader:
    """A binary file reading the object at `url` from its start, with retries (see the module doc)."""
    return io.BufferedReader(_Stream(url), buffer_size=1 << 20)
