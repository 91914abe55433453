"""The k-NN probe of an encoder on labelled shards (DINO's eval_knn), and its use during pretraining.

Each image is center-cropped (a centered square box, `crop_pct` of the short side) and resized to the
encoder's size; its feature is the mean of the patch tokens after the final norm (`forward_features`;
for a timm model with `global_pool="avg"`, its fc_norm of the mean), L2-normalised. A query takes the k
most cosine-similar memory-bank images and votes with weights exp(similarity / T) (k = 20, T = 0.07 as
in DINO).

`KnnProbe` runs it every `train.eval_every` steps on `train.eval_shards` (memory bank: `train.eval_bank_shards`,
or four fifths of the eval shards by key hash) for the metrics row's `knn_top1`. It runs on the main process
with the global RNGs kept as they were, so the data order, the masks and a resume are those of a run without it.
`img2vec knn` (img2vec/knn.py) is the same probe as a command.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from common.augment import CENTER_CROP, CUTS, center_view, decode_samples, normalize_pixels, replay
from common.config import ConfigError
from common.config import Train as TrainConfig
from common.runtime import seed_from, worker_slice
from common.signals import ignore_stop_signals
from shards.source import expand_shards, iter_samples

# --------------------------------------------------------------------------------------------------------
# pure parts: the eval crop, the split, the vote


def center_box(height: int, width: int, crop_pct: float = CENTER_CROP) -> list[int]:
    """A centered square view record [top, left, side, side, flip=0]: `crop_pct` of the short side."""
    return center_view(height, width, crop_pct)[0].tolist()


def in_val_split(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split by key hash: the same key is always on the same side, whatever the order."""
    return seed_from(seed, key) < fraction * 2**64


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 512) -> torch.Tensor:
    """bank: [M, D], queries: [Q, D] (L2-normalised), bank_labels: [M] -> class scores [Q, num_classes]
    (DINO's weighted vote: sum over the k nearest of exp(cos / T), per class)."""
    k = min(k, bank.shape[0])
    scores = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)                    # [q, k]
        votes = F.one_hot(bank_labels[idx], num_classes).to(sim)  # [q, k, C]
        scores.append((votes * (sim / temperature).exp()[..., None]).sum(1))
    return torch.cat(scores) if scores else queries.new_zeros(0, num_classes)


# --------------------------------------------------------------------------------------------------------
# features


class EvalCrops(IterableDataset):
    """(uint8 [3, S, S], label, key) of every labelled sample in `urls`; shards dealt to DataLoader workers.
    `split` keeps only one side of `in_val_split` ("train" or "val"). A subclass may change `samples` (which source
    samples, in which order) and `view` (an image's pixels): img2vec/supervised.py does."""

    def __init__(self, urls: list[str], img_size: int, crop_pct: float, split: str | None = None,
                 val_fraction: float = 0.0, seed: int = 0):
        self.urls, self.size, self.crop_pct = urls, img_size, crop_pct
        self.split, self.val_fraction, self.seed = split, val_fraction, seed

    def __iter__(self):
        for s, img, _ in decode_samples(filter(self.in_split, self.samples()), reject=_unlabelled):
            if img is None:  # no image, no label, or it does not decode: skipped and counted
                yield None, -1, s["key"]
                continue
            yield self.view(img), s["cls"], s["key"]

    def samples(self) -> Iterator[dict]:
        """The source samples this DataLoader worker reads: its share of the shards, in order."""
        for url in worker_slice(self.urls):
            yield from iter_samples(url)

    def view(self, img):
        return replay(img, center_box(img.height, img.width, self.crop_pct), self.size, CUTS[0])

    def in_split(self, sample: dict) -> bool:
        return self.split is None or (self.split == "val") == in_val_split(sample["key"], self.val_fraction, self.seed)


def _unlabelled(sample: dict) -> str | None:
    return "no .cls label" if sample["cls"] is None else None


