"""Preemption: SIGTERM (schedulers, `kill`, `timeout`, torchrun's agent), SIGUSR1 (SLURM's `--signal`, sent early)
and SIGINT (a terminal's Ctrl-C) ask a stage to stop at its next safe point instead of dying where it stands.

SLURM signals every process of a job step, and a terminal, `kill -- -PGID` and `timeout` the whole process group,
so the DataLoader workers get the signal too: they ignore all three (`ignore_stop_signals`, their worker_init_fn;
`_reap` ends any left running at exit) and leave the stop to the main process. Exit statuses:

- PREEMPTED (75, EX_TEMPFAIL: "try again") after SIGTERM / SIGUSR1: training checkpointed the step it stopped
  at, extraction kept the shards it finished. A job script requeues on it.
- INTERRUPTED (130, the shell's status for Ctrl-C) after SIGINT: the same clean stop, but a person asked for it,
  so a script that requeues on 75 does not restart it. The first signal decides; a repeated one (a launcher
  forwards the one its workers already got) changes nothing. To abort at once, SIGKILL.

A job script also tells a clean stop from a crash (1), a refused setting (2) and a full disk (3).
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - its exit handler registered first, so _reap (below) runs before it
import signal
import threading
import time

PREEMPTED = 75
INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested:` finish the unit of work and leave with `stop.status`.
    A repeated signal changes nothing (a launcher may forward the one the process already got)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals, self.received, self._old = signals, None, {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def status(self) -> int:
        """The exit status of a stop on the first signal received."""
        return status_of(self.received)

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


def status_of(signal_name: str | None) -> int:
    """The exit status of a stop on `signal_name` (as StopSignals.received names it; None: another rank's)."""
    return INTERRUPTED if signal_name == "SIGINT" else PREEMPTED


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader worker's `worker_init_fn`: SIGTERM, SIGUSR1 and SIGINT sent to the whole group are the main
    process's to act on. (torch's workers die of another process's SIGTERM, and SIGINT ends their loop.) A command a
    worker starts (a `pipe:` source) inherits the ignored signals and keeps running too."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_WORKERS: list = []  # the worker processes (multiprocessing.Process) of this process's current loaders


def watch_workers(iterator):
    """Register the workers of a DataLoader iterator and return the iterator: `dead_workers` names the ones a signal
    killed. Workers of earlier loaders that have exited are forgotten here."""
    _WORKERS[:] = [w for w in _WORKERS if w.exitcode is None]
    _WORKERS.extend(getattr(iterator, "_workers", ()))
    return iterator


def dead_workers() -> list[tuple[int, str]]:
    """(pid, signal name) of each registered worker that a signal killed (the kernel's OOM killer sends SIGKILL)."""
    return [(w.pid, signal.Signals(-w.exitcode).name) for w in _WORKERS if w.exitcode is not None and w.exitcode < 0]


@atexit.register
def _reap() -> None:
    """At interpreter exit, end the daemonic children (DataLoader workers) still running: SIGTERM, as
    multiprocessing's own exit handler sends it, then SIGKILL after a second for those that ignore it, as loader
    workers do. That handler joins them without a timeout: a loader not shut down by then (an uncaught exception
    keeps its frames alive; an error while its workers start leaves them without one) would hang the process."""
    import multiprocessing

    live = [p for p in multiprocessing.active_children() if p.daemon]
    if not live:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these deaths as a failure
    for p in live:
        p.terminate()
    deadline = time.monotonic() + 1.0
    for p in live:
        p.join(max(deadline - time.monotonic(), 0))
        if p.is_alive():
            p.kill()
