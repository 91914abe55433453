"""Elastic resume and the position in samples: an epoch's plan dealt again from where it stands (any world size and
batch size), the learning rate as a function of the epoch fraction, updates of grad_accum micro-batches that span
two epochs, and resumes with another batch size (a streamed run refuses, saying why). The 2 -> 1 and 1 -> 2
process resumes, stopped by real signals, are in tests/test_group_signals.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.runtime import seed_from
from tests.conftest import UNEVEN, assert_one_epoch, epoch_batches, epoch_order, read_metrics, run_in_process
from train.data import epoch_plan
from train.loop import main as train_main
from train.schedule import Position, Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def trace_lines(run: Path, rank: int = 0) -> list[tuple[int, list[str]]]:
    """(update, keys) per micro-batch, in the order trained (a micro-batch per line: grad_accum lines per update)."""
    return [(int(line.split()[0]), line.split()[1:]) for line in (run / f"keys-rank{rank}.txt").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("world,batch,consumed", [(1, 2, 0), (2, 2, 6), (2, 2, 8), (3, 2, 6), (1, 4, 10), (2, 3, 27),
                                                 (4, 2, 28)])
def test_the_rest_of_an_epoch_is_dealt_from_its_permutation(world, batch, consumed):
    """Against a brute force: the ranks' batches from `consumed` on are perm[consumed:] in consecutive global batches
    of world x batch (rank r takes the r-th B of each), less than one global batch is left out, and with the deal
    unchanged a resume deals exactly the rows the uninterrupted epoch had left."""
    counts = np.array(UNEVEN)
    n = int(counts.sum())
    perm = np.random.default_rng(seed_from(5, 3, "samples")).permutation(n)
    plans = [epoch_plan(counts, epoch=3, seed=5, world=world, rank=r, batch_size=batch, consumed=consumed)
             for r in range(world)]
    steps = (n - consumed) // (world * batch)
    assert all(p.shape == (steps, batch) for p in plans)
    for s in range(steps):
        dealt = np.concatenate([p[s] for p in plans])
        np.testing.assert_array_equal(dealt, perm[consumed + s * world * batch:consumed + (s + 1) * world * batch])
    assert n - consumed - steps * world * batch < world * batch
    if consumed % (world * batch) == 0:
        full = [epoch_plan(counts, epoch=3, seed=5, world=world, rank=r, batch_size=batch) for r in range(world)]
        for p, f in zip(plans, full):
            np.testing.assert_array_equal(p, f[consumed // (world * batch):])


def test_the_learning_rate_follows_the_epoch_fraction_and_its_peak_the_global_batch():
    """Warmup over 2 of 10 epochs, then a half-cosine: at the same epoch fraction, a run with half the global batch
    has half the learning rate (the same shape), the warmup's first update is one update's fraction of the ramp, and
    the end reaches the floor. With max_steps the cosine ends where that many updates end."""
    from common.config import Train

    t = Train(batch_size=4, lr=0.256, epochs=10, warmup_epochs=2, min_lr=0.0)
    two, one = Schedule.of(t, 28, 2), Schedule.of(t, 28, 1)  # 3 updates of 8 per epoch (24 samples), 7 of 4
    assert (two.peak, one.peak, two.epoch_samples, one.epoch_samples) == (0.008, 0.004, 24, 28)
    assert two.lr(Position()) == pytest.approx(0.008 * (8 / 24) / 2)
    for epoch, quarter in [(2, 0), (3, 1), (6, 2), (9, 3)]:  # past the warmup, the same fraction in both deals
        p2, p1 = Position(epoch=epoch, consumed=6 * quarter), Position(epoch=epoch, consumed=7 * quarter)
        assert one.lr(p1) == pytest.approx(two.lr(p2) / 2, rel=1e-12), (epoch, quarter)
    x = (6 + 8 / 24 - 2) / 8
    assert two.lr(Position(epoch=6, consumed=8)) == pytest.approx(0.008 * 0.5 * (1 + np.cos(np.pi * x)))
    assert two.lr(Position(epoch=10)) == 0.0 and two.done(Position(epoch=10)) and not two.done(Position(epoch=9))
    capped = Schedule.of(Train(batch_size=4, max_steps=6, epochs=10, warmup_epochs=0), 28, 2)
    assert capped.end == 2.0 and capped.done(Position(step=6)) and not capped.done(Position(step=5, epoch=3))


# ---------------------------------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_grad_accum_updates_span_epochs_and_use_every_micro_batch_once(tmp_path, extracted):
    """18 samples, batch 4: 4 micro-batches an epoch, grad_accum 3, so updates span epochs. Each epoch's micro-batches
    are its plan's batches in order, once each (before, the epoch's last partial micro-batches were read again up to
    grad_accum times and the next epoch's first were never used), and a run stopped after update 2 (mid-epoch 1,
    its checkpoint between epochs' micro-batches) and resumed trains the same micro-batches."""
    path, cfg = extracted
    sets = ["train.grad_accum=3", "train.trace_keys=true", "train.checkpoint_every=2", "train.workers=2"]
    run_in_process(path, tmp_path / "A", *sets, "train.max_steps=4")
    lines = trace_lines(tmp_path / "A")
    assert [u for u, _ in lines] == [u for u in range(4) for _ in range(3)]  # 4 updates of 3 micro-batches
    cache = Path(cfg.cache.path)
    for epoch in range(3):
        plan = [b["keys"] for b in epoch_batches(cache, epoch, bs=4, with_tokens=False)[0]]
        assert [keys for _, keys in lines[4 * epoch:4 * epoch + 4]] == plan, epoch
    position = json.loads((tmp_path / "A" / "checkpoints" / "step_00000002" / "position.json").read_text())
    assert {k: position[k] for k in ("step", "epoch", "consumed", "micro")} == {"step": 2, "epoch": 1, "consumed": 8,
                                                                                "micro": 6}
    run_in_process(path, tmp_path / "B", *sets, "train.max_steps=2")
    run_in_process(path, tmp_path / "B", *sets, "train.max_steps=4")
    assert trace_lines(tmp_path / "B") == lines


