"""Evaluation after pretraining: MAE's linear probe and fine-tuning (`img2vec linprobe`, `img2vec finetune`), their
pieces against MAE's code as formulas, and the timm train.py command `img2vec export` prints."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.data.auto_augment import rand_augment_transform

from common.augment import decode_image
from img2vec.evalsource import source_model
from img2vec.export import export_encoder, finetune_command, load_student, timm_encoder, timm_model_args
from img2vec.finetune import (HEAD_INIT_SCALE, MAE_FINETUNE, RECIPES, TIMM_AA, adamw, posterize_any_bits, recipe_for,
                              train_transform)
from img2vec.finetune import main as finetune_main
from img2vec.linprobe import LARS, parse_args, probe, probe_head
from img2vec.linprobe import main as linprobe_main
from img2vec.supervised import (FullBatches, LabelledImages, cosine_schedule, count_labelled, eval_transform, loader,
                                shard_labels)
from shards.source import expand_shards, iter_samples
from common import faults
from common.signals import INTERRUPTED, PREEMPTED
from tests.conftest import run_cli, train_py_flags, train_py_model
from train.model import STUDENTS


def shards(extracted) -> str:
    return extracted[1].data.shards  # 18 labelled images (4 classes) in 3 shards of 6


def keys_of(data: LabelledImages) -> list[str]:
    return [key for _, _, key in data]


def run_tool(main, run, pattern: str, out, *more: str) -> dict:
    """`img2vec linprobe|finetune RUN --train-shards P --val-shards P --batch-size 4 --json OUT ...` on the one set of
    tiny shards: its result, which it also wrote into the run dir."""
    assert main([str(run), "--train-shards", pattern, "--val-shards", pattern, "--batch-size", "4", "--workers", "0",
                 "--json", str(out), "--out", str(out.with_suffix("")), *more]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads((run / f"{main.__module__.rsplit('.', 1)[1]}.json").read_text())
    return result


def fork_in_own_group(main, argv: list[str], stderr: Path, **env: str) -> int:
    """`main(argv)` in a child of this process (its modules already imported: no interpreter to start) in a session,
    so a process group, of its own, as a job step is; its stderr to a file. -> its pid; it exits with main's status."""
    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:
        os.setsid()
        os.environ.update(env)
        faults.MAIN_PID = None  # an extraction in this process may have set it to the parent's
        sys.stdout, sys.stderr = open(os.devnull, "w"), open(stderr, "w", buffering=1)
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def proc_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (T: stopped, Z: ended, not reaped); None when gone. The name before it, in
    parentheses, may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # gone, or going while read (ESRCH)
        return None


def wait_exit(pid: int, seconds: float, log: Path) -> int:
    """The exit status of child `pid` (its own process group) within `seconds`; past that, its group is SIGKILLed and
    the test fails with the tail of `log`."""
    deadline = time.time() + seconds
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"pid {pid} did not exit within {seconds} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    return os.waitstatus_to_exitcode(done[1])


