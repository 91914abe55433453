"""Stage one: determinism, exact replay, both formats, kill and resume, ranks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.augment import decode_image, replay_probe, replay_views, sample_views, view_order
from common.codecs import get_codec
from common.config import load_config
from common.teacher import build_teacher
from extract.pipeline import run_extraction
from shards.manifest import read_manifest
from shards.reader import iter_feature_shard
from shards.source import iter_samples
from tests.conftest import cache_files, epoch_batches, run_cli, write_config, zarr_python_copy


def stored_tokens(cache: Path) -> dict[str, np.ndarray]:
    manifest = read_manifest(cache)
    codec = manifest.token_codec
    return {s["key"]: codec.decode(s["packed"]) for name in manifest.shard_names
            for s in iter_feature_shard(cache, name, manifest)}


def test_same_config_twice_gives_same_bytes(tmp_path, source, extracted):
    path = write_config(tmp_path, source, 3)
    run_extraction(load_config(path), progress=False)
    assert cache_files(tmp_path / "cache") == cache_files(Path(extracted[1].cache.path))


def test_manifest_and_records(extracted):
    cfg = extracted[1]
    cache = Path(cfg.cache.path)
    m = read_manifest(cache)
    assert m.token_shape == [4, 512] and m.samples == 18 and m.skipped == 0
    assert m.teacher.arch == "resnet18" and len(m.teacher.sha256) == 64
    tokens = np.stack(list(stored_tokens(cache).values()))  # [N, V, T, C]
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(m.stats.mean, flat.mean(0), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(m.stats.var, flat.var(0), rtol=2e-2, atol=1e-3)
    u = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    u = u.reshape(-1, 4, u.shape[-1])
    td = np.mean([1 - (np.sum(v @ v.T) - np.trace(v @ v.T)) / 12 for v in u])
    assert m.stats.token_diversity == pytest.approx(td, abs=1e-3)


@pytest.mark.parametrize("codec,cut", [("bf16-zstd", "torch"), ("u8-zstd", "torch"), ("bf16-zstd", "pil"),
                                       ("bf16z-zstd", "torch")])
def test_replay_is_exact(tmp_path, source, codec, cut):
    """Replaying each recorded view with the cache's cut path and running the teacher online reproduces the stored
    tokens; stage two's loader gives exactly those pixels."""
    cfg = load_config(write_config(tmp_path, source, 1, codec=codec), [f"augment.cut={cut}"])
    run_extraction(cfg, progress=False)
    teacher = build_teacher(cfg.teacher)
    stored = stored_tokens(Path(cfg.cache.path))
    manifest = read_manifest(Path(cfg.cache.path))
    assert manifest.augment.cut == cut and manifest.replay.probe == replay_probe(cut)
    records = {s["key"]: s["views"] for s in iter_feature_shard(Path(cfg.cache.path), "shard-000000", manifest)}
    loaded = {}  # stage two's pixels and tokens of each (key, view), over V epochs
    for epoch in range(3):
        for batch in epoch_batches(Path(cfg.cache.path), epoch, 1)[0]:
            key, view = batch["keys"][0], int(view_order(0, batch["keys"][0], 3)[epoch])
            loaded[key, view] = batch["images"][0]
            tokens = get_codec(codec).decode_tensor(batch["tokens"])[0].numpy()  # as the training step decodes them
            np.testing.assert_array_equal(tokens, stored[key][view])
    for s in iter_samples(str(source / "shard-000000.tar")):
        img = decode_image(s["image"])
        assert (records[s["key"]] == sample_views(seed=0, key=s["key"], height=img.height, width=img.width, views=3)).all()
        pixels = replay_views(img, records[s["key"]], 64, cut)
        for v in range(3):
            assert torch.equal(loaded[s["key"], v], pixels[v])
        online = teacher(pixels).numpy()  # [V, T, C]
        err = np.abs(stored[s["key"]] - online)
        if codec.startswith("bf16"):  # exact up to bf16 rounding of the teacher's output
            assert (err <= np.abs(online) * 2 ** -8 + 1e-6).all()
        else:
            assert (err <= get_codec(codec).max_abs_error(online) * 1.001 + 1e-6).all()
            cos = (stored[s["key"]] * online).sum(-1) / (
                np.linalg.norm(stored[s["key"]], axis=-1) * np.linalg.norm(online, axis=-1) + 1e-12)
            assert cos.min() > 0.999