@pytest.mark.slow
def test_a_resume_with_another_batch_size_continues_the_epoch(tmp_path, uneven, capsys):
    """28 samples: 3 updates of batch 4 (12 samples), then the same run dir with batch 3 to the epoch's end (5
    more updates, 15 samples, 1 left out): the epoch trained a prefix of its permutation, none twice; the learning
    rate of the first resumed update is the new schedule's at that position; a streamed run refuses such a resume
    and says why."""
    path, cfg = uneven
    run = tmp_path / "run"
    sets = ["train.trace_keys=true", "train.epochs=1"]
    run_in_process(path, run, *sets, "train.max_steps=3")
    capsys.readouterr()
    summary = run_in_process(path, run, *sets, "train.batch_size=3")
    assert summary["step"] == 8 and "elastic resume: batch_size 4 -> 3" in capsys.readouterr().err
    keys = [k for _, ks in trace_lines(run) for k in ks]
    assert len(keys) == 27
    assert_one_epoch(keys, epoch_order(Path(cfg.cache.path)), last_global_batch=3)
    sched = Schedule.of(load_config(path, [*sets, "train.batch_size=3"]).train, 28, 1)  # 9 updates of 3 an epoch
    assert read_metrics(run)[3]["lr"] == pytest.approx(sched.lr(Position(step=3, epoch=0, consumed=12)), rel=1e-6)

    stream = tmp_path / "stream"
    args = ["--config", str(path), "--no-progress", "--set", f"train.run_dir={json.dumps(str(stream))}",
            "--set", "train.reader=stream"]
    assert train_main([*args, "--set", "train.max_steps=1"]) == 0
    capsys.readouterr()
    assert train_main([*args, "--set", "train.max_steps=2", "--set", "train.batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "deal.batch_size: run dir has 4, this run has 3" in err and "A streamed run" in err, err
