"""Extraction's faults that used to mislead or hang, caused for real: a finished cache on a read-only mount (nothing
to do, nothing written), an unfinished one there (a message, exit 2), and a `pipe:` source that stalls (it fails
alone after extract.stall_timeout, naming it, with its command and the command's children stopped; the shard that
finished before it is recorded while it stalls)."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from extract.cli import main as extract_main
from tests.conftest import BIN, REPO, needs_mount, write_config


@needs_mount
def test_a_cache_on_a_read_only_mount(tmp_path, source, extracted, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], check=True)
    try:
        shutil.copytree(extracted[1].cache.path, disk / "cache")
        (disk / "cache" / "shard-000002.done.json").rename(disk / "later")
        path = write_config(tmp_path, source, 3, cache="disk/cache")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        rc = extract_main(["--config", str(path), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "cannot write" in err and "Read-only file system" in err, err[-2000:]
        assert "Traceback" not in err

        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        (disk / "later").rename(disk / "cache" / "shard-000002.done.json")
        before = (disk / "cache" / "manifest.json").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        rc = extract_main(["--config", str(path), "--no-progress"])
        out = capsys.readouterr()
        assert rc == 0 and "nothing to do: the 3 shard(s) of rank 0/1 are recorded" in out.err, out.err[-2000:]
        assert json.loads(out.out)["cache_complete"] and (disk / "cache" / "manifest.json").read_bytes() == before
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _alive(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in p.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(p.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stalled_pipe_source_fails_alone_and_the_others_are_recorded_meanwhile(tmp_path, source, workers):
    """The second of three sources sends 3,000 bytes and then nothing (a `sleep 607.N` keeps its pipe open). After
    extract.stall_timeout the stalled command and its children are stopped, that shard fails naming its source and
    the stall, the others are done: exit 1. Decoding in the main process (workers 0), the first shard's record is
    there while the job waits on the stall (a shard's last batch is committed at once, not with the next one);
    with workers, the stall is in a worker, and the other worker's items keep coming (one worker a team: the loader
    takes items as they come)."""
    sleep = f"sleep 607.{zlib.crc32(str(tmp_path).encode())}"  # this test's own: others may run the same test now
    stalled = f"pipe:cat {source}/shard-000001.tar | (head -c 3000; {sleep})"
    path = write_config(tmp_path, sets={"data.shards": [str(source / "shard-000000.tar"), stalled,
                                                        str(source / "shard-000002.tar")],
                                        "data.workers": workers, "extract.stall_timeout": 4})
    job = subprocess.Popen([str(BIN / "extract-features"), "--config", str(path), "--no-progress"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        record, seen_while_stalled = tmp_path / "cache" / "shard-000000.done.json", False
        while job.poll() is None and not seen_while_stalled:
            seen_while_stalled = record.exists() and bool(_alive(sleep)) and job.poll() is None
            time.sleep(0.2)
        out, err = job.communicate(timeout=300)
    finally:
        job.kill()
    if workers == 0:  # the main process reads the stalled pipe itself: shard-000000 was recorded before it began
        assert seen_while_stalled, err[-2000:]
    assert job.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert f"{stalled}: stalled: its command sent nothing for 4 s (extract.stall_timeout)" in err
    summary = json.loads(out)
    assert summary["shards_done"] == 2 and not summary["cache_complete"]
    assert not (tmp_path / "cache" / "shard-000001.done.json").exists()
    assert (tmp_path / "cache" / "shard-000002.done.json").exists()
    assert not _alive(sleep)  # the stalled command's children were stopped too
