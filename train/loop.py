"""Stage two: `accelerate launch -m train --config pipeline.toml [--set section.key=value ...]`.

`setup` builds a run (accelerator, schedule, student, optimizer, targets, run dir and resume) into one `Run`;
`train_step` takes one micro-batch through targets, masks, forward/backward, clipping, the update and the
non-finite guard; `fit` keeps the cadence (log, checkpoint, stop). Data lives in train/data.py, the student in
train/model.py, checkpoints in train/checkpoints.py, the run dir (lock, identity, metrics) in train/rundir.py,
the per-step stop / non-finite decision in train/preempt.py, the position and learning rate in train/schedule.py.
Checkpoints resume at the exact batch: the step, optimizer, RNG states and data position (epoch + samples into it)
are restored; in random mode also with another world size, batch size or grad_accum (the epoch's rest re-dealt).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.augment import normalize_pixels, pixel_scale
from common.compiled import compile_forward
from common.config import (Config, ConfigError, add_config_args, check_mask_ratio, check_student_patch, load_config,
                           validate)
from common.config import Train as TrainConfig
from common.faults import fault_point
from common.signals import StopSignals, status_of
from shards.errors import CacheError
from shards.manifest import Manifest, check_replay, read_manifest, source_urls
from shards.source import ShardError
from shards.teacher import cache_teacher
from shards.urlpath import as_path
from train import data
from train.checkpoints import Checkpoints, DiskFull, NonFinite
from train.losses import normalize_targets
from train.masking import step_generator
from train.model import build_student, compile_student, describe_student, param_groups, resolve_student
from train.preempt import StepGuard
from train.probe import KnnProbe
from train.rundir import MetricsLog, RunDirLock, StepTrace, check_sources, open_run, write_exit_status
from train.schedule import Position, Schedule
from train.trackers import check_trackers, start_trackers


@dataclass
class Targets:
    """What the student regresses: the cache's tokens decoded on the device, or (`train.targets = "online"`, the
    baseline) the cache's teacher run on the views; normalised as loss.target_norm says, with the cache's stats."""

    codec: Any
    teacher: torch.nn.Module | None
    norm: str
    mean: torch.Tensor | None
    var: torch.Tensor | None

    def __call__(self, batch: dict, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [B, 3, S, S] on the device -> targets [B, T, C]."""
        if self.teacher is not None:
            tokens = self.teacher(images)
        else:
            tokens = self.codec.decode_tensor(batch["tokens"].to(images.device, non_blocking=True))
        return normalize_targets(tokens, self.norm, self.mean, self.var)


@dataclass
class Pace:
    """Seconds spent waiting for data and computing since the metrics row of step `since`."""

    since: int
    wait: float = 0.0
    busy: float = 0.0


@dataclass
class Run:
    """One training run as `setup` builds it; `pos` and `skipping` move as it trains."""

    cfg: Config
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    index: data.CacheIndex
    mode: str  # the reader: "random" or "stream"
    sched: Schedule
    targets: Targets
    pixels: tuple[torch.Tensor, torch.Tensor]  # ImageNet mean and std in uint8 units, [1, 3, 1, 1]
    ckpts: Checkpoints
    guard: StepGuard
    trace: StepTrace
    log: MetricsLog | None  # the main process's metrics.jsonl
    bar: Any
    pos: Position  # updates taken and the data position, restored from the checkpoint a resume starts at
    skipping: bool = False  # a micro-batch of this update had a non-finite loss: the update is skipped
    pace: Pace = field(default_factory=lambda: Pace(0))
    last: dict = field(default_factory=dict)  # the latest metrics row, in the summary
    probe: KnnProbe = field(default_factory=KnnProbe)  # train.eval_every's k-NN probe, its row keys on the main process


def train(cfg: Config, progress: bool = True) -> dict:
    """Checks everything it can before any work, then trains holding the run dir's lock; SIGTERM / SIGUSR1 / SIGINT
    end it after the current step with a checkpoint (summary["preempted"], ["signal"]). The main process records
    the run's exit status in <run_dir>/exit_status (train/rundir.py: what a job script reads behind a launcher)."""
    resolve_student(cfg.student)  # 0 = the arch's value: checked as the values that will be built
    validate(cfg, "train")
    cache = as_path(cfg.cache.path)  # a local path, or a URL (read only: shards/urlpath.py)
    manifest = read_manifest(cache)
    check_replay(manifest)  # this machine cuts the pixels the teacher saw, or a clear error before any work
    check_mask_ratio(cfg.student.mask_ratio, manifest.tokens)
    check_student_patch(cfg.student.arch, manifest.stride)  # the student's patch tiles the teacher's tokens
    index = data.CacheIndex(cache, manifest, source_urls(manifest, cfg.data.shards))
    check_target_stats(cfg, manifest)
    check_sources(index.urls)
    mode = data.reader_mode(index, cfg.train.reader)
    run_dir = Path(cfg.train.run_dir)
    lock, main = RunDirLock(run_dir), int(os.environ.get("RANK", 0)) == 0  # accelerate / torchrun set RANK
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    status = 1
    try:
        if main:
            write_exit_status(run_dir, "running")
        with StopSignals() as stop:
            run = setup(cfg, manifest, index, mode, stop, progress)
            summary = close(run, fit(run, stop), stop)
        status = exit_status(summary)
        return summary
    except BaseException as e:
        status = error_status(e)
        raise
    finally:
        if main:
            write_exit_status(run_dir, status)
        lock.release()


