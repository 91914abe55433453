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
of the shard, an error, `stall_timeout` without data) SIGKILLs the command's session and process group
(`stop_command`) and reaps it at once, never waiting for it to finish. Commands still running when the process
exits are stopped then (atexit). A process killed outright (SIGKILL, the OOM killer) cannot stop them: a command
then ends at its next write into the pipe nobody reads (EPIPE / SIGPIPE: `cat`, `curl`, `aws s3 cp` exit), one
that is waiting on its network when its own timeout ends it, or SLURM's SIGKILL to every process of the step.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import select
import signal
import subprocess
import weakref
from pathlib import Path
from typing import NoReturn

class CommandFailed(OSError):
    """The command exited with a failure status (its own messages are on the job's stderr)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
IMMUNE = "trap '' TERM USR1 INT; "  # ignored signals stay ignored across exec, in every descendant
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the commands not yet stopped or reaped, stopped at exit


class Command:
    """A `pipe:` URL's command and its output, a binary stream for tarfile's stream reader. With a finite
    `stall_timeout`, a read (or the wait at the end) that goes that long without data stops the command and raises
    OSError, `stalled` set."""

    def __init__(self, url: str, stall_timeout: float | None = None):
        self.url, self.owner, self.read_any, self.restarted = url, os.getpid(), False, False
        self.timeout = stall_timeout if stall_timeout is not None and math.isfinite(stall_timeout) else None
        self.stalled = False
        self._start()
        _LIVE.add(self)

    def _start(self) -> None:
        self.proc = subprocess.Popen(IMMUNE + self.url.removeprefix("pipe:"), shell=True, stdout=subprocess.PIPE,
                                     start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def read(self, n: int = -1) -> bytes:
        """n bytes (fewer only at the end); b"" at the end, once the command has exited with success."""
        n = n if n > 0 else 1 << 20
        chunks, got = [], 0
        while got < n:
            if self.timeout is not None and not select.select([self.fd], [], [], self.timeout)[0]:
                self._stall()
            chunk = os.read(self.fd, n - got)
            if not chunk:
                if self._ended():
                    continue
                break
            chunks.append(chunk)
            got += len(chunk)
            self.read_any = True
        return b"".join(chunks)

    def _ended(self) -> bool:
        """At the end of its output: its status checked; True if it was started again (see below)."""
        try:
            status = self.proc.wait(self.timeout)  # its output is closed; it may still be running
        except subprocess.TimeoutExpired:
            status = self._stall()
        if -status in STOP_SIGNALS and not self.read_any and not self.restarted:
            # A stop signal to our group that came between the fork and the child's setsid: the child, its handlers
            # already reset to the default, died of it before running the command (it ignores them from its first
            # line on). It sent nothing: start it again, once. (Seen under load with train.workers 0.)
            self.proc.stdout.close()
            self.restarted = True
            self._start()
            return True
        if status > 0 and status != 141:
            raise CommandFailed(f"its command exited with status {status}")
        if status < 0:
            name = signal.Signals(-status).name if -status in set(signal.Signals) else f"signal {-status}"
            raise CommandFailed(f"its command was killed by {name}")
        return False

    def _stall(self) -> NoReturn:
        self.stalled = True
        self.stop()
        raise OSError(f"no data for {self.timeout:g} s")

    def stop(self) -> None:
        """Stop the command and everything it started now, unless it was reaped already; release its output."""
        if self.proc.returncode is None and self.owner == os.getpid():  # a forked copy leaves it to its owner
            stop_command(self.proc.pid)
            try:
                self.proc.wait(timeout=10)  # reaped, not left a zombie
            except subprocess.TimeoutExpired:  # stuck in the kernel (a dead NFS mount): Popen reaps it later
                pass
        self.proc.stdout.close()

    close = stop  # tarfile and `with` close a stream; an end that was read has reaped the command already


def stop_command(pid: int) -> None:
    """SIGKILL a command's session (it leads one: every process it started that did not leave it, found in /proc
    by session id, whatever group it made) and its process group: a shell's children (`aws s3 cp`, `curl`, `sleep`)
    would keep its output open, and a read on it blocked. Only our command's session: a process that is not ours
    cannot be in it (a pid is not reused while our unreaped command holds it as the session's id), and a daemon
    that left it (an ssh ControlPersist master) is spared."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if session == pid:
            with contextlib.suppress(OSError):  # gone already
                os.kill(int(stat.parent.name), signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


@atexit.register
def _stop_live() -> None:
    """At exit, stop this process's commands still running (a stream a reader left open)."""
    for command in list(_LIVE):
        if command.owner == os.getpid():
            command.stop()
