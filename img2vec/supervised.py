"""What `img2vec linprobe` and `img2vec finetune` share: labelled shards as each process's stream of augmented
batches, MAE's per-iteration learning-rate schedule, the training cadence, the top-1 on the val shards, and
the result JSON. One process, or several through accelerate:

    accelerate launch --num_processes 8 -m img2vec.cli finetune RUN_DIR --train-shards ... --val-shards ...

Data. The main process counts the train shards once, reading only their `.cls` members (of a local tar, its
headers and labels, not its images): the classes, and the steps per epoch, floor(samples / (W x B)) for W
processes of batch B (MAE's drop_last). Each pass over the train shards reorders them (seeded, the same on
every process) and deals them to the processes (shard i to rank i % W; with fewer shards than processes,
every process reads every shard and keeps its every W-th sample); a process's DataLoader workers split its
share the same way (whole shards, or every n-th sample of each when it has fewer shards than workers: at 256
GPUs, ImageNet's 1,282 shards are 5 a process, read by 10 workers), shuffle the samples in a buffer of 1,000,
decode them through the house's decode-and-skip stage (train/probe.py's EvalCrops) and augment them. Every
process takes the same number of full batches an epoch from its own endless stream: one whose share ran out
goes on into its next pass (as DistributedSampler pads), so no process waits at a collective for another.
The val shards are dealt the same way, in order and read once: each image is classified by one process, and
the counts are summed over processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, get_worker_info

from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.config import ConfigError
from common.runtime import seed_from, write_json_output
from shards.source import IMAGE_EXTS, ShardError, iter_members, iter_samples
from train.data import shard_order, shuffle_buffer
from train.probe import EvalCrops, collate_crops, labelled_shards

SHUFFLE_BUFFER = 1000  # samples (their encoded bytes) per DataLoader worker, shuffled before decoding


def eval_crop_pct(img_size: int) -> float:
    """MAE's evaluation crop (util/datasets.py): resize to size / 0.875 (256 for 224), center crop; above 224, none."""
    return 0.875 if img_size <= 224 else 1.0


def eval_transform(img_size: int):
    """MAE's val transform: bicubic resize of the short side to int(size / crop_pct), center crop, normalise."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=eval_crop_pct(img_size),
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


# --------------------------------------------------------------------------------------------------------
# data


def _dealt(part: int, parts: int, i: int) -> bool:
    return i % parts == part


class LabelledImages(EvalCrops):
    """(transform(image), label, key) of this process's share of the labelled samples of `urls`; `shuffle`:
    another shard order every pass (`epoch`) and a shuffle buffer, for training."""

    def __init__(self, urls: list[str], transform: Callable, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = False):
        super().__init__(urls, img_size=0, crop_pct=1.0, seed=seed)
        self.transform, self.rank, self.world, self.shuffle, self.epoch = transform, rank, world, shuffle, 0

    def shares(self) -> list[tuple[str, int, int]]:
        """(shard, part, parts) that this process reads: of the shard, the samples i with i % parts == part."""
        urls = [self.urls[i] for i in shard_order(len(self.urls), self.seed, self.epoch)] if self.shuffle else self.urls
        if len(urls) >= self.world:
            return [(url, 0, 1) for url in urls[self.rank::self.world]]
        return [(url, self.rank, self.world) for url in urls]

    def samples(self) -> Iterator[dict]:
        """This DataLoader worker's part of the process's shares: whole shards while there are as many as workers,
        else every n-th sample of each (n workers)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shares()
        mine = mine[worker::workers] if len(mine) >= workers else [(u, k + m * worker, m * workers) for u, k, m in mine]
        read = (s for url, k, m in mine for s in iter_samples(url, None if m == 1 else partial(_dealt, k, m))
                if s is not None)
        if not self.shuffle:
            return read
        return shuffle_buffer(read, SHUFFLE_BUFFER, random.Random(seed_from(self.seed, self.epoch, self.rank, worker)))

    def view(self, img):
        return self.transform(img)


