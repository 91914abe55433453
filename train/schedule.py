"""Where a run stands (`Position`, what a checkpoint records) and its learning rate there (`Schedule`).

The position is counted in samples, not batches: in random mode epoch e is one seeded permutation of all samples,
and after any number of steps it has used exactly a prefix of it, so a resume with another world size, batch size
or grad_accum deals the rest of the permutation over the new processes (train/data.py: epoch_plan) and no sample
of the epoch is repeated or skipped. The learning rate follows the epoch fraction reached, so it keeps its shape
across such a change; its peak follows the global batch the run has now.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from common.config import ConfigError
from common.config import Train as TrainConfig
from train.data import steps_per_epoch


@dataclass
class Position:
    """After `step` updates: in epoch `epoch`, `consumed` of its samples trained (all ranks together); `micro`
    micro-batches taken by each rank (the counter the next micro-batch's masks are drawn from)."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    micro: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, micro_per_epoch: int, deal: dict) -> Position:
        """A checkpoint's position.json. One written before positions were counted in samples holds the step and
        its epoch only: its place is derived from the step as it was then (with the same deal: run.json held it)."""
        if "consumed" in saved:
            return cls(*(int(saved[k]) for k in ("step", "epoch", "consumed", "micro")))
        micro = int(saved["step"]) * deal["grad_accum"]
        epoch, skip = divmod(micro, micro_per_epoch)
        return cls(int(saved["step"]), epoch, skip * deal["world_size"] * deal["batch_size"], micro)


@dataclass
class Schedule:
    """Linear warmup over `warmup` epochs, then a half-cosine from `peak` to `floor` ending at `end` epochs (MAE's
    adjust_learning_rate), as a function of the epoch fraction reached: epoch + consumed / epoch_samples.

    `end` is train.epochs, or with train.max_steps the fraction where that many updates of this global batch end;
    `peak` is train.lr x global batch / 256 (the global batch: world x batch_size x grad_accum, as the run is now).
    The run stops after train.epochs epochs, or at update train.max_steps."""

    micro_per_epoch: int  # micro-batches of one rank in an epoch, from its start
    epoch_samples: int  # samples an epoch trains: micro_per_epoch x world x batch_size
    global_batch: int  # samples per update
    epochs: int  # 0 with train.max_steps
    max_steps: int
    end: float
    warmup: float
    peak: float
    floor: float

    @classmethod
    def of(cls, t: TrainConfig, samples: int, world: int) -> Schedule:
        micro = steps_per_epoch(samples, world, t.batch_size)
        if micro == 0:
            raise ConfigError(f"the cache holds {samples} samples: too few for {world} processes x "
                              f"train.batch_size {t.batch_size}")
        epoch_samples, global_batch = micro * world * t.batch_size, world * t.batch_size * t.grad_accum
        end = t.max_steps * global_batch / epoch_samples if t.max_steps else float(t.epochs)
        return cls(micro, epoch_samples, global_batch, 0 if t.max_steps else t.epochs, t.max_steps, end,
                   warmup=min(t.warmup_epochs, end / 2), peak=t.lr * global_batch / 256, floor=t.min_lr)

    def progress(self, pos: Position) -> float:
        return pos.epoch + pos.consumed / self.epoch_samples

    def lr(self, pos: Position) -> float:
        """The learning rate of the update that starts at `pos`."""
        p = self.progress(pos)
        if p < self.warmup:  # the first update already takes a step of the ramp
            return self.peak * min((p + self.global_batch / self.epoch_samples) / self.warmup, 1.0)
        x = (p - self.warmup) / max(self.end - self.warmup, 1e-12)
        return self.floor + (self.peak - self.floor) * 0.5 * (1 + math.cos(math.pi * min(x, 1.0)))

    def done(self, pos: Position) -> bool:
        return pos.step >= self.max_steps if self.max_steps else pos.epoch >= self.epochs

    def total_steps(self, pos: Position) -> int:
        """Updates the run will have taken at its end, from `pos` on at this global batch (the progress bar's)."""
        if self.max_steps:
            return self.max_steps
        left = (self.epochs - self.progress(pos)) * self.epoch_samples / self.global_batch
        return pos.step + max(math.ceil(left), 0)
