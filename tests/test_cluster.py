"""What a cluster does to the data plane, caused for real: shards behind `pipe:` URLs ending in `-`, one file
name in two folders, a shard listed twice, two extraction jobs on one cache, a dead job's lease, a recorded
shard whose files went missing, a tar cut at a member boundary, a key twice in one shard."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, load_config
from extract.pipeline import run_extraction
from shards.index import read_index
from shards.leases import Lease
from shards.manifest import read_manifest
from shards.source import ShardError, iter_samples, shard_name, shard_names
from img2vec.verify import verify_cache
from tests.conftest import BIN, REPO, cache_files, make_source, run_in_process, write_config


def config_for(tmp: Path, shards: list[str], name: str = "cache") -> Path:
    """The test config with data.shards set to an explicit list (its cache and run dir named after `name`)."""
    return write_config(tmp, cache=name, run=f"run-{name}", sets={"data.shards": shards})


def test_shard_names_are_unique():
    urls = [f"pipe:aws s3 cp s3://bucket/train-{i:06d}.tar -" for i in range(3)]
    assert shard_names(urls) == ["train-000000", "train-000001", "train-000002"]
    assert shard_name("pipe:curl -s https://host/a/b/val-000007.tar.gz") == "val-000007"
    assert shard_name("/data/in1k/train-000001.tar") == "train-000001"
    assert shard_name("pipe:some-command --no-file-name -").startswith("shard-")
    a, b = shard_names(["/x/a/train-0.tar", "/x/b/train-0.tar"])
    assert a != b and a.startswith("train-0-") and b.startswith("train-0-")
    with pytest.raises(ConfigError, match="twice"):
        shard_names(["/x/a/train-0.tar", "/x/b/train-1.tar", "/x/a/train-0.tar"])


@pytest.mark.slow
def test_pipe_urls_ending_in_dash_extract_and_stream(tmp_path, source):
    """`pipe:cat .../shard-00000k.tar | cat -`: every URL ends in `-` (as `aws s3 cp ... -` does). Each source
    gets its own feature shard, and training streams them (no seeking in a pipe): one epoch covers all but
    less than a batch of the samples, none twice."""
    from train.loop import train

    urls = [f"pipe:cat {source}/shard-{i:06d}.tar | cat -" for i in range(3)]
    path = config_for(tmp_path, urls)
    summary = run_extraction(load_config(path), progress=False)
    assert summary["shards_done"] == 3 and summary["images"] == 18
    manifest = read_manifest(tmp_path / "cache")
    assert manifest.shard_names == ["shard-000000", "shard-000001", "shard-000002"]
    assert manifest.samples == 18
    assert not json.loads((tmp_path / "cache" / "shard-000000.done.json").read_text())["seekable"]
    assert verify_cache(tmp_path / "cache", progress=False).ok

    cfg = load_config(path, ["train.max_steps=4", "train.trace_keys=true", "train.workers=2"])
    out = train(cfg, progress=False)
    assert out["step"] == 4
    lines = (tmp_path / "run-cache" / "keys-rank0.txt").read_text().splitlines()
    keys = [k for line in lines for k in line.split()[1:]]
    assert len(keys) == len(set(keys)) == 16  # 18 samples, batch 4: 4 steps, 2 left out


@pytest.mark.slow
def test_same_file_name_in_two_folders_and_a_shard_listed_twice(tmp_path):
    a = make_source(tmp_path / "a", n=6, per_shard=6, seed=0)
    b = make_source(tmp_path / "b", n=6, per_shard=6, seed=1)
    path = config_for(tmp_path, [str(a / "shard-000000.tar"), str(b / "shard-000000.tar")])
    run_extraction(load_config(path), progress=False)
    manifest = read_manifest(tmp_path / "cache")
    assert len(set(manifest.shard_names)) == 2 and manifest.samples == 12

    twice = config_for(tmp_path, [str(a / "shard-000000.tar")] * 2, name="twice")
    r = subprocess.run([str(BIN / "extract-features"), "--config", str(twice), "--no-progress"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "twice" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "twice").exists()  # refused before any work


@pytest.mark.slow
def test_two_jobs_on_one_cache(tmp_path, source, extracted):
    """A job launched twice: both run at once on one cache. Each shard is written by one of them (leases), both
    exit 0, and the cache is byte-identical to a single job's."""
    path = write_config(tmp_path, source, 3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(BIN / "extract-features"), "--config", str(path), "--no-progress"]
    jobs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [j.communicate(timeout=300) for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], [o[1][-1500:] for o in outs]
    done = [json.loads(o[0])["shards_done"] for o in outs]
    busy = [len(json.loads(o[0])["shards_busy_elsewhere"]) for o in outs]
    assert sum(done) == 3, (done, busy)
    files = cache_files(tmp_path / "cache")
    files.pop("manifest.json")
    want = cache_files(Path(extracted[1].cache.path))
    want.pop("manifest.json")
    assert files == want


