"""The typed cache contract against its bytes: manifests written before the typed Manifest existed (commit 8edc966,
tests/data/manifest-format2-*.json: a 2-shard, V = 2 ResNet-18 cache, wds with bf16z-zstd and zarr with u8-zstd)
are read and written again byte for byte, keys this version does not know survive, a field of the wrong JSON type
is refused by name, and index.npy's dtype is the one docs/FORMAT.md section 4 lays out. The same for a completion
record (tests/data/record-format2-wds.done.json: shard 0 of a 2-shard, V = 3 wds cache of tests/conftest.py's
CONFIG, 3 samples, written by the writer of commit 84e20ba, before ShardRecord) and section 5's keys."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards.errors import RefusedFile
from common.files import write_json_atomic
from shards.index import ShardRecord, index_dtype, read_record
from shards.manifest import Manifest, read_manifest, write_manifest
from tests.conftest import REPO

GOLDEN = sorted((REPO / "tests" / "data").glob("manifest-format2-*.json"))
GOLDEN_RECORD = REPO / "tests" / "data" / "record-format2-wds.done.json"


def cache_with(tmp_path: Path, text: str, name: str = "cache") -> Path:
    cache = tmp_path / name
    cache.mkdir()
    (cache / "manifest.json").write_text(text)
    return cache


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda p: p.stem)
def test_a_manifest_is_written_again_byte_for_byte(golden, tmp_path):
    """read_manifest then write_manifest (the path every rewrite takes: finalize_manifest, extension) gives the
    file the older writer wrote, to the byte: field order, optional fields left out, floats as written."""
    assert len(GOLDEN) == 2
    manifest = read_manifest(cache_with(tmp_path, golden.read_text()))
    out = tmp_path / "again"
    out.mkdir()
    write_manifest(out, manifest)
    assert (out / "manifest.json").read_bytes() == golden.read_bytes()


def test_keys_this_version_does_not_know_survive(tmp_path):
    """A newer writer's keys, at the top and inside parts (an object, a list item), are kept and written back after
    the fields this version knows, so an older reader's rewrite loses nothing."""
    d = json.loads(GOLDEN[0].read_text())
    d["teacher"]["future_field"] = {"a": [1, 2.5]}
    d["shards"][1]["bytes"] = 123
    d["provenance"] = "a newer img2vec"
    text = json.dumps(d, indent=1)
    m = Manifest.from_dict(json.loads(text))
    assert m.extra == {"provenance": "a newer img2vec"} and m.teacher.extra == {"future_field": {"a": [1, 2.5]}}
    assert json.dumps(m.to_dict(), indent=1) == text
    out = tmp_path / "out"
    out.mkdir()
    write_manifest(out, read_manifest(cache_with(tmp_path, text)))
    assert (out / "manifest.json").read_text() == text


@pytest.mark.parametrize("where,value,expected", [
    ("teacher.layer", "4", "expected int"),
    ("teacher.layer", True, "expected int"),  # a JSON bool is not an int here
    ("augment.scale[1]", "1.0", "expected float"),
    ("codec.name", 3, "expected str"),
    ("shards[0]", "s-000000", "expected an object"),
    ("token_shape", 4, "expected a list"),
])
def test_a_field_of_the_wrong_type_is_refused_by_name(tmp_path, where, value, expected):
    d = json.loads(GOLDEN[0].read_text())
    *parents, last = re.findall(r"[^.\[\]]+", where)
    part = d
    for p in parents:
        part = part[int(p)] if isinstance(part, list) else part[p]
    part[int(last) if isinstance(part, list) else last] = value
    cache = cache_with(tmp_path, json.dumps(d, indent=1))
    with pytest.raises(RefusedFile) as e:
        read_manifest(cache)
    assert f"{cache / 'manifest.json'}: {where} is " in str(e.value) and expected in str(e.value)


def test_a_missing_field_is_refused_by_name():
    d = json.loads(GOLDEN[0].read_text())
    del d["augment"]["seed"]
    with pytest.raises(RefusedFile, match=r"manifest.json: augment.seed is missing"):
        Manifest.from_dict(d)


