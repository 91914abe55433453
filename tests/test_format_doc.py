"""docs/FORMAT.md is enough to read a cache: docs/read_cache.py (numpy, numcodecs, json, tarfile; nothing of this
project) decodes every view exactly as the project does, for every codec in both formats."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.codecs import CODECS, get_codec
from common.config import load_config
from extract.pipeline import run_extraction
from shards.manifest import read_manifest
from shards.reader import iter_feature_shard
from tests.conftest import REPO, cache_files, relayout_zarr_shard, run_cli, write_config, zarr_python_copy

READER = REPO / "docs" / "read_cache.py"
SHARD = "shard-000000"


def _load_reader():
    spec = importlib.util.spec_from_file_location("read_cache", READER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reader = _load_reader()


@pytest.fixture(scope="module")
def caches(tmp_path_factory, source):
    """(fmt, codec) -> a finished one-shard cache over the first source shard (6 images, 2 views), made once."""
    made: dict[tuple[str, str], Path] = {}
    tmp = tmp_path_factory.mktemp("format-doc")

    def get(fmt: str, codec: str) -> Path:
        if (fmt, codec) not in made:
            cfg = load_config(write_config(tmp, source, 1, fmt=fmt, codec=codec, cache=f"{fmt}-{codec}"),
                              ["augment.views=2"])
            run_extraction(cfg, progress=False)
            made[fmt, codec] = Path(cfg.cache.path)
        return made[fmt, codec]

    return get


def read_cli(cache: Path, key: str, view: int, out: Path):
    return run_cli(["python", str(READER), str(cache), SHARD, key, str(view), str(out)], timeout=60)


# the fast tier: the default codec in both formats, raw bf16, u8; the other codecs and formats are slow
FAST = {("wds", "bf16z-zstd"), ("zarr", "bf16z-zstd"), ("wds", "bf16"), ("zarr", "u8-zstd")}


@pytest.mark.parametrize("fmt,codec", [pytest.param(f, c, marks=() if (f, c) in FAST else pytest.mark.slow)
                                       for c in CODECS for f in ("wds", "zarr")])
def test_reader_decodes_every_view_as_the_project_does(caches, fmt, codec, tmp_path, one_thread):
    cache = caches(fmt, codec)
    manifest = read_manifest(cache)
    samples = list(iter_feature_shard(cache, SHARD, manifest))
    assert len(samples) == 6
    for s in samples:
        for view, want in enumerate(get_codec(codec).decode(s["packed"])):
            got = reader.read_view(cache, SHARD, s["key"], view)
            assert got.dtype == np.float32 and got.shape == want.shape == (4, 512)
            assert np.array_equal(got, want) and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert (want == 0).any() and (want != 0).any()  # post-ReLU tokens: the zero bitmap has both kinds
    if fmt == "zarr":  # the array names what its packed channels are
        attrs = json.loads((cache / SHARD / "tokens.zarr" / "tokens" / "zarr.json").read_text())["attributes"]
        assert attrs["img2vec"] == {"codec": codec, "layout": "[view, sample, token, packed channel]",
                                    "format_version": 2, "tokens": 4, "channels": 512}

    last = samples[-1]
    r = read_cli(cache, last["key"], 1, tmp_path / "view.npy")  # as a user runs it
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "view.npy"), get_codec(codec).decode(last["packed"])[1])


def test_missing_key_or_view_is_named(caches, tmp_path, one_thread):
    cache = caches("wds", "bf16z-zstd")
    r = read_cli(cache, "no-such-key", 0, tmp_path / "out.npy")
    assert r.returncode == 1 and "no sample 'no-such-key'" in r.stderr and "Traceback" not in r.stderr
    r = read_cli(cache, "s000_000000", 2, tmp_path / "out.npy")
    assert r.returncode == 1 and "view 2 out of range" in r.stderr
    assert not (tmp_path / "out.npy").exists()


def test_damage_is_caught_by_the_checksums_the_format_names(caches, tmp_path, one_thread):
    key = "s000_000002"
    # a damaged index row: its row_crc no longer matches
    cache = shutil.copytree(caches("wds", "bf16"), tmp_path / "row")
    index = np.load(cache / SHARD / "index.npy")
    index["views"][2, 0, 0] += 1
    np.save(cache / SHARD / "index.npy", index)
    with pytest.raises(reader.FormatError, match="index row 2 .* fails its crc32"):
        reader.read_view(cache, SHARD, key, 0)

    # a flipped byte of a stored view (uncompressed): the view's crc32 in the index
    cache = shutil.copytree(caches("wds", "bf16"), tmp_path / "view")
    row = np.load(cache / SHARD / "index.npy")[2]
    with open(cache / SHARD / "v01.tar", "r+b") as f:
        f.seek(int(row["offset"][1]) + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(reader.FormatError, match="crc32 differs from the index"):
        reader.read_view(cache, SHARD, key, 1)
    reader.read_view(cache, SHARD, key, 0)  # the other view is intact

    # a flipped byte of a Zarr chunk: the chunk's crc32c
    cache = shutil.copytree(caches("zarr", "bf16z-zstd"), tmp_path / "zarr")
    shard_file = cache / SHARD / "tokens.zarr" / "tokens" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    n_index = 16 * 6 + 4  # the shard file holds all 6 samples of view 0: its index is 16 B per sample + crc32c
    first = int(np.frombuffer(bytes(data[-n_index:-n_index + 16]), "<u8")[0])  # sample 0's chunk, from the index
    data[first + 20] ^= 0x01
    shard_file.write_bytes(bytes(data))
    with pytest.raises(reader.FormatError, match="crc32c check failed"):
        reader.read_view(cache, SHARD, "s000_000000", 0)


def test_unstored_zarr_chunks_and_long_tar_names(tmp_path):
    """Corners a reader from the spec must handle: Zarr stores no all-zero chunk (its shard index entry is
    2^64 - 1; a shard file of no stored chunk is not written at all), both read as zeros, also in the shard
    files of 256 samples caches had before; and a key too long for a tar header gets a GNU long-name member
    before its own."""
    from common.stats import TokenStats
    from shards.writer import FeatureShardWriter

    keys = ["short", "deep/" * 30 + "long"]
    tokens = np.random.default_rng(0).random((len(keys), 3, 4, 16), np.float32)
    tokens[0, 0] = 0  # sample 0's view 0: an unstored chunk beside a stored one
    tokens[:, 2] = 0  # view 2 of every sample: no shard file
    for fmt in ("wds", "zarr"):
        cache = tmp_path / fmt
        cache.mkdir()
        (cache / "manifest.json").write_text(json.dumps({
            "format_version": 2, "cache_format": fmt, "codec": {"name": "fp32"}, "augment": {"views": 3},
            "token_shape": [4, 16]}))
        writer = FeatureShardWriter(cache, SHARD, fmt, get_codec("fp32"), 3, 4, 16)
        for key, sample in zip(keys, tokens):
            writer.add(key, np.zeros((3, 5), np.int32), {"offset": 0, "size": 1, "crc": 0}, (8, 8), 0, sample)
        writer.commit([], "nowhere.tar", TokenStats(16), seekable=False)
        if fmt == "zarr":  # as zarr-python leaves them: byte for byte its files for the array
            assert not (cache / SHARD / "tokens.zarr" / "tokens" / "c" / "2").exists()
            zarr_python_copy(cache / SHARD / "tokens.zarr", tmp_path / "zarr-python", len(keys))
            assert cache_files(cache / SHARD / "tokens.zarr") == cache_files(tmp_path / "zarr-python")
        for key, sample in zip(keys, tokens):
            for view in range(3):
                assert np.array_equal(reader.read_view(cache, SHARD, key, view), sample[view])
    relayout_zarr_shard(tmp_path / "zarr", SHARD, 256)  # shard files as the older writer laid them out
    for key, sample in zip(keys, tokens):
        for view in range(3):
            assert np.array_equal(reader.read_view(tmp_path / "zarr", SHARD, key, view), sample[view])
