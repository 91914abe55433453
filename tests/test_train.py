"""Stage two: cached targets equal the online teacher's, real 2-process runs (odd and uneven shards,
DataLoader workers), exact resume, refused caches, the loss falls, and the epoch plan."""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import load_config
from common.teacher import IMAGENET_MEAN, IMAGENET_STD
from extract.pipeline import run_extraction
from shards.features import CorruptSample, iter_feature_shard, read_manifest
from tests.conftest import BIN, REPO, make_source, run_cli, write_config
from shards.features import source_urls
from train.data import CachedViews, batches_before, check_cache, make_loader, next_worker, plan_epoch
from train.loop import Checkpoints, build_student, main, online_teacher, train
from train.losses import normalize_targets

UNEVEN = [9, 2, 6, 4, 7]  # samples per source shard of the uneven source (2 is below the batch size)


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one intra-op thread: on a shared, busy CPU two threads run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_uneven_source(dirpath: Path, sizes: list[int]) -> Path:
    """Shards shard-000000.tar ... with the given numbers of samples (keys unique across shards)."""
    for i, n in enumerate(sizes):
        part = make_source(dirpath / f"part{i}", n=n, per_shard=n, seed=i)
        (part / "shard-000000.tar").rename(dirpath / f"shard-{i:06d}.tar")
        part.rmdir()
    return dirpath


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """An extracted cache over 5 source shards of uneven sizes: (config path, Config)."""
    tmp = tmp_path_factory.mktemp("uneven")
    path = write_config(tmp, make_uneven_source(tmp / "src", UNEVEN), len(UNEVEN))
    cfg = load_config(path)
    run_extraction(cfg, progress=False)
    return path, cfg


def shard_of_key(cache: Path) -> dict[str, str]:
    manifest = read_manifest(cache)
    return {s["key"]: sh["name"] for sh in manifest["shards"]
            for s in iter_feature_shard(cache, sh["name"], manifest, check=False)}


