"""`img2vec demo` as a new user runs it: stopped by SIGTERM mid-training, it says to rerun the same command, and that
command resumes (the data, the cache and the checkpoint kept; no step trained twice) and ends with a report whose
figures say what they were measured on; a rerun with other options is refused, naming them."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, read_metrics, run_cli


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
    td = report["token_diversity"]
    assert td["cache"]["size_px"] == 64 and td["cache"]["tokens_per_view"] == 4 and "train images" in td["cache"]["images"]
    assert td["maps"]["size_px"] == 224 and td["maps"]["tokens_per_view"] == 49 and "val images" in td["maps"]["images"]
    assert report["knn_during_training"][-1][0] == 40 and report["resumed"] is True
    assert report["knn_during_training"][-1][1] == pytest.approx(report["knn"]["trained"]["top1"])  # the same probe
    assert Path(report["curves_png"]).is_file()

    refused = run_cli(["img2vec", "demo", "--quick", "--steps", "41", "--out", str(out)])
    assert refused.returncode == 2 and "made with other options (steps 40 there, 41 now)" in refused.stderr
