"""Resume you can trust, with the faults made for real: a truncated weights file, a missing or garbled RNG
state, a torn metrics row, a resume with other settings or another cache, a run dir in use, a full disk."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import needs_mount
from tests.conftest import read_metrics as metrics
from train.loop import main as train_main


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # every test resumes or starts a real training run


def args(config: Path, run: Path, *sets: str) -> list[str]:
    out = ["--config", str(config), "--no-progress", "--set", f"train.run_dir={json.dumps(str(run))}",
           "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2"]
    for s in sets:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, extracted):
    """A 4-step run with checkpoints at 2 and 4: (config, run dir)."""
    run = tmp_path_factory.mktemp("trust") / "run"
    assert train_main(args(extracted[0], run)) == 0
    return extracted[0], run


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garble(path: Path) -> None:  # same size: only loading it can tell
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = os.urandom(len(data) // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,problem", [
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has"),
    (lambda c: (c / "random_states_0.pkl").unlink(), "the RNG state random_states_0.pkl of rank 0 is missing"),
    (lambda c: _garble(c / "random_states_0.pkl"), "the RNG state random_states_0.pkl is garbled"),
])
def test_bad_newest_checkpoint_is_passed_over_for_the_previous_one(tmp_path, finished, capsys, damage, problem):
    """step_00000004 damaged, and the last metrics row torn as a kill mid-write leaves it: the rerun warns
    naming the file, resumes from step_00000002, drops the torn row, and ends with the weights and losses
    of the undamaged run."""
    config, done = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    damage(run / "checkpoints" / "step_00000004")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 1, "loss": 0.06')
    capsys.readouterr()
    assert train_main(args(config, run)) == 0
    err = capsys.readouterr().err
    assert f"not resuming from {run / 'checkpoints' / 'step_00000004'}: {problem}" in err, err
    assert "resuming from" in err and "step_00000002 at step 2" in err and "dropped 1 unreadable row" in err, err
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    for a, b in zip(metrics(done), metrics(run)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    ours, theirs = (load_file(r / "checkpoints" / "step_00000004" / "model.safetensors") for r in (run, done))
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in theirs)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, finished, capsys):
    config, done = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "checkpoints" / "step_00000004" / "random_states_0.pkl").unlink()
    _truncate(run / "checkpoints" / "step_00000002" / "optimizer.bin")
    assert train_main(args(config, run)) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step_00000004: the RNG state" in err and "step_00000002: optimizer.bin has" in err
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # nothing was touched


def test_resume_with_another_seed_or_cache_is_refused(tmp_path, finished, capsys):
    """(Another batch size or world size is an elastic resume: tests/test_elastic.py.)"""
    config, done = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    assert train_main(args(config, run, "train.seed=1", "train.max_steps=8")) == 2
    assert "seed: run dir has 0, this run has 1" in capsys.readouterr().err

    cache = tmp_path / "other-cache"  # the same shards, made by another teacher
    shutil.copytree(json.loads((run / "config.json").read_text())["cache"]["path"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["teacher"]["sha256"] = "0" * 64
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert train_main(args(config, run, f"cache.path={json.dumps(str(cache))}", "train.max_steps=8")) == 2
    err = capsys.readouterr().err
    assert "cache.teacher_sha256: run dir has" in err and "'" + "0" * 64 + "'" in err, err
    assert max(r["step"] for r in metrics(run)) == 4  # refused before any step


def test_lock_of_a_live_training_elsewhere_refuses_a_stale_one_is_taken_over(tmp_path, extracted, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "lock").write_text(json.dumps({"host": "gpu-node-17", "pid": 4242}))
    assert train_main(args(extracted[0], run, "train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "in use by another training (host gpu-node-17, pid 4242)" in err and str(run / "lock") in err
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert train_main(args(extracted[0], run, "train.max_steps=1")) == 0
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (run / "lock").exists()
    (run / "lock").write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "slurm_job_id": "977"}))
    monkeypatch.setenv("SLURM_JOB_ID", "977")  # the same job, requeued onto another node
    assert train_main(args(extracted[0], run, "train.max_steps=2")) == 0
    assert "taking over the stale lock" in capsys.readouterr().err


@needs_mount
def test_no_space_left_while_writing_a_checkpoint_or_metrics_says_so(tmp_path, extracted, capsys):
    """A real 1 MB tmpfs as the run dir: the first checkpoint does not fit (exit 3, the message names the
    checkpoint and train.run_dir, no partial directory left). Then a tmpfs with 4 free pages: metrics.jsonl
    fills up (exit 3, names it). With space freed, the same command finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        assert train_main(args(extracted[0], run, "train.checkpoint_every=1")) == 3
        err = capsys.readouterr().err
        ckpt = run / "checkpoints" / "step_00000001"
        assert f"no space left on device while writing checkpoint {ckpt}: free space or move train.run_dir" in err, err
        assert not list((run / "checkpoints").iterdir())
        shutil.rmtree(run)

        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (free - 4 * 4096))
        assert train_main(args(extracted[0], run, "train.max_steps=60", "train.checkpoint_every=1000")) == 3
        err = capsys.readouterr().err
        assert f"no space left on device while writing metrics {run / 'metrics.jsonl'}" in err, err
        (disk / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        assert train_main(args(extracted[0], run, "train.max_steps=4")) == 0
        assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
