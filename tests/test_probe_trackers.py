"""Trackers by name (train.log_with) and the k-NN probe during pretraining (train.eval_every): TensorBoard's event
files and W&B's offline run hold the metrics rows; the probe's top-1 is the k-NN command's on the same checkpoint,
leaves the global RNGs and the training untouched, and a resumed run with it equals an uninterrupted one."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config, validate
from tests.conftest import read_metrics, run_in_process
from train.loop import main as train_main
from train.probe import KnnProbe, extract_features, kept_rng, knn_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def eval_sets(cfg) -> list[str]:
    """Memory bank: the source's first two shards (12 labelled images); queries: its third (6)."""
    src = Path(cfg.data.shards).parent
    return [f"train.eval_bank_shards={json.dumps(str(src / 'shard-{000000..000001}.tar'))}",
            f"train.eval_shards={json.dumps(str(src / 'shard-000002.tar'))}"]


def rng_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


# ---------------------------------------------------------------------------------------------------- the probe


def test_probe_keeps_the_rngs_and_the_mode_and_equals_the_knn(extracted):
    """The probe's row is knn_accuracy's top-1; it draws nothing from the global RNGs (a bare feature pass draws
    the DataLoader's base seed from torch's) and leaves the encoder in train mode."""
    from img2vec.knn import random_student

    path, cfg = extracted
    cfg = load_config(path, [*eval_sets(cfg), "train.eval_every=1", "train.eval_crop_pct=1.0"])
    probe = KnnProbe.of(cfg.train, 64)
    encoder = random_student("vit_tiny_patch16", 64)[0].train()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = rng_states()
    row = probe(encoder)
    assert rng_states() == before and encoder.training
    expected = knn_accuracy(encoder, probe.bank, probe.queries, 64, crop_pct=1.0, workers=0)
    assert row["knn_top1"] == expected["top1"] and row["knn_queries"] == 6 == expected["val_samples"]
    extract_features(encoder, probe.queries, 64, workers=0)  # the same pass outside kept_rng moves torch's RNG
    assert rng_states()[2] != before[2]
    with kept_rng():
        random.random(), np.random.rand(), torch.rand(3)
    assert rng_states()[:2] == before[:2]