def test_dead_jobs_lease_is_taken_over_and_missing_files_are_redone(tmp_path, source, extracted):
    path = write_config(tmp_path, source, 3)
    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    shutil.rmtree(cache / "shard-000001")
    (cache / "shard-000001.done.json").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cache / "shard-000001.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "since": 0}))
    (cache / "shard-000002" / "v01.tar").unlink()  # recorded, but a file is gone
    summary = run_extraction(load_config(path), progress=False)
    assert summary["shards_done"] == 2 and summary["shards_already_complete"] == 1
    assert cache_files(cache) == cache_files(Path(extracted[1].cache.path))

    (cache / "shard-000001.done.json").unlink()
    Path(cache / "shard-000001.lock").write_text(json.dumps({"host": "another-node", "pid": 1, "since": 0}))
    summary = run_extraction(load_config(path, ["extract.wait_for_others=0"]), progress=False)  # 75 at once
    assert summary["shards_done"] == 0 and "another-node" in summary["shards_busy_elsewhere"][0]
    assert not summary["cache_complete"]


def test_tar_cut_at_a_member_boundary_is_truncated(tmp_path, source):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(source / "shard-000000.tar") as tar:
        members = tar.getmembers()
    cut = members[4].offset  # the header of the 5th member: a clean member boundary
    (src / "shard-000000.tar").write_bytes((source / "shard-000000.tar").read_bytes()[:cut])
    with pytest.raises(ShardError, match="end-of-archive"):
        list(iter_samples(str(src / "shard-000000.tar")))
    summary = run_extraction(load_config(write_config(tmp_path, src, 1)), progress=False)
    assert summary["shards_failed"] and "end-of-archive" in summary["shards_failed"][0]
    assert not (tmp_path / "cache" / "shard-000000.done.json").exists()


def test_a_key_twice_in_a_shard_is_skipped_and_recorded(tmp_path, source):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(source / "shard-000000.tar") as tin, tarfile.open(src / "shard-000000.tar", "w") as tout:
        members = tin.getmembers()
        for m in members + members[:2]:  # the first sample's .cls and .jpg again, at the end
            tout.addfile(m, tin.extractfile(m))
    first = members[0].name.split(".")[0]
    cfg = load_config(write_config(tmp_path, src, 1))
    summary = run_extraction(cfg, progress=False)
    record = json.loads((tmp_path / "cache" / "shard-000000.done.json").read_text())
    assert record["skipped"] == [{"key": first, "reason": record["skipped"][0]["reason"]}]
    assert "duplicate key" in record["skipped"][0]["reason"] and summary["skipped_samples"] == 1
    keys = [k.decode() for k in read_index(tmp_path / "cache", "shard-000000")["key"]]
    assert len(keys) == len(set(keys)) == 6 and keys[0] == first
    report = verify_cache(tmp_path / "cache", recompute=2, progress=False)
    assert report.ok, [p.line() for p in report.problems]
    assert np.array_equal(np.sort(keys), np.sort([s["key"] for s in iter_samples(str(source / "shard-000000.tar"))]))


def test_lease_is_exclusive(tmp_path):
    a, b = Lease(tmp_path, "x"), Lease(tmp_path, "x")
    assert a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()


def test_open_files_stay_bounded(monkeypatch, uneven):
    """ImageNet has 1,282 shards of V view files each: a loader process must not hold one descriptor per
    file. With the limits set low, an epoch over 5 shards x 3 views + 5 sources keeps within them."""
    import shards.reader as reader
    from shards.manifest import source_urls
    from train.data import CacheIndex, EpochData, epoch_plan

    monkeypatch.setattr(reader, "MAX_OPEN_FILES", 3)
    cache = Path(uneven[1].cache.path)
    manifest = read_manifest(cache)
    index = CacheIndex(cache, manifest, source_urls(manifest), open_shards=2)
    before = len(os.listdir("/proc/self/fd"))
    plan = epoch_plan(index.counts, epoch=0, seed=0, world=1, rank=0, batch_size=2)
    batches = list(EpochData(index, plan, epoch=0, seed=0))
    assert len(batches) == len(plan) == 14
    assert len(os.listdir("/proc/self/fd")) - before <= 3 + 2


