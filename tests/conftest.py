"""What the test modules share: small real WebDataset shards, the test config (random ResNet-18 teacher, 64 px)
written from a table with dotted overrides, the session's extracted caches, and helpers to read a cache's
batches, run training in this process, and run console scripts as a user would."""
from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from shards.source import write_shards
from shards.synthetic import synthetic_image, synthetic_samples

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

UNEVEN = [9, 2, 6, 4, 7]  # samples per source shard of the uneven source (2 is below the batch size)

# ---------------------------------------------------------------------------------------------------- the config

CONFIG = {  # data.shards, cache.path/format/codec and train.run_dir are filled in by write_config
    "data": {"workers": 0},
    "augment": {"size": 64, "views": 3},
    "teacher": {"arch": "resnet18", "weights": "random"},
    "cache": {},
    "extract": {"batch_size": 4},
    "student": {"arch": "vit_tiny_patch16", "decoder_dim": 64, "decoder_heads": 4, "decoder_depth": 1,
                "head_hidden": 128},
    "train": {"batch_size": 4, "workers": 0, "shuffle_buffer": 8, "lr": 1e-3, "warmup_epochs": 1,
              "checkpoint_every": 1000, "log_every": 1},
}


def toml_text(tables: dict[str, dict]) -> str:
    """Tables of plain values -> TOML (a JSON string, number, boolean or list is a TOML value as written)."""
    return "".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
                   for name, table in tables.items())


def write_config(tmp: Path, src: Path | str | None = None, n_shards: int = 1, fmt: str = "wds",
                 codec: str = "bf16-zstd", cache: str = "cache", run: str = "run",
                 sets: dict[str, object] | None = None) -> Path:
    """Write the test config to tmp/<cache>.toml: shards src/shard-{000000..n_shards-1}.tar, the cache at tmp/<cache>,
    the run dir at tmp/<run>; `sets` overrides dotted keys as --set does ({"data.shards": [url, ...]})."""
    tables = copy.deepcopy(CONFIG)
    if src is not None:
        tables["data"]["shards"] = f"{src}/shard-{{000000..{n_shards - 1:06d}}}.tar"
    tables["cache"].update(path=str(tmp / cache), format=fmt, codec=codec)
    tables["train"]["run_dir"] = str(tmp / run)
    for key, value in (sets or {}).items():
        table, name = key.split(".")
        tables.setdefault(table, {})[name] = value
    if "shards" not in tables["data"]:
        raise ValueError("write_config needs src or sets={'data.shards': ...}")
    path = tmp / f"{cache}.toml"
    path.write_text(toml_text(tables))
    return path


# ---------------------------------------------------------------------------------------------------- sources


def make_source(dirpath: Path, n: int = 18, per_shard: int = 6, seed: int = 0) -> Path:
    write_shards(synthetic_samples(n, classes=4, seed=seed), dirpath, maxcount=per_shard, progress=False)
    return dirpath