def loader(data: LabelledImages, batch_size: int, workers: int) -> DataLoader:
    """Batches of `data` (collate_crops: images, labels, keys, skipped), decoded by `workers` processes (at most
    one per CPU this process may use)."""
    return DataLoader(data, batch_size=batch_size, collate_fn=collate_crops,
                      num_workers=min(workers, len(os.sched_getaffinity(0))), pin_memory=torch.cuda.is_available())


def full_batches(data: LabelledImages, batch_size: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of exactly `batch_size` images from this process's share, pass after pass (data.epoch
    counts the passes); images that do not decode are left out, not padded."""
    images, labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    while True:
        got = 0
        for x, y, _, _ in loader(data, batch_size, workers):
            got += len(y)
            images, labels = (torch.cat([images, x]), torch.cat([labels, y])) if len(labels) else (x, y)
            while len(labels) >= batch_size:
                yield images[:batch_size], labels[:batch_size]
                images, labels = images[batch_size:], labels[batch_size:]
        if not got:
            raise ConfigError(f"process {data.rank} of {data.world}: its share of the train shards holds no labelled "
                              "image that decodes")
        data.epoch += 1


def shard_labels(url: str) -> list[int]:
    """The `.cls` labels of one shard's samples that have an image and a label; reads the labels only."""
    labels, images = {}, set()
    for key, ext, read, _ in iter_members(url):
        if ext == "cls":
            labels[key] = read()
        elif ext in IMAGE_EXTS:
            images.add(key)
    return [int(v) for k, v in labels.items() if k in images and v.strip().isdigit()]


def count_labelled(urls: list[str], workers: int) -> tuple[int, int]:
    """(labelled samples, classes = largest label + 1) of the shards, read by `workers` DataLoader workers."""
    counts = DataLoader(urls, batch_size=None, collate_fn=shard_labels, num_workers=min(workers, len(urls)))
    n, top = 0, -1
    for labels in counts:
        n, top = n + len(labels), max([top, *labels])
    return n, top + 1


@dataclass(frozen=True)
class Plan:
    """A run's numbers: the epochs, the updates, the lr (linear scaling, as MAE) and what the result JSON records."""

    classes: int
    train_samples: int
    epochs: int
    warmup_epochs: float
    steps_per_epoch: int
    batch_size: int   # per process
    processes: int
    blr: float        # per 256 images

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes

    @property
    def lr(self) -> float:
        return self.blr * self.global_batch / 256

    def fields(self) -> dict:
        return dict(dataclasses.asdict(self), global_batch=self.global_batch, lr=self.lr)

    def __str__(self) -> str:
        return (f"{self.train_samples} train images, {self.classes} classes, {self.epochs} epochs x {self.steps_per_epoch} "
                f"updates of {self.processes} x {self.batch_size}, lr {self.lr:.4g} (base {self.blr:g} per 256)")


