"""What `img2vec linprobe` and `img2vec finetune` share: labelled shards as each process's stream of augmented
batches, MAE's per-iteration learning-rate schedule and the top-1 on the val shards (img2vec/evalrun.py: the
command line, the output dir and the training cadence around them). One process, or several through accelerate:

    accelerate launch --num_processes 8 -m img2vec.cli finetune RUN_DIR --train-shards ... --val-shards ...

Data. The main process counts the train shards once, reading only their `.cls` members (of a local tar, its
headers and labels, not its images): the classes, and the steps per epoch, floor(samples / (W x B)) for W
processes of batch B (MAE's drop_last). Each pass over the train shards reorders them (seeded, the same on
every process) and deals them to the processes (shard i to rank i % W; with fewer shards than processes,
every process reads every shard and keeps its every W-th sample); a process's DataLoader workers split its
share the same way (whole shards, or every n-th sample of each when it has fewer shards than workers: at 256
GPUs, ImageNet's 1,282 shards are 5 a process, read by 10 workers), shuffle the samples in a buffer of 1,000,
decode them through the house's decode-and-skip stage (train/probe.py's EvalCrops) and augment them, each
image's augmentation seeded by (seed, pass, key), whichever worker reads it: a resume that reads the used samples
again without decoding them augments the rest as the stopped run did (FullBatches). Every
process takes the same number of full batches an epoch from its own endless stream: one whose share ran out
goes on into its next pass (as DistributedSampler pads), so no process waits at a collective for another.
The val shards are dealt the same way, in order and read once: each image is classified by one process, and
the counts are summed over processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from common.augment import CENTER_CROP, IMAGENET_MEAN, IMAGENET_STD
from common.config import ConfigError
from common.faults import fault_point
from common.runtime import seed_from
from common.signals import ignore_stop_signals
from shards.source import IMAGE_EXTS, iter_members, iter_samples
from train.data import shard_order, shuffle_buffer
from train.probe import EvalCrops, collate_crops, kept_rng, labelled_shards

SHUFFLE_BUFFER = 1000  # samples (their encoded bytes) per DataLoader worker, shuffled before decoding


def eval_crop_pct(img_size: int) -> float:
    """MAE's evaluation crop (util/datasets.py): resize to size / 0.875 (256 for 224), center crop; above 224, none."""
    return CENTER_CROP if img_size <= 224 else 1.0


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
    another shard order every pass (`epoch`) and a shuffle buffer, for training. `skip` = (pass, per worker n): in
    that pass, each worker's first n samples come out as skipped ones, read but not decoded (a resume: FullBatches)."""

    def __init__(self, urls: list[str], transform: Callable, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = False):
        super().__init__(urls, img_size=0, crop_pct=1.0, seed=seed)
        self.transform, self.rank, self.world, self.shuffle, self.epoch = transform, rank, world, shuffle, 0
        self.skip: tuple[int, list[int]] | None = None

    def __iter__(self):
        for img, label, key in super().__iter__():  # view(): the decoded image as it is
            yield (None if img is None else self.augment(img, key)), label, key

    def augment(self, img, key: str):
        """transform(img); in training with the RNGs it draws from (Python's, NumPy's, torch's) seeded by (seed, pass,
        key) and given back after: an image's augmentation does not depend on which worker or process reads it nor
        on what was read before it (a resume skips samples), and draws nothing from the training's RNGs."""
        if not self.shuffle:
            return self.transform(img)
        n = seed_from(self.seed, self.epoch, key)
        with kept_rng():
            random.seed(n)
            np.random.seed(n % 2**32)
            torch.random.default_generator.manual_seed(n)
            return self.transform(img)

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
        if self.shuffle:
            read = shuffle_buffer(read, SHUFFLE_BUFFER, random.Random(seed_from(self.seed, self.epoch, self.rank, worker)))
        skip = self.skip[1][worker] if self.skip and self.skip[0] == self.epoch else 0
        return (dict(s, image=None) if i < skip else s for i, s in enumerate(read)) if skip else read

    def view(self, img):
        return img


def usable_workers(workers: int) -> int:
    """DataLoader workers per process: `workers`, at most one per CPU this process may use."""
    return min(workers, len(os.sched_getaffinity(0)))


def loader(data: LabelledImages, batch_size: int, workers: int, collate: Callable = collate_crops) -> DataLoader:
    """Batches of `data` (collate_crops: images, labels, keys, skipped), decoded by usable_workers(workers) processes
    that leave the stop signals to this one (common/signals.py); their base seed is not drawn from the global RNG."""
    return DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=usable_workers(workers),
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator(),
                      pin_memory=torch.cuda.is_available())


def collate_tagged(items):
    """collate_crops, then the id of the worker that made the batch (0 in the main process)."""
    info = get_worker_info()
    return (*collate_crops(items), info.id if info else 0)


