"""A cache is data, never code: hostile caches made by editing a real one (a `pipe:` source, a shard name that
climbs out of the cache, sizes of 2^40 in an index, a torn manifest, a record listing ../../etc/passwd). Each is
refused with exit 2 naming the file, by training, `img2vec verify` and `img2vec diversity`, and nothing it names
runs or is read."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from img2vec.cli import main as img2vec
from shards.manifest import read_manifest, source_urls
from shards.trust import name_problem, relative_problem, source_problem
from tests.conftest import write_config


def copy_cache(extracted, tmp_path: Path) -> Path:
    return Path(shutil.copytree(extracted[1].cache.path, tmp_path / "cache"))


def edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def edit_index(cache: Path, shard: str, edit) -> None:
    """Change an index and give every row a valid crc32 again: a file made to pass the row checks."""
    path = cache / shard / "index.npy"
    index = np.load(path, allow_pickle=False)
    edit(index)
    for row in index:
        row["row_crc"] = zlib.crc32(row.tobytes()[:-4])
    np.save(path, index, allow_pickle=False)


@contextmanager
def bounded(seconds: int = 20, memory: int = 1 << 30):
    """A call that could block (SIGALRM after `seconds`) or fill memory (address space capped at this process's own
    plus `memory`) fails instead of hanging or OOM-killing the test run."""
    def timeout(*_):
        raise TimeoutError(f"still running after {seconds} s")

    limits = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize:")).split()[1]) << 10
    before = signal.signal(signal.SIGALRM, timeout)
    cap = vm + memory if limits[1] == resource.RLIM_INFINITY else min(vm + memory, limits[1])  # under a ulimit -v
    resource.setrlimit(resource.RLIMIT_AS, (cap, limits[1]))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.signal(signal.SIGALRM, before)


def tool(capsys, *args) -> tuple[int, str]:
    rc = img2vec([*map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def train_refuses(tmp_path: Path, capsys, shards="") -> str:
    """Training on tmp_path/cache with data.shards as given ("" = the manifest's): exit 2, no traceback; the message."""
    from train.loop import main as train_main

    path = write_config(tmp_path, sets={"data.shards": shards, "train.max_steps": 1})
    rc = train_main(["--config", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    return err


def test_what_a_cache_may_name():
    for bad in ("", ".", "..", "../x", "a/b", "/etc", ".hidden", "a\\b", "a\0b"):
        assert name_problem(bad), bad
    assert name_problem("train-000123") is None
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "./v00.tar", "a\0"):
        assert relative_problem(bad), bad
    assert relative_problem("tokens.zarr/tokens/c/0/0/0/0") is None
    assert "pipe:" in source_problem("pipe:curl -s https://x/a.tar")
    assert source_problem("sftp://host/a.tar") and source_problem("relative/a.tar") and source_problem("/dev/null")
    assert source_problem("https://host/a.tar") is None and source_problem("/nonexistent/a.tar") is None


@pytest.mark.slow
def test_pipe_source_in_a_manifest_never_runs(tmp_path, extracted, capsys):
    """A manifest whose sources are `pipe:` commands that would create a marker file: verify --recompute and
    training (data.shards unset) refuse with exit 2 and the marker never appears; named again by the user
    (--source-shards), the same cache verifies."""
    cache = copy_cache(extracted, tmp_path)
    marker = tmp_path / "ran"
    src = Path(extracted[1].data.shards).parent
    edit_json(cache / "manifest.json", lambda m: [s.update(source=f"pipe:touch {marker}; cat {src}/{s['name']}.tar")
                                                  for s in m["shards"]])
    rc, out = tool(capsys, "verify", cache, "--recompute", "3")
    assert rc == 2 and "refused (" in out and "is a pipe: command: not run" in out and "--source-shards" in out, out
    err = train_refuses(tmp_path, capsys)
    assert "manifest.json names sources that are not data" in err and "data.shards" in err
    assert not marker.exists()
    rc, out = tool(capsys, "verify", cache, "--recompute", "3", "--source-shards",
                   f"{src}/shard-{{000000..000002}}.tar")
    assert rc == 0, out
    refused: dict = {}  # the user's own sources are used as given (they may be commands: the user named them)
    urls = source_urls(read_manifest(cache), f"pipe:cat {src}/shard-{{000000..000002}}.tar", refused=refused)
    assert not refused and all(u.startswith("pipe:cat ") for u in urls.values())
    assert not marker.exists()


@pytest.mark.slow
def test_shard_names_and_record_files_stay_inside_the_cache(tmp_path, extracted, capsys):
    """A manifest naming shard `../outside` (a complete shard placed there, to be read if the name were followed),
    and a record listing ../../etc/passwd: both refused with exit 2 naming the file, by verify and training."""
    cache = copy_cache(extracted, tmp_path)
    shutil.copytree(cache / "shard-000000", tmp_path / "outside")
    shutil.copy(cache / "shard-000000.done.json", tmp_path / "outside.done.json")
    edit_json(cache / "manifest.json", lambda m: m["shards"][0].update(name="../outside"))
    rc, out = tool(capsys, "verify", cache)
    assert rc == 2 and "shards[0].name '../outside'" in out and "refused" in out, out
    assert "manifest.json" in train_refuses(tmp_path, capsys)

    shutil.rmtree(cache)
    cache = copy_cache(extracted, tmp_path)
    edit_json(cache / "shard-000001.done.json",
              lambda r: r["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}))
    rc, out = tool(capsys, "verify", cache)
    assert rc == 2 and "shard-000001.done.json: files: '../../etc/passwd' leaves the shard's folder" in out, out
    assert "shard-000001.done.json" in train_refuses(tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("field", ["nbytes", "offset", "src_size", "rows"])
def test_sizes_of_2_to_the_40_in_an_index_are_refused(tmp_path, extracted, capsys, field):
    """A view offset, view size or image size of 2^40 with valid row checksums (a file made to pass them), or an
    index header claiming 2^40 rows: no MemoryError, exit 2 naming the index (and its row and key)."""
    cache = copy_cache(extracted, tmp_path)
    path = cache / "shard-000002" / "index.npy"
    if field == "rows":
        index = np.load(path, allow_pickle=False)
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(index.dtype),
                                                     "fortran_order": False, "shape": (1 << 40,)})
            f.write(index.tobytes())
        edit_json(cache / "shard-000002.done.json", lambda r: r["files"]["index.npy"].update(size=path.stat().st_size))
    else:
        edit_index(cache, "shard-000002", lambda index: index[field].__setitem__(1, 1 << 40))
    where = "shard-000002/index.npy: " + ("not an index of this format (its header claims" if field == "rows" else
                                          "row 1 (key")
    rc, out = tool(capsys, "verify", cache)
    assert rc == 2 and where in out and "MemoryError" not in out, out
    err = train_refuses(tmp_path, capsys, shards=f"{Path(extracted[1].data.shards).parent}/shard-{{000000..000002}}.tar")
    assert where in err, err


@pytest.mark.slow
def test_a_torn_manifest_is_exit_2_naming_it(tmp_path, extracted, capsys):
    cache = copy_cache(extracted, tmp_path)
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(text[: len(text) // 2])
    rc, out = tool(capsys, "verify", cache)
    assert rc == 2 and "manifest.json: manifest is not valid JSON" in out and "Traceback" not in out, out
    rc, out = tool(capsys, "diversity", "--cache", cache)
    assert rc == 2 and "manifest.json" in out, out
    assert "manifest.json" in train_refuses(tmp_path, capsys)

    shutil.rmtree(cache)  # a completion record that is a directory: refused, not an IsADirectoryError traceback
    cache = copy_cache(extracted, tmp_path)
    (cache / "shard-000001.done.json").unlink()
    (cache / "shard-000001.done.json").mkdir()
    rc, out = tool(capsys, "verify", cache)
    assert rc == 2 and "shard-000001.done.json: is a directory, not a completion record" in out, out
    assert "Traceback" not in out, out
    assert "shard-000001.done.json" in train_refuses(tmp_path, capsys)

    # a manifest.json that no reader may open as JSON (tar can make a FIFO; before: verify hung at the FIFO, read
    # /dev/zero until OOM-killed, and ended on a RecursionError traceback, exit 1)
    bare = tmp_path / "bare"
    bare.mkdir()
    for make, says in ((os.mkfifo, "is not a regular file"),
                       (lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
                       (lambda p: p.write_text("[" * 200_000 + "]" * 200_000), "nests arrays or objects deeper")):
        (bare / "manifest.json").unlink(missing_ok=True)
        make(bare / "manifest.json")
        with bounded():
            rc, out = tool(capsys, "verify", bare)
        assert rc == 2 and f"{bare / 'manifest.json'}: {says}" in out and "Traceback" not in out, out


def test_a_bad_token_shape_is_named_as_such(tmp_path):
    """token_shape with a negative token count is refused naming token_shape, not augment.views (which is fine)."""
    from shards.errors import RefusedFile

    m = {"format_version": 2, "cache_format": "wds", "codec": {"name": "bf16-zstd", "error_bound": "x"},
         "teacher": {"arch": "resnet18", "layer": -1, "sha256": "0" * 64, "precision": "float32"},
         "augment": {"size": 64, "scale": [0.2, 1.0], "ratio": [0.75, 1.33], "flip": 0.5, "views": 3, "seed": 0,
                     "interpolation": "bicubic", "cut": "torch"},
         "replay": {"cut": "torch", "probe": "0", "torch": "2", "pillow": "1"},
         "token_shape": [4, 512], "shards": [{"name": "shard-000000", "source": "/x/shard-000000.tar"}],
         "teacher_weights": "random", "teacher_seed": 0}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert read_manifest(tmp_path).token_shape == [4, 512]
    for shape in ([-4, 512], [-4, -512], [0, 512]):
        (tmp_path / "manifest.json").write_text(json.dumps(dict(m, token_shape=shape)))
        with pytest.raises(RefusedFile, match="token_shape") as e:
            read_manifest(tmp_path)
        assert "augment.views" not in str(e.value)


def test_a_format_version_of_another_type_is_named_as_such(tmp_path):
    """format_version "2" (a string), 2.0, true or missing: refused saying what the field holds and that this version
    reads the integer 2 (not "is format 2; this version reads format 2"); a real other format keeps its message."""
    from common.codecs import FORMAT_VERSION
    from shards.errors import CacheError, RefusedFile

    for held, shown in ((str(FORMAT_VERSION), f'"{FORMAT_VERSION}" (str)'), (float(FORMAT_VERSION),
                        f"{float(FORMAT_VERSION)} (float)"), (True, "true (bool)"), (None, "missing")):
        (tmp_path / "manifest.json").write_text(json.dumps({} if held is None else {"format_version": held}))
        with pytest.raises(RefusedFile) as e:
            read_manifest(tmp_path)
        assert f"format_version is {shown}, not a format number; this version reads format {FORMAT_VERSION}" in str(
            e.value) and f"is format {held}" not in str(e.value), e.value
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION - 1}))
    with pytest.raises(CacheError, match=f"is format {FORMAT_VERSION - 1}; this version reads format {FORMAT_VERSION}"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("field,value,named", [
    ("arch", "hf-hub:someone/model", "teacher.arch 'hf-hub:someone/model' is a model hub name"),
    ("arch", "no_such_net", "teacher.arch 'no_such_net' is not an architecture of this timm"),
    ("precision", "float8", "teacher.precision 'float8' is none of bfloat16, float16, float32"),
    ("weights", "/moved/teacher.pth", "teacher_weights '/moved/teacher.pth') cannot be built: teacher.weights: no such"),
])
def test_a_teacher_the_manifest_names_that_cannot_be_rebuilt_is_exit_2(tmp_path, extracted, capsys, field, value,
                                                                       named):
    """A manifest naming a hub model (never fetched), an architecture this timm lacks, an unknown precision or a
    checkpoint that moved: `verify --recompute` exits 2 (the check could not be done), naming the field and what
    to do, no traceback; the same cache without --recompute still verifies (exit 0)."""
    cache = copy_cache(extracted, tmp_path)
    edit_json(cache / "manifest.json", lambda m: m.update(teacher_weights=value) if field == "weights"
              else m["teacher"].update({field: value}))
    rc, out = tool(capsys, "verify", cache, "--recompute", "1", "--json", tmp_path / "v.json")
    assert rc == 2 and named in out and "Traceback" not in out, out
    assert ("--teacher-weights PATH" if field == "weights" else "verify the bytes only (no --recompute)") in out
    assert named in json.loads((tmp_path / "v.json").read_text())["teacher_error"]
    assert tool(capsys, "verify", cache)[0] == 0