def check_target_stats(cfg: Config, manifest: Manifest) -> None:
    """loss.target_norm = "channel" needs the channel statistics extraction merges into the manifest once every shard
    is recorded: a cache whose extraction stopped between its last shard and that is refused before any step."""
    if cfg.loss.target_norm == "channel" and manifest.stats is None:
        raise ConfigError(f"cache {cfg.cache.path}: every shard is recorded but manifest.json has no channel statistics "
                          "yet (extraction stopped before finalising it), and loss.target_norm = 'channel' needs them. "
                          "Rerun extract-features with the same config: it skips the finished shards and finalises "
                          "the manifest. Or set loss.target_norm to 'layernorm' or 'none'")


def make_accelerator(t: TrainConfig) -> Any:
    from accelerate import Accelerator

    cpu = t.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, gradient_accumulation_steps=t.grad_accum,
                       mixed_precision="no" if cpu or not torch.cuda.is_bf16_supported() else "bf16",
                       log_with=t.log_with or None, project_dir=str(Path(t.run_dir)))


def setup(cfg: Config, manifest: Manifest, index: data.CacheIndex, mode: str, stop: StopSignals, progress: bool) -> Run:
    """The accelerator, schedule, student, optimizer and targets; the run dir's identity checked and its newest
    usable checkpoint loaded (every rank); the metrics log, step guard, key trace and progress bar."""
    from accelerate.utils import set_seed
    from tqdm import tqdm

    t = cfg.train
    check_trackers(t.log_with)
    probe = KnnProbe.of(t, manifest.augment.size)  # off unless train.eval_every; its shards checked
    accelerator = make_accelerator(t)
    set_seed(t.seed)  # before the student is built: its initial weights come from this seed
    device, is_main = accelerator.device, accelerator.is_main_process
    sched = Schedule.of(t, len(index), accelerator.num_processes)
    if is_main:
        print(f"data: {len(index)} samples in {len(index.names)} shards, {mode} reader, {sched.micro_per_epoch} "
              f"steps of {accelerator.num_processes} x {t.batch_size} per epoch", file=sys.stderr)
    model = build_student(cfg, manifest.token_grid, manifest.augment.size)
    if t.compile:
        compile_student(model)
    if is_main:
        print(describe_student(cfg.student), file=sys.stderr)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=sched.peak, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = cache_teacher(manifest, device=device) if t.targets == "online" else None  # the baseline
    if teacher is not None and cfg.teacher.compile:
        compile_forward(teacher, "teacher.compile: the online teacher")
    stats = manifest.stats
    targets = Targets(manifest.token_codec, teacher, cfg.loss.target_norm,
                      mean=torch.tensor(stats.mean, device=device) if stats else None,
                      var=torch.tensor(stats.var, device=device) if stats else None)
    pixels = pixel_scale(device)

    run_dir = Path(t.run_dir)
    ckpts = Checkpoints(run_dir, t.keep_checkpoints)
    # the run's identity checked (the data plan's too), its newest usable checkpoint loaded
    pos = open_run(accelerator, cfg, manifest, ckpts, index.plan_identity(mode, t.workers, t.shuffle_buffer), sched)
    start_trackers(accelerator, cfg, pos.step)
    # rows of steps a killed run took past its last checkpoint, and a torn last row, are dropped
    log = MetricsLog(run_dir / "metrics.jsonl", pos.step) if is_main else None
    guard = StepGuard(accelerator, stop, t.on_nonfinite, ckpts.latest)
    trace = StepTrace(run_dir, accelerator.process_index, t.trace_keys)
    bar = tqdm(total=sched.total_steps(pos), initial=pos.step, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    return Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, index=index, mode=mode, sched=sched,
               targets=targets, pixels=pixels, ckpts=ckpts, guard=guard, trace=trace, log=log, bar=bar, pos=pos,
               pace=Pace(since=pos.step), probe=probe)


