"""The teacher that made a cache, rebuilt from its manifest: for the online baseline (train.targets = "online")
and `img2vec verify --recompute`.

A manifest is data: the teacher it names is built only from this timm's own architectures (a model hub name is
never fetched on a cache's word), with a precision this version knows, and its weights must hash as the manifest
records. Anything else is a ConfigError naming the manifest's field (exit 2).
"""
from __future__ import annotations

from common.config import CHOICES, ConfigError
from shards.errors import CacheError
from shards.manifest import Manifest


class TeacherMismatch(CacheError):
    """The rebuilt teacher's weights do not hash as the manifest records."""

    def __init__(self, message: str, fingerprint: dict, weights: str, seed: int):
        super().__init__(message)
        self.fingerprint, self.weights, self.seed = fingerprint, weights, seed


def cache_teacher(manifest: Manifest, weights: str | None = None, seed: int | None = None, device="cpu"):
    """The teacher that made the cache, rebuilt: its arch, layer and precision, the recorded weights (or
    `weights`, a checkpoint that moved) and seed (random weights are drawn from it). A ConfigError naming the
    manifest's field if it cannot be built; a TeacherMismatch (a CacheError) if its weights do not hash as the
    manifest says."""
    import timm

    from common.config import Teacher as TeacherConfig
    from common.teacher import build_teacher

    t = manifest.teacher
    if not timm.is_model(t.arch):
        why = ("a model hub name: a cache is data, and a model it names is never fetched" if ":" in t.arch
               else f"not an architecture of this timm ({timm.__version__})")
        raise ConfigError(f"manifest.json: teacher.arch {t.arch[:80]!r} is {why}")
    if t.precision not in CHOICES["teacher.dtype"]:
        raise ConfigError(f"manifest.json: teacher.precision {t.precision[:80]!r} is none of "
                          f"{', '.join(CHOICES['teacher.dtype'])}")
    named = "the weights given" if weights else "teacher_weights"
    weights = weights or manifest.teacher_weights or "random"
    seed = (manifest.teacher_seed or 0) if seed is None else seed
    cfg = TeacherConfig(arch=t.arch, layer=t.layer, weights=weights, dtype=t.precision, seed=seed,
                        norm=True if t.norm is None else t.norm)
    try:
        teacher = build_teacher(cfg, device)
    except ConfigError as e:
        raise ConfigError(f"manifest.json: teacher {t.arch} (teacher.layer {t.layer}, {named} "
                          f"{weights[:200]!r}) cannot be built: {e}") from None
    got = teacher.fingerprint["sha256"]
    if got != t.sha256:
        raise TeacherMismatch(f"teacher {weights} (seed {seed}) hashes to {got[:12]}, the cache was made by "
                              f"{t.sha256[:12]}", dict(teacher.fingerprint), weights, seed)
    return teacher
