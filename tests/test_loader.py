"""The training loader as a run uses it: one DataLoader whose workers persist across epochs (the same batches as
epoch-by-epoch loaders, and a resume continues the sequence), the cache's files opened once per run by the main
process (counted with strace on a real training run), and our own reader of Zarr's sharding codec (the same
arrays as zarr-python, damage caught by the crc32c the format names)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch

from common.config import load_config
from shards.errors import CorruptSample
from shards.manifest import read_manifest, source_urls
from shards.reader import NO_CHUNK, FeatureShard
from tests.conftest import REPO, make_source, write_config
from train.data import CacheIndex, Deal, RunData, make_loader, steps_per_epoch

sys.path.insert(0, str(REPO / "bench"))  # the benches import their helpers as top-level modules
from file_opens import strace_opens  # noqa: E402 - the one parser of strace's log, shared with the bench


def run_batches(cache: Path, epoch: int, consumed: int, count: int, mode: str, workers: int, bs: int = 4) -> list[dict]:
    index = CacheIndex(cache, read_manifest(cache), source_urls(read_manifest(cache)))
    deal = Deal(index.counts, seed=0, world=1, rank=0, batch_size=bs, mode=mode, workers=workers, buffer=5)
    out = []
    for batch in make_loader(RunData(index, deal, epoch=epoch, consumed=consumed), workers):
        out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if len(out) == count:
            return out
    raise AssertionError("the run's loader ended")


def epoch_by_epoch(cache: Path, epochs: int, mode: str, workers: int, bs: int = 4) -> list[dict]:
    """The reference: a new loader per epoch, in the main process, over epoch_plan's plans."""
    from train.data import EpochData, epoch_plan

    index = CacheIndex(cache, read_manifest(cache), source_urls(read_manifest(cache)))
    out = []
    for e in range(epochs):
        plan = epoch_plan(index.counts, epoch=e, seed=0, world=1, rank=0, batch_size=bs, mode=mode, workers=workers,
                          buffer=5)
        out += list(make_loader(EpochData(index, plan, epoch=e, seed=0, mode=mode), 0))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["random", "stream"])
def test_the_runs_loader_is_the_epochs_end_to_end(uneven, mode):
    """28 samples in batches of 4: 7 batches per epoch, an odd number, so with 2 persistent workers the worker that
    yields an epoch's first batch alternates. Three epochs from one loader give the epoch-by-epoch batches (keys,
    pixels, tokens bit for bit), and a loader started 2 batches into epoch 1 gives the rest of that sequence."""
    cache = Path(uneven[1].cache.path)
    steps = steps_per_epoch(28, 1, 4)
    want = epoch_by_epoch(cache, 3, mode, workers=2)
    got = run_batches(cache, 0, 0, 3 * steps, mode, workers=2)
    resumed = run_batches(cache, 1, 2 * 4, 2 * steps - 2, mode, workers=2)
    assert len(want) == 3 * steps == 21
    for a, b in zip(want, got):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"])
        assert a["tokens"].dtype == b["tokens"].dtype
        assert torch.equal(a["tokens"].view(torch.int16), b["tokens"].view(torch.int16))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in want[steps + 2:]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace counts the opens")
def test_three_epochs_open_what_one_does(tmp_path, extracted):
    """A real training run of 3 epochs with 2 loader workers, under `strace -f`: every file of the cache and every
    source tar is opened by the main process, before the first epoch's end (a source twice: once probed for its
    tar magic); after the first epoch's checkpoint no process opens any of them: 3 epochs open exactly what 1
    does (before, each worker reopened what it read, every epoch)."""
    path, cfg = extracted
    cache, src = Path(cfg.cache.path), Path(source_urls(read_manifest(Path(cfg.cache.path)))["shard-000000"]).parent
    log, run = tmp_path / "strace.log", tmp_path / "run"
    steps = steps_per_epoch(18, 1, 4)
    sets = [f"train.run_dir={json.dumps(str(run))}", "train.epochs=3", "train.workers=2", f"train.checkpoint_every={steps}"]
    cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=openat", "-e", "signal=none", "-o", str(log),
           sys.executable, "-m", "train", "--config", str(path), "--no-progress", *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    opens = strace_opens(log, [cache, src])
    first_ckpt = min(n for _, p, n in strace_opens(log, [run / "checkpoints"]) if f"step_{steps:08d}" in p)
    files = {str(p) for p in cache.rglob("*") if p.is_file()} | {str(p) for p in src.glob("*.tar")}
    main_pid = int(log.read_text().split(None, 1)[0])
    assert {p for _, p, _ in opens} <= files and {p for _, p, _ in opens if p.endswith(("v00.tar", "index.npy"))}
    assert all(pid == main_pid for pid, _, _ in opens), "a loader worker opened a cache file"
    assert all(n < first_ckpt for _, _, n in opens), "a file was opened after the first epoch"
    counts = {p: sum(q == p for _, q, _ in opens) for p in {p for _, p, _ in opens}}
    assert max(counts.values()) <= 3  # setup's checks may read a file (a source's tar magic): not per epoch


