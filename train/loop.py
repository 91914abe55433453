"""Stage two: `accelerate launch -m train --config pipeline.toml [--set section.key=value ...]`.

The loop fits on a screen; data lives in train/data.py, the student in train/model.py, the
schedule and checkpoints below. Checkpoints resume at the exact batch: the step, optimizer,
RNG states and data position (epoch + batches into it) are restored.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from common.config import Config, ConfigError, add_config_args, load_config
from common.faults import fault_point
from common.teacher import IMAGENET_MEAN, IMAGENET_STD, build_teacher
from shards.features import CacheError, read_manifest
from shards.source import ShardError
from shards.features import source_urls
from train.data import CachedViews, check_cache, make_loader, plan_epoch
from train.losses import normalize_targets
from train.model import STUDENTS, describe_student, param_groups, resolve_student


def build_student(cfg: Config, manifest: dict) -> torch.nn.Module:
    s = resolve_student(cfg.student)  # 0 = the arch's value, written into cfg (and so into config.json)
    tokens, channels = manifest["token_shape"]
    size = manifest["augment"]["size"]
    return STUDENTS[s.arch](img_size=size, teacher_dim=channels, teacher_stride=size // math.isqrt(tokens),
                            decoder_depth=s.decoder_depth, decoder_dim=s.decoder_dim, decoder_heads=s.decoder_heads,
                            head_hidden=s.head_hidden, multi_block=s.multi_block, mask_ratio=s.mask_ratio,
                            masks_per_view=s.masks_per_view)


def drop_rows_after(path: Path, step: int) -> None:
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


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
    teacher = build_teacher(tcfg, device)
    if teacher.fingerprint["sha256"] != manifest["teacher"]["sha256"]:
        raise CacheError(f"online teacher {tcfg.weights} hashes to {teacher.fingerprint['sha256'][:12]}, the cache "
                         f"was made by {manifest['teacher']['sha256'][:12]}")
    return teacher


class Checkpoints:
    """`<run_dir>/checkpoints/step_XXXXXXXX/` written by accelerator.save_state, renamed when complete."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir, self.keep = run_dir / "checkpoints", keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.dir.glob("step_*") if (p / "position.json").exists() and "." not in p.name)
        return done[-1] if done else None

    def save(self, accelerator, step: int, position: dict) -> None:
        final = self.dir / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "position.json").write_text(json.dumps(position))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(p for p in self.dir.glob("step_*") if "." not in p.name)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()


def train(cfg: Config, progress: bool = True) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    t = cfg.train
    run_dir = Path(t.run_dir)
    cache = Path(cfg.cache.path)
    manifest = read_manifest(cache)
    counts = check_cache(cache, manifest)
    urls = source_urls(manifest, cfg.data.shards)
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=t.grad_accum,
                              mixed_precision="no" if cpu or not torch.cuda.is_bf16_supported() else "bf16",
                              log_with="tensorboard" if t.tensorboard else None, project_dir=str(run_dir))
    set_seed(t.seed)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    plan0 = plan_epoch(counts, 0, t.seed, world, t.workers, t.batch_size)
    batches_per_epoch = plan0.steps
    if batches_per_epoch == 0:
        raise ConfigError(f"the cache holds {sum(counts.values())} samples: too few for {world} processes x "
                          f"{max(t.workers, 1)} workers x train.batch_size {t.batch_size}")
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
    stats = manifest.get("stats") or {}
    mean = torch.tensor(stats["mean"], device=device) if "mean" in stats else None
    var = torch.tensor(stats["var"], device=device) if "var" in stats else None
    pix_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    pix_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    ckpts, step = Checkpoints(run_dir, t.keep_checkpoints), 0
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dict(cfg.to_dict(), cache_manifest={
            k: manifest[k] for k in ("teacher", "augment", "codec", "token_shape")}), indent=1))
    accelerator.wait_for_everyone()
    latest = ckpts.latest()
    if latest is not None:
        accelerator.load_state(str(latest))
        step = json.loads((latest / "position.json").read_text())["step"]
        if accelerator.is_main_process:
            print(f"resuming from {latest} at step {step}", file=sys.stderr)
    if cfg.train.tensorboard:
        accelerator.init_trackers("img2vec")

    if accelerator.is_main_process:
        drop_rows_after(run_dir / "metrics.jsonl", step)  # steps a killed run took past its last checkpoint
    log = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    trace = open(run_dir / f"keys-rank{rank}.txt", "a") if t.trace_keys else None
    bar = tqdm(total=total, initial=step, disable=not (progress and accelerator.is_main_process), unit="step",
               dynamic_ncols=True)
    model.train()
    wait = busy = 0.0
    logged_at = step
    last = {}
    while step < total:
        batch_index = step * t.grad_accum
        epoch, skip = divmod(batch_index, batches_per_epoch)
        plan = plan_epoch(counts, epoch, t.seed, world, t.workers, t.batch_size)
        data = CachedViews(cache, manifest, urls, plan, rank, t.workers, epoch, t.seed, t.batch_size, t.shuffle_buffer,
                           skip_batches=skip, with_tokens=teacher is None, on_corrupt=t.on_corrupt)
        it = iter(make_loader(data))
        for _ in range(skip, plan.steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            if trace:
                trace.write(f"{step} {' '.join(batch['keys'])}\n")
                trace.flush()  # a killed run keeps the lines of the steps it took
            images = batch["images"].to(device, non_blocking=True)
            tokens = teacher(images) if teacher is not None else batch["tokens"].to(device, non_blocking=True)
            targets = normalize_targets(tokens, cfg.loss.target_norm, mean, var)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, warmup, peak, t.min_lr)
            with accelerator.accumulate(model):
                out = model((images.float() - pix_mean) / pix_std, targets, beta=cfg.loss.beta,
                            global_weight=cfg.loss.global_weight)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and t.clip_grad > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            wait, busy = wait + t1 - t0, busy + time.perf_counter() - t1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == total:
                losses = accelerator.reduce(torch.stack([out["loss"], out["patch_loss"], out["global_loss"]]).detach(),
                                            "mean").tolist()
                samples = (step - logged_at) * t.grad_accum * t.batch_size * world
                last = {"step": step, "epoch": epoch, "loss": losses[0], "patch_loss": losses[1],
                        "global_loss": losses[2], "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_s": samples / max(wait + busy, 1e-9), "data_wait": wait / max(wait + busy, 1e-9)}
                wait, busy, logged_at = 0.0, 0.0, step
                if log:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{losses[0]:.4f}", wait=f"{last['data_wait']:.0%}")
                accelerator.log(last, step=step)
            if step % t.checkpoint_every == 0 or step == total:
                ckpts.save(accelerator, step, {"step": step, "epoch": epoch})
            fault_point("step", str(step))
            if step == total:
                break
        del it
    bar.close()
    accelerator.end_training()
    for f in (log, trace):
        if f:
            f.close()
    return {"step": step, "run_dir": str(run_dir), "rank": rank, **last}


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
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0
