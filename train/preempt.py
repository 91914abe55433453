"""What every rank must decide together, once per micro-batch: is any rank's loss non-finite, and was any
rank asked to stop (SIGTERM / SIGUSR1)? One all-reduce of two numbers answers both, so all ranks skip,
stop or go on at the same step (a rank that stopped alone would hang the others)."""
from __future__ import annotations

import sys

import torch

from common.signals import StopSignals
from train.checkpoints import NonFinite


class StepGuard:
    def __init__(self, accelerator, stop: StopSignals, on_nonfinite: str, last_checkpoint):
        self.accelerator, self.stop, self.on_nonfinite = accelerator, stop, on_nonfinite
        self.last_checkpoint = last_checkpoint  # () -> Path | None, named when training stops
        self.skipped = 0

    def check(self, loss: torch.Tensor, step: int) -> tuple[bool, bool]:
        """(skip this step: the loss is not finite on some rank, stop after this step)."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self.stop.requested), device=loss.device)])
        nonfinite, stop = (self.accelerator.reduce(flags, "sum") > 0).tolist()
        if nonfinite:
            what = f"the loss of step {step + 1} is not finite (on rank {self.accelerator.process_index}: {loss.item()})"
            if self.on_nonfinite == "error":
                raise NonFinite(f"{what}: training stopped before the update, nothing was written; the last "
                                f"checkpoint is {self.last_checkpoint()}. Lower train.lr (and keep train.clip_grad > 0), "
                                "check the cache with `img2vec verify`, or set train.on_nonfinite=skip")
            self.skipped += 1
            if self.accelerator.is_main_process:
                print(f"warning: {what}: step skipped (train.on_nonfinite = skip)", file=sys.stderr)
        return nonfinite, stop
