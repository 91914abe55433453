"""Fault injection for the reliability tests: `IMG2VEC_FAULT=<point>:<shard>` SIGKILLs the process
(and, from a DataLoader worker, the main process too) when that point is reached for that shard;
`IMG2VEC_FAULT=<point>:<shard>:TERM` (or USR1, ...) sends that signal to the main process instead,
as a scheduler would. Unset, it costs one dict lookup."""
from __future__ import annotations

import os
import signal

MAIN_PID: int | None = None  # set by the job's main process; forked workers inherit it


def fault_point(point: str, shard: str) -> None:
    fault = os.environ.get("IMG2VEC_FAULT")
    if fault is None:
        return
    parts = fault.split(":")
    if parts[:2] != [point, shard]:
        return
    if len(parts) > 2:
        os.kill(MAIN_PID or os.getpid(), getattr(signal, f"SIG{parts[2]}"))
        return
    if MAIN_PID is not None and MAIN_PID != os.getpid():
        os.kill(MAIN_PID, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
