"""Stage two: `accelerate launch -m train --config pipeline.toml [--set section.key=value ...]`.

`setup` builds a run (accelerator, schedule, student, optimizer, targets, run dir and resume) into one `Run`;
`train_step` takes one micro-batch through targets, masks, forward/backward, clipping, the update and the
non-finite guard; `fit` keeps the cadence (log, checkpoint, stop). Data lives in train/data.py, the student in
train/model.py, checkpoints in train/checkpoints.py, the run dir (lock, identity, metrics) in train/rundir.py,
the per-step stop / non-finite decision in train/preempt.py. Checkpoints resume at the exact batch: the step,
optimizer, RNG states and data position (epoch + batches into it) are restored.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.augment import normalize_pixels, pixel_scale
from common.config import (Config, ConfigError, add_config_args, check_mask_ratio, check_student_patch, load_config,
                           validate)
from common.config import Train as TrainConfig
from common.faults import fault_point
from common.signals import PREEMPTED, StopSignals
from shards.errors import CacheError
from shards.manifest import Manifest, cache_teacher, check_replay, read_manifest, source_urls
from shards.source import ShardError
from shards.urlpath import as_path
from train import data
from train.checkpoints import Checkpoints, DiskFull, NonFinite
from train.losses import normalize_targets
from train.masking import step_generator
from train.model import build_student, describe_student, param_groups, resolve_student
from train.preempt import StepGuard
from train.probe import KnnProbe
from train.rundir import MetricsLog, RunDirLock, StepTrace, check_sources, open_run
from train.trackers import check_trackers, start_trackers


@dataclass
class Schedule:
    """How long the run is and its learning rate; a step is one update of `train.grad_accum` micro-batches."""

    batches_per_epoch: int  # micro-batches of one rank
    total: int  # steps
    warmup: int  # steps
    peak: float  # train.lr scaled by the global batch / 256
    floor: float

    @classmethod
    def of(cls, t: TrainConfig, samples: int, world: int) -> Schedule:
        batches_per_epoch = data.steps_per_epoch(samples, world, t.batch_size)
        if batches_per_epoch == 0:
            raise ConfigError(f"the cache holds {samples} samples: too few for {world} processes x "
                              f"train.batch_size {t.batch_size}")
        steps_per_epoch = max(batches_per_epoch // t.grad_accum, 1)
        total = t.max_steps or t.epochs * steps_per_epoch
        return cls(batches_per_epoch, total, warmup=min(int(t.warmup_epochs * steps_per_epoch), total // 2),
                   peak=t.lr * t.batch_size * world * t.grad_accum / 256, floor=t.min_lr)

    def lr(self, step: int) -> float:
        """Linear warmup, then half-cosine from `peak` to `floor` (as MAE's adjust_learning_rate, per step)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        x = (step - self.warmup) / max(self.total - self.warmup, 1)
        return self.floor + (self.peak - self.floor) * 0.5 * (1 + math.cos(math.pi * min(x, 1.0)))


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
    """One training run as `setup` builds it; `step` and `skipping` move as it trains."""

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
    step: int  # updates taken, restored from the checkpoint a resume starts at
    skipping: bool = False  # a micro-batch of this update had a non-finite loss: the update is skipped
    pace: Pace = field(default_factory=lambda: Pace(0))
    last: dict = field(default_factory=dict)  # the latest metrics row, in the summary
    probe: KnnProbe = field(default_factory=KnnProbe)  # train.eval_every's k-NN probe, its row keys on the main process


def train(cfg: Config, progress: bool = True) -> dict:
    """Checks everything it can before any work, then trains holding the run dir's lock; SIGTERM / SIGUSR1
    end it after the current step with a checkpoint (summary["preempted"])."""
    resolve_student(cfg.student)  # 0 = the arch's value: checked as the values that will be built
    validate(cfg, "train")
    cache = as_path(cfg.cache.path)  # a local path, or a URL (read only: shards/urlpath.py)
    manifest = read_manifest(cache)
    check_replay(manifest)  # this machine cuts the pixels the teacher saw, or a clear error before any work
    check_mask_ratio(cfg.student.mask_ratio, manifest.tokens)
    check_student_patch(cfg.student.arch, manifest.stride)  # the student's patch tiles the teacher's tokens
    index = data.CacheIndex(cache, manifest, source_urls(manifest, cfg.data.shards))
    check_sources(index.urls)
    mode = data.reader_mode(index, cfg.train.reader)
    lock = RunDirLock(Path(cfg.train.run_dir))
    if int(os.environ.get("RANK", 0)) == 0:  # the main process (accelerate / torchrun set RANK)
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        with StopSignals() as stop:
            run = setup(cfg, manifest, index, mode, stop, progress)
            preempted = fit(run, stop)
            return close(run, preempted)
    finally:
        lock.release()


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
        print(f"data: {len(index)} samples in {len(index.names)} shards, {mode} reader, {sched.batches_per_epoch} "
              f"steps of {accelerator.num_processes} x {t.batch_size} per epoch", file=sys.stderr)
    model = build_student(cfg, manifest.token_grid, manifest.augment.size)
    if is_main:
        print(describe_student(cfg.student), file=sys.stderr)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=sched.peak, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = cache_teacher(manifest, device=device) if t.targets == "online" else None  # the baseline
    stats = manifest.stats
    targets = Targets(manifest.token_codec, teacher, cfg.loss.target_norm,
                      mean=torch.tensor(stats.mean, device=device) if stats else None,
                      var=torch.tensor(stats.var, device=device) if stats else None)
    pixels = pixel_scale(device)

    run_dir = Path(t.run_dir)
    ckpts = Checkpoints(run_dir, t.keep_checkpoints)
    # the run's identity checked (the data plan's too), its newest usable checkpoint loaded
    step = open_run(accelerator, cfg, manifest, ckpts, index.plan_identity(mode, t.workers, t.shuffle_buffer))
    start_trackers(accelerator, cfg)
    # rows of steps a killed run took past its last checkpoint, and a torn last row, are dropped
    log = MetricsLog(run_dir / "metrics.jsonl", step) if is_main else None
    guard = StepGuard(accelerator, stop, t.on_nonfinite, ckpts.latest)
    trace = StepTrace(run_dir, accelerator.process_index, t.trace_keys)
    bar = tqdm(total=sched.total, initial=step, disable=not (progress and is_main), unit="step", dynamic_ncols=True)
    return Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, index=index, mode=mode, sched=sched,
               targets=targets, pixels=pixels, ckpts=ckpts, guard=guard, trace=trace, log=log, bar=bar, step=step,
               pace=Pace(since=step), probe=probe)


