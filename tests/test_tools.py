"""The img2vec tools: verify, diversity, make-shards (in-process through the dispatcher, once as a console script)."""
from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.augment import center_view, decode_image, replay
from common.config import load_config
from common.stats import token_diversity
from common.teacher import build_teacher
from img2vec.cli import main as img2vec
from img2vec.maps import query_tokens, similarity_map, teacher_label
from extract.pipeline import run_extraction
from shards.manifest import read_manifest
from shards.reader import iter_feature_shard
from shards.source import iter_samples
from tests.conftest import run_cli, write_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny batches: one intra-op thread is ~10x faster than two on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tool(capsys, *args: str) -> tuple[int, str]:
    """Run `img2vec ARGS` in this process: (exit status, stdout + stderr)."""
    rc = img2vec([*map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def copy_cache(extracted, tmp_path: Path) -> Path:
    """A private copy of the session cache: the tests below damage their copy, never the original."""
    return Path(shutil.copytree(extracted[1].cache.path, tmp_path / "cache"))


# ---------------------------------------------------------------- verify

@pytest.mark.slow
def test_verify_fresh_cache_with_recompute_console_script(tmp_path, extracted):
    cache = copy_cache(extracted, tmp_path)
    r = run_cli(["img2vec", "verify", str(cache), "--recompute", "4", "--json", str(tmp_path / "v.json")],
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "OK: 3 shards, 18 samples (54 views)" in r.stdout and "verify" in r.stderr  # table, then the tqdm bar
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["ok"] and len(report["recompute"]) == 4 and not report["problems"]
    assert all(row["err_over_bound"] <= 1 for row in report["recompute"])
    assert 0 < report["max_abs_error"] < 0.05 and report["min_cosine"] > 0.9999  # bf16 rounding, not exact


def test_verify_flipped_byte_in_shard_names_shard_and_key(tmp_path, extracted, capsys):
    cache = copy_cache(extracted, tmp_path)
    path = cache / "shard-000001" / "v01.tar"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    with tarfile.open(path) as tar:  # which sample, if any, holds the middle byte
        hit = [m.name for m in tar.getmembers() if m.offset_data <= mid < m.offset_data + m.size]
    data[mid] ^= 0xFF
    path.write_bytes(bytes(data))
    rc, out = tool(capsys, "verify", cache)
    assert rc == 1 and "FAILED" in out
    assert "shard-000001: sha256 of v01.tar differs from its record" in out
    if hit:
        assert f"shard-000001 key '{hit[0].split('.')[0]}': view 1" in out, out
    assert "shard-000000" not in out.split("problems")[-1]  # only the damaged shard is named


def test_verify_edited_index_and_record_name_shard_and_key(tmp_path, extracted, capsys):
    cache = copy_cache(extracted, tmp_path)
    index_path = cache / "shard-000002" / "index.npy"
    index = np.load(index_path, allow_pickle=False)
    key = index["key"][2].decode()
    index["crc"][2, 1] ^= 1 << 7
    np.save(index_path, index, allow_pickle=False)
    rec_path = cache / "shard-000000.done.json"
    record = json.loads(rec_path.read_text())
    sha = record["files"]["v00.tar"]["sha256"]
    record["files"]["v00.tar"]["sha256"] = sha[:-1] + ("0" if sha[-1] != "0" else "1")
    rec_path.write_text(json.dumps(record))
    rc, out = tool(capsys, "verify", cache, "--json", tmp_path / "v.json")
    assert rc == 1
    assert f"shard-000002 key '{key}': index row 2: crc32 differs" in out
    assert "shard-000002: sha256 of index.npy differs from its record" in out
    assert "shard-000000: sha256 of v00.tar differs from its record (every view's crc32 matches" in out
    problems = json.loads((tmp_path / "v.json").read_text())["problems"]
    assert {(p["shard"], p["key"]) for p in problems} == {("shard-000002", key), ("shard-000002", None),
                                                         ("shard-000000", None)}


def test_verify_zarr_u8_cache_and_moved_sources(tmp_path, source, capsys):
    cfg = load_config(write_config(tmp_path, source, 1, fmt="zarr", codec="u8-zstd"))
    run_extraction(cfg, progress=False)
    cache = Path(cfg.cache.path)
    rc, out = tool(capsys, "verify", cache, "--recompute", "3")
    assert rc == 0 and "OK: 1 shard, 6 samples" in out and "u8-zstd" in out, out
    moved = tmp_path / "moved"
    shutil.copytree(source, moved)
    manifest = json.loads((cache / "manifest.json").read_text())
    for s in manifest["shards"]:
        s["source"] = s["source"].replace(str(source), str(tmp_path / "gone"))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    rc, out = tool(capsys, "verify", cache, "--recompute", "1")
    assert rc == 1 and "shard-000000: " in out
    assert "file not found (check data.shards); if the dataset moved, pass --source-shards" in out
    pattern = f"{moved}/shard-{{000000..000002}}.tar"  # the moved dataset, matched by shard name
    rc, out = tool(capsys, "verify", cache, "--recompute", "1", "--source-shards", pattern)
    assert rc == 0, out


def test_verify_errors_a_user_can_act_on(tmp_path, extracted, capsys):
    rc, out = tool(capsys, "verify", tmp_path / "nowhere")
    assert rc == 1 and "is not a directory" in out
    cache = copy_cache(extracted, tmp_path)
    (cache / "shard-000001.done.json").unlink()
    rc, out = tool(capsys, "verify", cache, "--recompute", "2", "--teacher-seed", "7")
    assert rc == 1 and "shard-000001: no completion record" in out
    assert "--teacher-seed; tried 7" in out
    with pytest.raises(SystemExit) as e:
        img2vec(["verify", "--help"])
    assert e.value.code == 0 and "--recompute N" in capsys.readouterr().out


# ---------------------------------------------------------------- diversity

def brute_force_td(views: np.ndarray) -> float:
    """views [N, K, C] -> 1 - mean over views of the mean cosine over ordered pairs i != k, by explicit loops."""
    per_view = []
    for t in views.astype(np.float64):
        k, total = len(t), 0.0
        for i in range(k):
            for j in range(k):
                if i != j:
                    total += t[i] @ t[j] / (np.linalg.norm(t[i]) * np.linalg.norm(t[j]))
        per_view.append(1 - total / (k * (k - 1)))
    return float(np.mean(per_view))


def test_diversity_of_cache_equals_brute_force(extracted, tmp_path, capsys):
    cache = Path(extracted[1].cache.path)  # read only
    rc, out = tool(capsys, "diversity", "--cache", cache, "--samples", "4", "--json", tmp_path / "d.json")
    assert rc == 0, out
    row = json.loads((tmp_path / "d.json").read_text())["rows"][0]
    assert (row["images"], row["views"]) == (4, 12) and "resnet18 (cache)" in out
    manifest = read_manifest(cache)
    codec = manifest.token_codec
    tokens = [codec.decode(s["packed"]) for s in iter_feature_shard(cache, "shard-000000", manifest)][:4]
    assert row["token_diversity"] == pytest.approx(brute_force_td(np.concatenate(tokens)), abs=1e-5)


def test_diversity_two_teachers_over_shards_with_maps(source, tmp_path, capsys):
    pattern = f"{source}/shard-{{000000..000002}}.tar"
    rc, out = tool(capsys, "diversity", "--shards", pattern, "--teacher", "resnet18", "--teacher", "resnet10t",
                   "--size", "64", "--samples", "8", "--maps", tmp_path / "maps", "--map-images", "2",
                   "--json", tmp_path / "d.json", "--device", "cpu", "--students", "none")
    assert rc == 0, out
    result = json.loads((tmp_path / "d.json").read_text())
    assert [r["teacher"] for r in result["rows"]] == ["resnet18", "resnet10t"]
    table = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("|")]
    assert table == ["teacher", "---", "resnet18", "resnet10t"]  # a markdown table, a row per teacher
    assert all(r["images"] == 8 and r["views"] == 8 and 0 <= r["token_diversity"] <= 1 for r in result["rows"])
    pngs = sorted((tmp_path / "maps").glob("*.png"))
    assert len(pngs) == 2 and [str(p) for p in pngs] == result["map_files"]
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > im.height > 100
            im.verify()
    # the resnet18 row is the stats formula over the teacher's center views of the same 8 images
    from common.config import Teacher

    teacher = build_teacher(Teacher(arch="resnet18", weights="random"))
    imgs = [decode_image(s["image"]) for url in sorted(source.glob("shard-*.tar")) for s in iter_samples(str(url))][:8]
    views = torch.stack([replay(im, center_view(im.height, im.width)[0], 64, "torch") for im in imgs])
    assert result["rows"][0]["token_diversity"] == pytest.approx(token_diversity(teacher(views)), abs=1e-5)


def test_similarity_map_queries_and_titles():
    assert query_tokens(7, 7, 5) == [(3, 3), (1, 1), (5, 5), (1, 5), (5, 1)]  # center, then quadrant centers
    assert query_tokens(2, 2, 3) == [(1, 1), (0, 0), (0, 1)]  # distinct on a small grid
    tokens = torch.randn(49, 16)
    sim, q = similarity_map(tokens, (1, 5))
    assert q == (1, 5) and sim[1, 5] == pytest.approx(1.0)
    for r in range(7):
        for c in range(7):  # brute force: the cosine of token (r, c) to the query token
            a, b = tokens[r * 7 + c], tokens[1 * 7 + 5]
            assert sim[r, c].item() == pytest.approx((a @ b / (a.norm() * b.norm())).item(), abs=1e-5)
    assert teacher_label("resnet50=/ckpt/dir/dino_resnet50_pretrain.pth") == "resnet50 (dino_resnet50_pretrain)"
    assert teacher_label("resnet18") == "resnet18 (random init)"
    assert teacher_label("vit_b=/ckpt/mae_ft.pth,norm=false,layer=8") == "vit_b (mae_ft, norm=false, layer=8)"


def test_diversity_argument_errors(source, capsys):
    with pytest.raises(SystemExit) as e:
        img2vec(["diversity", "--shards", f"{source}/shard-000000.tar"])
    assert e.value.code == 2 and "needs at least one --teacher" in capsys.readouterr().err
    rc, out = tool(capsys, "diversity", "--shards", f"{source}/shard-000000.tar", "--teacher", "no_such_net",
                   "--size", "64")
    assert rc == 2 and "--teacher no_such_net" in out


# ---------------------------------------------------------------- make-shards

def test_make_shards_from_image_folder(tmp_path, capsys):
    folder = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for cls in ("n02_zebra", "n01_apple"):  # created out of order: labels follow sorted names
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / cls / f"im.{i}.jpg")
    out_dir = tmp_path / "shards"
    rc, out = tool(capsys, "make-shards", folder, out_dir, "--maxcount", "4")
    assert rc == 0, out
    assert "2 shards, 6 samples, 2 classes, shuffled with seed 0" in out and "train-000001.tar  2 samples" in out
    shards = sorted(out_dir.glob("train-*.tar"))
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar"]
    classes = json.loads((out_dir / "classes.json").read_text())
    assert classes == {"n01_apple": 0, "n02_zebra": 1}
    samples = [s for p in shards for s in iter_samples(str(p))]
    assert len(samples) == 6 and all(s["cls"] == classes[s["key"].split("/")[0]] for s in samples)
    rc, out = tool(capsys, "make-shards", folder, out_dir)
    assert rc == 2 and "--overwrite" in out
    rc, out = tool(capsys, "make-shards", tmp_path / "missing", out_dir)
    assert rc == 2 and "is not a directory" in out


def test_make_shards_shuffles_before_cutting_unless_told_not_to(tmp_path, capsys):
    folder = tmp_path / "imagenet"
    names = [f"n{c:02d}" for c in range(4)]
    for cls in names:
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(folder / cls / f"{i}.png")
    folder_order = [f"{c}/{i}" for c in names for i in range(6)]

    def shard_keys(out_dir):
        return [[s["key"] for s in iter_samples(str(p))] for p in sorted(out_dir.glob("train-*.tar"))]

    for args, seed in (([], 0), (["--seed", "5"], 5)):
        out_dir = tmp_path / f"shuffled{seed}"
        assert tool(capsys, "make-shards", folder, out_dir, "--maxcount", "6", *args)[0] == 0
        keys = shard_keys(out_dir)
        expected = list(folder_order)
        random.Random(seed).shuffle(expected)  # the documented order: a seeded shuffle of the folder order
        assert sum(keys, []) == expected
        assert all(len({k.split("/")[0] for k in shard}) > 1 for shard in keys)  # every shard mixes classes
    assert shard_keys(tmp_path / "shuffled0") != shard_keys(tmp_path / "shuffled5")

    out_dir = tmp_path / "folder-order"
    rc, out = tool(capsys, "make-shards", folder, out_dir, "--maxcount", "6", "--no-shuffle")
    assert rc == 0 and "folder order (class-sorted)" in out
    keys = shard_keys(out_dir)
    assert sum(keys, []) == folder_order and [{k.split("/")[0] for k in shard} for shard in keys] == [{c} for c in names]
