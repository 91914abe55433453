"""Every setting is checked before any work, for both stages: exit 2, the key and the allowed values named,
nothing created. Also: a missing source shard points at data.shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from extract.cli import main as extract_main
from tests.conftest import write_config
from train.loop import main as train_main

EXTRACT = [  # (override, words the message must hold); the test config has resnet18 (5 stages) and size 64
    ("augment.size=72", ["augment.size", "stride 32", "64 or 96"]),
    ("augment.size=60", ["augment.size", "multiple"]),
    ("teacher.layer=5", ["teacher.layer", "[-5, 4]", "resnet18"]),
    ("augment.scale=[0.8, 0.2]", ["augment.scale", "min <= max <= 1"]),
    ("augment.scale=[0.2, 1.5]", ["augment.scale", "<= 1"]),
    ("augment.scale=[0.0, 1.0]", ["augment.scale", "0 < min"]),
    ("augment.ratio=[1.33, 0.75]", ["augment.ratio", "min <= max"]),
    ("augment.flip=1.5", ["augment.flip", "[0, 1]"]),
    ("augment.views=0", ["augment.views", ">= 1"]),
    ("extract.batch_size=0", ["extract.batch_size", ">= 1"]),
    ("data.workers=-1", ["data.workers", ">= 0"]),
]

TRAIN = [
    ("train.batch_size=0", ["train.batch_size", ">= 1"]),
    ("train.grad_accum=0", ["train.grad_accum", ">= 1"]),
    ("train.checkpoint_every=0", ["train.checkpoint_every", ">= 1"]),
    ("train.log_every=0", ["train.log_every", ">= 1"]),
    ("train.workers=-2", ["train.workers", ">= 0"]),
    ("train.lr=-1e-4", ["train.lr", ">= 0"]),
    ("train.lr=nan", ["train.lr", "finite"]),
    ("train.keep_checkpoints=0", ["train.keep_checkpoints", ">= 1"]),
    ("student.decoder_heads=5", ["student.decoder_heads", "divisor of student.decoder_dim (64)"]),
    ("student.mask_ratio=1.0", ["student.mask_ratio", "(0, 1)"]),
    ("student.mask_ratio=0.05", ["student.mask_ratio", "between 1 and 3 of the 4 teacher tokens", "masks 0"]),
    ("student.mask_ratio=0.95", ["student.mask_ratio", "masks 4"]),
    ("train.on_nonfinite=ignore", ["train.on_nonfinite", "'error', 'skip'"]),
]


@pytest.mark.parametrize("override,words", EXTRACT)
def test_bad_extraction_setting_is_named_before_any_work(tmp_path, source, capsys, override, words):
    path = write_config(tmp_path, source, 3)
    assert extract_main(["--config", str(path), "--no-progress", "--set", override]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "must be" in err, err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("override,words", TRAIN)
def test_bad_training_setting_is_named_before_any_work(tmp_path, extracted, capsys, override, words):
    """The mask ratio is checked against the cache's 2x2 token grid (64 px at stride 32)."""
    path, _ = extracted
    run = tmp_path / "run"
    assert train_main(["--config", str(path), "--no-progress", "--set", f"train.run_dir={json.dumps(str(run))}",
                       "--set", override]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "must" in err, err
    assert not run.exists()


def test_missing_source_shard_points_at_data_shards(tmp_path, extracted, capsys):
    path, cfg = extracted
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):  # shard-000002.tar went missing in the move
        shutil.copy(Path(cfg.data.shards).parent / name, moved / name)
    shards = json.dumps(str(moved / "shard-{000000..000002}.tar"))
    run = tmp_path / "run"
    assert train_main(["--config", str(path), "--no-progress", "--set", f"data.shards={shards}",
                       "--set", f"train.run_dir={json.dumps(str(run))}"]) == 2
    err = capsys.readouterr().err
    assert str(moved / "shard-000002.tar") in err and "data.shards" in err, err
    assert not run.exists()

    path = write_config(tmp_path, moved, 3)
    assert extract_main(["--config", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard-000002.tar: file not found" in err and "is data.shards right?" in err, err


@pytest.mark.parametrize("stage,key,url", [("extract", "cache.path", "http://127.0.0.1:9/cache"),
                                           ("train", "train.run_dir", "s3://bucket/run")])
def test_a_url_to_write_into_is_refused_before_any_work(tmp_path, source, request, capsys, monkeypatch, stage, key,
                                                        url):
    """pathlib would write `http://host/cache` into a local folder `./http:/host/cache` and report success; the
    stage that writes there refuses the URL (exit 2), naming the way round (a file system, then an upload)."""
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, source, 3) if stage == "extract" else request.getfixturevalue("extracted")[0]
    main = extract_main if stage == "extract" else train_main
    assert main(["--config", str(path), "--no-progress", "--set", f"{key}={json.dumps(url)}"]) == 2
    err = capsys.readouterr().err
    assert f"'{key}' must be a local or shared file system path" in err and "aws s3 sync" in err, err
    assert list(tmp_path.iterdir()) == ([path] if stage == "extract" else [])  # no ./http: nor ./s3: folder
