"""The run dir around the loop: one training at a time (a lock), the run's identity (what a resume must
match), the resolved config, and `metrics.jsonl` (rows past the resumed step dropped, a torn row too).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import zlib
from pathlib import Path

from common.config import Config, ConfigError
from common.files import LockFile, write_atomic
from shards.manifest import Manifest
from train.checkpoints import Checkpoints, DiskFull, is_disk_full


class RunDirLock(LockFile):
    """`<run_dir>/lock` (common.files.LockFile), holding host, pid, nonce and SLURM job id. A lock of a dead
    process on this host, or of this same SLURM job (requeued, maybe on another node), is stale and taken over;
    a live one, or one of another host, refuses the second training."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir / "lock", slurm_job_id=os.environ.get("SLURM_JOB_ID"))

    def acquire(self) -> None:
        if super().acquire():
            if self.taken_over is not None:
                print(f"warning: taking over the stale lock {self.path} ({self.taken_over or 'unreadable'})",
                      file=sys.stderr)
            return
        owner = self.holder()
        if not owner:  # created a moment ago and not yet written, or released: another training raced us
            raise ConfigError(f"{self.path}: another training took the lock at the same time")
        raise ConfigError(f"{self.path.parent} is in use by another training (host {owner.get('host')}, "
                          f"pid {owner.get('pid')}): use another train.run_dir, or wait for it. If that "
                          f"process is gone, delete {self.path}")

    def _stale(self, h: dict) -> bool:
        if h.get("slurm_job_id") and h["slurm_job_id"] == os.environ.get("SLURM_JOB_ID"):
            return True  # a job runs once at a time: this is its earlier run, killed before it could unlock
        return super()._stale(h)


def cache_identity(manifest: Manifest) -> dict:
    """What makes a cache the same data: its teacher, codec and shard list."""
    shards = json.dumps(manifest.shard_names).encode()
    return {"teacher_sha256": manifest.teacher.sha256, "codec": manifest.codec.name,
            "shards_sha256": hashlib.sha256(shards).hexdigest(), "shards": len(manifest.shards)}


def run_identity(cfg: Config, world_size: int, manifest: Manifest, data_plan: dict) -> dict:
    """What a resume must share with the run it resumes: the data order and batches depend on these
    (`data_plan`: the reader mode, the per-shard sample counts, and for streaming its workers and buffer)."""
    return {"world_size": world_size, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seed": cfg.train.seed, "cache": cache_identity(manifest), "data": data_plan}


def check_identity(run_dir: Path, identity: dict, resuming: bool) -> None:
    """A resume must match the run dir's recorded identity (ConfigError naming each difference);
    a fresh run records it."""
    path = run_dir / "run.json"
    if resuming and path.exists():
        a, b = _flat(json.loads(path.read_text())), _flat(identity)
        diffs = [f"{k}: run dir has {a.get(k)!r}, this run has {b.get(k)!r}" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)]
        if diffs:
            raise ConfigError(f"{run_dir} holds a run that cannot be resumed with these settings:\n  "
                              + "\n  ".join(diffs) + "\nResume with the same ones, or use another train.run_dir.")
        return
    write_text(path, json.dumps(identity, indent=1), "run identity")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_sources(urls: dict[str, str | None]) -> None:
    """Every local source shard the cache pairs with must be there before the first step."""
    missing = [u for u in urls.values() if u and ":" not in u.split("/")[0] and not Path(u).exists()]
    if missing:
        raise ConfigError(f"{len(missing)} source shard(s) of the cache are missing, e.g. {missing[0]}: training reads "
                          "the images from them. If they moved, set data.shards to where they are now (same file "
                          "names), e.g. --set data.shards='/new/place/train-{0000..1023}.tar'")


def open_run(accelerator, cfg: Config, manifest: Manifest, ckpts: Checkpoints, data_plan: dict) -> int:
    """The main process checks the run dir's identity, writes the resolved config and picks the newest
    usable checkpoint; every rank loads that one. Returns its step (0 for a fresh run)."""
    from accelerate.utils import broadcast_object_list

    run_dir, latest = Path(cfg.train.run_dir), [None]
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        identity = run_identity(cfg, accelerator.num_processes, manifest, data_plan)
        check_identity(run_dir, identity, resuming=bool(ckpts.complete()))
        latest = [ckpts.latest_valid(accelerator.num_processes)]
        recipe = manifest.to_dict()
        write_text(run_dir / "config.json", json.dumps(dict(cfg.to_dict(), cache_manifest={
            k: recipe[k] for k in ("teacher", "augment", "codec", "token_shape")}), indent=1), "config")
    broadcast_object_list(latest)
    if latest[0] is None:
        return 0
    accelerator.load_state(str(latest[0]))
    step = json.loads((latest[0] / "position.json").read_text())["step"]
    if accelerator.is_main_process:
        print(f"resuming from {latest[0]} at step {step}", file=sys.stderr)
    return step


def write_text(path: Path, text: str, what: str) -> None:
    try:
        write_atomic(path, text)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(what, path) from None
        raise


class MetricsLog:
    """`metrics.jsonl`, one JSON row per logged step. Opened at a resume, it keeps the rows up to the resumed
    step that parse (a row torn by a kill or a full disk is dropped) and appends after them."""

    def __init__(self, path: Path, step: int):
        self.path = path
        rows, torn = [], 0
        if path.exists():
            for line in path.read_bytes().decode(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    keep = row["step"] <= step
                except (ValueError, KeyError, TypeError):
                    torn, keep = torn + 1, False
                if keep:
                    rows.append(line)
        if torn:
            print(f"warning: {path}: dropped {torn} unreadable row(s) (a write cut short)", file=sys.stderr)
        write_text(path, "".join(r + "\n" for r in rows), "metrics")
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull("metrics", self.path) from None
            raise

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # a full disk already reported


class StepTrace:
    """`train.trace_keys`: per rank, `keys-rank<r>.txt` (the step, then its batch's keys) and `masks-rank<r>.txt`
    (the step, crc32 of its masks), flushed every step so a killed run keeps the lines of the steps it took."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.files = [open(run_dir / f"{what}-rank{rank}.txt", "a") for what in ("keys", "masks")] if enabled else []

    def write(self, step: int, keys: list[str], masks) -> None:
        if self.files:
            keys_file, masks_file = self.files
            keys_file.write(f"{step} {' '.join(keys)}\n")
            masks_file.write(f"{step} {zlib.crc32(masks.cpu().numpy().tobytes()):08x}\n")
            for f in self.files:
                f.flush()

    def close(self) -> None:
        for f in self.files:
            f.close()