class FullBatches:
    """Endless batches of exactly `batch_size` images from this process's share, pass after pass (data.epoch counts
    the passes); images that do not decode are left out, not padded. `position()` says where the next batch starts:
    the pass, how many of its loader batches each worker made that are all used, and how many images of the next one
    are; `FullBatches(..., at=position)` hands over the same batches from there on: the workers read the used samples
    without decoding them (same loader batches, so the same interleaving) and every augmentation is seeded per
    sample (LabelledImages.augment)."""

    def __init__(self, data: LabelledImages, batch_size: int, workers: int, at: dict | None = None):
        self.data, self.batch_size, self.workers = data, batch_size, workers
        self.images, self.labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        self.pending: deque[list[int]] = deque()  # [worker, images not used yet] of loader batches not all used
        self.used, self.carry = [0] * max(usable_workers(workers), 1), 0  # carry: images of the previous pass
        if at:
            data.epoch, self.used = at["pass"], list(at["used"])
            data.skip = (data.epoch, [n * batch_size for n in self.used])
        self.batches = iter(loader(data, batch_size, workers, collate_tagged))
        # has this pass given an image? (one without any: _next_pass raises) At a resume: did the stopped run use any
        # of its loader batches (read again below undecoded; all of whose images may have failed to decode, and then
        # a pass without any image is found one pass later)
        self.had_image = bool(at and (sum(self.used) or at["drop"]))
        if at:
            for _ in range(sum(self.used)):  # the used loader batches, read again without decoding
                next(self.batches)
            self._fill(at["drop"])
            self._take(at["drop"])

    def position(self) -> dict:
        assert not self.carry  # a batch takes all of the previous pass's images first, and they are fewer
        return {"pass": self.data.epoch, "used": list(self.used),
                "drop": self.pending[0][2] - self.pending[0][1] if self.pending else 0}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._fill(self.batch_size)
        return self._take(self.batch_size)

    def _fill(self, n: int) -> None:
        while len(self.labels) < n:
            try:
                x, y, _, _, worker = next(self.batches)
            except StopIteration:
                self._next_pass()
                continue
            self.had_image = self.had_image or bool(len(y))
            self.pending.append([worker, len(y), len(y)])
            self.images, self.labels = (torch.cat([self.images, x]), torch.cat([self.labels, y])) if len(
                self.labels) else (x, y)

    def _next_pass(self) -> None:
        if not self.had_image:
            raise ConfigError(f"process {self.data.rank} of {self.data.world}: its share of the train shards holds "
                              "no labelled image that decodes")
        self.data.epoch += 1
        self.carry, self.had_image, self.used = len(self.labels), False, [0] * len(self.used)
        self.pending.clear()
        self.batches = iter(loader(self.data, self.batch_size, self.workers, collate_tagged))

    def _take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n images; the loader batches they finish count as used."""
        out = self.images[:n], self.labels[:n]
        self.images, self.labels = self.images[n:], self.labels[n:]
        n, self.carry = n - min(n, self.carry), max(self.carry - n, 0)
        while self.pending and (n or not self.pending[0][1]):
            k = min(n, self.pending[0][1])
            self.pending[0][1] -= k
            n -= k
            if not self.pending[0][1]:
                self.used[self.pending.popleft()[0]] += 1
        return out


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
    """(labelled samples, classes = largest label + 1) of the shards, read by usable_workers(workers) DataLoader workers
    (at most one a shard)."""
    counts = DataLoader(urls, batch_size=None, collate_fn=shard_labels,
                        num_workers=min(usable_workers(workers), len(urls)), worker_init_fn=ignore_stop_signals)
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
               multiple: int = 1) -> tuple[LabelledImages, Plan]:
    """-> (this process's share of the train images, for FullBatches; the plan) from the recipe's epochs, warmup and
    base lr and the arguments that override them; the main process counts the shards, every process gets its count.
    A batch larger than a process's share of the images shrinks to it (a multiple of `multiple`), with a note."""
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
    return data, plan


# --------------------------------------------------------------------------------------------------------
# schedule, evaluation


def cosine_schedule(optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float, min_lr: float):
    """MAE's util/lr_sched.py, per iteration: linear warmup from 0 over `warmup_epochs`, then a half-cycle cosine to
    `min_lr`; a param group's `lr_scale` (layer decay) multiplies its lr. timm's CosineLRScheduler, stepped with
    `step_update(i)` before update i."""
    from timm.scheduler import CosineLRScheduler

    warmup, total = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


@torch.no_grad()
def top1(accelerator, classify: Callable[[torch.Tensor], torch.Tensor], shards, img_size: int, classes: int,
         batch_size: int, workers: int, between: Callable[[], None] = lambda: None) -> dict:
    """Top-1 (and top-5 when there are more than 5 classes) in % of `classify` (images -> logits) on the val
    shards, each image classified by one process, the counts summed over processes; `between()` before every batch
    (a stop signal raises there: img2vec/evalrun.py halt)."""
    urls = labelled_shards(shards, "--val-shards")
    data = LabelledImages(urls, eval_transform(img_size), accelerator.process_index, accelerator.num_processes)
    counts = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # top-1, top-5 right; images; skipped
    for n, (images, labels, _, skipped) in enumerate(loader(data, batch_size, workers)):
        fault_point("eval", str(n))
        between()
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