def collate_crops(items):
    """EvalCrops items -> (images, labels, keys, how many were skipped)."""
    good = [it for it in items if it[0] is not None]
    images = torch.stack([it[0] for it in good]) if good else torch.zeros(0, dtype=torch.uint8)
    return images, torch.tensor([it[1] for it in good], dtype=torch.long), [it[2] for it in good], len(items) - len(good)


@dataclass
class Features:
    feats: torch.Tensor        # [N, D] L2-normalised
    labels: torch.Tensor       # [N]
    keys: list[str] = field(default_factory=list)
    skipped: int = 0           # samples without an image, a label, or that did not decode


@torch.no_grad()
def encode(encoder, images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> mean-pooled patch tokens after the final norm, L2-normalised: [N, D]"""
    x = normalize_pixels(images.to(next(encoder.parameters()).device))
    tokens = encoder.forward_features(x)                          # [N, prefix + L, D]
    patches = tokens[:, getattr(encoder, "num_prefix_tokens", 1):]  # drop the cls token
    pooled = patches.mean(dim=1)
    if getattr(encoder, "fc_norm", None) is not None:  # timm with global_pool="avg": the final norm is after the pool
        pooled = encoder.fc_norm(pooled)
    return F.normalize(pooled.float(), dim=-1)


def labelled_shards(shards, what: str = "shards") -> list[str]:
    """The shard URLs of `shards`, every local one there (a ConfigError naming `what` otherwise)."""
    urls = expand_shards(shards)
    missing = [u for u in urls if ":" not in u.split("/")[0] and not Path(u).exists()]  # URLs and pipe: are read later
    if missing:
        raise ConfigError(f"{what}: {len(missing)} of {len(urls)} shards not found, e.g. {', '.join(missing[:3])}")
    return urls


def extract_features(encoder, shards, img_size: int, crop_pct: float = CENTER_CROP, batch_size: int = 64,
                     workers: int = 2, split: str | None = None, val_fraction: float = 0.0, seed: int = 0,
                     progress: bool = False, desc: str = "features") -> Features:
    from tqdm import tqdm

    urls = labelled_shards(shards)
    data = EvalCrops(urls, img_size, crop_pct, split, val_fraction, seed)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate_crops, num_workers=min(workers, len(urls)),
                        worker_init_fn=ignore_stop_signals)  # a stop signal to the group is the training's to act on
    encoder.eval()
    feats, labels, keys, skipped = [], [], [], 0
    with tqdm(unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for images, y, k, bad in loader:
            if len(images):
                feats.append(encode(encoder, images).cpu())
                labels.append(y)
                keys += k
            skipped += bad
            bar.update(len(k))
    if not feats:
        raise ConfigError(f"no labelled image in {shards!r}{f' ({split} split)' if split else ''}: k-NN needs "
                          "samples with an image and a .cls label")
    return Features(torch.cat(feats), torch.cat(labels), keys, skipped)


def knn_scores(train: Features, val: Features, k: int = 20, temperature: float = 0.07) -> dict:
    """Top-1 (and top-5 when there are more than 5 classes) of `val` against the memory bank `train`, in %."""
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    scores = knn_predict(train.feats, train.labels, val.feats, num_classes, k, temperature)
    ranked = scores.argsort(dim=1, descending=True)
    out = {"top1": 100.0 * (ranked[:, 0] == val.labels).float().mean().item()}
    if num_classes > 5:
        out["top5"] = 100.0 * (ranked[:, :5] == val.labels[:, None]).any(1).float().mean().item()
    return dict(out, k=min(k, len(train.labels)), temperature=temperature, classes=num_classes,
                train_samples=len(train.labels), val_samples=len(val.labels),
                skipped=train.skipped + val.skipped)


def knn_accuracy(encoder, train_shards, val_shards=None, img_size: int = 224, k: int = 20,
                 temperature: float = 0.07, crop_pct: float = CENTER_CROP, batch_size: int = 64, workers: int = 2,
                 val_fraction: float = 0.0, seed: int = 0, progress: bool = False) -> dict:
    """k-NN top-1 of `encoder` (anything with a timm-style `forward_features`): memory bank = `train_shards`,
    queries = `val_shards`, or a `val_fraction` of `train_shards` split by key hash when `val_shards` is None."""
    if val_shards is None and not 0.0 < val_fraction < 1.0:
        raise ConfigError("give val shards, or a val fraction in (0, 1) to split the train shards")
    split = (None, None) if val_shards is not None else ("train", "val")
    common = dict(img_size=img_size, crop_pct=crop_pct, batch_size=batch_size, workers=workers,
                  val_fraction=val_fraction, seed=seed, progress=progress)
    train = extract_features(encoder, train_shards, split=split[0], desc="knn memory bank", **common)
    val = extract_features(encoder, val_shards or train_shards, split=split[1], desc="knn queries", **common)
    return knn_scores(train, val, k, temperature)


# --------------------------------------------------------------------------------------------------------
# during pretraining

EVAL_QUERIES = 0.2  # without train.eval_bank_shards: this share of the eval shards (by key hash) are the queries


@contextmanager
def kept_rng() -> Iterator[None]:
    """The global RNGs (Python's, NumPy's, torch's CPU and CUDA ones) as they were on entry: what runs inside
    (a DataLoader draws its base seed from torch's) leaves nothing drawn for the training that follows."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def check_labelled(url: str, what: str) -> None:
    """The first sample of shard `url` has a .cls label, or a ConfigError naming `what`."""
    first = next(iter_samples(url), None)
    if first is None or first["cls"] is None:
        raise ConfigError(f"{what}: {url} holds {'no sample' if first is None else 'samples without a .cls label'}: "
                          "the k-NN probe needs labelled images (img2vec make-shards writes .cls)")


@dataclass
class KnnProbe:
    """train.eval_every / train.eval_shards: the k-NN top-1 of the student's encoder every `every` steps (and at
    the last). `every = 0`: off."""

    every: int = 0
    queries: list[str] = field(default_factory=list)
    bank: list[str] | None = None  # None: the queries' shards, split by key hash
    img_size: int = 224
    crop_pct: float = CENTER_CROP
    batch_size: int = 64
    workers: int = 0

    @classmethod
    def of(cls, t: TrainConfig, img_size: int) -> KnnProbe:
        """From the train config, its shards checked (there, labelled) before any step."""
        if not t.eval_every:
            return cls()
        queries = labelled_shards(t.eval_shards, "train.eval_shards")
        bank = labelled_shards(t.eval_bank_shards, "train.eval_bank_shards") if t.eval_bank_shards else None
        check_labelled(queries[0], "train.eval_shards")
        if bank:
            check_labelled(bank[0], "train.eval_bank_shards")
        return cls(t.eval_every, queries, bank, img_size, t.eval_crop_pct, t.batch_size, t.workers)

    def due(self, step: int, last: bool) -> bool:
        """Probe after update `step` (`last`: the run's last)?"""
        return self.every > 0 and (step % self.every == 0 or last)

    def __call__(self, encoder: torch.nn.Module) -> dict:
        """The metrics row's k-NN keys for `encoder` (a timm-style `forward_features`), which is left in the mode
        (train / eval) it was in, and the global RNGs as they were."""
        t0, training = time.perf_counter(), encoder.training
        with kept_rng():
            try:
                r = knn_accuracy(encoder, self.bank or self.queries, self.queries if self.bank else None, self.img_size,
                                 crop_pct=self.crop_pct, batch_size=self.batch_size, workers=self.workers,
                                 val_fraction=0.0 if self.bank else EVAL_QUERIES)
            finally:
                encoder.train(training)
        row = {"knn_top1": r["top1"], "knn_top5": r.get("top5"), "knn_queries": r["val_samples"],
               "knn_seconds": time.perf_counter() - t0}
        return {k: v for k, v in row.items() if v is not None}
