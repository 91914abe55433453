"""Shared fixtures: small real WebDataset shards and a small config (random ResNet-18 teacher, 64 px)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from shards.source import write_shards
from shards.synthetic import synthetic_samples

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

CONFIG = """
[data]
shards = "{src}/shard-{{000000..{last:06d}}}.tar"
workers = 0
[augment]
size = 64
views = 3
[teacher]
arch = "resnet18"
weights = "random"
[cache]
path = "{cache}"
format = "{fmt}"
codec = "{codec}"
[extract]
batch_size = 4
[student]
arch = "vit_tiny_patch16"
decoder_dim = 64
decoder_heads = 4
decoder_depth = 1
head_hidden = 128
[train]
run_dir = "{run}"
batch_size = 4
workers = 0
shuffle_buffer = 8
lr = 1e-3
warmup_epochs = 1
checkpoint_every = 1000
log_every = 1
"""


def make_source(dirpath: Path, n: int = 18, per_shard: int = 6, seed: int = 0) -> Path:
    write_shards(synthetic_samples(n, classes=4, seed=seed), dirpath, maxcount=per_shard, progress=False)
    return dirpath


def write_config(tmp: Path, src: Path, n_shards: int, fmt: str = "wds", codec: str = "bf16-zstd",
                 cache: str = "cache", run: str = "run") -> Path:
    path = tmp / f"{cache}.toml"
    path.write_text(CONFIG.format(src=src, last=n_shards - 1, cache=tmp / cache, fmt=fmt, codec=codec, run=tmp / run))
    return path


@pytest.fixture
def one_thread():
    """In-process runs on one intra-op thread: on a shared, busy CPU two threads run several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> Path:
    """18 JPEGs in 3 shards of 6."""
    return make_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, source):
    """A finished bf16-zstd wds cache over `source`: (config path, Config)."""
    from extract.pipeline import run_extraction

    tmp = tmp_path_factory.mktemp("cache")
    path = write_config(tmp, source, 3)
    cfg = load_config(path)
    run_extraction(cfg, progress=False)
    return path, cfg


def run_cli(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run a console script of this environment as a user would."""
    full_env = dict(os.environ, **(env or {}))
    cmd = [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *args[1:]]
    return subprocess.run(cmd, env=full_env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