def fit(run: Run, stop: StopSignals) -> bool:
    """The cadence: micro-batches in order from the run's position, an update every train.grad_accum of them (an
    update may span two epochs), a metrics row every train.log_every updates, a checkpoint every
    train.checkpoint_every (and at the end and on a stop). True if it stopped on a signal."""
    t, accelerator, sched, pos = run.cfg.train, run.accelerator, run.sched, run.pos
    run.model.train()
    batches = micro_batches(run)
    starts = True  # the next micro-batch starts an update
    try:
        while not sched.done(pos):
            if starts:  # the update's learning rate and epoch are those of the position it starts at
                epoch, lr = pos.epoch, sched.lr(pos)
                for g in run.optimizer.param_groups:
                    g["lr"] = lr
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            out, stopping = train_step(run, batch, pos.micro - 1)
            run.pace.wait, run.pace.busy = run.pace.wait + t1 - t0, run.pace.busy + time.perf_counter() - t1
            starts = accelerator.sync_gradients
            if not starts:  # a micro-batch within the update
                continue
            pos.step += 1
            run.bar.update(1)
            probing = run.probe.due(pos.step, sched.done(pos))
            if pos.step % t.log_every == 0 or sched.done(pos) or probing:
                log_metrics(run, out, epoch, probing)
            if pos.step % t.checkpoint_every == 0 or sched.done(pos) or stopping:
                run.ckpts.save(accelerator, pos.step, pos.to_dict())
            fault_point("step", str(pos.step))
            if stopping:  # SIGTERM / SIGUSR1 / SIGINT on some rank: every rank stops here, checkpointed
                if accelerator.is_main_process:
                    print(f"stopping at step {pos.step} on {stop.received or 'a signal to another rank'}: checkpoint "
                          f"{run.ckpts.latest()}; rerun the same command to resume", file=sys.stderr)
                return True
    except (RuntimeError, OSError) as e:  # torch's "DataLoader worker ... killed by signal" is a RuntimeError
        data.raise_if_a_worker_died(e, t.workers, t.batch_size, run.ckpts.latest())
        raise_if_out_of_files(e, t.workers)
        raise
    finally:
        batches.close()  # the loader's workers shut down
    return False


def raise_if_out_of_files(e: BaseException, workers: int) -> None:
    """EMFILE (also inside torch's RuntimeError "Too many open files") as a ConfigError saying what to change: the
    loader's workers, their queues and the batches they hand over all take descriptors."""
    cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
    if isinstance(cause, OSError) and cause.errno == errno.EMFILE:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        raise ConfigError(f"too many open files: this process may have {soft} open (`ulimit -n`; the hard limit is "
                          f"{hard}), too few for {workers} DataLoader workers. Raise the limit (e.g. `ulimit -n 65536` "
                          "in the job script) or lower train.workers") from None


def micro_batches(run: Run):
    """This rank's micro-batches from the run's position on, epoch after epoch, from ONE DataLoader for the run
    (train/data.py: RunData): its workers persist across epochs with the files they read, so an epoch starts without
    a new pool of workers or a file opened. The position moves past each batch as it is handed out, so a checkpoint
    after an update records where the next one starts; when what is left of an epoch is less than one global batch
    (dropped), the position moves to the next epoch's start, as the loader's sequence does."""
    t, accelerator, pos = run.cfg.train, run.accelerator, run.pos
    per_batch = accelerator.num_processes * t.batch_size
    deal = data.Deal(run.index.counts, seed=t.seed, world=accelerator.num_processes, rank=accelerator.process_index,
                     batch_size=t.batch_size, mode=run.mode, workers=t.workers, buffer=t.shuffle_buffer)
    dataset = data.RunData(run.index, deal, epoch=pos.epoch, consumed=pos.consumed,
                           with_tokens=run.targets.teacher is None, on_corrupt=t.on_corrupt)
    for batch in data.make_loader(dataset, t.workers):
        pos.micro, pos.consumed = pos.micro + 1, pos.consumed + per_batch
        if len(run.index) - pos.consumed < per_batch:
            pos.epoch, pos.consumed = pos.epoch + 1, 0
        yield batch


