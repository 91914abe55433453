"""Sources are identified by what they are, not where: a half-done extraction finished through a symlinked folder or
a staged copy gives the bytes of an uninterrupted run, while another tar under a recorded shard's name is refused,
naming the shard."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from extract.cli import main as extract_main
from tests.conftest import cache_files, make_source, write_config


def run(tmp_path: Path, src: Path, capsys, *sets: str) -> tuple[int, str]:
    path = write_config(tmp_path, src, 3)
    rc = extract_main(["--config", str(path), "--no-progress", *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr().err


def shard_files(cache: Path) -> dict[str, bytes]:
    """The feature shards' bytes (not the manifest or the records, which name the source's path)."""
    return {k: v for k, v in cache_files(cache).items() if "/" in k}


@pytest.mark.slow
def test_the_same_shards_through_another_path_finish_the_cache(tmp_path, source, extracted, capsys):
    ref = Path(extracted[1].cache.path)
    for how in ("symlink", "copy"):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        assert run(tmp_path, source, capsys, "extract.limit=1")[0] == 0  # half done: shard-000000 only
        other = tmp_path / how
        shutil.rmtree(other, ignore_errors=True) if other.is_dir() and not other.is_symlink() else other.unlink(True)
        other.symlink_to(source) if how == "symlink" else shutil.copytree(source, other)
        rc, err = run(tmp_path, other, capsys)
        assert rc == 0, (how, err[-2000:])
        assert shard_files(tmp_path / "cache") == shard_files(ref), how
        record = json.loads((tmp_path / "cache" / "shard-000001.done.json").read_text())
        assert record["source"].startswith(str(other)) and record["source_size"] > 0


@pytest.mark.slow
def test_another_tar_under_a_recorded_name_is_refused(tmp_path, source, capsys):
    assert run(tmp_path, source, capsys, "extract.limit=1")[0] == 0
    other = tmp_path / "other"
    shutil.copytree(source, other)
    make_source(tmp_path / "new", n=6, per_shard=6, seed=7)  # another shard-000000.tar, same sample count
    shutil.copy(tmp_path / "new" / "shard-000000.tar", other / "shard-000000.tar")
    rc, err = run(tmp_path, other, capsys)
    assert rc == 2 and "shard-000000: " in err and "not the sources given now" in err and "Traceback" not in err, err
    assert "shard-000001" not in err.split("given now")[1]  # only the recorded shard that differs is named
    assert not (tmp_path / "cache" / "shard-000001.done.json").exists()  # refused before any work
