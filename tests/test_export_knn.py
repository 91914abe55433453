"""Export (student checkpoint -> timm weights, strict keys, same features) and the k-NN probe."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import torch.nn.functional as F

from img2vec.export import (GLOBAL_POOLS, ExportError, check_timm_keys, export_encoder, load_student, resolve_checkpoint,
                          timm_keys, timm_model_args)
from img2vec.export import main as export_main
from img2vec.knn import random_student
from img2vec.knn import main as knn_main
from tests.conftest import train_py_model
from train.model import STUDENTS
from train.probe import Features, center_box, extract_features, in_val_split, knn_predict, knn_scores


@pytest.fixture(scope="module")
def run_dir(student_run):
    """conftest's 2-step run on the shared cache (tests that change it work on a copy)."""
    return student_run


def source_pattern(extracted) -> str:
    return extracted[1].data.shards


# ----------------------------------------------------------------------------------------------------------
# export


def test_export_loads_in_timm_with_the_printed_snippet_and_gives_the_same_features(tmp_path, run_dir, capsys):
    """Default (global_pool="avg", the fine-tuning model): strict keys, the pretrained final norm as fc_norm, and
    timm's pooled feature = fc_norm(mean of the last block's patch tokens), computed here from the student."""
    out = tmp_path / "encoder.safetensors"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    snippet = (f'timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=64, global_pool="avg", '
               f'pretrained_cfg_overlay=dict(file="{out}", num_classes=0, mean=(0.485, 0.456, 0.406), '
               f'std=(0.229, 0.224, 0.225)))')
    assert snippet in printed
    command = next(line.strip() for line in printed.splitlines() if " train.py " in line)
    assert (f"train.py --data-dir /data/imagenet --model vit_tiny_patch16_224 --model-kwargs img_size=64 --img-size 64 "
            f"--pretrained --pretrained-path {out} --gp avg") in command
    assert "--layer-decay 0.85 --drop-path 0.1" in command  # ViT-Ti's recipe (img2vec/finetune.py), not ViT-B's

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["img_size"] == "64" and meta["step"] == "2"
    assert meta["global_pool"] == "avg" and json.loads(meta["timm_kwargs"]) == {"img_size": 64, "global_pool": "avg"}

    model = eval(snippet, {"timm": timm}).eval()  # exactly what a user pastes
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # timm's data config normalises as pretraining
    weights = load_file(str(out))
    own = model.state_dict()
    assert set(own) == set(weights)  # strict: no key missing, none left over, nothing dropped by timm
    for k, v in weights.items():
        assert torch.equal(own[k], v), k  # loaded as written: no resampling, no random init left
    model.load_state_dict(weights, strict=True)

    # as timm's train.py builds it from the printed command (--pretrained-path, --gp avg, --drop-path, 1000 classes,
    # --model-kwargs)
    ft = train_py_model(command)
    assert ft.patch_embed.img_size == (64, 64)
    ft_sd = ft.state_dict()
    assert set(ft_sd) - set(weights) == {"head.weight", "head.bias"} and set(weights) <= set(ft_sd)
    assert all(torch.equal(ft_sd[k], v) for k, v in weights.items())  # only the new classifier is not pretrained

    student, info = load_student(run_dir)
    assert info["step"] == 2
    assert torch.equal(weights["fc_norm.weight"], student.norm.weight) and "norm.weight" not in weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        t = student.patch_embed(x) + student.pos_embed[:, 1:]
        t = torch.cat([(student.cls_token + student.pos_embed[:, :1]).expand(2, -1, -1), t], dim=1)
        for blk in student.blocks:
            t = blk(t)
        by_hand = F.layer_norm(t[:, 1:].mean(1), (192,), student.norm.weight, student.norm.bias, eps=1e-6)
    assert pooled.shape == (2, 192)
    torch.testing.assert_close(pooled, by_hand, rtol=1e-5, atol=1e-5)