def test_teacher_precision_is_part_of_the_cache_identity(tmp_path, source, extracted, capsys):
    """A cache computed in bf16 on GPUs must not be finished in fp32 on a CPU node (tokens ~0.9999 cosine apart):
    the manifest records the effective precision (fp32 on a CPU whatever teacher.dtype says) and a rerun
    with another is refused, naming it."""
    from extract.cli import main as extract_main

    assert read_manifest(Path(extracted[1].cache.path)).teacher.precision == "float32"
    path = write_config(tmp_path, source, 3)
    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    (cache / "shard-000002.done.json").unlink()
    m = json.loads((cache / "manifest.json").read_text())
    m["teacher"]["precision"] = "bfloat16"  # as a GPU node writes it
    (cache / "manifest.json").write_text(json.dumps(m))
    assert extract_main(["--config", str(path), "--no-progress"]) == 2
    assert "teacher.precision: cache has 'bfloat16', config gives 'float32'" in capsys.readouterr().err


def test_stale_leases(tmp_path):
    """Stale: a dead pid on this host, a previous life of our own pid (a restarted container), another host's
    lease without a heartbeat for LEASE_TTL. Live: another host's fresh lease, and ours."""
    import shards.leases as leases

    lock = tmp_path / "x.lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = os.uname().nodename
    for holder, age, stale in [({"host": here, "pid": dead.pid}, 0, True),
                               ({"host": here, "pid": os.getpid(), "nonce": "an-old-life"}, 0, True),
                               ({"host": "other-node", "pid": 1}, 0, False),
                               ({"host": "other-node", "pid": 1}, leases.LEASE_TTL + 60, True)]:
        lock.write_text(json.dumps(holder))
        os.utime(lock, (time.time() - age, time.time() - age))
        lease = Lease(tmp_path, "x")
        assert lease.acquire() == stale, holder
        if stale:
            assert lease.held() and not Lease(tmp_path, "x").acquire()  # taken over once, and then held
            lease.release()
    assert not (tmp_path / "x.lock.takeover").exists()


def test_names_that_are_no_file_names_never_become_paths():
    for url in (".", "/", "..", "/data/.hidden", "pipe:producer --stdout -"):
        name = shard_name(url)
        assert name.startswith("shard-") and "/" not in name, (url, name)


def test_adjacent_duplicate_keeps_the_first_sample(tmp_path, source):
    with tarfile.open(source / "shard-000000.tar") as tin, tarfile.open(tmp_path / "d.tar", "w") as tout:
        members = tin.getmembers()
        jpg = next(m for m in members if m.name.endswith(".jpg"))
        for m in members[:members.index(jpg) + 1] + [jpg] + members[members.index(jpg) + 1:]:
            tout.addfile(m, tin.extractfile(m))
    samples = list(iter_samples(str(tmp_path / "d.tar")))
    key = jpg.name.split(".")[0]
    assert [s["duplicate"] for s in samples if s["key"] == key] == [False, True]
    assert next(s for s in samples if s["key"] == key)["image"] is not None


def test_a_key_that_is_not_utf8_is_skipped(tmp_path, source):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(source / "shard-000000.tar") as tin, \
            tarfile.open(src / "shard-000000.tar", "w", encoding="utf-8", errors="surrogateescape") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m)
            if m.name.startswith(tin.getmembers()[0].name.split(".")[0] + "."):
                m.name = "bad\udcff." + m.name.split(".", 1)[1]
            tout.addfile(m, data)
    summary = run_extraction(load_config(write_config(tmp_path, src, 1)), progress=False)
    record = json.loads((tmp_path / "cache" / "shard-000000.done.json").read_text())
    assert summary["cache_complete"] and [s["reason"] for s in record["skipped"]] == ["key is not valid UTF-8"]


def test_stream_reader_names_a_missing_sample_at_once(tmp_path, extracted):
    """A streamed source that lost a sample: a ShardError naming the shard when its stream ends, not after the
    rest of the worker's run was buffered."""
    from shards.manifest import source_urls
    from train.data import CacheIndex, EpochData, epoch_plan

    _, cfg = extracted
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.path, cache)
    src = tmp_path / "src"
    shutil.copytree(Path(cfg.data.shards).parent, src)
    victim = read_index(cache, "shard-000001")["key"][2].decode()
    with tarfile.open(Path(cfg.data.shards).parent / "shard-000001.tar") as tin, \
            tarfile.open(src / "shard-000001.tar", "w") as tout:
        for m in tin.getmembers():
            if not m.name.startswith(victim + "."):
                tout.addfile(m, tin.extractfile(m))
    manifest = read_manifest(cache)
    index = CacheIndex(cache, manifest, source_urls(manifest, f"{src}/shard-{{000000..000002}}.tar"))
    plan = epoch_plan(index.counts, epoch=0, seed=0, world=1, rank=0, batch_size=1, mode="stream", workers=0, buffer=4)
    with pytest.raises(ShardError, match="shard-000001.*not in the shard any more"):
        list(EpochData(index, plan, epoch=0, seed=0, mode="stream"))


