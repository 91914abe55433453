"""bench/gpu.py, the GPU node's one command: `--tiny` runs the same code on this CPU (so it cannot rot) and writes
the JSON the doc describes; its step and rate arithmetic against hand-made timings; a section that fails is
reported while the others run."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.append(str(REPO / "bench"))  # the benches import their helpers as top-level modules


def finite_spread(s: dict, n: int | None = None) -> None:
    assert 0 < s["min"] <= s["median"] <= s["max"] and math.isfinite(s["max"]), s
    if n is not None:
        assert s["n"] == n


def test_step_times_come_from_batch_requests():
    from _train_speed import summarize

    # requests (asked, got): a step every 0.5 s after a 3 s first step, each waiting 0.1 s for its batch
    asked = [0.0, 3.0, 3.5, 4.0, 4.5]
    run = {"name": "cache-0", "mode": "cache", "compiled": False, "round": 0, "peak_gpu_mib": None,
           "requests": [(a, a + 0.1) for a in asked]}
    synthetic = {**run, "name": "synthetic-0", "mode": "synthetic", "requests": [(a / 2, a / 2) for a in asked]}
    out = summarize([synthetic, run], warmup=1, batch=8)
    cache = out["runs"][1]
    assert cache["first_step_s"] == pytest.approx(3.0)
    assert cache["steps_per_s"] == {"median": pytest.approx(2.0), "min": pytest.approx(2.0),
                                    "max": pytest.approx(2.0), "n": 3}
    assert cache["samples_per_s"] == pytest.approx(16.0)
    assert cache["data_wait"] == pytest.approx(0.1 / 0.5)
    assert out["runs"][0]["data_wait"] == 0
    assert out["ratios"]["cache / synthetic"]["median"] == pytest.approx(0.5)  # synthetic: twice as fast


def test_a_run_that_failed_or_was_skipped_has_no_rate():
    from _train_speed import markdown, summarize

    runs = [{"name": "cache-0", "mode": "cache", "compiled": False, "round": 0, "error": "Traceback\nBoom: no",
             "requests": []},
            {"name": "online-0", "mode": "online", "compiled": False, "round": 0, "skipped": "past the budget"},
            {"name": "synthetic-0", "mode": "synthetic", "compiled": False, "round": 0, "requests": [(0, 0), (1, 1)]}]
    out = summarize(runs, warmup=1, batch=4)
    assert [("steps_per_s" in r) for r in out["runs"]] == [False, False, False]
    assert out["runs"][2]["error"] == "only 1 steps timed" and out["ratios"] == {}
    text = markdown(out, gpu=False)
    assert "error: Boom: no" in text and "skipped: past the budget" in text


def test_extraction_rates_from_batch_times():
    from _extract_speed import rates

    # batches of 40 views reach the loop at 1.0, 1.5, 2.0 s of a 3 s run: 80 views in 1 s steady, 120 in 3 s
    assert rates([(1.0, 40), (1.5, 40), (2.0, 40)], 3.0) == {"views_per_s": 80.0, "whole_run": 40.0}
    assert rates([(1.0, 40)], 2.0) == {"views_per_s": 20.0, "whole_run": 20.0}


def test_a_failing_section_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
    import gpu

    def broken(bench):
        raise RuntimeError("no teacher today")

    monkeypatch.setattr(gpu, "extract_section", broken)
    monkeypatch.setattr(gpu, "train_section", lambda bench, name: ({"arch": name}, f"{name} table\n"))
    args = gpu.argparse.Namespace(json=str(tmp_path / "out.json"), device="cpu", extract_workers=1, train_workers=1)
    bench = gpu.Bench(args, gpu.TINY, tmp_path)
    out = {"sections": {}}
    gpu.run_sections(bench, ["extract", "train_base"], out)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["sections"]["extract"]["status"] == "error"
    assert "RuntimeError: no teacher today" in written["sections"]["extract"]["error"]
    assert written["sections"]["train_base"]["status"] == "ok"
    assert written["sections"]["train_base"]["result"] == {"arch": "train_base"}
    printed = capsys.readouterr().out
    assert "no teacher today" in printed and "train_base table" in printed


def test_unknown_sections_are_refused(capsys):
    import gpu

    with pytest.raises(SystemExit):
        gpu.main(["--sections", "extract,warp_drive"])
    assert "unknown warp_drive" in capsys.readouterr().err


@pytest.mark.slow
def test_no_run_starts_that_would_end_past_the_budget(tmp_path):
    import time

    from _train_speed import MODES, plan, run_child

    runs = plan(MODES, [False, True], 1, tmp_path / "runs")
    results = run_child(REPO / "pipeline.toml", [], runs, tmp_path / "child", deadline=time.time() + 600,
                        estimates=(900.0, 900.0))  # every run is expected to take 15 minutes: none starts
    assert [r["skipped"] for r in results] == ["it would end past the time budget (--budget)"] * 6
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_tiny_runs_every_section_and_writes_the_json(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--json", str(out),
                           "--tmp", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["tiny"] and {"cpu", "cores", "gpu", "torch", "timm"} <= set(d["machine"])
    assert list(d["sections"]) == ["extract", "train_base", "train_large"]
    for name, section in d["sections"].items():
        assert section["status"] == "ok", (name, section["error"])
        assert section["seconds"] > 0
    sizes = d["sizes"]

    rows = d["sections"]["extract"]["result"]["rows"]
    assert [(r["views"], r["codec"] or r["what"]) for r in rows] == [
        (v, what) for v in sizes["views"] for what in ("teacher alone", "decode + cut alone", *sizes["codecs"])]
    for r in rows:
        for key in ("views_per_s", "vs_teacher", "vs_cut"):
            finite_spread(r[key], n=sizes["rounds"])
        if r["codec"]:
            finite_spread(r["cores_busy"])
            finite_spread(r["whole_run"])

    for name in ("train_base", "train_large"):
        result = d["sections"][name]["result"]
        assert result["arch"] == sizes["students"][name][0] and result["teacher_precision"] == "float32"
        assert "decoder 2 blocks x 512 wide" in result["student"]  # the recipe's decoder, from the arch
        assert [(r["mode"], r["compiled"]) for r in result["runs"]] == [
            (m, c) for c in (False, True) for m in ("synthetic", "cache", "online")]
        for r in result["runs"]:
            assert not r["error"] and not r["note"], r
            finite_spread(r["steps_per_s"], n=sizes["steps"])
            assert 0 <= r["data_wait"] < 1 and r["first_step_s"] > 0
        assert set(result["ratios"]) == {"cache / synthetic", "cache / online", "compiled cache / synthetic",
                                         "compiled cache / online", "compiled / eager, cache"}
        for ratio in result["ratios"].values():
            finite_spread(ratio, n=1)
    assert "| V | what | views/s, steady |" in proc.stdout and "| mode | round | steps/s |" in proc.stdout
