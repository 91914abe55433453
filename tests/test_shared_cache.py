"""A cache shared by jobs on several hosts and requeues, caused for real: another host's lease whose heartbeat stops
(taken over within the short ttl), one that stays alive (the job waits, then exits 75; or finishes when the other
job does), a node paused past the ttl while another host's job finishes its shards (a real second "host": a process
in its own UTS namespace with another hostname; no Errno 39, the paused job drops its copies), and an mtime from a
clock that runs ahead."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from extract.cli import main as extract_main
from shards.leases import Lease
from tests.conftest import BIN, REPO, cache_files, write_config

FAST = ["extract.lease_ttl=1"]  # a dead holder is taken over after 1 s of silence; this job beats every 1/12 s


def half_done(extracted, tmp_path: Path, missing: str = "shard-000001") -> Path:
    """A copy of the session cache without one shard (its directory and record): a job has that shard to do."""
    cache = Path(shutil.copytree(extracted[1].cache.path, tmp_path / "cache"))
    shutil.rmtree(cache / missing)
    (cache / f"{missing}.done.json").unlink()
    return cache


def other_host_lease(cache: Path, name: str, **extra) -> Path:
    lock = cache / f"{name}.lock"
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "nonce": "theirs", **extra}))
    return lock


def extract(tmp_path, source, capsys, *sets: str) -> tuple[int, dict, str]:
    path = write_config(tmp_path, source, 3)
    rc = extract_main(["--config", str(path), "--no-progress", *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def beat(lock: Path, until: threading.Event, then=None) -> threading.Thread:
    """Another host's job: touches its lease every 0.1 s until `until` is set, then runs `then` (finish its shard)."""
    def run():
        while not until.wait(0.1):
            os.utime(lock)
        if then:
            then()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_a_dead_hosts_lease_is_taken_over_within_the_ttl(tmp_path, source, extracted, capsys):
    """A requeued job meets the lease of a node that just died (fresh mtime, no more beats): it waits, saying so,
    takes the lease over after its 1 s ttl and finishes the cache: exit 0, the bytes of an uninterrupted run."""
    cache = half_done(extracted, tmp_path)
    other_host_lease(cache, "shard-000001", ttl=1.0)
    t0 = time.monotonic()
    rc, summary, err = extract(tmp_path, source, capsys, *FAST, "extract.wait_for_others=60")
    assert rc == 0 and summary["shards_done"] == 1 and summary["cache_complete"], err[-2000:]
    assert "waiting for 1 shard(s) that other jobs hold: shard-000001 (host another-node" in err
    assert summary["waited_s"] < 5 and time.monotonic() - t0 < 30  # within the 1 s ttl, not 30 minutes
    assert cache_files(cache) == cache_files(Path(extracted[1].cache.path))


@pytest.mark.slow
def test_a_live_hosts_lease_is_waited_for_then_exit_75_or_done_when_it_finishes(tmp_path, source, extracted, capsys):
    cache = half_done(extracted, tmp_path)
    lock = other_host_lease(cache, "shard-000001")
    stop = threading.Event()
    t = beat(lock, stop)
    rc, summary, err = extract(tmp_path, source, capsys, *FAST, "extract.wait_for_others=2")
    stop.set()
    t.join()
    assert rc == 75 and not summary["cache_complete"], err[-2000:]
    (busy,) = summary["shards_busy_elsewhere"]
    assert busy.startswith("shard-000001 (host another-node pid 1") and summary["shards_not_done"] == ["shard-000001"]
    assert "still held by other live jobs after waiting" in err and "another-node" in err and "Rerun" in err
    assert summary["waited_s"] >= 2 and "Traceback" not in err

    def finish():  # the other job commits its shard and releases its lease
        ref = Path(extracted[1].cache.path)
        shutil.copytree(ref / "shard-000001", cache / "shard-000001")
        shutil.copy(ref / "shard-000001.done.json", cache / "shard-000001.done.json")
        lock.unlink()

    stop = threading.Event()
    t = beat(lock, stop, then=finish)
    threading.Timer(1.5, stop.set).start()
    rc, summary, err = extract(tmp_path, source, capsys, *FAST, "extract.wait_for_others=60")
    t.join()
    assert rc == 0 and summary["shards_done"] == 0 and summary["cache_complete"], err[-2000:]
    assert 0 < summary["waited_s"] < 10  # it waited for the other job, and did not redo its shard
    assert summary["shards_busy_elsewhere"] == summary["shards_not_done"] == []
    assert cache_files(cache) == cache_files(Path(extracted[1].cache.path))
    assert Lease(cache, "shard-000001").describe() == "shard-000001 (no lease: no job holds it now)"  # not host None


def test_a_clock_ahead_of_ours_only_delays_the_takeover(tmp_path):
    """Another host's lease with an mtime 1 h in the future (its clock, or its file server's, runs ahead): live at
    first, stale once its mtime has not changed for the ttl on our own clock."""
    lock = other_host_lease(tmp_path, "x")
    future = time.time() + 3600
    os.utime(lock, (future, future))
    lease = Lease(tmp_path, "x", ttl=0.5)
    assert not lease.acquire()
    time.sleep(0.7)
    assert lease.acquire() and lease.held()
    lease.release()


