"""Faults and bad input: each is injected for real and must end well (see docs/RELIABILITY.md)."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.augment import decode_image
from common.config import ConfigError, load_config
from common.teacher import build_teacher
from extract.pipeline import run_extraction
from tests.conftest import encode_image as _encode
from tests.conftest import needs_mount, odd_samples, run_cli, write_config
from tests.conftest import write_odd_shard as _write_odd_shard


def test_odd_and_corrupt_images_are_converted_or_skipped_and_recorded(tmp_path):
    samples, bad = odd_samples()
    src = tmp_path / "src"
    src.mkdir()
    _write_odd_shard(src / "shard-000000.tar", samples)
    cfg = load_config(write_config(tmp_path, src, 1))
    summary = run_extraction(cfg, progress=False)
    record = json.loads((tmp_path / "cache" / "shard-000000.done.json").read_text())
    assert {s["key"] for s in record["skipped"]} == bad
    assert all(s["reason"] for s in record["skipped"])
    from shards.index import read_index
    keys = [k.decode() for k in read_index(tmp_path / "cache", "shard-000000")["key"]]
    assert keys == [s["key"] for s in samples if s["key"] not in bad]  # same order
    assert all(s["reason"] and "0x" not in s["reason"] for s in record["skipped"])  # no reprs, no addresses
    assert "UnidentifiedImageError: cannot identify image file <_io.BytesIO>" in {s["reason"] for s in record["skipped"]}
    assert summary["skipped_samples"] == len(bad) and summary["cache_complete"]


def test_odd_images_become_rgb_with_the_right_values():
    samples, bad = odd_samples()
    by_key = {s["key"]: s for s in samples}
    for s in samples:
        if s["key"] not in bad:
            assert decode_image(s["image"]).mode == "RGB", s["key"]
    g16 = np.asarray(decode_image(by_key["png16"]["image"]))[..., 0]  # 16-bit -> 8-bit by value / 257
    expected = np.round(np.arange(40 * 50).reshape(40, 50) * 30 / 65535 * 255).astype(np.uint8)
    assert np.abs(g16.astype(int) - expected).max() <= 1
    rgba = np.asarray(decode_image(_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")))
    assert (rgba == 255).all()  # transparent composites on white


@needs_mount
@pytest.mark.slow
def test_no_space_left_is_a_clear_error_and_rerun_finishes(tmp_path, source):
    """A real full disk: a 120 KB tmpfs holds about one shard of the three."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(disk)], check=True)
    try:
        path = write_config(tmp_path, source, 3, cache="disk/cache")
        r = run_cli(["extract-features", "--config", str(path), "--no-progress"])
        assert r.returncode == 3 and "no space left" in r.stderr, r.stderr[-1500:]
        assert "()" not in r.stderr and str(disk / "cache") in r.stderr  # the file, or the cache: never an empty name
        records = list((disk / "cache").glob("*.done.json"))
        assert len(records) < 3
        for rec in records:  # what is recorded is complete and intact
            from shards.index import shard_dir, tree_files
            rec_d = json.loads(rec.read_text())
            assert tree_files(shard_dir(disk / "cache", rec_d["shard"])) == rec_d["files"]
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        r = run_cli(["extract-features", "--config", str(path), "--no-progress"])
        assert r.returncode == 0, r.stderr[-1500:]
        assert json.loads(r.stdout)["cache_complete"]
        assert not list((disk / "cache").glob("*.tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("override,words", [
    ("student.mask_ratioo=0.5", ["student.mask_ratioo", "unknown key"]),
    ("trainn.lr=1", ["unknown section", "trainn"]),
    ("train.lr=fast", ["train.lr", "float"]),
    ("augment.views=2.5", ["augment.views", "int"]),
    ("cache.format=hdf5", ["cache.format", "wds"]),
    ("cache.codec=gzip9", ["cache.codec", "bf16-zstd"]),
    ("teacher.weights=/nonexistent/dino.pth", ["teacher.weights", "/nonexistent/dino.pth"]),
])
@pytest.mark.slow
def test_bad_configuration_is_named_before_any_work(tmp_path, source, override, words):
    path = write_config(tmp_path, source, 3)
    r = run_cli(["extract-features", "--config", str(path), "--set", override, "--no-progress"])
    assert r.returncode == 2, r.stderr[-1500:]
    assert all(w in r.stderr for w in words), r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists()  # nothing was started


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[train]\nlr = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")


