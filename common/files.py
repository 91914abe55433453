"""Files that survive a crash: the one atomic write, fsync of a tree, sha256 of a file, and the one lock file.

A write goes to a temporary name beside its target, is fsynced and renamed over it, so a reader sees the old
file or the new one, never half of one. A lock is a file created with O_EXCL; see `LockFile` for when a lock
left behind by a dead process counts as stale.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.config import ConfigError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file and directory under `path` (or the file `path`), and its parent directory."""
    paths = [path] if path.is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for r, ds, _ in os.walk(path):
            for d in ds:
                fsync_dir(Path(r) / d)
        fsync_dir(path)
    fsync_dir(path.parent)


def unique_suffix() -> str:
    """Host, pid and a random part: ranks on different hosts often share a small pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_file(path) as f:` what is written to `f` replaces `path` in one step when the block ends: written
    to `<name>.tmp-<unique>` (a name no other writer shares), fsynced, renamed, the directory fsynced. On an error
    (a full disk, a download cut short) the temporary is removed and the old file, if any, stays."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{unique_suffix()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` by `data` in one step (atomic_file)."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as JSON with indent=1 (the cache's manifest and completion records), written atomically."""
    write_atomic(path, json.dumps(obj, indent=1))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") if hasattr(path, "open") else open(path, "rb") as f:  # also a cache's RemotePath
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mtime(path: Path) -> float:
    """The file's mtime, 0 if it is gone."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


TORN_AFTER = 60.0  # s: a lock file still empty or unparsable this long after its creation was left by a crash
_HELD: set[str] = set()  # nonces of the locks this process holds (a lock naming our pid and another nonce is
                         # a previous life's: a restarted container often gets the same hostname and pid)
_SEEN: dict[str, tuple[float, float]] = {}  # lock path -> (its mtime, our monotonic clock when we first saw it)


MAX_TTL_FACTOR = 10  # the longest ttl another holder may claim, in units of ours


class NotALockFile(ConfigError):
    """A lock's path holds something this program never creates there (a directory, a symbolic link, a FIFO):
    neither read, followed, nor removed; the message names it and says what to do (exit 2)."""


class LockFile:
    """A file created with O_EXCL by the one process that holds it: {"host", "pid", "nonce", **info}. Its mtime
    is the holder's heartbeat (`beat()`, or a `Heartbeat` thread). The lock is stale when its process is dead on
    this host, when it names our pid but no nonce this process holds (a previous life), when it is torn (empty or
    unparsable) for TORN_AFTER seconds, or, given a `ttl` (written into the lock, and the holder's own is the one
    used), when another host's has not beaten for `ttl` seconds (without one, another host's lock never counts as
    dead: its processes cannot be seen from here). Taking over a stale lock goes through a second O_EXCL file,
    `<name>.takeover`, so two processes that both judge it stale cannot both take it.

    Clocks: the holder's mtime is compared with this host's clock, so another host's lock is judged right while
    the two clocks (on NFS: this host's and the file server's, which stamps mtime) differ by less than `ttl`
    minus the holder's beat interval. A clock ahead of ours by more (an mtime in the future) only delays the
    verdict: a lock whose mtime has not changed for `ttl` seconds of our own clock is stale too."""

    def __init__(self, path: Path, ttl: float | None = None, **info):
        self.path, self.ttl = Path(path), ttl
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "nonce": os.urandom(8).hex(), **info}
        if ttl is not None:
            self.me["ttl"] = ttl
        self.taken_over: dict | None = None  # the stale holder that acquire() replaced ({} if torn), if any

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        _HELD.add(self.me["nonce"])
        return True

    def _check_kind(self, path: Path | None = None) -> None:
        """A NotALockFile if the lock's path (or its takeover guard) holds anything but a regular file: a directory
        is never unlinked (it may hold someone's files), a symbolic link or FIFO never read (to /dev/zero, it would
        never end)."""
        path = path or self.path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else \
                "not a regular file"
            raise NotALockFile(f"{path} is {kind}, not a lock file (this program only ever creates a small "
                               "regular file there). Nothing was changed: move it out of the way (it may be someone "
                               "else's), then rerun")

    def acquire(self) -> bool:
        """True if this process now holds the lock (created, or a stale one taken over); a NotALockFile if its
        path holds anything but a regular file."""
        if self._create():
            return True
        self._check_kind()
        if not self.stale():
            return False
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another process is taking it over (or died doing so long ago)
            self._check_kind(guard)
            if time.time() - mtime(guard) > TORN_AFTER:
                guard.unlink(missing_ok=True)
            return False
        os.close(fd)
        try:
            if not self.stale():  # judged again, now that no one else can take it over
                return False
            previous = self.holder()
            self.path.unlink(missing_ok=True)
            if not self._create():
                return False
            self.taken_over = previous
            return True
        finally:
            guard.unlink(missing_ok=True)

    def holder(self) -> dict:
        """The holder's record, {} if there is none or it cannot be read."""
        try:
            h = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return h if isinstance(h, dict) else {}

    def stale(self) -> bool:
        h = self.holder()
        if not h:  # torn or vanished: a writer died between create and write, or just released it
            return not self.path.exists() or time.time() - mtime(self.path) > TORN_AFTER
        return self._stale(h)

    def _stale(self, h: dict) -> bool:
        """Whether the holder `h` (parsed) is dead; subclasses add their own reasons."""
        if h.get("host") != self.me["host"]:
            return self.ttl is not None and self._silent_for(h)
        try:
            pid = int(h["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
        return pid == self.me["pid"] and h.get("nonce") not in _HELD  # our pid, a previous life

    def _silent_for(self, h: dict) -> bool:
        """Another host's holder has not beaten for its ttl: by the mtime's age on our clock, or by an mtime that
        has not changed for ttl seconds of our own (monotonic) clock, whatever the clocks say."""
        ttl = h.get("ttl")
        ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0 else self.ttl
        ttl = min(ttl, MAX_TTL_FACTOR * self.ttl)  # a lease file is data: one saying 1e308 s blocks no shard for good
        m, now = mtime(self.path), time.monotonic()
        if time.time() - m > ttl:
            return True
        seen = _SEEN.get(str(self.path))
        if seen is None or seen[0] != m:
            _SEEN[str(self.path)] = (m, now)
            return False
        return now - seen[1] > ttl

    def held(self) -> bool:
        return self.holder().get("nonce") == self.me["nonce"]

    def beat(self) -> bool:
        """Touch the lock if this process still holds it; False if it does not (released, or taken over)."""
        if not self.held():
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            return False
        return True

    def clear_stale(self) -> None:
        self._check_kind()
        if self.path.exists() and self.stale():
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)
        _HELD.discard(self.me["nonce"])


class Heartbeat:
    """A daemon thread that beats the locks it is given every `interval` seconds, while the main thread works or
    waits (a long batch, a source that stalls, a wait for other jobs): a holder's heartbeat says its process is
    alive, so another host may take over its locks only after it died. `with Heartbeat(5.0) as hb: hb.add(lock)`."""

    def __init__(self, interval: float):
        self.interval, self.locks = interval, set()
        self._guard, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def add(self, lock: LockFile) -> None:
        with self._guard:
            self.locks.add(lock)

    def discard(self, lock: LockFile) -> None:
        with self._guard:
            self.locks.discard(lock)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._guard:
                locks = list(self.locks)
            for lock in locks:
                try:
                    if not lock.beat():
                        self.discard(lock)  # released, or taken over: nothing of ours to keep alive
                except OSError:
                    pass  # a file system hiccup: the next beat tries again

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