def make_uneven_source(dirpath: Path, sizes: list[int]) -> Path:
    """Shards shard-000000.tar ... with the given numbers of samples (keys unique across shards)."""
    for i, n in enumerate(sizes):
        part = make_source(dirpath / f"part{i}", n=n, per_shard=n, seed=i)
        (part / "shard-000000.tar").rename(dirpath / f"shard-{i:06d}.tar")
        part.rmdir()
    return dirpath


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs torch on one intra-op thread: the tensors here are tiny, and on a shared, busy CPU two
    spinning threads ran the fast tier ~2.5x slower (61 s against 24 s, the same tests). Still a named fixture, so a
    module may ask for it explicitly."""
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
    """A finished bf16-zstd wds cache over `source`: (config path, Config). Read only: tests copy it to damage it."""
    from extract.pipeline import run_extraction

    tmp = tmp_path_factory.mktemp("cache")
    path = write_config(tmp, source, 3)
    cfg = load_config(path)
    run_extraction(cfg, progress=False)
    return path, cfg


@pytest.fixture(scope="session")
def student_run(tmp_path_factory, extracted) -> Path:
    """A 2-step run of the test student (vit_tiny_patch16 at 64 px) on `extracted`: the run dir to export, probe and
    fine-tune. Read only, but for the result files the evaluation commands write into it (tests copy it to damage it)."""
    from train.loop import main as train_main

    config, _ = extracted
    run = tmp_path_factory.mktemp("student") / "run"
    assert train_main(["--config", str(config), "--set", f'train.run_dir="{run}"', "--set", "train.max_steps=2",
                       "--no-progress"]) == 0
    return run


@pytest.fixture(scope="session")
def uneven(tmp_path_factory):
    """An extracted cache over 5 source shards of UNEVEN sizes: (config path, Config). Read only."""
    from extract.pipeline import run_extraction

    tmp = tmp_path_factory.mktemp("uneven")
    path = write_config(tmp, make_uneven_source(tmp / "src", UNEVEN), len(UNEVEN))
    cfg = load_config(path)
    run_extraction(cfg, progress=False)
    return path, cfg


# ---------------------------------------------------------------------------------------------------- helpers


def encode_image(img, fmt: str, **kw) -> bytes:
    """A PIL image as the bytes of a file of format `fmt` (JPEG, PNG, WEBP...)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_samples() -> tuple[list[dict], set[str]]:
    """Odd and corrupt images; returns the samples and the keys that must be skipped."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = synthetic_image(2, rng, 90, 120)
    jpeg = encode_image(base, "JPEG")
    g16 = Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16))
    s = [
        ("ok", jpeg, "jpg"),
        ("truncated_jpeg", jpeg[: len(jpeg) // 2], "jpg"),
        ("zero_bytes", b"", "jpg"),
        ("cmyk_jpeg", encode_image(base.convert("CMYK"), "JPEG"), "jpg"),
        ("png16", encode_image(g16, "PNG"), "png"),
        ("palette_png", encode_image(base.convert("P"), "PNG", transparency=0), "png"),
        ("rgba_png", encode_image(base.convert("RGBA"), "PNG"), "png"),
        ("png_named_jpg", encode_image(base, "PNG"), "jpg"),
        ("gray_jpeg", encode_image(base.convert("L"), "JPEG"), "jpeg"),
        ("one_pixel", encode_image(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "png"),
        ("very_wide", encode_image(Image.new("RGB", (10000, 10), (0, 90, 0)), "PNG"), "png"),
        ("webp", encode_image(base, "WEBP"), "webp"),
        ("not_an_image", b"hello, I am text", "jpg"),
    ]
    samples = [{"key": k, "image": data, "ext": ext, "cls": i % 3} for i, (k, data, ext) in enumerate(s)]
    samples.insert(5, {"key": "label_only", "image": None, "ext": None, "cls": 1})
    return samples, {"truncated_jpeg", "zero_bytes", "label_only", "not_an_image"}


def write_odd_shard(path: Path, samples: list[dict]) -> None:
    """A WebDataset tar of these samples as they are (no re-encoding; a sample without image has its label only)."""
    import webdataset as wds

    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0) as tar:
        for s in samples:
            entry = {"__key__": s["key"], "cls": str(s["cls"]).encode()}
            if s["image"] is not None:
                entry[s["ext"]] = s["image"]
            tar.write(entry)


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache by relative path: two caches are byte-identical when these are equal."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def zarr_python_copy(src: Path, dst: Path, per_file: int) -> None:
    """tokens.zarr at src written again at dst by zarr-python itself, in shard files of `per_file` samples of one
    view (the same codecs and attributes): per_file = N is what our streaming writer must match byte for byte,
    256 the layout Zarr caches had before."""
    import zarr

    a = zarr.open_array(str(src), path="tokens", mode="r")
    b = zarr.open_group(str(dst), mode="w", zarr_format=3).create_array(
        "tokens", shape=a.shape, chunks=a.chunks, shards=(1, per_file, *a.shape[2:]), dtype=a.dtype, fill_value=0,
        compressors=a.compressors, dimension_names=a.metadata.dimension_names, attributes=a.attrs.asdict())
    b[...] = a[...]


def relayout_zarr_shard(cache: Path, name: str, per_file: int) -> None:
    """A shard of a Zarr cache rewritten by zarr-python in shard files of `per_file` samples, its record's file list
    updated: a cache as an older writer made it (per_file = 256)."""
    import shutil

    from shards.index import tree_files

    shard = cache / name
    zarr_python_copy(shard / "tokens.zarr", cache / f"{name}.relayout", per_file)
    shutil.rmtree(shard / "tokens.zarr")
    (cache / f"{name}.relayout").rename(shard / "tokens.zarr")
    record = json.loads((cache / f"{name}.done.json").read_text())
    record["files"] = tree_files(shard)
    (cache / f"{name}.done.json").write_text(json.dumps(record))


def epoch_batches(cache: Path, epoch: int, bs: int, seed: int = 0, world: int = 1, rank: int = 0, workers: int = 0,
                  start: int = 0, **kw) -> tuple[list[dict], np.ndarray]:
    """The batches one rank's loader yields in one epoch (random reader), and the plan they follow."""
    from shards.manifest import read_manifest, source_urls
    from train.data import CacheIndex, EpochData, epoch_plan, make_loader

    manifest = read_manifest(cache)
    index = CacheIndex(cache, manifest, source_urls(manifest))
    plan = epoch_plan(index.counts, epoch=epoch, seed=seed, world=world, rank=rank, batch_size=bs, mode="random",
                      workers=workers)
    data = EpochData(index, plan, epoch=epoch, seed=seed, start=start, mode="random", **kw)
    return list(make_loader(data, workers)), plan