def test_export_with_token_pool_is_timms_default_layout_and_the_students_features(tmp_path, run_dir, capsys):
    out = tmp_path / "encoder-token.safetensors"
    assert export_main([str(run_dir), "--out", str(out), "--global-pool", "token"]) == 0
    snippet = (f'timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=64, '
               f'pretrained_cfg_overlay=dict(file="{out}", num_classes=0, mean=(0.485, 0.456, 0.406), '
               f'std=(0.229, 0.224, 0.225)))')
    assert snippet in capsys.readouterr().out
    model = eval(snippet, {"timm": timm}).eval()
    model.load_state_dict(load_file(str(out)), strict=True)
    student, _ = load_student(run_dir)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.forward_features(x), student.forward_features(x)
    assert a.shape == b.shape == (2, 1 + 16, 192)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_every_student_fits_its_timm_model_for_both_pools(arch):
    """The real sizes at 224 (ViT-H/16 included), checked on the meta device as export checks them."""
    with torch.device("meta"):
        encoder = STUDENTS[arch]().encoder_state_dict()
    for pool in GLOBAL_POOLS:
        name, kwargs = timm_model_args(arch, 224, pool)
        check_timm_keys(timm_keys(encoder, pool), name, kwargs)
    assert timm_model_args("vit_huge_patch16", 224, "avg") == ("vit_huge_patch14_224",
                                                                {"patch_size": 16, "global_pool": "avg"})
    with pytest.raises(ExportError, match=r"missing \['fc_norm.bias', 'fc_norm.weight'\], unexpected \['norm.bias'"):
        check_timm_keys(timm_keys(encoder, "token"), *timm_model_args(arch, 224, "avg"))


def test_export_weights_are_the_trained_ones_not_the_init(tmp_path, run_dir):
    trained, _ = load_student(run_dir)
    init, _ = load_student(run_dir, weights=False)
    ckpt = load_file(str(resolve_checkpoint(run_dir)[0] / "model.safetensors"))
    info = export_encoder(run_dir, tmp_path / "e.safetensors")
    enc = load_file(info["out"])
    assert torch.equal(enc["blocks.0.attn.qkv.weight"], ckpt["blocks.0.attn.qkv.weight"])
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)
    assert not any(k.startswith(("decoder", "mask_token", "proj_head", "global_head", "unit_merge")) for k in enc)


