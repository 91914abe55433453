"""The cache's errors: every message names the file, shard or key, and what to do."""
from __future__ import annotations


class CacheError(RuntimeError):
    """A cache that cannot be used as it is; the message names the file, shard or key."""


class CorruptSample(CacheError):
    def __init__(self, shard: str, key: str | None = None, reason: str | None = None, what: str = "feature shard"):
        if key is None:  # re-raised from a DataLoader worker with its message only
            super().__init__(shard)
            return
        fix = ("run `img2vec verify` and re-extract that shard (delete its .done.json)" if what == "feature shard"
               else "the source changed after extraction: restore it, or re-extract that shard")
        super().__init__(f"{what} {shard}: sample {key!r} is corrupt ({reason}); {fix}")
        self.shard, self.key, self.reason = shard, key, reason  # verify reports the reason alone


class RefusedFile(CacheError):
    """A cache file that is torn, or names something outside the cache (a path, a size past a file's end, a
    command): refused before it is used (shards/trust.py); the message names the file."""