def fit(run: Run, stop: StopSignals) -> bool:
    """The cadence: micro-batches in order from the run's position, an update every train.grad_accum of them, a
    metrics row every train.log_every updates, a checkpoint every train.checkpoint_every (and at the end and on a
    stop). True if it stopped on a signal."""
    t, accelerator, sched = run.cfg.train, run.accelerator, run.sched
    run.model.train()
    while run.step < sched.total:
        epoch, skip = divmod(run.step * t.grad_accum, sched.batches_per_epoch)  # the position follows the step
        it = iter(epoch_loader(run, epoch, skip))
        for batch_index in range(epoch * sched.batches_per_epoch + skip, (epoch + 1) * sched.batches_per_epoch):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            out, stopping = train_step(run, batch, batch_index)
            run.pace.wait, run.pace.busy = run.pace.wait + t1 - t0, run.pace.busy + time.perf_counter() - t1
            if not accelerator.sync_gradients:  # a micro-batch within the update
                continue
            run.step += 1
            run.bar.update(1)
            probing = run.probe.due(run.step, run.step == sched.total)
            if run.step % t.log_every == 0 or run.step == sched.total or probing:
                log_metrics(run, out, epoch, probing)
            if run.step % t.checkpoint_every == 0 or run.step == sched.total or stopping:
                run.ckpts.save(accelerator, run.step, {"step": run.step, "epoch": epoch})
            fault_point("step", str(run.step))
            if stopping:  # SIGTERM / SIGUSR1 on some rank: every rank stops here, checkpointed
                if accelerator.is_main_process:
                    print(f"stopping at step {run.step} on {stop.received or 'a signal to another rank'}: checkpoint "
                          f"{run.ckpts.latest()}; rerun the same command to resume", file=sys.stderr)
                return True
            if run.step == sched.total:
                break
        del it
    return False


