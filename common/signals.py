"""Preemption: SIGTERM (schedulers, `kill`, torchrun's agent) and SIGUSR1 (SLURM's `--signal`, sent early)
ask a stage to stop at its next safe point instead of dying where it stands.

Both stages then exit with PREEMPTED (75, EX_TEMPFAIL: "try again"), so a job script can tell a clean,
resumable stop from a crash (1), a config error (2), a full disk (3) or a process killed by a signal (128+n).
"""
from __future__ import annotations

import signal
import threading

PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested:` finish the unit of work and leave.
    A repeated signal changes nothing (a launcher may forward the one the process already got)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.received, self._old = signals, None, {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