def train_step(run: Run, batch: dict, batch_index: int) -> tuple[dict, bool]:
    """One micro-batch: its targets; its masks, drawn from (seed, rank, batch_index) so that a resume draws the same;
    forward and backward; at the update's last micro-batch the clipping and the optimizer step, skipped on every
    rank when a loss of this update was not finite on some rank. -> (the student's losses, stop after this step)."""
    cfg, t, accelerator = run.cfg, run.cfg.train, run.accelerator
    device = accelerator.device
    n_masks = len(batch["keys"]) * cfg.student.masks_per_view
    generator = step_generator(t.seed, accelerator.process_index, batch_index)
    unit_mask = accelerator.unwrap_model(run.model).draw_mask(n_masks, "cpu", generator)
    run.trace.write(run.pos.step, batch["keys"], unit_mask)
    images = batch["images"].to(device, non_blocking=True)
    targets = run.targets(batch, images)
    pix_mean, pix_std = run.pixels
    with accelerator.accumulate(run.model):
        out = run.model(normalize_pixels(images, pix_mean, pix_std), targets, unit_mask=unit_mask.to(device),
                        beta=cfg.loss.beta, global_weight=cfg.loss.global_weight)
        nonfinite, stopping = run.guard.check(out["loss"], run.pos.step)  # every rank gets the same answer
        run.skipping = run.skipping or nonfinite  # one non-finite micro-batch skips the whole update
        accelerator.backward(out["loss"])  # also when skipping: ranks stay in lockstep
        if accelerator.sync_gradients and t.clip_grad > 0 and not run.skipping:
            accelerator.clip_grad_norm_(run.model.parameters(), t.clip_grad)
        if not run.skipping:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients:  # this update is done (or skipped): the next starts clean
        run.skipping = False
    return out, stopping


def log_metrics(run: Run, out: dict, epoch: int, probing: bool = False) -> None:
    """A metrics row: the losses averaged over ranks, the lr, samples/s and the share of the time spent waiting
    for data since the last row, and the steps skipped as non-finite; when `probing`, the encoder's k-NN top-1
    (train/probe.py, on the main process)."""
    t, accelerator, pace = run.cfg.train, run.accelerator, run.pace
    losses = accelerator.reduce(torch.stack([out["loss"], out["patch_loss"], out["global_loss"]]).detach(),
                                "mean").tolist()
    step = run.pos.step
    samples = (step - pace.since) * t.grad_accum * t.batch_size * accelerator.num_processes
    seconds = max(pace.wait + pace.busy, 1e-9)
    run.last = {"step": step, "epoch": epoch, "loss": losses[0], "patch_loss": losses[1],
                "global_loss": losses[2], "lr": run.optimizer.param_groups[0]["lr"],
                "samples_per_s": samples / seconds, "data_wait": pace.wait / seconds, "skipped_steps": run.guard.skipped}
    if probing and accelerator.is_main_process:
        with accelerator.autocast():  # the training's precision (bf16 on a GPU)
            run.last.update(run.probe(accelerator.unwrap_model(run.model)))
    run.pace = Pace(since=step)
    if run.log:
        run.log.write(run.last)
        run.bar.set_postfix(loss=f"{losses[0]:.4f}", wait=f"{run.last['data_wait']:.0%}")
    accelerator.log(run.last, step=step)


def close(run: Run, preempted: bool, stop: StopSignals) -> dict:
    """The summary: the latest metrics row, then where the run ended (a stop may come after that row)."""
    run.bar.close()
    run.accelerator.end_training()
    run.trace.close()
    if run.log:
        run.log.close()
    return {**run.last, "step": run.pos.step, "epoch": run.pos.epoch, "run_dir": str(Path(run.cfg.train.run_dir)),
            "rank": run.accelerator.process_index, "preempted": preempted, "signal": stop.received}


# the exit status of a run that ended in one of these (a crash otherwise: 1); main prints their message alone
ERROR_STATUS = (((ConfigError, CacheError, ShardError), 2), ((DiskFull,), 3), ((NonFinite, data.WorkerDied), 1))
REPORTED = tuple(kind for kinds, _ in ERROR_STATUS for kind in kinds)


def error_status(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):  # a Ctrl-C before the handlers were set
        return status_of("SIGINT")
    return next((code for kinds, code in ERROR_STATUS if isinstance(e, kinds)), 1)


def exit_status(summary: dict) -> int:
    """0 done; after a stop, 75 (SIGTERM / SIGUSR1, or a signal to another rank) or 130 (SIGINT): common/signals.py."""
    return status_of(summary["signal"]) if summary["preempted"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train", description="Img2Vec student training from a feature cache "
                                "(run under `accelerate launch -m train` for several processes)")
    add_config_args(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, progress=not args.no_progress)
    except REPORTED as e:  # a DataLoader worker's CacheError / ShardError too (data.Loader raises it as is)
        print(f"train: error: {e.strerror if isinstance(e, DiskFull) else str(e).strip()}", file=sys.stderr)
        return error_status(e)
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return exit_status(summary)