def epoch_loader(run: Run, epoch: int, skip: int):
    """This rank's micro-batches of `epoch`, from its `skip`-th on."""
    t, accelerator = run.cfg.train, run.accelerator
    plan = data.epoch_plan(run.index.counts, epoch, t.seed, world=accelerator.num_processes,
                           rank=accelerator.process_index, batch_size=t.batch_size, mode=run.mode, workers=t.workers,
                           buffer=t.shuffle_buffer)
    dataset = data.EpochData(run.index, plan, epoch, t.seed, start=skip, mode=run.mode,
                             with_tokens=run.targets.teacher is None, on_corrupt=t.on_corrupt)
    return data.make_loader(dataset, t.workers)


def train_step(run: Run, batch: dict, batch_index: int) -> tuple[dict, bool]:
    """One micro-batch: its targets; its masks, drawn from (seed, rank, batch_index) so that a resume draws the same;
    forward and backward; at the update's last micro-batch the clipping and the optimizer step, skipped on every
    rank when a loss of this update was not finite on some rank. -> (the student's losses, stop after this step)."""
    cfg, t, accelerator = run.cfg, run.cfg.train, run.accelerator
    device = accelerator.device
    n_masks = len(batch["keys"]) * cfg.student.masks_per_view
    generator = step_generator(t.seed, accelerator.process_index, batch_index)
    unit_mask = accelerator.unwrap_model(run.model).draw_mask(n_masks, "cpu", generator)
    run.trace.write(run.step, batch["keys"], unit_mask)
    images = batch["images"].to(device, non_blocking=True)
    targets = run.targets(batch, images)
    for g in run.optimizer.param_groups:
        g["lr"] = run.sched.lr(run.step)
    pix_mean, pix_std = run.pixels
    with accelerator.accumulate(run.model):
        out = run.model(normalize_pixels(images, pix_mean, pix_std), targets, unit_mask=unit_mask.to(device),
                        beta=cfg.loss.beta, global_weight=cfg.loss.global_weight)
        nonfinite, stopping = run.guard.check(out["loss"], run.step)  # every rank gets the same answer
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
    samples = (run.step - pace.since) * t.grad_accum * t.batch_size * accelerator.num_processes
    seconds = max(pace.wait + pace.busy, 1e-9)
    run.last = {"step": run.step, "epoch": epoch, "loss": losses[0], "patch_loss": losses[1],
                "global_loss": losses[2], "lr": run.optimizer.param_groups[0]["lr"],
                "samples_per_s": samples / seconds, "data_wait": pace.wait / seconds, "skipped_steps": run.guard.skipped}
    if probing and accelerator.is_main_process:
        run.last.update(run.probe(accelerator.unwrap_model(run.model)))
    run.pace = Pace(since=run.step)
    if run.log:
        run.log.write(run.last)
        run.bar.set_postfix(loss=f"{losses[0]:.4f}", wait=f"{run.last['data_wait']:.0%}")
    accelerator.log(run.last, step=run.step)


def close(run: Run, preempted: bool) -> dict:
    run.bar.close()
    run.accelerator.end_training()
    run.trace.close()
    if run.log:
        run.log.close()
    return {"step": run.step, "run_dir": str(Path(run.cfg.train.run_dir)), "rank": run.accelerator.process_index,
            **run.last, "preempted": preempted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train", description="Img2Vec student training from a feature cache "
                                "(run under `accelerate launch -m train` for several processes)")
    add_config_args(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, progress=not args.no_progress)
    except (ConfigError, CacheError, ShardError) as e:  # a DataLoader worker's too (data.Loader raises it as is)
        print(f"train: error: {str(e).strip()}", file=sys.stderr)
        return 2
    except DiskFull as e:
        print(f"train: error: {e.strerror}", file=sys.stderr)
        return 3
    except NonFinite as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return PREEMPTED if summary["preempted"] else 0