def read_trace(path: Path) -> dict[int, list[str]]:
    out = {}
    for line in path.read_text().splitlines():
        step, *keys = line.split()
        assert int(step) not in out, f"{path}: step {step} traced twice"
        out[int(step)] = keys
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, *overrides: str, processes: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` with real CPU processes, as a user runs it (its own port: other runs may share the host)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "train", "--config", str(config), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_in_process(config: Path, run: Path, *overrides: str) -> dict:
    cfg = load_config(config, list(overrides))
    cfg.train.run_dir = str(run)
    return train(cfg, progress=False)


# ---------------------------------------------------------------------------------------------------- targets


def test_cached_targets_equal_online_teacher(extracted):
    """Each epoch's batch pairs the images with the tokens of exactly that view: the online teacher on the
    replayed pixels gives the cached tokens up to bf16 rounding, and the same loss for the same mask."""
    path, _ = extracted
    cfg = load_config(path)  # own copy: online_teacher writes the manifest's teacher into cfg.teacher
    cache = Path(cfg.cache.path)
    manifest = read_manifest(cache)
    counts = check_cache(cache, manifest)
    urls = source_urls(manifest, cfg.data.shards)
    teacher = online_teacher(cfg, manifest, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_student(cfg, manifest).eval()
    mean, var = manifest["stats"]["mean"], manifest["stats"]["var"]
    pix_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    pix_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    bs = cfg.train.batch_size
    for epoch in range(manifest["augment"]["views"]):  # every recorded view is used once
        plan = plan_epoch(counts, epoch, cfg.train.seed, 1, 0, bs)
        batches = list(CachedViews(cache, manifest, urls, plan, 0, 0, epoch, cfg.train.seed, bs,
                                   cfg.train.shuffle_buffer, with_tokens=True))
        assert len(batches) == plan.steps == sum(counts.values()) // bs
        for i, batch in enumerate(batches):
            images, cached = batch["images"], batch["tokens"]
            assert images.dtype == torch.uint8 and images.shape == (bs, 3, 64, 64)
            assert cached.shape == (bs, *manifest["token_shape"])
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


@pytest.mark.parametrize("which,workers,steps", [("even", 0, 3), ("uneven", 2, 5)])
def test_two_processes(tmp_path, extracted, uneven, which, workers, steps):
    """3 shards over 2 ranks (12 samples against 6), 5 uneven shards over 2 ranks x 2 workers (one shard
    smaller than a batch; rank 0 holds more batches than it runs): the run ends, both ranks take the same
    steps, each rank reads only its own shards, and within an epoch no sample is seen twice."""
    path, cfg = extracted if which == "even" else uneven
    cache = Path(cfg.cache.path)
    run = tmp_path / "run"
    r = launch(path, f"train.run_dir={json.dumps(str(run))}", "train.trace_keys=true", f"train.max_steps={steps}",
               f"train.workers={workers}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == steps

    counts = check_cache(cache, read_manifest(cache))
    per_epoch = plan_epoch(counts, 0, cfg.train.seed, 2, workers, cfg.train.batch_size).steps
    traces = [read_trace(run / f"keys-rank{r}.txt") for r in (0, 1)]
    assert sorted(traces[0]) == sorted(traces[1]) == list(range(steps))
    home = shard_of_key(cache)
    for epoch in range(math.ceil(steps / per_epoch)):
        plan = plan_epoch(counts, epoch, cfg.train.seed, 2, workers, cfg.train.batch_size)
        seen = []
        for rank, trace in enumerate(traces):
            keys = [k for s in range(epoch * per_epoch, min((epoch + 1) * per_epoch, steps)) for k in trace[s]]
            assert len(keys) == len(set(keys)), f"rank {rank} saw a sample twice in epoch {epoch}"
            own = {n for slot in plan.slots[rank * max(workers, 1):(rank + 1) * max(workers, 1)] for n in slot}
            assert {home[k] for k in keys} <= own, f"rank {rank} read another rank's shard in epoch {epoch}"
            seen.append(set(keys))
        assert not seen[0] & seen[1], f"epoch {epoch}: both ranks saw {sorted(seen[0] & seen[1])}"

    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.bin").is_file()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((ckpt / "position.json").read_text())["step"] == steps
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(row["loss"]) and row["samples_per_s"] > 0 and 0 <= row["data_wait"] <= 1 for row in rows)


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
def test_resume_is_exact(tmp_path, extracted, capsys, monkeypatch, how, workers):
    """B stops at step c (a shorter max_steps, or a crash right after the step-c checkpoint), then reruns in
    the same run dir to 2c; it ends with A's weights, optimizer state, losses and batches, A never stopping.
    c = 5 is one batch into epoch 1 (4 batches per epoch; with 2 workers the second worker's turn), so the
    data is fast-forwarded to the batch, and the run goes on into epoch 2."""
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
    assert read_trace(tmp_path / "A" / "keys-rank0.txt") == read_trace(tmp_path / "B" / "keys-rank0.txt")


# ---------------------------------------------------------------------------------------------------- refused caches


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


# ---------------------------------------------------------------------------------------------------- learning


def test_loss_falls(tmp_path, extracted):
    path, _ = extracted
    steps = 30
    summary = run_in_process(path, tmp_path / "run", f"train.max_steps={steps}", "train.lr=0.064")  # peak lr 1e-3
    assert summary["step"] == steps
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


def test_resolved_student_is_printed_and_recorded_and_masks_per_view_reaches_the_model(tmp_path, extracted, capsys):
    """decoder_depth 0 = from the arch (ViT-Ti: 2 blocks); config.json records what was built, so export and knn
    rebuild the same student; masks_per_view goes from the config into the model."""
    from train.export import load_student

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


COUNTS = [
    {"a": 6, "b": 6, "c": 6},
    {f"s{i}": n for i, n in enumerate(UNEVEN)},
    {f"s{i:02d}": 3 + (7 * i) % 11 for i in range(13)},
    {"x": 40, "y": 1, "z": 2},
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2), (3, 1), (4, 3)])
def test_plan_epoch(counts, world, workers):
    n_slots = world * max(workers, 1)
    steps0 = None
    for bs in (1, 2, 4):
        for epoch in range(4):
            plan = plan_epoch(counts, epoch, 7, world, workers, bs)
            again = plan_epoch(counts, epoch, 7, world, workers, bs)  # what the other ranks compute
            assert (plan.slots, plan.quotas, plan.steps) == (again.slots, again.quotas, again.steps)
            assert len(plan.slots) == len(plan.quotas) == n_slots
            names = [n for slot in plan.slots for n in slot]
            assert sorted(names) == sorted(counts)  # disjoint, covering
            assert plan.quotas == [sum(counts[n] for n in slot) // bs for slot in plan.slots]
            per_rank = [sum(plan.quotas[r * max(workers, 1):(r + 1) * max(workers, 1)]) for r in range(world)]
            assert plan.steps == min(per_rank)  # every rank can run `steps` batches, and runs no more
            if epoch == 0:
                steps0 = plan.steps
            assert plan.steps == steps0  # the loop maps steps to epochs with epoch 0's count
        if world * max(workers, 1) < len(counts):
            orders = {tuple(map(tuple, plan_epoch(counts, e, 7, world, workers, 1).slots)) for e in range(8)}
            assert len(orders) > 1  # the shard order changes between epochs


def round_robin(quotas: list[int]) -> list[int]:
    """Brute force: the worker of each batch when workers take turns and a finished worker drops out."""
    done, order = [0] * len(quotas), []
    while len(order) < sum(quotas):
        for w, q in enumerate(quotas):
            if done[w] < q:
                done[w] += 1
                order.append(w)
    return order


@pytest.mark.parametrize("quotas", [[0], [5], [3, 1], [1, 3], [2, 0, 4], [0, 0, 3], [4, 4, 1, 0, 2], [1, 1, 1, 1]])
def test_batches_before_is_round_robin(quotas):
    order = round_robin(quotas)
    for start in range(sum(quotas) + 1):
        assert batches_before(quotas, start) == [order[:start].count(w) for w in range(len(quotas))]
        if start < len(order):  # resumed here, the loader's first turn must be this worker's
            w = next_worker(quotas, start)
            assert order[start] == next(v % len(quotas) for v in range(w, w + len(quotas)) if
                                        order[:start].count(v % len(quotas)) < quotas[v % len(quotas)])
    with pytest.raises(ValueError):
        batches_before(quotas, sum(quotas) + 1)


class Tagged(torch.utils.data.IterableDataset):
    def __init__(self, quotas):
        self.quotas = quotas

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        for i in range(self.quotas[w]):
            yield w, i


@pytest.mark.parametrize("quotas", [[3, 1], [2, 0, 3, 1]])
def test_dataloader_takes_batches_round_robin(quotas):
    """What batches_before assumes of torch's DataLoader, checked on the real thing."""
    loader = torch.utils.data.DataLoader(Tagged(quotas), batch_size=None, num_workers=len(quotas), prefetch_factor=4)
    assert [w for w, _ in loader] == round_robin(quotas)


@pytest.mark.parametrize("which", ["even", "uneven"])
@pytest.mark.parametrize("world,workers", [(1, 2), (2, 2)])
def test_fast_forward_gives_the_rest_of_the_epoch(extracted, uneven, which, world, workers):
    """CachedViews started `skip` batches into an epoch yields exactly the batches a full pass yields after
    them, through the real multi-worker loader (what resume relies on)."""
    _, cfg = extracted if which == "even" else uneven
    cache = Path(cfg.cache.path)
    manifest = read_manifest(cache)
    counts = check_cache(cache, manifest)
    urls = source_urls(manifest, None)
    plan = plan_epoch(counts, 1, 0, world, workers, 4)

    def keys(rank, skip):
        data = CachedViews(cache, manifest, urls, plan, rank, workers, 1, 0, 4, 8, skip_batches=skip,
                           with_tokens=False)
        return [b["keys"] for b in make_loader(data)][: plan.steps - skip]

    full = [keys(rank, 0) for rank in range(world)]
    assert all(len(f) == plan.steps for f in full)
    if world == 2:
        assert not {k for b in full[0] for k in b} & {k for b in full[1] for k in b}
    for skip in range(1, plan.steps):
        assert keys(0, skip) == full[0][skip:]


def test_skipped_corrupt_samples_keep_the_batch_count(tmp_path, extracted):
    """on_corrupt = "skip" fills a corrupt sample's place with a good one, also when the corrupt samples come
    first in a worker's stream; every batch is full, the quota is met, and fast-forward stays exact."""
    _, cfg = extracted
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.path, cache)
    manifest = read_manifest(cache)
    counts = check_cache(cache, manifest)
    urls = source_urls(manifest, None)
    bs = 3  # 18 samples: quota 6 uses every one, so a lost place would cost a batch
    plan = plan_epoch(counts, 0, 0, 1, 0, bs)
    first = plan.slots[0][0]  # shuffle_buffer 1 keeps the stream in shard order: this shard comes first
    record = json.loads((cache / f"{first}.done.json").read_text())
    keys = list(record["crc32"])
    bad = {keys[0], keys[1], keys[4]}
    for k in bad:
        record["crc32"][k] ^= 1
    (cache / f"{first}.done.json").write_text(json.dumps(record))

    def batches(skip=0, on_corrupt="skip"):
        return list(CachedViews(cache, manifest, urls, plan, 0, 0, 0, 0, bs, 1, skip_batches=skip,
                                with_tokens=True, on_corrupt=on_corrupt))

    full = batches()
    assert len(full) == plan.quotas[0] == 6
    assert all(len(b["keys"]) == bs and b["tokens"].shape[0] == bs for b in full)
    assert not bad & {k for b in full for k in b["keys"]}
    for skip in range(1, len(full)):
        assert [b["keys"] for b in batches(skip)] == [b["keys"] for b in full[skip:]]
    with pytest.raises(CorruptSample, match=keys[0]):
        batches(on_corrupt="error")