def run_in_process(config: Path, run: Path, *overrides: str) -> dict:
    """Train in this process with the config and --set style overrides, in run dir `run`: the summary."""
    from train.loop import train

    cfg = load_config(config, list(overrides))
    cfg.train.run_dir = str(run)
    return train(cfg, progress=False)


def read_metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl rows."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_py_flags(command: str) -> dict[str, list[str]]:
    """A printed timm `train.py` command line -> {flag: its words} (a switch: [])."""
    import shlex

    words = shlex.split(command)
    flags, key = {}, None
    for word in words[words.index("train.py") + 1:]:
        if word.startswith("--"):
            key = word[2:]
            flags[key] = []
        else:
            flags[key].append(word)
    return flags


def train_py_model(command: str, pretrained: bool = True):
    """The model timm's train.py builds from a printed command: its create_model call (the file under
    --pretrained-path with num_classes=-1 in the overlay, so the head is adapted; --gp; --drop-path; --num-classes;
    --model-kwargs read as its ParseKwargs reads them)."""
    import ast

    import timm

    flags = train_py_flags(command)
    kwargs = {k: ast.literal_eval(v) for k, v in (w.split("=", 1) for w in flags.get("model-kwargs", []))}
    overlay = dict(file=flags["pretrained-path"][0], num_classes=-1) if pretrained else {}
    return timm.create_model(flags["model"][0], pretrained=pretrained and "pretrained" in flags,
                             num_classes=int(flags["num-classes"][0]), drop_path_rate=float(flags["drop-path"][0]),
                             global_pool=flags["gp"][0], pretrained_cfg_overlay=overlay or None, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    """Run a console script of this environment as a user would."""
    full_env = dict(os.environ, **(env or {}))
    cmd = [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *args[1:]]
    return subprocess.run(cmd, env=full_env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def can_mount() -> bool:
    """Whether this process may mount a small tmpfs (root, as in CI): the full-disk tests need one."""
    probe = Path("/tmp/img2vec-mount-probe")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    return ok


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs (CI runs as root)")


# ---------------------------------------------------------------- moved from test files (shared)

def read_trace(path: Path, resumed: bool = False) -> dict[int, list[str]]:
    """step -> keys (or mask hash); in a run resumed after a kill, the steps it redid replace the killed run's."""
    out = {}
    for line in path.read_text().splitlines():
        step, *keys = line.split()
        assert resumed or int(step) not in out, f"{path}: step {step} traced twice"
        out[int(step)] = keys
    return out


def launch(config: Path, *overrides: str, processes: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` with real CPU processes, as a user runs it (its own port: other runs may share the host)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "train", "--config", str(config), "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def epoch_order(cache: Path, epoch: int = 0, seed: int = 0) -> list[str]:
    """The keys of `epoch`'s seeded permutation of all samples, in order (one sample per batch, one rank)."""
    batches, _ = epoch_batches(cache, epoch, bs=1, seed=seed, with_tokens=False)
    return [b["keys"][0] for b in batches]


def assert_one_epoch(keys: list[str], order: list[str], last_global_batch: int) -> None:
    """The keys trained in an epoch are a prefix of its permutation, none twice, and what is left out is less than
    one global batch of the deal that ended it."""
    assert len(keys) == len(set(keys)), "a sample was trained twice in the epoch"
    assert set(keys) == set(order[:len(keys)]), "the samples trained are not the epoch's permutation from its start"
    assert 0 <= len(order) - len(keys) < last_global_batch


def grace_hopper(size: int = 224):
    """matplotlib's sample photograph (a dependency of the project): center square, bicubic to `size`, uint8."""
    import matplotlib
    import torch
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"matplotlib ships no {path.name} here")
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]
