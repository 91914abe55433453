"""train.compile and teacher.compile: compiled models compute what eager ones do, to a stated tolerance, and leave the
checkpoints' keys as they were; a compiler that fails falls back to eager with a warning naming the error."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.compiled import compile_forward
from common.config import load_config
from extract.pipeline import run_extraction
from shards.manifest import read_manifest
from shards.reader import iter_feature_shard
from tests.conftest import read_metrics, run_in_process, write_config


def tokens(cache: Path) -> dict[str, np.ndarray]:
    manifest = read_manifest(cache)
    return {s["key"]: manifest.token_codec.decode(s["packed"]) for name in manifest.shard_names
            for s in iter_feature_shard(cache, name, manifest)}


@pytest.mark.slow
def test_compiled_student_and_teacher_agree_with_eager(tmp_path, extracted, source):
    """train.compile: the first 3 steps' losses are eager's within 1e-4 relative (CPU fp32: inductor fuses and
    reorders float sums, ~1e-6 apart here), and the checkpoint holds the same keys (no `_orig_mod.`).
    teacher.compile: every stored token is eager's within the bf16 codec's bound (one bf16 rounding apart:
    2^-8 relative), and most are the same bf16 value."""
    path, cfg = extracted
    from torch._dynamo.utils import counters

    eager = run_in_process(path, tmp_path / "eager", "train.max_steps=3")
    counters.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled = run_in_process(path, tmp_path / "compiled", "train.max_steps=3", "train.compile=true")
    assert not [w for w in seen if "torch.compile failed" in str(w.message)]
    assert counters["stats"]["unique_graphs"] >= 2  # the encoder's and the decoder's block, compiled
    assert eager["step"] == compiled["step"] == 3
    for a, b in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    weights = [load_file(next((tmp_path / run / "checkpoints").glob("step_*")) / "model.safetensors")
               for run in ("eager", "compiled")]
    assert weights[0].keys() == weights[1].keys() and not any("_orig_mod" in k for k in weights[1])

    sets = {"teacher.compile": True, "extract.batch_size": 3}  # 6 images a shard: one batch shape, one compile
    run_extraction(load_config(write_config(tmp_path, source, 3, sets=sets)), progress=False)
    ours, theirs = tokens(tmp_path / "cache"), tokens(Path(cfg.cache.path))
    assert ours.keys() == theirs.keys()
    a, b = np.stack(list(ours.values())), np.stack(list(theirs.values()))
    assert np.all(np.abs(a - b) <= 2 ** -8 * np.abs(b) + 1e-30)
    assert np.mean(a == b) > 0.99


@pytest.mark.slow
def test_a_compiler_that_fails_falls_back_to_eager_with_a_warning(monkeypatch):
    """No working C compiler (inductor's cpp.cxx pointed at a missing file): the first call warns naming the error
    and returns eager's result; later calls run eager without trying again."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/cc",))
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    expected = module(x)
    compile_forward(module, "the test module")
    with pytest.warns(RuntimeWarning, match=r"the test module: torch.compile failed .*C\+\+ compiler.*running eager"):
        assert torch.equal(module(x), expected)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(module(x), expected)
    assert not seen and set(module.state_dict()) == {"0.weight", "0.bias"}