def documented_index_fields() -> list[tuple[str, str, str, str]]:
    """(field, dtype, shape, byte offset) rows of FORMAT.md section 4's table."""
    text = (REPO / "docs" / "FORMAT.md").read_text()
    section = text[text.index("## 4. `index.npy`"):text.index("\n## 5.")]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|([^|]*)\|([^|]+)\|", section, re.M)
    assert len(rows) == 12, rows
    return [(name, dtype, shape.strip(), offset.strip()) for name, dtype, shape, offset in rows]


def formula(text: str, views: int, key_bytes: int) -> int:
    """The doc's `K + 32 + 20V` at V, K."""
    return sum(int(t[:-1] or 1) * views if t.endswith("V") else key_bytes if t == "K" else int(t)
               for t in text.replace(" ", "").split("+"))


@pytest.mark.parametrize("views,keys", [(1, 1), (2, 9), (10, 20), (16, 1)])
def test_the_index_dtype_is_the_documented_one(views, keys):
    """Field order, dtypes, shapes and offsets as FORMAT.md's table gives them (its K at least 1: an empty key
    still takes one byte), and the row size its formula K + 36 + 40V."""
    dt, k = index_dtype(views, keys), max(keys, 1)
    fields = documented_index_fields()
    assert list(dt.names) == [f[0] for f in fields]
    for name, dtype, shape, offset in fields:
        sub, at = dt.fields[name]
        want_shape = tuple(views if s == "V" else int(s) for s in re.findall(r"\w+", shape))
        assert sub.base == np.dtype(dtype.replace("{K}", str(k))) and sub.shape == want_shape, name
        assert at == formula(offset, views, k), name
    size = re.search(r"A row is ([^.]+) bytes", (REPO / "docs" / "FORMAT.md").read_text()).group(1)
    assert dt.itemsize == formula(size, views, k) == k + 36 + 40 * views
    assert index_dtype(views, 0) == index_dtype(views, 1)


def test_golden_files_are_the_ones_named():
    """The goldens are what the docstring says they are (a changed golden is a changed contract, not a fix)."""
    made = [Manifest.from_dict(json.loads(p.read_text()), path=p) for p in GOLDEN]
    assert [(m.cache_format, m.codec.name, m.views, m.token_grid) for m in made] == \
        [("wds", "bf16z-zstd", 2, (4, 512)), ("zarr", "u8-zstd", 2, (4, 512))]
    assert all(m.samples == 8 and m.stats is not None for m in made)


def test_a_completion_record_is_written_again_byte_for_byte(tmp_path):
    """read_record then the writer's write_json_atomic of to_dict gives the file the older writer wrote, to the byte
    (field order, floats as written); keys this version does not know, at the top and in a file's entry, are kept
    and written back after the known ones."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(GOLDEN_RECORD, cache / "shard-000000.done.json")
    record = read_record(cache, "shard-000000")
    assert (record.shard, record.format, record.format_version, record.samples, record.skipped, record.seekable) == \
        ("shard-000000", "wds", 2, 3, [], True)
    assert sorted(record.files) == ["index.npy", "v00.tar", "v01.tar", "v02.tar"] and record.files["v00.tar"].size == 10240
    assert record.stats["td_count"] == 3 * 3 and len(record.stats["sum"]) == 512 and record.extra == {}
    write_json_atomic(tmp_path / "again.json", record.to_dict())
    assert (tmp_path / "again.json").read_bytes() == GOLDEN_RECORD.read_bytes()
    d = json.loads(GOLDEN_RECORD.read_text())
    d["files"]["index.npy"]["mtime"] = 1.5
    d["producer"] = "a newer img2vec"
    text = json.dumps(d, indent=1)
    newer = ShardRecord.from_dict(json.loads(text), "shard-000000", cache / "shard-000000.done.json")
    assert newer.extra == {"producer": "a newer img2vec"} and newer.files["index.npy"].extra == {"mtime": 1.5}
    assert json.dumps(newer.to_dict(), indent=1) == text


def test_the_record_fields_are_the_documented_ones():
    """ShardRecord's fields are FORMAT.md section 5's keys, in its order (the order the writer writes them)."""
    text = (REPO / "docs" / "FORMAT.md").read_text()
    section = text[text.index("## 5. The completion record"):text.index("\n## 6.")]
    keys = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert [f.name for f in dataclasses.fields(ShardRecord) if f.name != "extra"] == keys
    assert list(json.loads(GOLDEN_RECORD.read_text())) == keys