def test_export_from_a_checkpoint_dir_and_latest_complete_checkpoint(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpts = run / "checkpoints"
    done = ckpts / "step_00000002"
    assert resolve_checkpoint(run) == (done, run)
    shutil.copytree(done, ckpts / "step_00000009.tmp")            # being written
    shutil.copytree(done, ckpts / "step_00000007")
    (ckpts / "step_00000007" / "position.json").unlink()          # interrupted before completion
    assert resolve_checkpoint(run)[0] == done
    assert resolve_checkpoint(done) == (done, run)
    a = export_encoder(done, tmp_path / "a.safetensors")
    b = export_encoder(run, tmp_path / "b.safetensors")
    wa, wb = load_file(a["out"]), load_file(b["out"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_export_errors_say_what_to_do(tmp_path, run_dir, capsys):
    assert export_main([str(tmp_path / "nope"), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert export_main([str(empty), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    orphan = tmp_path / "orphan" / "step_00000002"
    shutil.copytree(resolve_checkpoint(run_dir)[0], orphan)
    assert export_main([str(orphan), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(run_dir), "--out", str(tmp_path / "e.pth")])
    assert "safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# k-NN


def test_knn_vote_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (50,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    k, t = 6, 0.07
    scores = knn_predict(bank, labels, queries, 5, k, t, chunk=3)
    for q in range(7):
        sims = [(float(queries[q] @ bank[i]), i) for i in range(50)]
        expect = torch.zeros(5, dtype=torch.float64)
        for s, i in sorted(sims, reverse=True)[:k]:
            expect[labels[i]] += torch.exp(torch.tensor(s / t, dtype=torch.float64))
        torch.testing.assert_close(scores[q].double(), expect, rtol=1e-4, atol=0)


def test_knn_scores_perfect_on_separable_and_k_is_clamped():
    feats = torch.eye(4)
    f = Features(feats, torch.arange(4))
    r = knn_scores(f, f, k=20)
    assert r["top1"] == 100.0 and r["k"] == 4 and "top5" not in r


def test_center_box_and_split():
    assert center_box(100, 60, 1.0) == [20, 0, 60, 60, 0]
    assert center_box(64, 64, 0.875) == [4, 4, 56, 56, 0]
    keys = [f"k{i}" for i in range(2000)]
    val = [k for k in keys if in_val_split(k, 0.25)]
    assert 400 < len(val) < 600 and val == [k for k in keys if in_val_split(k, 0.25)]


def test_knn_on_tiny_shards(extracted):
    pattern = source_pattern(extracted)
    encoder, size = random_student("vit_tiny_patch16", 64, seed=0)
    bank = extract_features(encoder, pattern, size, workers=0)
    assert bank.feats.shape == (18, 192) and bank.skipped == 0
    torch.testing.assert_close(bank.feats.norm(dim=1), torch.ones(18))
    assert sorted(bank.labels.tolist()) == sorted([i % 4 for i in range(18)])
    assert knn_scores(bank, bank, k=1)["top1"] == 100.0  # memory bank == queries: each finds itself


def test_knn_command_with_a_split_and_with_exported_weights(tmp_path, extracted, run_dir, capsys):
    pattern = source_pattern(extracted)
    out = tmp_path / "knn.json"
    assert knn_main(["--shards", pattern, "--val-fraction", "0.3", "--random", "--arch", "vit_tiny_patch16",
                     "--img-size", "64", "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert 0.0 <= r["top1"] <= 100.0 and r["train_samples"] + r["val_samples"] == 18 and r["classes"] == 4
    assert re.search(r"top-1 \d+\.\d\d%", capsys.readouterr().out)

    weights = export_encoder(run_dir, tmp_path / "e.safetensors")["out"]
    assert knn_main(["--train-shards", pattern, "--val-shards", pattern, "--weights", weights, "-k", "1",
                     "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["top1"] == 100.0 and r["img_size"] == 64  # size from the file's metadata
    assert knn_main(["--train-shards", pattern, "--val-shards", pattern, "--run", str(run_dir), "-k", "1",
                     "--workers", "0", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == 100.0


def test_knn_command_errors(tmp_path, extracted, capsys):
    pattern = source_pattern(extracted)
    with pytest.raises(SystemExit):
        knn_main(["--shards", pattern])  # no encoder
    assert "choose one encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        knn_main(["--train-shards", pattern, "--random", "--arch", "vit_tiny_patch16"])
    assert "--val-shards" in capsys.readouterr().err
    assert knn_main(["--shards", str(tmp_path / "missing-{0..1}.tar"), "--random", "--arch", "vit_tiny_patch16",
                     "--img-size", "64", "--workers", "0", "--no-progress"]) == 2
    assert "missing-0.tar" in capsys.readouterr().err
    assert knn_main(["--shards", pattern, "--random", "--arch", "vit_huge_patch99", "--no-progress"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_ddp_prefixed_checkpoint_exports_the_same(tmp_path, run_dir):
    """Under DDP, accelerate's save_state keeps the wrapper's `module.` prefix."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = resolve_checkpoint(run)[0]
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({f"module.{k}": v for k, v in sd.items()}, str(ckpt / "model.safetensors"))
    a, b = export_encoder(run, tmp_path / "a.safetensors"), export_encoder(run_dir, tmp_path / "b.safetensors")
    wa, wb = load_file(a["out"]), load_file(b["out"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_of_a_run_is_the_student_it_started_from(tmp_path, extracted):
    """`load_student(run, weights=False)` (knn --random --run) rebuilds the run's starting point: a step
    with lr 0 leaves the weights where they started."""
    from train.loop import main as train_main

    config, _ = extracted
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--set", f'train.run_dir="{run}"', "--set", "train.max_steps=1",
                       "--set", "train.lr=0.0", "--no-progress"]) == 0
    trained, init = load_student(run)[0].encoder_state_dict(), load_student(run, weights=False)[0].encoder_state_dict()
    assert all(torch.equal(trained[k], init[k]) for k in trained)
