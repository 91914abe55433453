"""Extraction's decode workers are not capped by the shards: a shard's batches are split over the workers, and the
cache's bytes do not depend on how many there are."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.config import load_config
from extract.pipeline import run_extraction
from shards.index import read_index
from shards.source import iter_samples
from tests.conftest import cache_files, make_source, odd_samples, write_config
from tests.conftest import write_odd_shard as _write_odd_shard


def two_shards(src: Path) -> tuple[list[Path], set[str]]:
    """shard-000000: odd and corrupt images and a key met twice (5 skipped of 15); shard-000001: 10 good images cut
    in the 7th. -> the paths and the keys skipped in shard 0."""
    samples, bad = odd_samples()
    samples.append(dict(samples[0]))  # "ok" again, 14 samples later: a duplicate, skipped
    _write_odd_shard(src / "shard-000000.tar", samples)
    make_source(src / "good", n=10, per_shard=10, seed=3)
    data = (src / "good" / "shard-000000.tar").read_bytes()
    cut = [s["offset"] for s in iter_samples(str(src / "good" / "shard-000000.tar"))][6] + 300
    (src / "shard-000001.tar").write_bytes(data[:cut])
    return [src / f"shard-{i:06d}.tar" for i in range(2)], bad


@pytest.mark.slow
@pytest.mark.parametrize("stream,counts", [(False, (0, 1, 4)), (True, (0, 3))], ids=["local", "pipe"])
def test_any_number_of_workers_writes_the_same_bytes(tmp_path, monkeypatch, stream, counts):
    """data.workers = 0, 1, 4 on 2 local tars (4 workers: 2 on each shard, each reading only its own samples'
    bytes) and 0, 3 on `pipe:` streams (2 on the first): the 15 samples of shard 0 (4 batches of 4) are decoded by
    2 processes, every file of the caches is the same byte for byte, and the index lists the good samples in source
    order. The shard cut in its 7th sample fails alone, however it was split."""
    import extract.views

    (tmp_path / "src").mkdir()
    paths, bad = two_shards(tmp_path / "src")
    urls = [f"pipe:cat {p}" if stream else str(p) for p in paths]
    log = tmp_path / "decoders.txt"

    def decode_image(data):  # forked workers inherit this: which process decoded which shard
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {decode_image.shard}\n")
        return real(data)

    real = extract.views.decode_image
    monkeypatch.setattr(extract.views, "fault_point", lambda point, shard: setattr(decode_image, "shard", shard))
    monkeypatch.setattr(extract.views, "decode_image", decode_image)
    caches = {}
    for workers in counts:
        log.write_text("")
        cfg = load_config(write_config(tmp_path, cache=f"cache{workers}",
                                       sets={"data.shards": urls, "data.workers": workers}))
        summary = run_extraction(cfg, progress=False)
        assert summary["data_workers"] == workers
        assert (summary["shards_done"], len(summary["shards_failed"])) == (1, 1), summary
        assert "shard-000001.tar" in summary["shards_failed"][0] and summary["skipped_samples"] == len(bad) + 1
        pids = {line.split()[0] for line in log.read_text().splitlines() if line.endswith("shard-000000")}
        assert len(pids) == (2 if workers > 2 else 1), (workers, pids)
        caches[workers] = cache_files(tmp_path / f"cache{workers}")
    assert "shard-000000.done.json" in caches[0] and not any(k.startswith("shard-000001") for k in caches[0])
    for workers in counts[1:]:
        assert caches[workers] == caches[0], workers
    source_keys = [s["key"] for s in iter_samples(str(paths[0]))]
    keys = [k.decode() for k in read_index(tmp_path / f"cache{counts[-1]}", "shard-000000")["key"]]
    assert keys == [k for k in source_keys[:-1] if k not in bad]  # the duplicate (last) and the bad ones skipped
    skipped = json.loads((tmp_path / f"cache{counts[-1]}" / "shard-000000.done.json").read_text())["skipped"]
    assert [s["key"] for s in skipped] == [k for k in source_keys if k in bad] + ["ok"]


@pytest.mark.parametrize("stream", [False, True], ids=["local", "pipe"])
def test_a_cut_tar_breaks_at_the_same_sample_whichever_samples_are_read(tmp_path, stream):
    """A tar cut anywhere: reading all samples, or only every k-th (the others' bytes skipped by seeking, or read
    past in a stream), yields the same samples and then the same ShardError, so every worker sharing a shard agrees
    where it broke."""
    from shards.source import ShardError

    make_source(tmp_path / "src", n=5, per_shard=5)
    data = (tmp_path / "src" / "shard-000000.tar").read_bytes()
    last = list(iter_samples(str(tmp_path / "src" / "shard-000000.tar")))[-1]["offset"]  # the last image's bytes

    def read(url, wanted=None):
        out = []
        try:
            for s in iter_samples(url, wanted):
                out.append(s and (s["key"], s["image"], s["offset"], s["cls"]))
        except ShardError:
            return out, True
        return out, False

    for cut in [*range(0, len(data), 2003), len(data) - 1024, len(data) - 1, len(data)]:
        (tmp_path / "t.tar").write_bytes(data[:cut])
        url = f"pipe:cat {tmp_path / 't.tar'}" if stream else str(tmp_path / "t.tar")
        whole, broke = read(url)
        assert broke or cut > last, cut
        for k, j in [(2, 0), (2, 1), (3, 2)]:
            part, part_broke = read(url, lambda i, k=k, j=j: i % k == j)
            assert part_broke == broke and len(part) == len(whole), (cut, k, j)
            assert all(p == w if i % k == j else p is None for i, (p, w) in enumerate(zip(part, whole))), (cut, k, j)


def test_teams_share_shards_only_when_there_are_fewer_than_workers():
    """10 workers on local tars: 10, 160 or 1,282 shards (ImageNet on one GPU) in teams of one (whole shards, no
    header read twice); 11 shards in 2 teams of 5 (10 teams would end on one worker doing the 11th shard alone); 5
    in 5 teams of 2; 6 in 2 teams of 5 (6 teams would leave 2 shards to one worker each). Streams, read whole by
    every member, are shared only when there are fewer than the workers (6 streams: 6 teams)."""
    from extract.views import SKIP_COST, pick_teams

    assert [pick_teams(s, 10) for s in (10, 11, 160, 1282)] == [10, 2, 10, 10]
    assert [pick_teams(s, 10) for s in (1, 5, 6)] == [1, 5, 2]
    assert [pick_teams(s, 10, SKIP_COST["stream"]) for s in (1, 5, 6, 11)] == [1, 5, 6, 10]
    assert pick_teams(0, 4) == pick_teams(3, 0) == 1