def _dino_files(tmp_path: Path) -> tuple[dict, list[Path]]:
    """A backbone-only file and a full DINO training checkpoint with argparse args, as DINO saves them."""
    import timm

    sd = timm.create_model("resnet18", num_classes=0).state_dict()
    head = {"mlp.0.weight": torch.randn(8, 512), "last_layer.weight_g": torch.randn(8, 1)}
    backbone_only = tmp_path / "dino_resnet18_pretrain.pth"
    torch.save(sd, backbone_only)
    full = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in sd.items()} | {f"module.head.{k}": v for k, v in head.items()},
                "teacher": {f"backbone.{k}": v for k, v in sd.items()} | {f"head.{k}": v for k, v in head.items()},
                "epoch": 100, "args": argparse.Namespace(arch="resnet18", lr=0.03)}, full)
    return sd, [backbone_only, full]


def test_dino_checkpoints_load_with_strict_backbone_keys(tmp_path):
    from common.config import Teacher
    from common.teacher import state_dict_sha256

    sd, files = _dino_files(tmp_path)
    for f in files:
        t = build_teacher(Teacher(arch="resnet18", weights=str(f)))
        assert t.fingerprint["sha256"] == state_dict_sha256(sd)
    with pytest.raises(ConfigError, match="missing keys"):
        build_teacher(Teacher(arch="resnet50", weights=str(files[0])))
    with pytest.raises(ConfigError, match="no such file"):
        build_teacher(Teacher(arch="resnet18", weights=str(tmp_path / "absent.pth")))


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/tmp/img2vec-should-not-be-deleted",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    from common.config import Teacher

    victim = Path("/tmp/img2vec-should-not-be-deleted")
    victim.mkdir(exist_ok=True)
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil()}, evil)
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_teacher(Teacher(arch="resnet18", weights=str(evil)))
    assert victim.exists()


def _flip_payload_bytes(shard: Path) -> list[str]:
    """Flip one byte inside every stored view of a feature shard (an epoch drops a few samples: every sample of
    the shard is damaged, so the first batch that holds one meets it); returns the shard's keys."""
    for tar_path in sorted(shard.glob("v*.tar")):
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".tokens")]
        data = bytearray(tar_path.read_bytes())
        for m in members:
            data[m.offset_data + m.size // 2] ^= 0x5A
        tar_path.write_bytes(bytes(data))
    return [m.name.split(".")[0] for m in members]


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
@pytest.mark.slow
def test_training_refuses_or_skips_a_corrupt_sample(tmp_path, extracted, on_corrupt):
    from train.loop import main as train_main

    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    keys = _flip_payload_bytes(cache / "shard-000001")
    path = write_config(tmp_path, Path(extracted[1].data.shards).parent, 3)
    args = ["--config", str(path), "--no-progress", "--set", "train.max_steps=5", "--set", f"train.on_corrupt={on_corrupt}"]
    code = train_main(args)
    if on_corrupt == "error":
        assert code == 2
    else:
        assert code == 0 and (tmp_path / "run" / "checkpoints").exists()
    r = run_cli(["python", "-m", "train", *args]) if on_corrupt == "error" else None
    if r is not None:  # the message names the shard and the key
        assert r.returncode == 2 and "shard-000001" in r.stderr and any(k in r.stderr for k in keys), r.stderr[-1500:]


@pytest.mark.slow
def test_incomplete_cache_names_the_shard(tmp_path, extracted):
    from train.loop import main as train_main

    cache = tmp_path / "cache"
    shutil.copytree(extracted[1].cache.path, cache)
    (cache / "shard-000002.done.json").unlink()
    path = write_config(tmp_path, Path(extracted[1].data.shards).parent, 3)
    r = run_cli(["python", "-m", "train", "--config", str(path), "--no-progress"])
    assert r.returncode == 2 and "shard-000002" in r.stderr and "extract-features" in r.stderr
    assert train_main(["--config", str(path), "--no-progress"]) == 2


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run's rows for a step replace the killed run's


@pytest.mark.slow
def test_training_killed_mid_run_resumes_on_the_same_trajectory(tmp_path, extracted):
    """SIGKILL at step 5 (checkpoint at 3); the rerun resumes at 3 and steps 4..8 match an uninterrupted run."""
    src = Path(extracted[1].data.shards).parent
    sets = ["--set", "train.max_steps=8", "--set", "train.checkpoint_every=3", "--set", f"cache.path={extracted[1].cache.path}"]
    plain = write_config(tmp_path, src, 3, cache="a", run="run_a")
    killed = write_config(tmp_path, src, 3, cache="b", run="run_b")
    r = run_cli(["python", "-m", "train", "--config", str(plain), "--no-progress", *sets])
    assert r.returncode == 0, r.stderr[-1500:]
    r = run_cli(["python", "-m", "train", "--config", str(killed), "--no-progress", *sets], env={"IMG2VEC_FAULT": "step:5"})
    assert r.returncode == -9
    r = run_cli(["python", "-m", "train", "--config", str(killed), "--no-progress", *sets])
    assert r.returncode == 0 and "resuming" in r.stderr and "step_00000003" in r.stderr, r.stderr[-1500:]
    a, b = _losses(tmp_path / "run_a"), _losses(tmp_path / "run_b")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), step