def assert_same_run(a: dict, out_a, b: dict, out_b) -> None:
    """Two runs' results and the weights of their last checkpoints: the same but for the time taken."""
    assert (b["top1"], [(r["loss"], r["lr"]) for r in b["history"]]) == (
        a["top1"], [(pytest.approx(r["loss"], rel=1e-6), r["lr"]) for r in a["history"]])
    wa, wb = (load_file(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors") for out in (out_a, out_b))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)


# ----------------------------------------------------------------------------------------------------------
# the pieces, against MAE's code


def test_lars_steps_as_maes_util_lars():
    """MAE's LARS: a matrix's step (after weight decay) scaled to trust x |p| / |step|, momentum without dampening;
    a bias (ndim 1) gets neither; a zero matrix keeps its plain step."""
    g = torch.Generator().manual_seed(0)
    w, b, z = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.zeros(2, 2)
    params = [p.clone().requires_grad_() for p in (w, b, z)]
    opt = LARS(params, lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    expect, mu = [w.clone(), b.clone(), z.clone()], [torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(z)]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for i, grad in enumerate(grads):
            step = grad
            if expect[i].ndim > 1:
                step = grad + 0.1 * expect[i]
                pn, sn = expect[i].norm().item(), step.norm().item()
                step = step * (0.001 * pn / sn if pn > 0 and sn > 0 else 1.0)
            mu[i] = 0.9 * mu[i] + step
            expect[i] = expect[i] - 0.5 * mu[i]
    for p, e in zip(params, expect):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def test_schedule_is_maes_lr_sched_per_iteration():
    """util/lr_sched.py at the fractional epoch i / steps + epoch: warmup from 0, half-cycle cosine to min_lr, times each
    group's lr_scale (layer decay)."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.25}], lr=0.4)
    steps, epochs, warmup, lr, min_lr = 7, 6, 2, 0.4, 1e-3
    sched = cosine_schedule(opt, steps, epochs, warmup, min_lr)
    for i in range(steps * epochs):
        sched.step_update(i)
        e = i / steps
        mae = lr * e / warmup if e < warmup else min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup) /
                                                                                              (epochs - warmup)))
        assert opt.param_groups[0]["lr"] == pytest.approx(mae, rel=1e-9, abs=1e-12), i
        assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * mae, rel=1e-9, abs=1e-12), i


def test_layer_decay_and_weight_decay_are_maes_param_groups_lrd():
    """timm's groups equal MAE's util/lr_decay.py: layer id 0 for cls_token, pos_embed, patch_embed; i + 1 for
    blocks.i; depth + 1 for the rest; scale decay ** (depth + 1 - id); no weight decay on 1-d parameters and
    no_weight_decay() (pos_embed, cls_token)."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, global_pool="avg", num_classes=4)
    opt = adamw(model, lr=1.0, layer_decay=0.65)
    names, top = {id(p): n for n, p in model.named_parameters()}, len(model.blocks) + 1

    def layer(n: str) -> int:
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            return 0
        return int(n.split(".")[1]) + 1 if n.startswith("blocks.") else top

    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            n, seen = names[id(p)], seen + 1
            assert group["lr_scale"] == pytest.approx(0.65 ** (top - layer(n)), rel=1e-12), n
            assert group["weight_decay"] == (0.0 if p.ndim == 1 or n in ("pos_embed", "cls_token") else 0.05), n
    assert seen == len(names) and type(opt).__name__ == "AdamW" and opt.defaults["betas"] == (0.9, 0.999)


def test_a_recipe_for_every_size_and_maes_for_b_l_h():
    assert {recipe_for(arch) for arch in STUDENTS} <= set(RECIPES.values())
    assert [(r.blr, r.layer_decay, r.drop_path, r.epochs, r.warmup_epochs) for r in
            (RECIPES["vit_base_patch16"], RECIPES["vit_large_patch16"], RECIPES["vit_huge_patch16"])] == \
        [(5e-4, 0.65, 0.1, 100, 5), (1e-3, 0.75, 0.2, 50, 5), (1e-3, 0.75, 0.3, 50, 5)]
    assert recipe_for("vit_tiny_patch16") != recipe_for("vit_base_patch16") != recipe_for("vit_small_patch14")
    assert recipe_for("vit_base_patch14") == RECIPES["vit_base_patch16"]


def test_randaugment_inc1_without_the_zero_bit_posterize():
    """MAE's rand-m9-mstd0.5-inc1 draws m up to 10, where PosterizeIncreasing keeps 0 bits (Pillow 13 refuses it): the
    tool's op answers as Pillow < 13 did (black); the printed command's -mmax9 keeps >= 1 bit and the same ops."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment, posterize

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize_any_bits(img, 0).getextrema() == ((0, 0),) * 3
    assert posterize_any_bits(img, 2).tobytes() == posterize(img, 2).tobytes()
    transform = train_transform(64)
    ra = next(t for t in transform.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    assert op.level_fn(10.0, op.hparams) == (0,) and op.aug_fn is posterize_any_bits
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that crashed timm's train.py
    assert op(img).getextrema() == ((0, 0),) * 3
    assert transform(Image.new("RGB", (90, 70), (30, 60, 90))).shape == (3, 64, 64)

    printed, mae = rand_augment_transform(TIMM_AA, {}), rand_augment_transform(MAE_FINETUNE["aa"], {})
    assert [o.name for o in printed.ops] == [o.name for o in mae.ops] and printed.num_layers == mae.num_layers == 2
    post = next(o for o in printed.ops if o.name == "PosterizeIncreasing")
    assert post.magnitude_max == 9 and post.level_fn(9.0, post.hparams) == (1,)


def test_printed_command_for_every_size_and_input_size():
    """The train.py command of each student size: the model at the student's input size (train.py's --img-size sizes
    the data only), ViT-H/16's patch size, the size's recipe, and MAE's choices where timm's defaults differ."""
    for arch in sorted(STUDENTS):
        patch = int(arch.rsplit("_patch", 1)[1])
        for size in (224, 8 * patch):
            name, kwargs = timm_model_args(arch, size, "avg")
            command = finetune_command("enc.safetensors", arch, name, kwargs)
            flags, r = train_py_flags(command), recipe_for(arch)
            if size != 224 and arch in ("vit_tiny_patch16", "vit_tiny_patch14", "vit_huge_patch16"):  # as train.py builds it
                with torch.device("meta"):
                    model = train_py_model(command, pretrained=False)
                assert model.patch_embed.img_size == (size, size) and model.patch_embed.patch_size == (patch, patch)
            assert ("patch_size=16" in flags.get("model-kwargs", [])) == (arch == "vit_huge_patch16")
            assert flags["img-size"] == [str(size)] and flags["gp"] == ["avg"] and flags["crop-pct"] == ["0.875"]
            assert (f"img_size={size}" in flags.get("model-kwargs", [])) == (size != 224)
            assert [float(flags[k][0]) for k in ("lr-base", "layer-decay", "drop-path")] == [r.blr, r.layer_decay,
                                                                                          r.drop_path]
            assert int(flags["epochs"][0]) + int(flags["warmup-epochs"][0]) == r.epochs  # warmup added by --warmup-prefix
            assert flags["warmup-epochs"] == [str(r.warmup_epochs)] and flags["warmup-lr"] == ["0"]
            assert {"warmup-prefix", "sched-on-updates"} <= set(flags) and flags["train-interpolation"] == ["bicubic"]
            assert float(flags["head-init-scale"][0]) * 0.02 == pytest.approx(2e-5) and flags["aa"] == [TIMM_AA]
    assert HEAD_INIT_SCALE == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------------
# data


def test_labelled_images_deal_every_sample_to_one_process(extracted):
    urls = expand_shards(shards(extracted))
    every = sorted(s["key"] for u in urls for s in iter_samples(u))
    assert count_labelled(urls, workers=0) == (18, 4) and sorted(shard_labels(urls[0])) == sorted(
        s["cls"] for s in iter_samples(urls[0]))

    def dealt(world: int, **kw) -> list[list[str]]:
        return [keys_of(LabelledImages(urls, lambda img: torch.zeros(1), rank, world, **kw)) for rank in range(world)]

    for world in (1, 2, 5):  # 5 > 3 shards: every process reads every shard, keeping every 5th sample
        parts = dealt(world)
        assert sorted(k for part in parts for k in part) == every and all(parts), world
    one = LabelledImages(urls, lambda img: torch.zeros(1), shuffle=True)
    first = keys_of(one)
    one.epoch = 1
    assert sorted(first) == sorted(keys_of(one)) == every and first != keys_of(one)  # another order each pass

    batches = FullBatches(LabelledImages(urls, lambda img: torch.zeros(1), shuffle=True), batch_size=4, workers=0)
    sizes = [len(next(batches)[1]) for _ in range(10)]  # 40 images: two and a bit passes over the 18
    assert sizes == [4] * 10


def test_workers_default_to_the_usable_cpus_and_the_label_count_takes_no_more(extracted, monkeypatch):
    """On a process allowed 1 CPU: --workers defaults to 1 (was: 10) and counting the labels of 3 shards with
    --workers 10 starts 1 worker (was: 3, and torch's 'excessive worker creation' warning, twice)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    pattern = shards(extracted)
    assert parse_args(["run", "--train-shards", pattern, "--val-shards", pattern], "t").workers == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_labelled(expand_shards(pattern), workers=10) == (18, 4)


def _nothing(img) -> torch.Tensor:
    return torch.zeros(1)


@pytest.mark.slow
def test_dataloader_workers_split_a_process_share_without_overlap(extracted):
    """3 shards: 2 processes x 2 workers (process 1: 1 shard for 2 workers, so every 2nd sample of it), and 5
    processes x 2 workers (every 10th sample of every shard): each sample read once."""
    urls = expand_shards(shards(extracted))
    every = sorted(s["key"] for u in urls for s in iter_samples(u))
    for world, workers in ((2, 2), (5, 2)):
        keys = [k for rank in range(world) for _, _, ks, _ in loader(LabelledImages(urls, _nothing, rank, world), 4, workers)
                for k in ks]
        assert sorted(keys) == every, (world, workers)


# ----------------------------------------------------------------------------------------------------------
# the commands


@pytest.mark.slow
def test_timm_encoder_is_the_exported_model(tmp_path, student_run):
    """What linprobe and finetune train is the exported file, tensor for tensor, plus a new head."""
    exported = load_file(export_encoder(student_run, tmp_path / "e.safetensors")["out"])
    model, info = timm_encoder(student_run, "avg", num_classes=4, drop_path_rate=0.1)
    own = model.state_dict()
    assert set(own) - set(exported) == {"head.weight", "head.bias"} and set(exported) <= set(own)
    assert all(torch.equal(own[k], v) for k, v in exported.items())
    student, _ = load_student(student_run)
    assert torch.equal(own["fc_norm.weight"], student.norm.weight) and info["img_size"] == 64


@pytest.mark.slow
def test_the_exported_file_is_the_run_dirs_encoder_and_linprobe_takes_it(tmp_path, student_run, extracted, capsys):
    """An exported file (either pool) gives the model a run dir gives, for either pool (the cls feature reads the
    final norm back from an avg file's fc_norm): tensor for tensor, and the same features on a batch. `img2vec
    linprobe FILE` (was: exit 2, "neither a run dir") runs with its default --out, in the file's folder, per settings."""
    files = {pool: export_encoder(student_run, tmp_path / f"{pool}.safetensors", check=False, global_pool=pool)["out"]
             for pool in ("avg", "token")}
    models = {pool: timm_encoder(student_run, pool)[0].eval() for pool in ("token", "avg")}
    for pool, model in models.items():
        for exported in files.values():
            loaded, info = source_model(exported, pool)
            assert loaded.state_dict().keys() == model.state_dict().keys()
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
            assert (info["arch"], info["img_size"], info["step"]) == ("vit_tiny_patch16", 64, 2)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # linprobe's default: the cls feature, from the avg file (its final norm back in place)
        assert torch.equal(source_model(files["avg"], "token")[0].eval()(images), models["token"](images))

    pattern, file = shards(extracted), files["avg"]
    assert linprobe_main([file, "--train-shards", pattern, "--val-shards", pattern, "--batch-size", "6", "--workers",
                          "0", "--epochs", "1", "--log-every", "0"]) == 0
    out = Path(re.search(r"output dir (\S+) \(of these settings\): a new run\n", capsys.readouterr().out)[1])
    assert out.parent == tmp_path and re.fullmatch(r"linprobe-[0-9a-f]{8}", out.name)
    r = json.loads((tmp_path / "avg.linprobe.json").read_text())  # beside the file: another export has its own
    assert (r["checkpoint"], r["run_dir"], r["step"], r["pool"]) == (file, str(tmp_path), 2, "cls")
    assert json.loads((out / "run.json").read_text())["student"]["checkpoint"] == "avg.safetensors"


@pytest.mark.slow
def test_linprobe_trains_only_the_head_and_its_top1_is_the_count(tmp_path, extracted, student_run, capsys):
    pattern = shards(extracted)
    r = run_tool(linprobe_main, student_run, pattern, tmp_path / "lp.json", "--epochs", "2")
    assert re.search(r"linprobe of vit_tiny_patch16 \(pretraining step 2\): top-1 \d+\.\d\d%", capsys.readouterr().out)
    assert (r["classes"], r["train_samples"], r["val_samples"], r["steps_per_epoch"], r["pool"]) == (4, 18, 18, 4, "cls")
    assert r["lr"] == pytest.approx(0.1 * 4 / 256) and r["warmup_epochs"] == pytest.approx(2 * 10 / 90)
    assert len(r["history"]) == 2 and r["optimizer"] == "LARS" and r["weight_decay"] == 0.0

    result, classifier = probe(parse_args([str(student_run), "--train-shards", pattern, "--val-shards", pattern,
                                           "--epochs", "2", "--workers", "0", "--pool", "avg", "--out",
                                           str(tmp_path / "avg")], "t"))
    assert "note: --batch-size 512 x 1 processes is more than the 18 train images: batch 18" in capsys.readouterr().out
    encoder, head = classifier
    frozen = timm_encoder(student_run, "avg")[0].state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in encoder.state_dict().items())  # the encoder did not move
    assert head[0].num_batches_tracked == 2 and not head[0].affine and head[0].eps == 1e-6
    assert (result["batch_size"], result["steps_per_epoch"], result["lr"]) == (18, 1, pytest.approx(0.1 * 18 / 256))
    right = 0
    with torch.no_grad():  # the top-1 recounted one image at a time
        for url in expand_shards(pattern):
            for s in iter_samples(url):
                x = eval_transform(64)(decode_image(s["image"]))[None]
                right += int(classifier(x).argmax(1).item() == s["cls"])
    assert result["top1"] == pytest.approx(100.0 * right / 18)


@pytest.mark.slow
def test_linprobe_learns_the_tiny_classes_with_a_base_lr_for_its_batch(tmp_path, extracted, student_run):
    """MAE's base lr 0.1 is for batch 16,384: at batch 6 LARS moves the head by ~lr x 0.001 of its size an update and
    the probe stays at chance (measured: 22% of 18, loss 1.40 after 30 epochs); --blr 2000 (lr 47) learns the 4
    synthetic classes (measured: 56-61% over seeds 0-3; 33-61% after 15 epochs)."""
    pattern = shards(extracted)
    r = run_tool(linprobe_main, student_run, pattern, tmp_path / "lp.json", "--batch-size", "6", "--epochs", "30",
                 "--blr", "2000", "--log-every", "0")
    assert r["lr"] == pytest.approx(2000 * 6 / 256) and r["top1"] > 40.0, r["top1"]  # >= 8 of 18; chance: 25%


@pytest.mark.slow
def test_linprobe_stopped_by_a_group_sigterm_resumes_to_the_result_of_a_run_never_stopped(tmp_path, extracted,
                                                                                          student_run):
    """SIGTERM to the whole process group (as SLURM, `kill -- -PGID` and `timeout` send it) of `img2vec linprobe`
    with 2 loader workers, held (SIGSTOP) after update 6 of 3 epochs x 4: the workers ignore it, the run checkpoints
    update 7 and exits 75; the same command resumes there, mid-pass over the shards, and ends with the rows, top-1
    and weights of a run never stopped."""
    pattern, out = shards(extracted), tmp_path / "stopped"
    argv = [str(student_run), "--train-shards", pattern, "--val-shards", pattern, "--batch-size", "4", "--workers", "2",
            "--epochs", "3", "--log-every", "0"]
    log = tmp_path / "stderr"
    pid, status = fork_in_own_group(linprobe_main, [*argv, "--out", str(out)], log, IMG2VEC_FAULT="step:6:STOP"), None
    try:
        deadline = time.time() + 120
        while proc_state(pid) != "T":  # stopped by itself after update 6
            assert proc_state(pid) not in (None, "Z") and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        workers = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        os.killpg(pid, signal.SIGTERM)
        time.sleep(0.2)
        alive = [w for w in workers if proc_state(w) not in (None, "Z")]
        os.killpg(pid, signal.SIGCONT)
        status = wait_exit(pid, 120, log)
    finally:
        if status is None and proc_state(pid) is not None:  # an assertion above failed: end it, reap it
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status == PREEMPTED, log.read_text()[-3000:]
    assert len(workers) == 2 and alive == workers
    assert "stopping at update 7 (epoch 2) on SIGTERM" in log.read_text()
    assert (out / "exit_status").read_text() == f"{PREEMPTED}\n"
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000007"]

    assert linprobe_main([*argv, "--out", str(out)]) == 0
    resumed = json.loads((student_run / "linprobe.json").read_text())
    assert linprobe_main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert_same_run(json.loads((student_run / "linprobe.json").read_text()), tmp_path / "whole", resumed, out)


@pytest.mark.slow
def test_linprobe_default_out_is_per_settings_and_a_stop_during_an_evaluation_resumes(tmp_path, extracted, student_run,
                                                                                     capsys, monkeypatch):
    """The default --out is RUN_DIR/linprobe-<digest of the settings>. A SIGINT during the evaluation after epoch 1 of 2
    (--eval-every 1) stops the run there, exit 130 (was: 0, the signal seen only after the evaluations); the same
    command finds its dir again and resumes from epoch 1's checkpoint, evaluating it again, to the rows, top-1 and
    weights of a run never stopped. Another --blr runs in a dir of its own (was: refused, exit 2). Another --workers
    lands in the same dir and is refused; another seed in that --out is refused before the train shards are counted."""
    pattern = shards(extracted)
    argv = [str(student_run), "--train-shards", pattern, "--val-shards", pattern, "--batch-size", "4", "--workers", "0",
            "--epochs", "2", "--eval-every", "1", "--log-every", "0", "--seed", "3"]
    monkeypatch.setenv("IMG2VEC_FAULT", "eval:0:INT")
    assert linprobe_main(argv) == INTERRUPTED
    monkeypatch.delenv("IMG2VEC_FAULT")
    printed = capsys.readouterr()
    out = Path(re.search(r"output dir (\S+) \(of these settings\): a new run\n", printed.out)[1])
    assert out.parent == student_run and re.fullmatch(r"linprobe-[0-9a-f]{8}", out.name)
    assert "stopping during an evaluation on SIGINT" in printed.err and "epoch 1/2" not in printed.out
    assert (out / "exit_status").read_text() == f"{INTERRUPTED}\n"
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step_00000004"]

    assert linprobe_main(argv) == 0
    printed = capsys.readouterr()
    assert f"output dir {out} (of these settings): resuming the run it holds\n" in printed.out
    assert f"resuming from {out / 'checkpoints' / 'step_00000004'} at update 4" in printed.err
    resumed = json.loads((student_run / "linprobe.json").read_text())
    assert linprobe_main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((student_run / "linprobe.json").read_text())
    assert_same_run(whole, tmp_path / "whole", resumed, out)
    assert [r.get("top1") for r in resumed["history"]] == [whole["history"][0]["top1"], None]

    assert linprobe_main([*argv, "--blr", "0.2"]) == 0
    other = Path(re.search(r"output dir (\S+) \(of these settings\): a new run\n", capsys.readouterr().out)[1])
    assert other.parent == student_run and other != out and json.loads(
        (student_run / "linprobe.json").read_text())["blr"] == 0.2

    assert linprobe_main([*argv, "--workers", "1"]) == 2
    assert re.search(r"loader_workers: run dir has 0, this run has 1\n.*another --out", capsys.readouterr().err)

    def not_counted(*a):
        raise AssertionError("the train shards counted before the settings were checked")

    monkeypatch.setattr("img2vec.supervised.count_labelled", not_counted)
    assert linprobe_main([*argv, "--seed", "4", "--out", str(out)]) == 2
    assert re.search(r"seed: run dir has 3, this run has 4\n.*another --out", capsys.readouterr().err)


def test_probe_head_is_maes(tmp_path):
    head = probe_head(192, 1000)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and head[0].weight is None and head[0].eps == 1e-6
    assert head[1].weight.std().item() == pytest.approx(0.01, rel=0.05) and head[1].bias.abs().max() == 0


@pytest.mark.slow
def test_finetune_command_on_tiny_shards_stopped_and_resumed(tmp_path, extracted, student_run, capsys, monkeypatch):
    r = run_tool(finetune_main, student_run, shards(extracted), tmp_path / "ft.json", "--epochs", "1")
    assert re.search(r"finetune of vit_tiny_patch16 \(pretraining step 2\): top-1 \d+\.\d\d%", capsys.readouterr().out)
    assert (r["classes"], r["train_samples"], r["val_samples"], r["steps_per_epoch"], r["processes"]) == (4, 18, 18, 4, 1)
    assert r["recipe"]["layer_decay"] == 0.85 and r["lr"] == pytest.approx(1e-3 * 4 / 256) and r["head_std"] == 2e-5
    assert 0.0 <= r["top1"] <= 100.0 and len(r["history"]) == 1 and math.isfinite(r["history"][0]["loss"])

    # SIGUSR1 after update 1 of 4: a checkpoint of update 2 (mid-epoch), exit 75; a rerun with another seed is refused;
    # the same command resumes there (drop path and mixup draw on from the RNG states it saved) and ends as `r`
    out = tmp_path / "stopped"
    argv = [str(student_run), "--train-shards", shards(extracted), "--val-shards", shards(extracted), "--batch-size", "4",
            "--workers", "0", "--epochs", "1", "--out", str(out)]
    monkeypatch.setenv("IMG2VEC_FAULT", "step:1:USR1")
    assert finetune_main(argv) == PREEMPTED and (out / "exit_status").read_text() == f"{PREEMPTED}\n"
    monkeypatch.delenv("IMG2VEC_FAULT")
    assert "stopping at update 2 (epoch 1) on SIGUSR1" in capsys.readouterr().err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    assert finetune_main([*argv, "--seed", "1"]) == 2
    assert re.search(r"cannot be resumed with these settings:\n  seed: run dir has 0, this run has 1\n.*another --out",
                     capsys.readouterr().err)
    assert finetune_main(argv) == 0 and (out / "exit_status").read_text() == "0\n"
    assert f"resuming from {out / 'checkpoints' / 'step_00000002'} at update 2" in capsys.readouterr().err
    assert_same_run(r, tmp_path / "ft", json.loads((student_run / "finetune.json").read_text()), out)


@pytest.mark.slow
def test_finetune_on_two_processes_counts_each_val_image_once(tmp_path, extracted, student_run):
    """A real 2-process accelerate run (gloo, CPU): 3 shards dealt 2 + 1, every process the same number of updates,
    each of the 18 val images classified by one process."""
    pattern, out = shards(extracted), tmp_path / "ft2.json"
    p = run_cli(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "img2vec.cli", "finetune", str(student_run),
                 "--train-shards", pattern, "--val-shards", pattern, "--epochs", "1", "--batch-size", "2",
                 "--workers", "1", "--log-every", "0", "--json", str(out), "--out", str(tmp_path / "ft2")],
                env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["processes"], r["global_batch"], r["steps_per_epoch"], r["val_samples"]) == (2, 4, 4, 18)
    assert p.stdout.count("top-1") == 1  # printed by the main process only


def test_errors_name_what_to_do(tmp_path, extracted, student_run, capsys):
    pattern = shards(extracted)
    assert linprobe_main([str(student_run), "--train-shards", str(tmp_path / "no-{0..1}.tar"), "--val-shards", pattern,
                          "--workers", "0"]) == 2
    assert "no-0.tar" in capsys.readouterr().err
    assert finetune_main([str(student_run), "--train-shards", pattern, "--val-shards", pattern, "--num-classes", "3",
                          "--workers", "0"]) == 2
    assert "--num-classes 3: the train shards hold labels up to 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune_main([str(student_run), "--train-shards", pattern, "--val-shards", pattern, "--batch-size", "3"])
    assert "even" in capsys.readouterr().err
    assert linprobe_main([str(tmp_path), "--train-shards", pattern, "--val-shards", pattern]) == 2
    assert "neither a run dir" in capsys.readouterr().err
    (tmp_path / "notes.safetensors").write_text("not a safetensors file")
    assert finetune_main([str(tmp_path / "notes.safetensors"), "--train-shards", pattern, "--val-shards", pattern]) == 2
    assert "is a file but not one `img2vec export` writes" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "odd.safetensors",
              metadata={"student_arch": "vit_tiny_patch16", "img_size": "6x4", "global_pool": "avg"})
    assert finetune_main([str(tmp_path / "odd.safetensors"), "--train-shards", pattern, "--val-shards", pattern]) == 2
    assert "img_size '6x4'" in capsys.readouterr().err  # a message, not a ValueError traceback
    busy = tmp_path / "busy"  # an --out another host's run holds
    busy.mkdir()
    (busy / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "nonce": "0"}))
    assert linprobe_main([str(student_run), "--train-shards", pattern, "--val-shards", pattern, "--out", str(busy)]) == 2
    assert "is in use by another training (host elsewhere, pid 1): use another --out" in capsys.readouterr().err