def test_probe_settings_are_checked_before_any_work(tmp_path, extracted, capsys):
    path, cfg = extracted
    bank, queries = eval_sets(cfg)
    for sets, words in [
        (["train.eval_every=5"], "'train.eval_shards' must be labelled shards"),
        ([queries], "'train.eval_every' must be an integer >= 1 (steps) when train.eval_shards is set"),
        ([queries, "train.eval_every=2", "train.eval_crop_pct=0"], "'train.eval_crop_pct' must be a fraction in (0, 1]"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            validate(load_config(path, sets), "train")
    missing = str(tmp_path / "nowhere-{0..1}.tar")
    unlabelled = tmp_path / "unlabelled.tar"
    import webdataset as wds

    with wds.TarWriter(str(unlabelled)) as w:
        w.write({"__key__": "a", "jpg": (Path(cfg.data.shards).parent / "shard-000000.tar").read_bytes()[:10]})
    for shards, words in [(missing, "train.eval_shards: 2 of 2 shards not found"),
                          (str(unlabelled), "samples without a .cls label")]:
        run = tmp_path / f"run-{len(words)}"
        assert train_main(["--config", str(path), "--no-progress", "--set", "train.eval_every=1", "--set",
                           f"train.eval_shards={json.dumps(shards)}", "--set", f"train.run_dir={run}"]) == 2
        assert words in capsys.readouterr().err
        assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_probe_during_training_resumes_exactly_and_leaves_the_training_alone(tmp_path, extracted):
    """A (probe every 3 steps, 6 steps), B (the same, stopped at step 3, then resumed to 6) and C (no probe): A and B
    log the same rows, k-NN ones included (at 3 and 6, the last); A and C take the same batches, masks and losses;
    A's last top-1 is `img2vec knn --run A`'s on the same shards."""
    from img2vec.knn import main as knn_main

    path, cfg = extracted
    c = 3
    sets = ["train.trace_keys=true", "train.lr=0.064", "train.warmup_epochs=0", f"train.min_lr={0.064 * 4 / 256}",
            "train.log_every=2", f"train.checkpoint_every={c}"]  # a constant lr: B's first leg has max_steps c
    probe = [*eval_sets(cfg), f"train.eval_every={c}", "train.eval_crop_pct=1.0"]
    run_in_process(path, tmp_path / "A", *sets, *probe, f"train.max_steps={2 * c}")
    run_in_process(path, tmp_path / "B", *sets, *probe, f"train.max_steps={c}")
    run_in_process(path, tmp_path / "B", *sets, *probe, f"train.max_steps={2 * c}")
    run_in_process(path, tmp_path / "C", *sets, f"train.max_steps={2 * c}")
    a, b, no_probe = (read_metrics(tmp_path / r) for r in "ABC")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 3, 4, 6]  # every 2nd, and the probe's 3 and 6
    assert [r["step"] for r in a if "knn_top1" in r] == [3, 6]
    timing = {"samples_per_s", "data_wait", "knn_seconds"}
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra.keys() - timing:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-8), (ra["step"], k)
    assert {r["step"]: r["loss"] for r in no_probe}.items() <= {r["step"]: r["loss"] for r in a}.items()
    for name in ("keys-rank0.txt", "masks-rank0.txt"):
        assert (tmp_path / "A" / name).read_text() == (tmp_path / "C" / name).read_text()
    out = tmp_path / "knn.json"
    bank, queries = (s.split("=", 1)[1].strip('"') for s in eval_sets(cfg))
    assert knn_main(["--train-shards", bank, "--val-shards", queries, "--run", str(tmp_path / "A"), "--crop-pct", "1.0",
                     "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == a[-1]["knn_top1"]


# ---------------------------------------------------------------------------------------------------- trackers


def test_tracker_names_and_packages_are_checked_before_any_step(tmp_path, extracted, capsys):
    """An unknown tracker, or one whose package is missing, exits 2 naming what to install; `train.tensorboard =
    true` (the old switch) still works, named as log_with."""
    from accelerate.tracking import get_available_trackers

    from train.trackers import PACKAGES

    path, _ = extracted
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = next((n for n in PACKAGES if n not in available), None)
    cases = [('["tensorboard", "nope"]', "unknown tracker 'nope'")]
    if missing:
        cases.append((f'["{missing}"]', f"the '{missing}' tracker needs the {PACKAGES[missing][0]} package, which is "
                                        f"not installed: pip install"))
    for value, words in cases:
        run = tmp_path / f"run-{len(words)}"
        assert train_main(["--config", str(path), "--no-progress", "--set", f"train.log_with={value}", "--set",
                           f"train.run_dir={run}"]) == 2
        assert words in capsys.readouterr().err
        assert not (run / "metrics.jsonl").exists()
    assert load_config(path, ["train.tensorboard=true"]).train.log_with == ["tensorboard"]
    assert "'train.tensorboard' is deprecated: use train.log_with" in capsys.readouterr().err
    assert load_config(path, ["train.tensorboard=false"]).train.log_with == []
    assert [load_config(path, [f"train.log_with={v}"]).train.log_with for v in ('tensorboard', '"wandb"', '""')] == [
        ["tensorboard"], ["wandb"], []]  # a single name, as accelerate takes it


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_metrics_rows(tmp_path, extracted):
    """log_with = ["tensorboard"]: event files under <run_dir>/img2vec whose loss and knn_top1 scalars are the
    metrics.jsonl rows', step by step. Killed after step 3's row but before its checkpoint (step 3's checkpoint
    removed), then resumed from step 2 to 4, the run appends to the same log dir, the replayed step 3 replacing the
    killed one (TensorBoard drops a tag's events from a step logged again on), as metrics.jsonl's rows do."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[test]')")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, cfg = extracted
    run, sets = tmp_path / "run", ['train.log_with=["tensorboard"]', *eval_sets(cfg), "train.eval_every=2",
                                   "train.checkpoint_every=2"]
    run_in_process(path, run, "train.max_steps=3", *sets)
    killed = {r["step"]: r["samples_per_s"] for r in read_metrics(run)}
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    run_in_process(path, run, "train.max_steps=4", *sets)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["samples_per_s"] != killed[3]  # step 3 replayed
    events = EventAccumulator(str(run / "img2vec"))
    events.Reload()
    for key in ("loss", "global_loss", "lr", "knn_top1", "samples_per_s"):
        scalars = events.Scalars(key)  # in the order read: a step logged twice would be here twice
        assert [e.step for e in scalars] == [r["step"] for r in rows if key in r], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in rows if key in r], rel=1e-6), key
    assert [e.step for e in events.Scalars("knn_top1")] == [2, 4]
    assert len(list((run / "img2vec").glob("events.out.tfevents.*"))) == 2


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (`run-<id>.wandb`): W&B's record log (LevelDB's log format: 32 KiB
    blocks, each record a 7-byte header of crc32, length and kind, then a piece of a protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, piece, records = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B", run_file
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        piece, pos = piece + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            records.append(wandb_internal_pb2.Record.FromString(piece))
            piece = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_rows(tmp_path, extracted, monkeypatch):
    """log_with = ["wandb"] with WANDB_MODE=offline: an offline run under WANDB_DIR whose history rows are the
    metrics.jsonl rows (loss and k-NN), named after the run dir. Resumed (max_steps 2, then 3), the run logs to the
    same W&B run (the id in <run_dir>/wandb_run_id, resume "allow"): two run files, one id, the steps continuing."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[test]')")
    path, cfg = extracted
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run-a"
    import wandb

    for steps in (2, 3):  # a WANDB_DIR each: W&B names an offline run's dir by its start's second and id
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"wandb-{steps}"))
        (tmp_path / f"wandb-{steps}").mkdir()
        run_in_process(path, run, f"train.max_steps={steps}", 'train.log_with=["wandb"]', *eval_sets(cfg),
                       "train.eval_every=2")
        wandb.teardown()  # as a rerun's new process would (W&B keeps its settings); run.finish() may return
        # before W&B's service has flushed the run file (seen on a loaded CI)
    history, starts = [], []
    for steps in (2, 3):
        (run_file,) = (tmp_path / f"wandb-{steps}" / "wandb").glob("offline-run-*/run-*.wandb")
        records = wandb_records(run_file)
        assert records[-1].WhichOneof("record_type") == "exit", "the run file ends with the run's exit record"
        history += [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                    for r in records if r.WhichOneof("record_type") == "history"]
        starts += [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    rows = read_metrics(run)
    assert [h["step"] for h in history] == [r["step"] for r in rows] == [1, 2, 3]
    for h, r in zip(history, rows):
        assert {k: h[k] for k in r} == pytest.approx(r, rel=1e-6)
    assert "knn_top1" in history[1] and "knn_top1" in history[2]
    assert [(s.run_id, s.resume, s.display_name, s.project) for s in starts] == [
        ((run / "wandb_run_id").read_text().strip() if (run / "wandb_run_id").exists() else None, True, "run-a",
         "img2vec")] * 2, "both starts log to the run dir's W&B run"
