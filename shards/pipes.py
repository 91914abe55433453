"""`pipe:` sources: a shell command that writes a tar to its standard output (`pipe:aws s3 cp s3://b/x.tar -`),
read as a stream; started apart from the job's stop signals, and stopped by us, with everything it started.

Apart from the job's signals. A terminal's Ctrl-C and `kill -- -PGID` (SLURM's proctrack/pgid too) signal the whole
process group, proctrack/linuxproc every process of the step. The main process finishes its step and leaves
(common/signals.py); a command reading a shard for it would die first, the shard fail mid-read and the run with it
(exit 2). So a command runs in its own session (its own process group, no controlling terminal: a password prompt
fails instead of waiting) with SIGTERM, SIGUSR1 and SIGINT ignored (`trap ''`, inherited by what it starts), as
loader workers ignore them. (SLURM's proctrack/cgroup sends these to the step's tasks only: commands never see
them. A command that handles them itself, e.g. Go's signal.Notify, is kept from group signals by its session only.)

Stopped by us. A stream read to its end waits for the command: an exit status other than 0 and 141 (a shell's
SIGPIPE; webdataset's gopen's rule) fails the read. A stream closed before its end (a reader that needed only part
of the shard, an error, `stall_timeout` without data) SIGKILLs the command's process group and its descendants
(`stop_command`) and reaps it at once, never waiting for it to finish. Commands still running when the process
exits are stopped then (atexit). A process killed outright (SIGKILL, the OOM killer) cannot stop them: a command
then ends at its next write into the pipe nobody reads (EPIPE / SIGPIPE: `cat`, `curl`, `aws s3 cp` exit), one
that is waiting on its network when its own timeout ends it, or SLURM's SIGKILL to every process of the step.
"""
from __future__ import annotations

import atexit
import math
import os
import select
import signal
import subprocess
import weakref
from pathlib import Path
from typing import NoReturn

IMMUNE = "trap '' TERM USR1 INT; "  # ignored signals stay ignored across exec, in every descendant
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the commands not yet stopped or reaped, stopped at exit


class Command:
    """A `pipe:` URL's command and its output, a binary stream for tarfile's stream reader. With a finite
    `stall_timeout`, a read (or the wait at the end) that goes that long without data stops the command and raises
    OSError, `stalled` set."""

    def __init__(self, url: str, stall_timeout: float | None = None):
        self.proc = subprocess.Popen(IMMUNE + url.removeprefix("pipe:"), shell=True, stdout=subprocess.PIPE,
                                     start_new_session=True)
        self.fd, self.owner = self.proc.stdout.fileno(), os.getpid()
        self.timeout = stall_timeout if stall_timeout is not None and math.isfinite(stall_timeout) else None
        self.stalled = False
        _LIVE.add(self)

    def read(self, n: int = -1) -> bytes:
        """n bytes (fewer only at the end); b"" at the end, once the command has exited with success."""
        n = n if n > 0 else 1 << 20
        chunks, got = [], 0
        while got < n:
            if self.timeout is not None and not select.select([self.fd], [], [], self.timeout)[0]:
                self._stall()
            chunk = os.read(self.fd, n - got)
            if not chunk:
                self._ended()
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _ended(self) -> None:
        try:
            status = self.proc.wait(self.timeout)  # its output is closed; it may still be running
        except subprocess.TimeoutExpired:
            status = self._stall()
        if status not in (0, 141):
            raise OSError(f"its command exited with status {status}" if status > 0 else
                          f"its command was killed by {signal.Signals(-status).name}")

    def _stall(self) -> NoReturn:
        self.stalled = True
        self.stop()
        raise OSError(f"no data for {self.timeout:g} s")

    def stop(self) -> None:
        """Stop the command and everything it started now, unless it was reaped already; release its output."""
        if self.proc.returncode is None:
            stop_command(self.proc.pid)
            try:
                self.proc.wait(timeout=10)  # reaped, not left a zombie
            except subprocess.TimeoutExpired:  # stuck in the kernel (a dead NFS mount): Popen reaps it later
                pass
        self.proc.stdout.close()

    close = stop  # tarfile and `with` close a stream; an end that was read has reaped the command already


def stop_command(pid: int) -> None:
    """SIGKILL a command's process group (it leads one) and its descendants found in /proc (one that made its own
    group): a shell's children (`aws s3 cp`, `curl`, `sleep`) would keep its output open, and a read on it blocked."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:  # gone already
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


@atexit.register
def _stop_live() -> None:
    """At exit, stop this process's commands still running (a stream a reader left open)."""
    for command in list(_LIVE):
        if command.owner == os.getpid():
            command.stop()
