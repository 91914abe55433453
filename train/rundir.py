"""The run dir around the loop: one training at a time (a lock), the run's identity (what a resume must
match) and its deal (what an elastic resume may change), the resolved config, `metrics.jsonl` (rows past the
resumed step dropped, a torn row too) and `exit_status` (the run's outcome, for job scripts behind a launcher).
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
from train.schedule import Position


class RunDirLock(LockFile):
    """`<run_dir>/lock` (common.files.LockFile), holding host, pid, nonce and SLURM job id. A lock of a dead
    process on this host, or of this same SLURM job (requeued, maybe on another node), is stale and taken over;
    a live one, or one of another host, refuses the second training, naming `other` as what to use instead."""

    def __init__(self, run_dir: Path, other: str = "another train.run_dir"):
        super().__init__(run_dir / "lock", slurm_job_id=os.environ.get("SLURM_JOB_ID"))
        self.other = other

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
                          f"pid {owner.get('pid')}): use {self.other}, or wait for it. If that "
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


def run_identity(cfg: Config, manifest: Manifest, data_plan: dict) -> dict:
    """What a resume must share with the run it resumes: the seed, the cache, and the data plan (the reader mode,
    the per-shard sample counts, and for streaming its workers and buffer)."""
    return {"seed": cfg.train.seed, "cache": cache_identity(manifest), "data": data_plan}


def run_deal(cfg: Config, world_size: int) -> dict:
    """How the samples are dealt: a resume in random mode may change all three (the rest of the epoch is dealt
    again, train/data.py: epoch_plan); a streamed run keeps its world size and batch size."""
    return {"world_size": world_size, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum}


STREAM_DEAL = ("world_size", "batch_size")
STREAM_KEYS = ("deal.", "data.workers", "data.shuffle_buffer")  # what a streamed epoch's order depends on
WHY_STREAM = ("A streamed run (train.reader 'stream': pipe: or compressed sources, servers without ranged reads) "
              "resumes only with the world size, batch size, train.workers and train.shuffle_buffer it started with: "
              "each rank's workers read their own runs of shards through a shuffle buffer, so what a stopped epoch "
              "used is not a prefix of one sequence that could be dealt again.")


def check_identity(run_dir: Path, identity: dict, deal: dict, resuming: bool, elastic: bool,
                   other: str = "another train.run_dir") -> None:
    """A resume must match the run dir's recorded identity, and unless `elastic` its deal's world and batch size
    (a ConfigError naming each difference, and saying to resume with the same settings or use `other`); an elastic
    change is printed. run.json records both."""
    path = run_dir / "run.json"
    if resuming and path.exists():
        old = json.loads(path.read_text())
        if "deal" not in old:  # a run.json from before the deal was recorded apart
            old["deal"] = {k: old.pop(k) for k in ("world_size", "batch_size", "grad_accum") if k in old}
        a, b = _flat(old), _flat(dict(identity, deal=deal))
        fixed = [k for k in sorted(set(a) | set(b)) if not k.startswith("deal.") or (not elastic and k[5:] in STREAM_DEAL)]
        diffs = [f"{k}: run dir has {a.get(k)!r}, this run has {b.get(k)!r}" for k in fixed if a.get(k) != b.get(k)]
        if diffs:
            raise ConfigError(f"{run_dir} holds a run that cannot be resumed with these settings:\n  " + "\n  ".join(diffs)
                              + ("\n" + WHY_STREAM if any(d.startswith(STREAM_KEYS) for d in diffs) else "")
                              + f"\nResume with the same ones, or use {other}.")
        changed = [f"{k} {old['deal'].get(k)} -> {v}" for k, v in deal.items() if old["deal"].get(k) != v]
        if changed:
            print(f"elastic resume: {', '.join(changed)}: the rest of the epoch is dealt again over this run's "
                  "processes; the learning rate follows the epoch fraction, its peak the new global batch", file=sys.stderr)
    write_text(path, json.dumps(dict(identity, deal=deal), indent=1), "run identity")


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


def open_run(accelerator, cfg: Config, manifest: Manifest, ckpts: Checkpoints, data_plan: dict, sched) -> Position:
    """The main process checks the run dir's identity, writes the resolved config and picks the newest usable
    checkpoint; every rank loads that one. Returns its position (the start for a fresh run)."""
    from accelerate.utils import broadcast_object_list

    run_dir, latest = Path(cfg.train.run_dir), [None]
    deal = run_deal(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_identity(run_dir, run_identity(cfg, manifest, data_plan), deal, resuming=bool(ckpts.complete()),
                       elastic=data_plan["reader"] == "random")
        latest = [ckpts.latest_valid()]
        recipe = manifest.to_dict()
        write_text(run_dir / "config.json", json.dumps(dict(cfg.to_dict(), cache_manifest={
            k: recipe[k] for k in ("teacher", "augment", "codec", "token_shape")}), indent=1), "config")
    broadcast_object_list(latest)
    if latest[0] is None:
        return Position()
    accelerator.load_state(str(latest[0]))  # a rank the checkpoint has no RNG state for keeps its seeded one
    accelerator.step = 0  # its micro-batch count: checkpoints are taken between updates, whatever grad_accum was
    pos = Position.from_dict(json.loads((latest[0] / "position.json").read_text()), sched.micro_per_epoch, deal)
    if accelerator.is_main_process:
        print(f"resuming from {latest[0]} at step {pos.step}", file=sys.stderr)
    return pos


EXIT_STATUS = "exit_status"


def write_exit_status(run_dir: Path, status: int | str) -> None:
    """`<run_dir>/exit_status`: "running", then the run's exit status (common/signals.py), written by the main process
    while it holds the lock. torchelastic's launcher (torchrun, and `accelerate launch`, which runs it) exits 1 after
    it forwarded a signal, whatever its workers returned: a job script reads the outcome here (README, SLURM)."""
    try:
        write_atomic(run_dir / EXIT_STATUS, f"{status}\n")
    except OSError as e:  # a full disk is reported by what filled it; the status file is not worth a second error
        print(f"warning: could not write {run_dir / EXIT_STATUS}: {e.strerror}", file=sys.stderr)


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