# ---------------------------------------------------------------- our own reader of Zarr's sharding codec

@pytest.fixture(scope="module")
def zarr_cache(tmp_path_factory):
    from extract.pipeline import run_extraction

    tmp = tmp_path_factory.mktemp("zarr")
    path = write_config(tmp, make_source(tmp / "src", n=12, per_shard=6), 2, fmt="zarr", codec="bf16z-zstd")
    run_extraction(load_config(path), progress=False)
    return Path(load_config(path).cache.path)


def zarr_python(cache: Path, name: str):
    import zarr

    return zarr.open_array(str(cache / name / "tokens.zarr"), path="tokens", mode="r")


def shard_index_bytes(shard_file: Path) -> int:
    """The size of a Zarr shard file's index and its crc32c: 16 B per sample of the file (zarr.json says how many)."""
    meta = json.loads((shard_file.parents[4] / "zarr.json").read_text())
    return 16 * meta["chunk_grid"]["configuration"]["chunk_shape"][1] + 4


def rewrite_shard_index(shard_file: Path, edit) -> None:
    """Apply `edit` to a Zarr shard file's index entries [samples of the file, 2] and rewrite it with its crc32c."""
    data, n = bytearray(shard_file.read_bytes()), shard_index_bytes(shard_file)
    entries = np.frombuffer(bytes(data[-n:-4]), "<u8").reshape(-1, 2).copy()
    edit(entries)
    data[-n:] = bytes(numcodecs.CRC32C().encode(entries.tobytes()))
    shard_file.write_bytes(bytes(data))


def test_zarr_reader_reads_what_zarr_python_reads(zarr_cache, tmp_path):
    """Every view of every sample, also one whose chunk is not stored (the fill value), read into a batch buffer
    or not: the arrays zarr-python gives; a flipped byte of a chunk is that sample's crc32c error, of a shard
    index every sample of that file's, the rest reading on."""
    manifest = read_manifest(zarr_cache)
    name = manifest.shard_names[0]
    fs = FeatureShard(zarr_cache, name, manifest)
    n, views = len(fs.index), manifest.views
    ids, vs = np.repeat(np.arange(n), views), np.tile(np.arange(views), n)
    array = zarr_python(zarr_cache, name)
    want = [array[int(v), int(i)] for i, v in zip(ids, vs)]
    buffer = np.zeros((len(ids), *want[0].shape), want[0].dtype)
    for got in (fs.read_views(ids, vs), fs.read_views(ids, vs, out=list(buffer))):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert np.array_equal(buffer, np.stack(want))

    # sample 1's view 0 as an unstored chunk: zeros (its recorded crc32 made that of zeros, the row's own with it)
    cache = shutil.copytree(zarr_cache, tmp_path / "unstored")
    rewrite_shard_index(cache / name / "tokens.zarr/tokens/c/0/0/0/0", lambda e: e.__setitem__(1, NO_CHUNK))
    index = np.load(cache / name / "index.npy")
    index["crc"][1, 0] = zlib.crc32(np.zeros_like(want[0]).tobytes())
    index["row_crc"][1] = zlib.crc32(index[1].tobytes()[:-4])
    np.save(cache / name / "index.npy", index)
    got = FeatureShard(cache, name, read_manifest(cache)).read_views([1, 1], [0, 1])
    assert not got[0].any() and np.array_equal(got[0], zarr_python(cache, name)[0, 1])
    assert np.array_equal(got[1], want[1 * views + 1])

    # damage: a chunk byte (sample 2, view 1), a byte of view 2's shard index
    cache = shutil.copytree(zarr_cache, tmp_path / "damaged")
    chunk_file = cache / name / "tokens.zarr/tokens/c/1/0/0/0"
    n_index = shard_index_bytes(chunk_file)
    entries = np.frombuffer(chunk_file.read_bytes()[-n_index:-4], "<u8").reshape(-1, 2)
    data = bytearray(chunk_file.read_bytes())
    data[int(entries[2, 0]) + 20] ^= 1
    chunk_file.write_bytes(bytes(data))
    index_file = cache / name / "tokens.zarr/tokens/c/2/0/0/0"
    data = bytearray(index_file.read_bytes())
    data[-10] ^= 1
    index_file.write_bytes(bytes(data))
    got = FeatureShard(cache, name, read_manifest(cache)).read_views(ids, vs)
    bad = {(int(i), int(v)) for i, v, g in zip(ids, vs, got) if isinstance(g, CorruptSample)}
    assert bad == {(2, 1)} | {(i, 2) for i in range(n)}
    assert all("crc32c" in got[j].reason for j in range(len(got)) if isinstance(got[j], CorruptSample))
    assert all(np.array_equal(g, w) for g, w in zip(got, want) if not isinstance(g, CorruptSample))