def test_a_lease_claiming_an_endless_ttl_is_capped(tmp_path):
    """A lease file is data: another host's lease that claims a ttl of 1e308 s (or infinity) is held to
    MAX_TTL_FACTOR times ours, so a silent one is taken over instead of blocking its shard for good."""
    from common.files import MAX_TTL_FACTOR

    for claimed in (1e308, float("inf")):
        lock = other_host_lease(tmp_path, "x", ttl=claimed)
        old = time.time() - MAX_TTL_FACTOR * 0.5 - 1
        os.utime(lock, (old, old))
        lease = Lease(tmp_path, "x", ttl=0.5)
        assert lease.acquire() and lease.held()
        lease.release()
        lock = other_host_lease(tmp_path, "x", ttl=claimed)  # a fresh heartbeat is still respected
        assert not Lease(tmp_path, "x", ttl=0.5).acquire()
        lock.unlink()


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare -u")
@pytest.mark.slow
def test_a_paused_host_loses_its_shards_to_another_host_without_crashing(tmp_path, source, extracted):
    """Job A runs as another host (its own UTS namespace, hostname other-node) and leases all three shards; it is
    SIGSTOPped while writing the first (a node paused or cut off: no heartbeat). Job B, on this host, takes A's leases
    over after the 1 s ttl and finishes the cache. A, continued, finds each shard finished by B: it drops its copies
    with a message (no Errno 39, no traceback) and exits 0; the cache has the bytes of one uninterrupted job."""
    path = write_config(tmp_path, source, 3)
    cmd = [str(BIN / "extract-features"), "--config", str(path), "--no-progress", "--set", "extract.lease_ttl=1",
           "--set", "extract.batch_size=8"]  # one batch a shard: A stops once, at shard-000000's
    env = dict(os.environ, OMP_NUM_THREADS="1")
    a = subprocess.Popen(["unshare", "-u", "sh", "-c", 'hostname other-node && exec "$@"', "sh", *cmd], cwd=REPO,
                         env=dict(env, IMG2VEC_FAULT="write:shard-000000:STOP"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not _stopped(a.pid):
            assert a.poll() is None and time.time() < deadline, a.communicate()[1][-2000:]
            time.sleep(0.1)
        assert json.loads((tmp_path / "cache" / "shard-000002.lock").read_text())["host"] == "other-node"
        b = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert b.returncode == 0 and json.loads(b.stdout)["shards_done"] == 3, b.stderr[-2000:]
    finally:
        os.kill(a.pid, 18)  # SIGCONT
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0 and "Errno 39" not in err and "Traceback" not in err, err[-2000:]
    assert err.count("this job's copy is dropped") == 3 and "shard shard-000000: another job" in err
    assert json.loads(out)["shards_done"] == 0
    files, want = cache_files(tmp_path / "cache"), cache_files(Path(extracted[1].cache.path))
    assert files.keys() == want.keys()  # every shard recorded, no lock or temporary left
    assert {k: v for k, v in files.items() if "/" in k} == {k: v for k, v in want.items() if "/" in k}  # (the
    # records' float sums depend on extract.batch_size, 8 here)


@pytest.mark.parametrize("hostile", ["lease is a directory", "lease is a link", "temporary is a link",
                                     "shard dir is a link"])
def test_what_no_job_wrote_where_a_lease_or_leftover_goes_is_named_not_followed(tmp_path, source, extracted, capsys,
                                                                                 hostile):
    """A cache from elsewhere: a directory (holding a file, an hour old: the lease of a dead job to take over) or a
    symbolic link (to a file outside: it could be /dev/zero) where shard-000001's lease goes, or a link to a folder
    outside where its temporary or its shard directory goes (leftovers to delete). Extraction exits 2 naming the
    path and saying what to do, no traceback; the outside folder, the directory and every other file of the cache
    are as they were, and no lease is left behind."""
    cache = half_done(extracted, tmp_path)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "precious").write_text("keep")
    path = cache / {"lease is a directory": "shard-000001.lock", "lease is a link": "shard-000001.lock",
                    "temporary is a link": "shard-000001.tmp-elsewhere", "shard dir is a link": "shard-000001"}[hostile]
    if hostile == "lease is a directory":
        shutil.copytree(outside, path)
        hour_ago = time.time() - 3600
        os.utime(path, (hour_ago, hour_ago))
    else:
        path.symlink_to(outside / "sub" / "precious" if hostile == "lease is a link" else outside)
    before = cache_files(cache)
    rc = extract_main(["--config", str(write_config(tmp_path, source, 3)), "--no-progress", "--set",
                       "extract.wait_for_others=0"])
    err = capsys.readouterr().err
    what = "a directory, not a lock file" if hostile == "lease is a directory" else "a symbolic link"
    assert rc == 2 and f"{path} is {what}" in err and "move it out of the" in err and "Traceback" not in err, err
    assert cache_files(cache) == before and path.exists() and (outside / "sub" / "precious").read_text() == "keep"
    assert not [p for p in cache.glob("*.lock") if p != path]  # the leases it took are released
