"""Stage two: cached targets equal the online teacher's, real 2-process runs (odd and uneven shards,
DataLoader workers), exact resume, refused caches, the loss falls, and the epoch plan."""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from common.teacher import IMAGENET_MEAN, IMAGENET_STD
from shards.errors import CorruptSample
from shards.index import read_index
from shards.manifest import read_manifest
from shards.reader import iter_feature_shard
from shards.teacher import cache_teacher
from tests.conftest import (UNEVEN, epoch_batches, launch, read_metrics, read_trace, run_cli,
                            run_in_process,
                            write_config)
from train.checkpoints import Checkpoints
from train.data import epoch_plan, steps_per_epoch
from train.loop import main
from train.losses import normalize_targets
from train.model import build_student

# ---------------------------------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def shard_of_key(cache: Path) -> dict[str, str]:
    manifest = read_manifest(cache)
    return {s["key"]: name for name in manifest.shard_names for s in iter_feature_shard(cache, name, manifest)}


# ---------------------------------------------------------------------------------------------------- targets


def test_cached_targets_equal_online_teacher(extracted):
    """Each epoch's batch pairs the images with the tokens of exactly that view: the online teacher on the
    replayed pixels gives the cached tokens up to bf16 rounding, and the same loss for the same mask."""
    path, _ = extracted
    cfg = load_config(path)
    cache = Path(cfg.cache.path)
    manifest = read_manifest(cache)
    teacher = cache_teacher(manifest, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_student(cfg, manifest.token_grid, manifest.augment.size).eval()
    mean, var = manifest.stats.mean, manifest.stats.var
    pix_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    pix_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    bs = cfg.train.batch_size
    for epoch in range(manifest.views):  # every recorded view is used once
        batches, _ = epoch_batches(cache, epoch, bs, cfg.train.seed)
        assert len(batches) == manifest.samples // bs
        for i, batch in enumerate(batches):
            images, cached = batch["images"], manifest.token_codec.decode_tensor(batch["tokens"])
            assert images.dtype == torch.uint8 and images.shape == (bs, 3, 64, 64)
            assert cached.shape == (bs, *manifest.token_grid)
            with torch.no_grad():
                online = teacher(images)
                mirrored = teacher(images.flip(-1))
            bound = online.abs() * 2**-8 + 1e-6
            assert ((cached - online).abs() <= bound).all(), f"epoch {epoch} batch {i}: {batch['keys']}"
            assert not ((cached - mirrored).abs() <= bound).all()  # the check can tell another view apart

            mask = model.draw_mask(bs, "cpu", generator=torch.Generator().manual_seed(100 * epoch + i))
            x = (images.float() - pix_mean) / pix_std
            for norm in ("none", "layernorm", "channel"):
                with torch.no_grad():
                    a, b = (model(x, normalize_targets(t, norm, mean, var), unit_mask=mask, beta=cfg.loss.beta,
                                  global_weight=cfg.loss.global_weight) for t in (cached, online))
                torch.testing.assert_close(a["pred"], b["pred"], rtol=0, atol=0)  # same weights, same mask
                for k in ("loss", "patch_loss", "global_loss"):
                    assert a[k].item() == pytest.approx(b[k].item(), rel=5e-3, abs=1e-7), (norm, k)


# ---------------------------------------------------------------------------------------------------- 2 processes


def keys_per_step(run: Path, rank: int) -> dict[int, list[str]]:
    return read_trace(run / f"keys-rank{rank}.txt")


UNEVEN_WORKERS, UNEVEN_STEPS = 2, 7  # the shared uneven run's (test_two_processes' uneven case checks these)
UNEVEN_RUN = ["train.trace_keys=true", f"train.max_steps={UNEVEN_STEPS}", "train.checkpoint_every=3",
              f"train.workers={UNEVEN_WORKERS}"]


@pytest.fixture(scope="module")
def uneven_two_processes(tmp_path_factory, uneven) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted `accelerate launch` of 2 ranks x 2 loader workers on the uneven cache, 7 steps, checkpoints
    at 3 and 6: test_two_processes checks its deal, the SIGKILL test resumes to it (one launch for both, ~9 s)."""
    path, _ = uneven
    run = tmp_path_factory.mktemp("uneven-2p") / "run"
    return run, launch(path, f"train.run_dir={json.dumps(str(run))}", *UNEVEN_RUN)


@pytest.mark.parametrize("which,workers,steps", [("even", 10, 3), ("uneven", UNEVEN_WORKERS, UNEVEN_STEPS)])
@pytest.mark.slow
def test_two_processes(tmp_path, extracted, uneven, request, which, workers, steps):
    """2 ranks x 10 workers on 3 shards (20 loader slots, 18 samples), and 2 x 2 on 5 uneven shards (the shared
    run): both ranks take the same steps, an epoch's batches over the ranks are disjoint and cover all but < one
    global batch of the samples, and every rank draws its own masks."""
    path, cfg = extracted if which == "even" else uneven
    cache = Path(cfg.cache.path)
    if which == "even":
        run = tmp_path / "run"
        r = launch(path, f"train.run_dir={json.dumps(str(run))}", "train.trace_keys=true", f"train.max_steps={steps}",
                   f"train.workers={workers}")
    else:
        run, r = request.getfixturevalue("uneven_two_processes")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == steps

    n, bs = read_manifest(cache).samples, cfg.train.batch_size
    per_epoch = steps_per_epoch(n, 2, bs)
    traces = [keys_per_step(run, r) for r in (0, 1)]
    assert sorted(traces[0]) == sorted(traces[1]) == list(range(steps))
    for epoch in range(math.ceil(steps / per_epoch)):
        in_epoch = range(epoch * per_epoch, min((epoch + 1) * per_epoch, steps))
        keys = [k for trace in traces for s in in_epoch for k in trace[s]]
        assert len(keys) == len(set(keys)) == 2 * bs * len(in_epoch), f"a sample was used twice in epoch {epoch}"
        if len(in_epoch) == per_epoch:
            assert n - len(keys) < 2 * bs  # less than one global batch left out
    masks = [read_trace(run / f"masks-rank{r}.txt") for r in (0, 1)]
    assert all(masks[0][s] != masks[1][s] for s in range(steps))  # its own masks on every rank

    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.bin").is_file()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((ckpt / "position.json").read_text())["step"] == steps
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(row["loss"]) and row["samples_per_s"] > 0 and 0 <= row["data_wait"] <= 1 for row in rows)


@pytest.mark.slow
def test_two_processes_resume_after_sigkill(tmp_path, uneven, uneven_two_processes):
    """Two ranks x 2 loader workers, SIGKILLed at step 5 (checkpoint at 3): the rerun resumes at 3, and every
    rank's batches and masks, and the losses, match an uninterrupted 2-process run (the module's, A)."""
    path, _ = uneven
    sets = UNEVEN_RUN
    (a, done), b = uneven_two_processes, tmp_path / "B"
    assert done.returncode == 0, done.stderr[-3000:]
    os.environ["IMG2VEC_FAULT"] = "step:5"
    try:
        killed = launch(path, f"train.run_dir={json.dumps(str(b))}", *sets)
    finally:
        del os.environ["IMG2VEC_FAULT"]
    assert killed.returncode != 0 and not (b / "checkpoints" / "step_00000007").exists()
    r = launch(path, f"train.run_dir={json.dumps(str(b))}", *sets)
    assert r.returncode == 0 and "step_00000003" in r.stderr, r.stderr[-2000:]
    for rank in (0, 1):
        for name in (f"keys-rank{rank}.txt", f"masks-rank{rank}.txt"):
            assert read_trace(a / name) == read_trace(b / name, resumed=True)
    la, lb = ({r["step"]: r["loss"] for r in read_metrics(x)} for x in (a, b))
    assert sorted(la) == sorted(lb) == list(range(1, 8))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5, abs=1e-7), s


# ---------------------------------------------------------------------------------------------------- resume


def checkpoint_state(run: Path, step: int) -> tuple[dict, dict]:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    return load_file(ckpt / "model.safetensors"), torch.load(ckpt / "optimizer.bin", weights_only=True)


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    assert oa["state"].keys() == ob["state"].keys() and oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for k in oa["state"][i]:
            torch.testing.assert_close(oa["state"][i][k], ob["state"][i][k], rtol=0, atol=1e-6, msg=f"{i}.{k}")


@pytest.mark.parametrize("how,workers", [("max_steps", 0), ("crash", 2)])
@pytest.mark.slow
def test_resume_is_exact(tmp_path, extracted, capsys, monkeypatch, how, workers):
    """B stops at step c (a shorter max_steps, or a crash right after the step-c checkpoint), then reruns in
    the same run dir to 2c; it ends with A's weights, optimizer state, losses, batches and masks, A never
    stopping. c = 5 is one batch into epoch 1 (4 batches per epoch; with 2 workers the second worker's turn),
    so the loader starts mid-epoch, and the run goes on into epoch 2."""
    path, _ = extracted
    c = 5
    sets = [f"train.workers={workers}", f"train.checkpoint_every={c}", "train.trace_keys=true", "train.lr=0.064"]
    if how == "max_steps":  # a constant lr: the schedule of a run depends on its max_steps
        sets += ["train.warmup_epochs=0", f"train.min_lr={0.064 * 4 * 1 * 1 / 256}"]
    run_in_process(path, tmp_path / "A", *sets, f"train.max_steps={2 * c}")

    if how == "max_steps":
        assert run_in_process(path, tmp_path / "B", *sets, f"train.max_steps={c}")["step"] == c
    else:
        class Crash(Exception):
            pass

        save = Checkpoints.save

        def save_then_crash(self, accelerator, step, position):
            save(self, accelerator, step, position)
            if step == c:
                raise Crash

        monkeypatch.setattr(Checkpoints, "save", save_then_crash)
        try:
            run_in_process(path, tmp_path / "B", *sets, f"train.max_steps={2 * c}")
            raise AssertionError("the run did not crash")
        except Crash:
            pass
        gc.collect()  # the crashed run's files and loader workers go with its frames
        monkeypatch.setattr(Checkpoints, "save", save)
    capsys.readouterr()
    assert run_in_process(path, tmp_path / "B", *sets, f"train.max_steps={2 * c}")["step"] == 2 * c
    assert f"resuming from {tmp_path / 'B' / 'checkpoints' / f'step_{c:08d}'} at step {c}" in capsys.readouterr().err

    assert_same_state(checkpoint_state(tmp_path / "A", 2 * c), checkpoint_state(tmp_path / "B", 2 * c))
    a, b = read_metrics(tmp_path / "A"), read_metrics(tmp_path / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * c + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "patch_loss", "global_loss", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-8), (ra["step"], k)
    for name in ("keys-rank0.txt", "masks-rank0.txt"):
        assert read_trace(tmp_path / "A" / name) == read_trace(tmp_path / "B" / name)


# ---------------------------------------------------------------------------------------------------- refused caches


@pytest.mark.slow
def test_missing_or_incomplete_cache_fails_with_code_2(tmp_path, extracted, capsys):
    path, cfg = extracted
    run = tmp_path / "run"
    args = ["--config", str(path), "--no-progress", "--set", f"train.run_dir={json.dumps(str(run))}"]
    missing = tmp_path / "no-cache"
    assert main([*args, "--set", f"cache.path={json.dumps(str(missing))}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: error:") and str(missing / "manifest.json") in err

    broken = tmp_path / "broken"
    shutil.copytree(cfg.cache.path, broken)
    (broken / "shard-000001.done.json").unlink()
    assert main([*args, "--set", f"cache.path={json.dumps(str(broken))}"]) == 2
    err = capsys.readouterr().err
    assert "shard-000001" in err and "shard-000000" not in err and "extract-features" in err
    assert not run.exists()  # refused before any work

    r = run_cli(["python", "-m", "train", *args, "--set", f"cache.path={json.dumps(str(broken))}"])
    assert r.returncode == 2 and "shard-000001" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]

    old = tmp_path / "format1"
    shutil.copytree(cfg.cache.path, old)
    m = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(dict(m, format_version=1)))
    assert main([*args, "--set", f"cache.path={json.dumps(str(old))}"]) == 2
    assert "format 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_loss_falls(tmp_path, extracted):
    path, _ = extracted
    steps = 30
    summary = run_in_process(path, tmp_path / "run", f"train.max_steps={steps}", "train.lr=0.064")  # peak lr 1e-3
    assert summary["step"] == steps
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


@pytest.mark.slow
def test_cached_and_online_runs_take_the_same_samples_masks_and_losses(tmp_path, source):
    """With an fp32 cache, a cached run and an online-teacher run with one seed see the same batches and
    masks, and their losses agree to 1e-3 relative."""
    from extract.pipeline import run_extraction

    path = write_config(tmp_path, source, 3, codec="fp32")
    run_extraction(load_config(path), progress=False)
    sets = ["train.max_steps=6", "train.trace_keys=true", "train.lr=0.064"]
    run_in_process(path, tmp_path / "cached", *sets)
    run_in_process(path, tmp_path / "online", *sets, "train.targets=online")
    for name in ("keys-rank0.txt", "masks-rank0.txt"):
        assert read_trace(tmp_path / "cached" / name) == read_trace(tmp_path / "online" / name)
    for a, b in zip(read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "online"), strict=True):
        for k in ("loss", "patch_loss", "global_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-3), (a["step"], k)


def test_resolved_student_is_printed_and_recorded_and_masks_per_view_reaches_the_model(tmp_path, extracted, capsys):
    """decoder_depth 0 = from the arch (ViT-Ti: 2 blocks); config.json records what was built, so export and knn
    rebuild the same student; masks_per_view goes from the config into the model."""
    from img2vec.export import load_student

    path, _ = extracted
    run = tmp_path / "run"
    summary = run_in_process(path, run, "train.max_steps=1", "student.decoder_depth=0", "student.masks_per_view=2")
    assert summary["step"] == 1 and math.isfinite(summary["loss"])
    assert "student vit_tiny_patch16: decoder 2 blocks x 64 wide, 4 heads" in capsys.readouterr().err
    student_cfg = json.loads((run / "config.json").read_text())["student"]
    assert (student_cfg["decoder_depth"], student_cfg["masks_per_view"]) == (2, 2)
    student, _ = load_student(run)
    assert len(student.decoder_blocks) == 2 and student.masks_per_view == 2


# ---------------------------------------------------------------------------------------------------- epoch plan


COUNTS = [[6, 6, 6], UNEVEN, [3 + (7 * i) % 11 for i in range(13)], [40, 1, 2], [1000, 0, 3]]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 10), (3, 1), (8, 3)])
@pytest.mark.parametrize("mode", ["random", "stream"])
def test_epoch_plan(counts, world, workers, mode):
    """Brute force over ranks: the same steps on every rank, disjoint batches covering all but < one global
    batch, the same plan whatever a rank computes it, another order in another epoch."""
    n = sum(counts)
    for bs in (1, 2, 4):
        steps = n // (world * bs)
        orders = set()
        for epoch in range(3):
            plans = [epoch_plan(counts, epoch=epoch, seed=7, world=world, rank=r, batch_size=bs, mode=mode,
                                workers=workers, buffer=5) for r in range(world)]
            assert all(p.shape == (steps, bs) for p in plans)
            ids = np.concatenate([p.ravel() for p in plans])
            assert len(np.unique(ids)) == len(ids) == steps * world * bs and n - len(ids) < world * bs
            assert ((ids >= 0) & (ids < n)).all()
            assert (epoch_plan(counts, epoch=epoch, seed=7, world=world, rank=0, batch_size=bs, mode=mode,
                               workers=workers, buffer=5) == plans[0]).all()
            orders.add(tuple(plans[0].ravel()))
        assert len(orders) > 1 or steps * bs <= 1 or (mode == "stream" and len(counts) == 1)


def expected_distinct(n: int, classes: int, b: int) -> float:
    """E[distinct classes] in b samples drawn without replacement from n = classes x (n / classes)."""
    per = n // classes
    return classes * (1 - math.comb(n - per, b) / math.comb(n, b))


def test_random_plan_batches_are_iid_on_class_sorted_shards():
    """ImageNet-like class-sorted shards (shard s holds class s only): a batch of 128 from the random plan
    holds as many classes as i.i.d. sampling (>= 0.85 of the expectation); the stream plan, for contrast, far fewer."""
    shards, per, bs = 100, 100, 128
    label = np.repeat(np.arange(shards), per)
    want = expected_distinct(shards * per, shards, bs)
    for mode, ok in (("random", True), ("stream", False)):
        plan = epoch_plan([per] * shards, epoch=0, seed=0, world=4, rank=1, batch_size=bs, mode=mode, workers=10,
                          buffer=1000)
        got = np.mean([len(np.unique(label[b])) for b in plan])
        assert (got >= 0.85 * want) == ok, (mode, got, want)


@pytest.mark.parametrize("workers,world", [(2, 1), (3, 2)])
@pytest.mark.slow
def test_resumed_loader_continues_the_epoch(extracted, uneven, workers, world):
    """Started at batch k of an epoch, the real multi-worker loader yields exactly the rest of the full pass."""
    for _, cfg in (extracted, uneven):
        cache = Path(cfg.cache.path)
        full, plan = epoch_batches(cache, 1, 4, world=world, rank=world - 1, workers=workers, with_tokens=False)
        assert len(full) == len(plan) and [b["keys"] for b in full] == [
            [k.decode() for k in keys] for keys in keys_of_ids(cache, plan)]
        for start in range(1, len(plan)):
            rest, _ = epoch_batches(cache, 1, 4, world=world, rank=world - 1, workers=workers, start=start,
                                    with_tokens=False)
            assert [b["keys"] for b in rest] == [b["keys"] for b in full[start:]]


def keys_of_ids(cache: Path, plan: np.ndarray) -> np.ndarray:
    manifest = read_manifest(cache)
    keys = np.concatenate([read_index(cache, name)["key"] for name in manifest.shard_names])
    return keys[plan]


# ---------------------------------------------------------------------------------------------------- checked samples


def corrupt_index_crc(cache: Path, shard: str, rows: list[int]) -> list[str]:
    """Flip the recorded crc32 of every view of some samples (index.npy is rewritten in place)."""
    path = cache / shard / "index.npy"
    index = np.load(path, allow_pickle=False)
    index["crc"][rows] ^= 1
    np.save(path, index, allow_pickle=False)
    return [k.decode() for k in index["key"][rows]]


def test_skipped_corrupt_samples_keep_the_batch_count(tmp_path, extracted):
    """on_corrupt = "skip": a corrupt sample's place goes to another sample of its batch; every batch is full,
    and the batch count holds; with "error" the first one is raised naming shard and key."""
    _, cfg = extracted
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.path, cache)
    bad = set(corrupt_index_crc(cache, "shard-000001", [0, 1, 4]))
    bs = 3
    full, plan = epoch_batches(cache, 0, bs, on_corrupt="skip")
    assert len(full) == len(plan) == 6
    assert all(len(b["keys"]) == bs and b["tokens"].shape[0] == bs for b in full)
    assert not bad & {k for b in full for k in b["keys"]}
    with pytest.raises(CorruptSample, match="shard-000001"):
        epoch_batches(cache, 0, bs, on_corrupt="error")


def rewrite_source(src: Path, dst: Path, change) -> None:
    """Copy a source tar member by member; change(name, data) -> new data (None drops the member)."""
    import tarfile

    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = change(m.name, tin.extractfile(m).read())
            if data is not None:
                m.size = len(data)
                tout.addfile(m, __import__("io").BytesIO(data))


@pytest.mark.parametrize("change", ["reencoded", "replaced", "truncated"])
def test_changed_source_image_is_a_corrupt_sample(tmp_path, extracted, change):
    """After extraction, one source image is re-encoded (other bytes, same picture), replaced by a smaller image,
    or the tar is cut inside an image: training names shard and key (CorruptSample), and with "skip" warns and
    keeps its step count."""
    import io

    from PIL import Image

    _, cfg = extracted
    src = tmp_path / "src"
    shutil.copytree(Path(cfg.data.shards).parent, src)
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.path, cache)
    tar = src / "shard-000002.tar"
    keys = [k.decode() for k in read_index(cache, "shard-000002")["key"]]
    victim = keys[3]
    lost = set(keys[3:])  # the members after the changed one moved (or were cut): their recorded offsets miss too

    def edit(name, data):
        if name != f"{victim}.jpg":
            return data
        img = Image.open(io.BytesIO(data))
        out = io.BytesIO()
        (img if change == "reencoded" else img.resize((img.width // 2, img.height // 2))).save(out, "JPEG", quality=70)
        return out.getvalue()

    if change == "truncated":
        meta = read_index(cache, "shard-000002")[3]
        tar.write_bytes(tar.read_bytes()[:int(meta["src_offset"]) + int(meta["src_size"]) // 2])
    else:
        rewrite_source(Path(cfg.data.shards).parent / "shard-000002.tar", tar, edit)
    m = json.loads((cache / "manifest.json").read_text())
    for s in m["shards"]:
        s["source"] = str(src / Path(s["source"]).name)
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptSample, match=f"shard-000002.*({'|'.join(lost)})"):
        for epoch in range(2):
            epoch_batches(cache, epoch, 2)
    batches, plan = epoch_batches(cache, 0, 2, on_corrupt="skip")
    assert len(batches) == len(plan) and all(len(b["keys"]) == 2 for b in batches)
    assert not lost & {k for b in batches for k in b["keys"]}


# ---------------------------------------------------------------------------------------------------- bytes read


def resident_bytes(paths: list[Path]) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def evict(paths: list[Path]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="fincore (util-linux) not installed")
@pytest.mark.parametrize("fmt", ["wds", "zarr"])
@pytest.mark.slow
def test_an_epoch_reads_one_view(tmp_path, source, fmt):
    """Evict the cache from the page cache, train on one epoch's batches, count what the kernel read: the token
    bytes of one view per sample (plus the pages they straddle and, in Zarr, each read's shard index), ~1/V of
    the token files. Reading every view, as format 1 did, would be all of them."""
    from extract.pipeline import run_extraction

    path = write_config(tmp_path, source, 3, fmt=fmt, codec="fp32")
    cfg = load_config(path, ["augment.size=128", "augment.views=4"])  # 32 KiB per view
    run_extraction(cfg, progress=False)
    cache = Path(cfg.cache.path)
    token_files = [p for p in cache.rglob("*") if p.is_file() and p.parent.name != "c" and p.name.startswith("v")
                   or p.is_file() and "/c/" in str(p)]
    total = sum(p.stat().st_size for p in token_files)
    evict(token_files)
    assert resident_bytes(token_files) == 0
    batches, plan = epoch_batches(cache, 0, 3)
    read = resident_bytes(token_files)
    one_view = 18 * 4 * 16 * 512  # samples x fp32 x T x C
    page = 4096
    bound = one_view + len(plan.ravel()) * (2 * page if fmt == "zarr" else page)
    assert one_view <= read <= bound, (read, one_view, total)
    assert read / total < 1 / 4 * (1 + 2 * page / (one_view / 18))
    print(f"{fmt}: read {read} of {total} token bytes ({read / total:.3f}; 1/V = 0.25)")
