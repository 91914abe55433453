"""The teacher that made a cache, rebuilt from its manifest: for the online baseline (train.targets = "online")
and `img2vec verify --recompute`."""
from __future__ import annotations

from shards.errors import CacheError
from shards.manifest import Manifest


class TeacherMismatch(CacheError):
    """The rebuilt teacher's weights do not hash as the manifest records."""

    def __init__(self, message: str, fingerprint: dict, weights: str, seed: int):
        super().__init__(message)
        self.fingerprint, self.weights, self.seed = fingerprint, weights, seed


def cache_teacher(manifest: Manifest, weights: str | None = None, seed: int | None = None, device="cpu"):
    """The teacher that made the cache, rebuilt: its arch, layer and precision, the recorded weights (or
    `weights`, a checkpoint that moved) and seed (random weights are drawn from it). A ConfigError if it cannot
    be built; a TeacherMismatch (a CacheError) if its weights do not hash as the manifest says."""
    from common.config import Teacher as TeacherConfig
    from common.teacher import build_teacher

    import timm

    from common.config import ConfigError

    t = manifest.teacher
    if not timm.is_model(t.arch):  # a hub name ("hf-hub:...") would fetch a model from where the cache says
        raise ConfigError(f"manifest.json: teacher.arch {t.arch[:80]!r} is not an architecture of this timm")
    weights = weights or manifest.teacher_weights or "random"
    seed = (manifest.teacher_seed or 0) if seed is None else seed
    cfg = TeacherConfig(arch=t.arch, layer=t.layer, weights=weights, dtype=t.precision, seed=seed,
                        norm=True if t.norm is None else t.norm)
    teacher = build_teacher(cfg, device)
    got = teacher.fingerprint["sha256"]
    if got != t.sha256:
        raise TeacherMismatch(f"teacher {weights} (seed {seed}) hashes to {got[:12]}, the cache was made by "
                              f"{t.sha256[:12]}", dict(teacher.fingerprint), weights, seed)
    return teacher
