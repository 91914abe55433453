"""Stage two: `accelerate launch -m train --config pipeline.toml [--set section.key=value ...]`.

The loop fits on a screen; data lives in train/data.py, the student in train/model.py, the
schedule below, checkpoints in train/checkpoints.py, the run dir (lock, identity, metrics) in
train/rundir.py, the per-step stop / non-finite decision in train/preempt.py. Checkpoints resume at
the exact batch: the step, optimizer, RNG states and data position (epoch + batches into it) are restored.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from common.codecs import get_codec
from common.config import Config, ConfigError, add_config_args, check_mask_ratio, load_config, validate
from common.faults import fault_point
from common.signals import PREEMPTED, StopSignals
from common.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher
from shards.features import CacheError, check_replay, read_manifest, source_urls
from shards.source import ShardError
from shards.urlpath import as_path
from train import data
from train.losses import normalize_targets
from train.checkpoints import Checkpoints, DiskFull, NonFinite
from train.model import build_student, describe_student, param_groups, resolve_student
from train.preempt import StepGuard
from train.masking import step_generator
from train.rundir import MetricsLog, RunDirLock, StepTrace, check_sources, open_run


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup, then half-cosine from `peak` to `floor` (as MAE's adjust_learning_rate, per step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def online_teacher(cfg: Config, manifest: dict, device):
    """The teacher of the cache, run in the step (the baseline); its weights must hash as the manifest says."""
    tcfg = cfg.teacher
    tcfg.arch, tcfg.layer = manifest["teacher"]["arch"], manifest["teacher"]["layer"]
    tcfg.weights = manifest.get("teacher_weights", tcfg.weights)
    tcfg.seed = manifest.get("teacher_seed", tcfg.seed)
    tcfg.dtype = manifest["teacher"].get("precision", tcfg.dtype)  # the precision the cache was computed in
    teacher = build_teacher(tcfg, device)
    if teacher.fingerprint["sha256"] != manifest["teacher"]["sha256"]:
        raise CacheError(f"online teacher {tcfg.weights} hashes to {teacher.fingerprint['sha256'][:12]}, the cache "
                         f"was made by {manifest['teacher']['sha256'][:12]}")
    return teacher


def train(cfg: Config, progress: bool = True) -> dict:
    """Checks everything it can before any work, then trains holding the run dir's lock; SIGTERM / SIGUSR1
    end it after the current step with a checkpoint (summary["preempted"])."""
    resolve_student(cfg.student)  # 0 = the arch's value: checked as the values that will be built
    validate(cfg, "train")
    cache = as_path(cfg.cache.path)  # a local path, or a URL (read only: shards/urlpath.py)
    manifest = read_manifest(cache)
    check_replay(manifest)  # this machine cuts the pixels the teacher saw, or a clear error before any work
    check_mask_ratio(cfg.student.mask_ratio, manifest["token_shape"][0])
    index = data.CacheIndex(cache, manifest, source_urls(manifest, cfg.data.shards))
    check_sources(index.urls)
    mode = data.reader_mode(index, cfg.train.reader)
    lock = RunDirLock(Path(cfg.train.run_dir))
    if int(os.environ.get("RANK", 0)) == 0:  # the main process (accelerate / torchrun set RANK)
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        with StopSignals() as stop:
            return _train(cfg, manifest, index, mode, stop, progress)
    finally:
        lock.release()


def _train(cfg: Config, manifest: dict, index: data.CacheIndex, mode: str, stop: StopSignals, progress: bool) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    t = cfg.train
    run_dir = Path(t.run_dir)
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=t.grad_accum,
                              mixed_precision="no" if cpu or not torch.cuda.is_bf16_supported() else "bf16",
                              log_with="tensorboard" if t.tensorboard else None, project_dir=str(run_dir))
    set_seed(t.seed)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    batches_per_epoch = data.steps_per_epoch(len(index), world, t.batch_size)
    if batches_per_epoch == 0:
        raise ConfigError(f"the cache holds {len(index)} samples: too few for {world} processes x "
                          f"train.batch_size {t.batch_size}")
    if accelerator.is_main_process:
        print(f"data: {len(index)} samples in {len(index.names)} shards, {mode} reader, {batches_per_epoch} steps "
              f"of {world} x {t.batch_size} per epoch", file=sys.stderr)
    steps_per_epoch = max(batches_per_epoch // t.grad_accum, 1)
    total = t.max_steps or t.epochs * steps_per_epoch
    warmup = min(int(t.warmup_epochs * steps_per_epoch), total // 2)
    peak = t.lr * t.batch_size * world * t.grad_accum / 256

    model = build_student(cfg, manifest)
    if accelerator.is_main_process:
        print(describe_student(cfg.student), file=sys.stderr)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=peak, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = online_teacher(cfg, manifest, device) if t.targets == "online" else None
    codec = get_codec(manifest["codec"]["name"])
    stats = manifest.get("stats") or {}
    mean = torch.tensor(stats["mean"], device=device) if "mean" in stats else None
    var = torch.tensor(stats["var"], device=device) if "var" in stats else None
    pix_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    pix_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    ckpts = Checkpoints(run_dir, t.keep_checkpoints)
    # the run's identity checked (the data plan's too), its newest usable checkpoint loaded
    step = open_run(accelerator, cfg, manifest, ckpts, index.plan_identity(mode, t.workers, t.shuffle_buffer))
    if cfg.train.tensorboard:
        accelerator.init_trackers("img2vec")

    # rows of steps a killed run took past its last checkpoint, and a torn last row, are dropped
    log = MetricsLog(run_dir / "metrics.jsonl", step) if accelerator.is_main_process else None
    guard = StepGuard(accelerator, stop, t.on_nonfinite, ckpts.latest)
    skipping = preempted = False
    trace = StepTrace(run_dir, rank, t.trace_keys)
    bar = tqdm(total=total, initial=step, disable=not (progress and accelerator.is_main_process), unit="step",
               dynamic_ncols=True)
    model.train()
    wait = busy = 0.0
    logged_at = step
    last = {}
    while step < total and not preempted:
        batch_index = step * t.grad_accum
        epoch, skip = divmod(batch_index, batches_per_epoch)
        plan = data.epoch_plan(index.counts, epoch, t.seed, world, rank, t.batch_size, mode, t.workers, t.shuffle_buffer)
        dataset = data.EpochData(index, plan, epoch, t.seed, start=skip, mode=mode, with_tokens=teacher is None,
                                 on_corrupt=t.on_corrupt)
        it = iter(data.make_loader(dataset, t.workers))
        for batch_index in range(epoch * batches_per_epoch + skip, (epoch + 1) * batches_per_epoch):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            n_masks = len(batch["keys"]) * cfg.student.masks_per_view
            unit_mask = accelerator.unwrap_model(model).draw_mask(n_masks, "cpu", step_generator(t.seed, rank, batch_index))
            trace.write(step, batch["keys"], unit_mask)
            images = batch["images"].to(device, non_blocking=True)
            if teacher is not None:
                tokens = teacher(images)
            else:
                tokens = codec.decode_tensor(batch["tokens"].to(device, non_blocking=True))
            targets = normalize_targets(tokens, cfg.loss.target_norm, mean, var)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, warmup, peak, t.min_lr)
            with accelerator.accumulate(model):
                out = model((images.float() - pix_mean) / pix_std, targets, unit_mask=unit_mask.to(device), beta=cfg.loss.beta,
                            global_weight=cfg.loss.global_weight)
                nonfinite, stopping = guard.check(out["loss"], step)  # every rank gets the same answer
                skipping = skipping or nonfinite  # one non-finite micro-batch skips the whole update
                accelerator.backward(out["loss"])  # also when skipping: ranks stay in lockstep
                if accelerator.sync_gradients and t.clip_grad > 0 and not skipping:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                if not skipping:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            wait, busy = wait + t1 - t0, busy + time.perf_counter() - t1
            if not accelerator.sync_gradients:
                continue
            step, skipping = step + 1, False
            bar.update(1)
            if step % t.log_every == 0 or step == total:
                losses = accelerator.reduce(torch.stack([out["loss"], out["patch_loss"], out["global_loss"]]).detach(),
                                            "mean").tolist()
                samples = (step - logged_at) * t.grad_accum * t.batch_size * world
                last = {"step": step, "epoch": epoch, "loss": losses[0], "patch_loss": losses[1],
                        "global_loss": losses[2], "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_s": samples / max(wait + busy, 1e-9), "data_wait": wait / max(wait + busy, 1e-9),
                        "skipped_steps": guard.skipped}
                wait, busy, logged_at = 0.0, 0.0, step
                if log:
                    log.write(last)
                    bar.set_postfix(loss=f"{losses[0]:.4f}", wait=f"{last['data_wait']:.0%}")
                accelerator.log(last, step=step)
            if step % t.checkpoint_every == 0 or step == total or stopping:
                ckpts.save(accelerator, step, {"step": step, "epoch": epoch})
            fault_point("step", str(step))
            if stopping:  # SIGTERM / SIGUSR1 on some rank: every rank stops here, checkpointed
                preempted = True
                if accelerator.is_main_process:
                    print(f"stopping at step {step} on {stop.received or 'a signal to another rank'}: checkpoint "
                          f"{ckpts.latest()}; rerun the same command to resume", file=sys.stderr)
                break
            if step == total:
                break
        del it
    bar.close()
    accelerator.end_training()
    trace.close()
    if log:
        log.close()
    return {"step": step, "run_dir": str(run_dir), "rank": rank, **last, "preempted": preempted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train", description="Img2Vec student training from a feature cache "
                                "(run under `accelerate launch -m train` for several processes)")
    add_config_args(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, progress=not args.no_progress)
    except (ConfigError, CacheError, ShardError) as e:
        msg = str(e).strip()
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the worker's own message
            msg = msg.splitlines()[-1].split(": ", 1)[-1]
        print(f"train: error: {msg}", file=sys.stderr)
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
