"""Preemption and non-finite values, caused for real: SIGTERM / SIGUSR1 delivered to the running
processes, a teacher checkpoint with a NaN in it, a learning rate that overflows the student."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.signals import PREEMPTED
from extract.cli import main as extract_main
from tests.conftest import BIN, REPO, free_port, read_metrics, write_config
from train.loop import main as train_main


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run)}


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.slow
def test_sigusr1_in_training_checkpoints_the_step_and_the_rerun_redoes_none(tmp_path, extracted, monkeypatch, capsys):
    """SIGUSR1 (SLURM's early warning) arrives during step 3: the step finishes, step_00000003 is written
    (checkpoint_every is 100), the exit status is 75; the same command resumes at 3 and steps 4..6 equal
    an uninterrupted run's."""
    path, _ = extracted
    args = ["--config", str(path), "--no-progress", "--set", "train.max_steps=6", "--set", "train.checkpoint_every=100"]
    assert train_main([*args, "--set", f"train.run_dir={json.dumps(str(tmp_path / 'A'))}"]) == 0
    b = [*args, "--set", f"train.run_dir={json.dumps(str(tmp_path / 'B'))}"]
    monkeypatch.setenv("IMG2VEC_FAULT", "step:2:USR1")  # a real SIGUSR1 to this process once step 2 is done
    assert train_main(b) == PREEMPTED
    assert "stopping at step 3 on SIGUSR1" in capsys.readouterr().err
    assert checkpoints(tmp_path / "B") == ["step_00000003"] and max(rows(tmp_path / "B")) == 3
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers are given back
    monkeypatch.delenv("IMG2VEC_FAULT")
    assert train_main(b) == 0
    assert "resuming from" in capsys.readouterr().err
    a, bb = rows(tmp_path / "A"), rows(tmp_path / "B")
    assert sorted(a) == sorted(bb) == list(range(1, 7))
    for step in a:
        assert bb[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-7), step


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no rank {rank} under the launcher")


@pytest.mark.slow
def test_two_processes_stop_together_when_one_rank_gets_sigterm(tmp_path, extracted, capsys):
    """`accelerate launch` with 2 real processes; SIGTERM reaches rank 1 only. Both ranks stop after the
    same step with one checkpoint (both RNG states), the run dir is refused to a second training while it
    runs; the same command then resumes there and finishes. (A resume with another world size is elastic:
    tests/test_elastic.py.)"""
    path, _ = extracted
    run = tmp_path / "run"
    sets = ["--set", f"train.run_dir={json.dumps(str(run))}", "--set", "train.max_steps=12",
            "--set", "train.checkpoint_every=100"]
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "train", "--config", str(path), "--no-progress", *sets]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.05)
        assert train_main(["--config", str(path), "--no-progress", *sets]) == 2  # in use: the lock
        assert "is in use by another training" in capsys.readouterr().err
        os.kill(_rank_pid(launcher, 1), signal.SIGTERM)
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "stopping at step" in err, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["preempted"] and stopped["step"] < 12
    ckpt = run / "checkpoints" / f"step_{stopped['step']:08d}"
    assert checkpoints(run) == [ckpt.name] and max(rows(run)) == stopped["step"]
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not (run / "lock").exists()

    cmd[cmd.index("--main_process_port") + 1] = str(free_port())
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ckpt} at step {stopped['step']}" in r.stderr
    assert sorted(rows(run)) == list(range(1, 13))