@pytest.mark.slow
def test_zarr_shard_files_of_all_samples_and_of_256_read_the_same(zarr_cache, tmp_path):
    """A shard of 300 samples written by the streaming writer: one shard file per view (V files, was 2 V), every
    file byte for byte what zarr-python writes for the same array in shard files of N, all-zero views not stored
    as zarr-python does; the same shard as the older writer laid it out (256 samples per file: 2 files per view,
    the second with 44) reads the same packed bytes; `verify` passes on both layouts and names a flipped chunk byte."""
    from common.stats import TokenStats
    from img2vec.verify import verify_cache
    from shards.writer import FeatureShardWriter
    from tests.conftest import cache_files, relayout_zarr_shard, zarr_python_copy

    cache = shutil.copytree(zarr_cache, tmp_path / "cache")
    manifest, n = read_manifest(cache), 300
    codec, views, (t, c) = manifest.token_codec, manifest.views, manifest.token_grid
    tokens = np.maximum(np.random.default_rng(0).standard_normal((n, views, t, c), np.float32), 0)
    tokens[[3, 299], 0] = 0  # unstored chunks, one in each of the older layout's files
    packed = np.stack([codec.encode(x) for x in tokens])  # [N, V, T, C']
    writer = FeatureShardWriter(cache, "big", "zarr", codec, views, t, c)
    for b in range(0, n, 64):
        keys = [f"k{i:03d}" for i in range(b, min(n, b + 64))]
        writer.add_batch(keys, [np.tile(np.array([0, 0, 8, 8, 0], np.int32), (views, 1))] * len(keys),
                         [{"offset": 0, "size": 1, "crc": 0}] * len(keys), [(8, 8)] * len(keys), [0] * len(keys),
                         packed[b:b + len(keys)])
    writer.commit([], "nowhere.tar", TokenStats(c), seekable=False)
    zarr_python_copy(cache / "big" / "tokens.zarr", tmp_path / "zarr-python", n)
    assert cache_files(cache / "big" / "tokens.zarr") == cache_files(tmp_path / "zarr-python")
    ids, vs = np.repeat(np.arange(n), views), np.tile(np.arange(views), n)
    for per_file in (n, 256):
        if per_file == 256:  # in a copy: the reader keeps the files it read open (a path is not rewritten in place)
            cache = shutil.copytree(cache, tmp_path / "older")
            relayout_zarr_shard(cache, "big", 256)
        fs = FeatureShard(cache, "big", manifest)
        assert len(fs.token_files()) == views * -(-n // per_file) and all(p.exists() for p in fs.token_files())
        got = fs.read_views(ids, vs)
        bad = [(i, v, g) for g, i, v in zip(got, ids, vs) if not np.array_equal(g, packed[i, v])]
        assert not bad, (per_file, bad[:3])
        assert np.array_equal(zarr_python(cache, "big")[...], packed.transpose(1, 0, 2, 3))

    for name in manifest.shard_names[1:]:
        relayout_zarr_shard(cache, name, 256)  # a cache of both layouts
    assert verify_cache(cache, progress=False).ok
    name = manifest.shard_names[0]
    chunk_file = cache / name / "tokens.zarr/tokens/c/1/0/0/0"
    data, n_index = bytearray(chunk_file.read_bytes()), shard_index_bytes(chunk_file)
    data[int(np.frombuffer(bytes(data[-n_index:-4]), "<u8").reshape(-1, 2)[4, 0]) + 20] ^= 1
    chunk_file.write_bytes(bytes(data))
    problems = {(p.shard, p.key) for p in verify_cache(cache, progress=False).problems}
    assert problems == {(name, None), (name, FeatureShard(cache, name, manifest).key(4))}


def test_zarr_metadata_of_another_layout_is_refused(zarr_cache, tmp_path):
    """Our reader reads the shard files docs/FORMAT.md describes; a zarr.json describing other ones (here shard
    files of 128 samples) is refused, naming the file, not read as something it is not."""
    from shards.errors import RefusedFile

    cache = shutil.copytree(zarr_cache, tmp_path / "other")
    name = read_manifest(cache).shard_names[0]
    meta_file = cache / name / "tokens.zarr/tokens/zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"][1] = 128
    size = meta_file.stat().st_size
    meta_file.write_text(json.dumps(meta).ljust(size))  # the size its record says: the file passes that check
    with pytest.raises(RefusedFile, match=r"zarr\.json: shard files of \(1, 128"):
        FeatureShard(cache, name, read_manifest(cache)).read_views([0], [0])