def test_a_file_that_vanishes_while_training_is_named(tmp_path, extracted):
    from shards.errors import CacheError
    from shards.manifest import source_urls
    from train.data import CacheIndex, EpochData, epoch_plan

    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    manifest = read_manifest(cache)
    index = CacheIndex(cache, manifest, source_urls(manifest))
    for v in range(3):
        (cache / "shard-000000" / f"v{v:02d}.tar").unlink()  # after the start-up checks
    with pytest.raises(CacheError, match="v0[0-2].tar: No such file"):
        list(EpochData(index, epoch_plan(index.counts, epoch=0, seed=0, world=1, rank=0, batch_size=2), epoch=0, seed=0))


def test_a_damaged_index_row_pairs_nothing(tmp_path, extracted):
    """A crop box changed in index.npy (the views' crc32 intact): training would replay other pixels for the same
    tokens. The row's own crc32 catches it: a CorruptSample naming shard and key, and `verify` names it too."""
    from shards.errors import CorruptSample
    from shards.manifest import source_urls
    from train.data import CacheIndex, EpochData, epoch_plan

    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    path = cache / "shard-000001" / "index.npy"
    index = np.load(path, allow_pickle=False)
    index["views"][:, :, 0] += 1  # every view record of every sample: the top edge one pixel lower
    np.save(path, index, allow_pickle=False)
    manifest = read_manifest(cache)
    data = CacheIndex(cache, manifest, source_urls(manifest))
    with pytest.raises(CorruptSample, match="shard-000001.*index row"):
        list(EpochData(data, epoch_plan(data.counts, epoch=0, seed=0, world=1, rank=0, batch_size=2), epoch=0, seed=0))
    report = verify_cache(cache, progress=False)
    assert not report.ok and any("index row" in p.line() and "shard-000001" in p.line() for p in report.problems)


@pytest.mark.slow
def test_the_torch_cut_is_the_same_on_every_x86_cpu_kind():
    """A cluster mixes CPU generations: extraction may cut on AVX-512 nodes, training replay on AVX2 or older. torch's
    uint8 antialiased resize is integer arithmetic, so every kernel torch dispatches to gives the same bytes (its
    float path does not: this test would catch a switch to it). The probe covers up- and down-scaling and flips."""
    import sys

    from common.augment import CUTS, replay_probe

    code = "from common.augment import replay_probe; print(replay_probe('torch'), replay_probe('pil'))"
    here = f"{replay_probe('torch')} {replay_probe('pil')}"
    for kind in ("default", "avx2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": kind}).stdout.split()
        assert " ".join(out) == here, kind
    assert replay_probe("torch") != replay_probe("pil") and CUTS[0] == "torch"  # the probe tells the paths apart
    from common.config import CHOICES

    assert CHOICES["augment.cut"] == CUTS


def test_a_machine_that_cuts_other_pixels_is_refused(tmp_path, source, extracted, capsys):
    """Another torch or Pillow version may resize differently: training would pair the cached tokens with pixels
    the teacher never saw. The manifest's probe catches it before any work: training, verify and an extraction
    that would add shards to the cache all refuse, naming both machines' versions."""
    from common.augment import replay_probe
    from extract.cli import main as extract_main
    from shards.errors import CacheError

    path = write_config(tmp_path, source, 3)
    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    m = json.loads((cache / "manifest.json").read_text())
    assert m["augment"]["cut"] == "torch" and m["replay"]["probe"] == replay_probe("torch")
    m["replay"].update(probe="0badc0de", torch="9.9.9")  # as another machine would have recorded it
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="probe .* here \\(torch .*\\), 0badc0de there \\(torch 9.9.9"):
        run_in_process(path, tmp_path / "run", "train.max_steps=1")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint*"))
    report = verify_cache(cache, progress=False)  # the bytes are fine: a warning, unless views are recomputed
    assert report.ok and any("0badc0de" in w for w in report.warnings)
    report = verify_cache(cache, recompute=2, progress=False)
    assert not report.ok and any("0badc0de" in p.line() for p in report.problems)
    (cache / "shard-000002.done.json").unlink()
    assert extract_main(["--config", str(path), "--no-progress"]) != 0
    assert "0badc0de there" in capsys.readouterr().err
    assert not (cache / "shard-000002.done.json").exists()


def test_caches_from_before_the_cut_setting_are_replayed_with_pillow():
    """A manifest without augment.cut was cut by Pillow: it is replayed so, and extending it needs augment.cut=pil."""
    from shards.manifest import manifest_cut, manifest_differences

    old = {"augment": {"size": 224, "interpolation": "bicubic"}}
    assert manifest_cut(old) == "pil"
    assert manifest_differences(old, {"augment": {"size": 224, "interpolation": "bicubic", "cut": "pil"}}) == []
    assert manifest_differences(old, {"augment": {"size": 224, "interpolation": "bicubic", "cut": "torch"}}) == [
        "augment.cut: cache has 'pil', config gives 'torch'"]