def test_sigterm_in_extraction_drops_the_shard_in_flight_and_the_rerun_completes(tmp_path, extracted, monkeypatch,
                                                                                capsys):
    """SIGTERM while shard-000001 is being read: shard-000000 stays recorded, shard-000001 is dropped
    (no record, no temporary), shard-000002 is not started, exit status 75; the rerun finishes with the
    same bytes as an uninterrupted extraction."""
    path = write_config(tmp_path, Path(extracted[1].data.shards).parent, 3)
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMG2VEC_FAULT", "decode:shard-000001:TERM")  # the main process decodes: no race
    assert extract_main(["--config", str(path), "--no-progress"]) == PREEMPTED
    assert "stopped on SIGTERM" in capsys.readouterr().err
    assert sorted(p.name for p in cache.glob("*.done.json")) == ["shard-000000.done.json"]
    assert sorted(p.name for p in cache.glob("shard-*")) == ["shard-000000", "shard-000000.done.json"]
    assert not list(cache.glob("*.tmp-*")) and not list(cache.glob("*.lock"))
    monkeypatch.delenv("IMG2VEC_FAULT")
    assert extract_main(["--config", str(path), "--no-progress"]) == 0
    for name in ("shard-000000", "shard-000001", "shard-000002"):
        ours = json.loads((cache / f"{name}.done.json").read_text())
        theirs = json.loads((Path(extracted[1].cache.path) / f"{name}.done.json").read_text())
        assert ours["files"] == theirs["files"], name


def test_teacher_with_a_nan_weight_is_refused_naming_shard_and_key(tmp_path, extracted, capsys):
    import timm

    sd = timm.create_model("resnet18", num_classes=0).state_dict()
    sd["layer4.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "nan_resnet18.pth"
    torch.save(sd, weights)
    path = write_config(tmp_path, Path(extracted[1].data.shards).parent, 3)
    assert extract_main(["--config", str(path), "--no-progress", "--set", f"teacher.weights={json.dumps(str(weights))}"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "shard-000000" in err and "for key '" in err and "teacher.weights" in err, err
    assert not list((tmp_path / "cache").glob("*.done.json")) and not list((tmp_path / "cache").glob("*.tmp-*"))


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips_and_no_nonfinite_checkpoint_is_written(tmp_path, extracted, capsys, mode):
    """lr 1e30 without clipping: step 1 sends the weights to ~1e28, so from step 2 on the loss is NaN.
    "error": exit 1 naming the step, the last checkpoint (step 1, finite) kept although keep_checkpoints is 1;
    "skip": the run ends, steps 2..4 are skipped and the weights stay those of step 1."""
    path, _ = extracted
    run = tmp_path / "run"
    code = train_main(["--config", str(path), "--no-progress", "--set", f"train.run_dir={json.dumps(str(run))}",
                       "--set", "train.max_steps=4", "--set", "train.lr=1e30", "--set", "train.clip_grad=0",
                       "--set", "train.checkpoint_every=1", "--set", f"train.keep_checkpoints={1 if mode == 'error' else 4}",
                       "--set", f"train.on_nonfinite={mode}"])
    err = capsys.readouterr().err
    for name in checkpoints(run):
        assert all(torch.isfinite(w).all() for w in load_file(run / "checkpoints" / name / "model.safetensors").values())
    if mode == "error":
        assert code == 1 and "loss of step 2 is not finite" in err and "step_00000001" in err, err[-2000:]
        assert checkpoints(run) == ["step_00000001"] and max(rows(run)) == 1
    else:
        assert code == 0 and err.count("step skipped") == 3, err[-2000:]
        assert rows(run)[4]["skipped_steps"] == 3
        first, last = (load_file(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors") for s in (1, 4))
        assert all(torch.equal(first[k], last[k]) for k in first)
    shutil.rmtree(run)



def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    """The save itself refuses weights with a NaN (a finite loss can still overflow an update): no
    checkpoint directory, partial or not, and the last good one stays."""
    from accelerate import Accelerator

    from train.checkpoints import Checkpoints, NonFinite

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    ckpts = Checkpoints(tmp_path, keep=1)
    ckpts.save(accelerator, 1, {"step": 1, "epoch": 0})
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFinite, match="weights at step 2 are not finite: no checkpoint written"):
        ckpts.save(accelerator, 2, {"step": 2, "epoch": 0})
    assert checkpoints(tmp_path) == ["step_00000001"]