def train_data(accelerator, args: argparse.Namespace, transform, epochs: int, warmup_epochs: float, blr: float,
               multiple: int = 1) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], Plan]:
    """-> (this process's endless batch stream, the plan) from the recipe's epochs, warmup and base lr and the
    arguments that override them; the main process counts the shards, every process gets its count. A batch
    larger than a process's share of the images shrinks to it (a multiple of `multiple`), with a note."""
    from accelerate.utils import broadcast_object_list

    urls = labelled_shards(args.train_shards, "--train-shards")
    counted = [count_labelled(urls, args.workers) if accelerator.is_main_process else None]
    samples, found = broadcast_object_list(counted)[0]
    if not samples:
        raise ConfigError(f"--train-shards {args.train_shards!r}: no sample with an image and a .cls label "
                          "(img2vec make-shards writes .cls)")
    world, batch = accelerator.num_processes, args.batch_size
    if not samples // (world * batch):
        batch = samples // world // multiple * multiple
        if not batch:
            raise ConfigError(f"--train-shards: {samples} labelled images, fewer than {world} processes x {multiple}")
        accelerator.print(f"note: --batch-size {args.batch_size} x {world} processes is more than the {samples} train "
                          f"images: batch {batch} (the lr scales with it)")
    if args.num_classes is not None and args.num_classes < found:
        raise ConfigError(f"--num-classes {args.num_classes}: the train shards hold labels up to {found - 1}")
    n = args.epochs or epochs  # the recipe's warmup share of it, unless --warmup-epochs (10 of 90 -> 1 of 9)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else warmup_epochs * n / epochs
    plan = Plan(args.num_classes or found, samples, n, warmup, samples // (world * batch), batch, world, args.blr or blr)
    data = LabelledImages(urls, transform, accelerator.process_index, world, args.seed, shuffle=True)
    return full_batches(data, batch, args.workers), plan


# --------------------------------------------------------------------------------------------------------
# schedule, cadence, evaluation


def cosine_schedule(optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float, min_lr: float):
    """MAE's util/lr_sched.py, per iteration: linear warmup from 0 over `warmup_epochs`, then a half-cycle cosine to
    `min_lr`; a param group's `lr_scale` (layer decay) multiplies its lr. timm's CosineLRScheduler, stepped with
    `step_update(i)` before update i."""
    from timm.scheduler import CosineLRScheduler

    warmup, total = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def train_epochs(accelerator, batches: Iterator, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 scheduler, plan: Plan, evaluate: Callable[[], dict], eval_every: int = 0, log_every: int = 50
                 ) -> list[dict]:
    """The cadence: the plan's epochs x updates (`step(images, labels)` -> its loss), the lr set before each; one row
    per epoch (mean loss over processes, the epoch's last lr), with `evaluate()` every `eval_every` epochs."""
    history, i, steps_per_epoch, epochs = [], 0, plan.steps_per_epoch, plan.epochs
    for epoch in range(1, epochs + 1):
        t0, total = time.perf_counter(), torch.zeros((), device=accelerator.device)
        for _ in range(steps_per_epoch):
            scheduler.step_update(i)
            images, labels = next(batches)
            loss = step(images.to(accelerator.device, non_blocking=True), labels.to(accelerator.device, non_blocking=True))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, update {i}: stopping")
            total += loss.detach()
            i += 1
            if log_every and i % log_every == 0:
                accelerator.print(f"  epoch {epoch} update {i}: loss {loss.item():.4f}, lr {_lr(scheduler):.3g}")
        row = {"epoch": epoch, "loss": accelerator.reduce(total, "mean").item() / steps_per_epoch, "lr": _lr(scheduler),
               "seconds": round(time.perf_counter() - t0, 2)}
        if eval_every and epoch % eval_every == 0 and epoch < epochs:
            row.update(evaluate())
        accelerator.print(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
        history.append(row)
    return history


def update(accelerator, optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One optimizer update from `loss` (gradients synchronised by accelerate's DDP); -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return loss


def _lr(scheduler) -> float:
    """The lr of the group without layer decay (the head's)."""
    return max(g["lr"] for g in scheduler.optimizer.param_groups)


@torch.no_grad()
def top1(accelerator, classify: Callable[[torch.Tensor], torch.Tensor], shards, img_size: int, classes: int,
         batch_size: int, workers: int) -> dict:
    """Top-1 (and top-5 when there are more than 5 classes) in % of `classify` (images -> logits) on the val
    shards, each image classified by one process, the counts summed over processes."""
    urls = labelled_shards(shards, "--val-shards")
    data = LabelledImages(urls, eval_transform(img_size), accelerator.process_index, accelerator.num_processes)
    counts = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # top-1, top-5 right; images; skipped
    for images, labels, _, skipped in loader(data, batch_size, workers):
        counts[3] += skipped
        if not len(labels):
            continue
        logits, labels = classify(images.to(accelerator.device)), labels.to(accelerator.device)
        ranked = logits.topk(min(5, classes), dim=1).indices
        counts[:3] += torch.stack([(ranked[:, 0] == labels).sum(), (ranked == labels[:, None]).any(1).sum(),
                                   torch.tensor(len(labels), device=labels.device)])
    right1, right5, n, skipped = accelerator.reduce(counts, "sum").tolist()
    if not n:
        raise ConfigError(f"--val-shards {shards!r}: no labelled image that decodes")
    out = {"top1": 100.0 * right1 / n, "val_samples": n, "val_skipped": skipped}
    return dict(out, top5=100.0 * right5 / n) if classes > 5 else out


# --------------------------------------------------------------------------------------------------------
# command line and result


def make_parser(prog: str, description: str, doc: str, batch_size: int) -> argparse.ArgumentParser:
    """The arguments both commands take; `doc` (the module's docstring) ends with the usage examples."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + "\n".join(doc.splitlines()[-3:]))
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a training run dir (its latest complete checkpoint) or a checkpoints/step_XXXXXXXX dir")
    p.add_argument("--train-shards", required=True, metavar="PATTERN", help="labelled (.cls) train shards, brace pattern")
    p.add_argument("--val-shards", required=True, metavar="PATTERN", help="labelled (.cls) val shards, brace pattern")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--warmup-epochs", type=float,
                   help="epochs of linear warmup from 0 (default: the recipe's share of --epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per process and update ({batch_size}); the lr scales with processes x batch / 256")
    p.add_argument("--blr", type=float, help="base lr per 256 images (default: the recipe's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the train shards' largest label + 1)")
    p.add_argument("--workers", type=int, default=10, help="DataLoader workers per process (10, as MAE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, metavar="EPOCHS",
                   help="also evaluate every N epochs (0: only after the last)")
    p.add_argument("--log-every", type=int, default=50, metavar="UPDATES", help="print the loss every N updates (0: off)")
    p.add_argument("--json", metavar="FILE", help="also write the result here (it is always written into the run dir)")
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1 or (args.epochs is not None and args.epochs < 1) or args.workers < 0:
        p.error("--batch-size and --epochs must be >= 1, --workers >= 0")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        p.error("--warmup-epochs must be >= 0")


def start(seed: int):
    """The Accelerator (one process, or accelerate launch's), every RNG seeded with seed + rank, as MAE."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    set_seed(seed + accelerator.process_index)
    return accelerator


def result_fields(info: dict, evaluation: dict, plan: Plan, history: list[dict], t0: float, **more) -> dict:
    """The result JSON: the student, the top-1, the plan, what the command adds, the epochs' rows."""
    return {**{k: info[k] for k in ("arch", "img_size", "run_dir", "checkpoint", "step")}, **evaluation, **plan.fields(),
            **more, "history": history, "seconds": round(time.perf_counter() - t0, 2)}


def finish(result: dict, name: str, json_out: str | None) -> None:
    """Print the top-1 and write the result as `<run dir>/<name>.json` (and --json), from the main process."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
    print(f"{name} of {result['arch']} (pretraining step {result['step']}): top-1 {result['top1']:.2f}%{top5} "
          f"({result['val_samples']} val images, {result['classes']} classes; {result['epochs']} epochs of "
          f"{result['steps_per_epoch']} updates, batch {result['global_batch']})")
    for path in [Path(result["run_dir"]) / f"{name}.json", *([json_out] if json_out else [])]:
        write_json_output(path, result)
    print(f"  -> {Path(result['run_dir']) / f'{name}.json'}")


def run_command(train: Callable[[argparse.Namespace], tuple[dict, torch.nn.Module]], args: argparse.Namespace,
                name: str, prog: str) -> int:
    """train(args), then finish; an error a user can act on (a shard, a run dir, an argument) is one line, exit 2."""
    from img2vec.export import ExportError

    try:
        finish(train(args)[0], name, args.json)
    except (ConfigError, ExportError, ShardError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