def test_wds_and_zarr_decode_to_same_tokens(tmp_path, source, extracted):
    """A Zarr cache decodes to the tars' tokens; each of its shards, streamed by extraction's writer, is byte for
    byte what zarr-python writes for its array in shard files of all N samples of one view: V files per shard."""
    cfg = load_config(write_config(tmp_path, source, 3, fmt="zarr"))
    run_extraction(cfg, progress=False)
    z, w = stored_tokens(Path(cfg.cache.path)), stored_tokens(Path(extracted[1].cache.path))
    assert list(z) == list(w)
    for k in z:
        np.testing.assert_array_equal(z[k], w[k])
    for name in read_manifest(Path(cfg.cache.path)).shard_names:
        array = Path(cfg.cache.path) / name / "tokens.zarr"
        zarr_python_copy(array, tmp_path / name, 6)
        assert cache_files(array) == cache_files(tmp_path / name)
        assert sorted(p.relative_to(array).parts[2:] for p in array.rglob("c/*/*/*/*")) == \
            [(str(v), "0", "0", "0") for v in range(cfg.augment.views)]


@pytest.mark.parametrize("point", ["decode", "write", "commit"])
@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, source, extracted, point):
    """SIGKILL while decoding, while writing a shard, and between shard and record."""
    path = write_config(tmp_path, source, 3)
    killed = run_cli(["extract-features", "--config", str(path), "--no-progress"],
                     env={"IMG2VEC_FAULT": f"{point}:shard-000001"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    cache = tmp_path / "cache"
    assert not (cache / "shard-000001.done.json").exists()
    rerun = run_cli(["extract-features", "--config", str(path), "--no-progress"])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards_done"] + summary["shards_already_complete"] == 3
    if point != "decode":  # the writer thread commits shard 0 before it writes shard 1
        assert summary["shards_already_complete"] >= 1
    assert cache_files(cache) == cache_files(Path(extracted[1].cache.path))


@pytest.mark.slow
def test_two_ranks_write_disjoint_shards_covering_all(tmp_path, source, extracted):
    path = write_config(tmp_path, source, 3)
    procs = [run_cli(["extract-features", "--config", str(path), "--no-progress"],
                     env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-1000:] + procs[1].stderr[-1000:]
    summaries = [json.loads(p.stdout) for p in procs]
    assert [s["shards_done"] for s in summaries] == [2, 1]
    assert summaries[1]["cache_complete"]  # the last rank to finish merges the statistics
    assert cache_files(tmp_path / "cache") == cache_files(Path(extracted[1].cache.path))


def test_slurm_env_and_flags_pick_the_rank(monkeypatch):
    from shards.source import rank_and_world, rank_shards

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert rank_and_world() == (2, 3)
    assert rank_and_world(0, 1) == (0, 1)
    assert rank_shards(list("abcdefg"), 2, 3) == ["c", "f"]


@pytest.mark.slow
def test_cache_of_another_recipe_is_refused(tmp_path, source, capsys):
    """extract-features' main in this process (its exit status as the console script's; a process each was ~3.5 s)."""
    from extract.cli import main as extract_main

    path = write_config(tmp_path, source, 1)
    run_extraction(load_config(path), progress=False)
    for override, word in [("augment.views=2", "augment.views"), ("teacher.seed=1", "teacher.sha256"),
                           ("cache.codec=u8-zstd", "codec.name")]:
        rc = extract_main(["--config", str(path), "--set", override, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and word in err, err[-1500:]


@pytest.mark.slow
def test_truncated_source_shard_fails_alone_and_rerun_finishes(tmp_path, source, capsys):
    import shutil

    from extract.cli import main as extract_main

    src = tmp_path / "src"
    shutil.copytree(source, src)
    good = (src / "shard-000001.tar").read_bytes()
    (src / "shard-000001.tar").write_bytes(good[: len(good) // 2 + 100])
    path = write_config(tmp_path, src, 3)
    args = ["--config", str(path), "--no-progress"]  # main in this process, its exit status as the script's
    rc, err = extract_main(args), capsys.readouterr().err
    assert rc == 1 and "shard-000001.tar" in err, err[-1500:]
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.done.json")) == [
        "shard-000000.done.json", "shard-000002.done.json"]
    (src / "shard-000001.tar").write_bytes(good)
    rc, out = extract_main(args), capsys.readouterr()
    assert rc == 0, out.err[-1500:]
    s = json.loads(out.out)
    assert (s["shards_done"], s["shards_already_complete"], s["cache_complete"]) == (1, 2, True)


def test_teacher_on_gpu_settings_do_not_change_cpu_output(extracted):
    """bf16 autocast and channels_last apply on CUDA only: the CPU teacher is fp32 and deterministic."""
    teacher = build_teacher(extracted[1].teacher)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(teacher(x), teacher(x)) and teacher(x).dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert os.environ.get("IMG2VEC_FAULT") is None


def test_encode_threads_do_not_change_the_bytes(tmp_path, source, extracted):
    """Views are encoded, compressed and checksummed by a pool, and written in order: any thread count gives
    the bytes of one thread (the fixture's cache, made with the default)."""
    path = write_config(tmp_path, source, 3)
    run_extraction(load_config(path, ["extract.encode_threads=3"]), progress=False)
    assert cache_files(tmp_path / "cache") == cache_files(Path(extracted[1].cache.path))


def test_u8_caches_written_before_bitshuffle_still_decode():
    """u8-zstd now bit-shuffles before zstd (smaller and ~2x faster to encode); Blosc's header says how a block was
    shuffled, so views compressed the old way (no shuffle) decode to the same array."""
    import numcodecs

    codec = get_codec("u8-zstd")
    tokens = np.maximum(np.random.default_rng(0).normal(0, 1, (3, 16, 64)), 0).astype(np.float32)
    packed = codec.encode(tokens)
    old = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE, blocksize=1 << 18)
    for p in packed:
        np.testing.assert_array_equal(codec.decompress(bytes(old.encode(p)), 16, 64), p)
        np.testing.assert_array_equal(codec.decompress(codec.compress(p), 16, 64), p)
    assert codec.blosc().shuffle == numcodecs.Blosc.BITSHUFFLE


def test_u8_quantization_without_host_syncs_gives_the_same_bytes():
    """On a GPU the cosine search runs every round on every token (no data-dependent shapes, nothing waits for the
    device); on a CPU it skips rounds nobody needs. Both give the same q, lo and scale, companded tokens included."""
    from common.codecs import U8_TARGET_COS, quantize_u8

    rng = np.random.default_rng(0)
    relu = np.maximum(rng.normal(0, 1, (64, 2048)), 0)
    spiky = rng.uniform(0, 3, (16, 2048))
    spiky[:, 0] = rng.uniform(100, 2000, 16)  # one huge channel: 255 linear levels miss, companding is needed
    tokens = torch.from_numpy(np.concatenate([relu, spiky, np.zeros((2, 2048))]).astype(np.float32))
    a, b = quantize_u8(tokens, U8_TARGET_COS, sync_free=False), quantize_u8(tokens, U8_TARGET_COS, sync_free=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[2] < 0).any() and (a[2] > 0).any()  # both linear and companded tokens were exercised
    dec = get_codec("u8-zstd").decode_tensor(torch.cat([a[0], torch.stack([a[1], a[2]], -1).view(torch.uint8)], -1))
    cos = torch.nn.functional.cosine_similarity(dec, tokens, dim=-1)
    assert (cos[:-2] >= U8_TARGET_COS).all() and torch.equal(dec[-2:], tokens[-2:])


@pytest.mark.parametrize("shape", [(3, 49, 2048), (2, 4, 13), (1, 1, 1)])
def test_zero_bitmap_layout_is_lossless(shape):
    """bf16z-zstd stores a view as [bitmap of nonzeros | high bytes | low bytes | zeros]: the same bf16 bits as
    bf16-zstd for post-ReLU tokens, negative zero, channels not a multiple of 8, and views with no zeros or only
    zeros; decoded alike by numpy and by the training step's torch path."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(0, 1, shape), 0).astype(np.float32)
    x[0, 0, 0] = -0.0
    x = np.concatenate([x, np.zeros((1, *shape[1:]), np.float32), rng.uniform(1, 2, (1, *shape[1:])).astype(np.float32)])
    plain, z = get_codec("bf16-zstd"), get_codec("bf16z-zstd")
    packed = z.encode(x)
    assert packed.shape == (len(x), *z.packed_spec(*shape[1:])[0]) and packed.dtype == np.uint8
    expected = plain.decode(plain.encode(x)).view(np.uint32)
    assert np.array_equal(z.decode(packed).view(np.uint32), expected)
    batch = torch.stack([z.to_tensor(z.decompress(z.compress(p), *shape[1:])) for p in packed])
    assert np.array_equal(z.decode_tensor(batch).numpy().view(np.uint32), expected)


def test_zero_bitmap_codec_in_both_formats(tmp_path, source):
    """bf16z-zstd in tars and in Zarr (a fixed-size uint8 chunk per view) decodes to the same tokens as bf16-zstd."""
    caches = {}
    for fmt, codec in (("wds", "bf16z-zstd"), ("zarr", "bf16z-zstd"), ("wds", "bf16-zstd")):
        cfg = load_config(write_config(tmp_path, source, 1, fmt=fmt, codec=codec, cache=f"{fmt}-{codec}"))
        run_extraction(cfg, progress=False)
        caches[fmt, codec] = stored_tokens(Path(cfg.cache.path))
    ref = caches["wds", "bf16-zstd"]
    for tokens in caches.values():
        assert list(tokens) == list(ref)
        for k in ref:
            np.testing.assert_array_equal(tokens[k], ref[k])
