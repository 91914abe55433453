"""Sources at URLs: extraction and training from an HTTP server with Range support (random mode), one
without (stream mode), dropped connections retried, a server that keeps failing named; S3 through moto's
server when it is installed. Every server listens on 127.0.0.1 and is started here."""
from __future__ import annotations

import gzip
import http.server
import importlib.util
import json
import re
import socket
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import load_config
from extract.pipeline import run_extraction
from shards import remote
from shards.source import ShardError, is_seekable, iter_samples
from tests.conftest import make_source, run_cli, write_config
from train.data import CacheIndex

SHARDS = ("shard-000000.tar", "shard-000001.tar")
FAST_RETRIES = {"IMG2VEC_REMOTE_TRIES": "3", "IMG2VEC_REMOTE_BACKOFF": "0.01"}


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves a folder; `ranges=False` ignores Range headers (200, the whole file); `drops[path] = n` cuts the
    next n GETs of that path halfway through the body. `gets` logs (path, Range header) of every GET."""

    daemon_threads = True

    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges = Path(root), ranges
        self.drops: dict[str, int] = {}
        self.gets: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), RangeHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):  # a client that hung up on a cut body: no traceback
        pass


class RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()

    def _file(self) -> bytes | None:
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self._reply(404, {})
            return None
        return path.read_bytes()

    def do_HEAD(self):
        data = self._file()
        if data is not None:
            self._reply(200, {"Accept-Ranges": "bytes"} if self.server.ranges else {}, data)

    def do_GET(self):
        data = self._file()
        if data is None:
            return
        rng = self.headers.get("Range")
        self.server.gets.append((self.path, rng))
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if m and (m[1] or m[2]) and self.server.ranges:  # bytes=a-b, bytes=a- or bytes=-n (the last n bytes)
            start, end = (int(m[1]), min(int(m[2]) + 1 if m[2] else len(data), len(data))) if m[1] else (
                max(len(data) - int(m[2]), 0), len(data))
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
            body = data[start:end]
            self._reply(206, {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}, body)
        else:
            body = data
            self._reply(200, {}, body)
        if self.server.drops.get(self.path, 0):
            self.server.drops[self.path] -= 1
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """12 JPEGs in 2 local shards, a server with ranged reads and one without, over the same folder."""
    src = make_source(tmp_path_factory.mktemp("src"), n=12, per_shard=6)
    servers = RangeServer(src), RangeServer(src, ranges=False)
    yield src, *servers
    for s in servers:
        s.shutdown()


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, served):
    """The cache of the same shards read locally: what every URL read must agree with."""
    tmp = tmp_path_factory.mktemp("local")
    path = write_config(tmp, served[0], 2)
    run_extraction(load_config(path), progress=False)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, local_cache):
    """3 steps in random mode from the local cache and shards: what every run reading URLs must repeat."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(local_cache, tmp_path_factory.mktemp("local-run") / "run", "train.reader=\"random\"")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fast_retries(monkeypatch):
    for k, v in FAST_RETRIES.items():
        monkeypatch.setenv(k, v)


def _members(url: str) -> list[tuple]:
    return [(s["key"], s["image"], s["offset"], s["cls"]) for s in iter_samples(url)]


def test_ranged_reads_streams_and_probes(served, fast_retries):
    src, ranged, plain = served
    data = (src / SHARDS[0]).read_bytes()
    url = f"{ranged.url}/{SHARDS[0]}"
    assert remote.read_range(url, 1000, 300) == data[1000:1300]
    assert remote.read_ranges([(url, 0, 10), (f"{ranged.url}/{SHARDS[1]}", 5, 7), (url, 512, 1)]) == [
        data[:10], (src / SHARDS[1]).read_bytes()[5:12], data[512:513]]
    assert remote.open_stream(url).read() == data
    assert _members(url) == _members(str(src / SHARDS[0]))
    assert is_seekable(url) and not is_seekable(f"{plain.url}/{SHARDS[0]}")  # no Range support: stream mode
    why = CacheIndex.not_seekable  # what train.reader = "auto" says when it streams: the first source and why
    local = str(src / SHARDS[0])
    assert why(SimpleNamespace(urls={"0": local, "1": url})) is None
    assert why(SimpleNamespace(urls={"0": local, "1": f"{plain.url}/{SHARDS[1]}", "2": "pipe:cat x"})) == (
        f"source {plain.url}/{SHARDS[1]} is served without ranged reads (a Range request got the whole file)")
    assert why(SimpleNamespace(urls={"0": f"pipe:cat {local}"})) == f"source pipe:cat {local} is a pipe: command, " \
                                                                    "read once from start to end"
    (src / "packed.tar.gz").write_bytes(gzip.compress(data))  # ranges served, but no tar at its offsets
    assert why(SimpleNamespace(urls={"0": f"{ranged.url}/packed.tar.gz"})) == (
        f"source {ranged.url}/packed.tar.gz is not an uncompressed tar (compressed?)")
    assert _members(f"{plain.url}/{SHARDS[0]}") == _members(str(src / SHARDS[0]))
    with pytest.raises(ShardError, match=re.escape(f"{ranged.url}/nope.tar") + ".*not found"):
        list(iter_samples(f"{ranged.url}/nope.tar"))
    with pytest.raises(remote.RemoteError, match="shorter than recorded|416"):  # never used short
        remote.read_range(url, len(data) - 10, 20)


@pytest.mark.parametrize("ranges", [True, False])
def test_a_dropped_connection_is_retried(served, fast_retries, ranges):
    src, server = served[0], served[1 if ranges else 2]
    data = (src / SHARDS[1]).read_bytes()
    url, path = f"{server.url}/{SHARDS[1]}", f"/{SHARDS[1]}"
    before = len(server.gets)
    server.drops[path] = 2  # the stream is cut twice, then read to its end
    assert remote.open_stream(url).read() == data
    assert server.drops[path] == 0 and len(server.gets) - before == 3
    if ranges:
        server.drops[path] = 2
        assert remote.read_range(url, 2048, 4096) == data[2048:6144]
        assert server.drops[path] == 0


def test_a_server_that_keeps_failing_is_a_named_error(served, fast_retries):
    from train.batches import read_sources

    src, server = served[0], served[1]
    url, path = f"{server.url}/{SHARDS[0]}", f"/{SHARDS[0]}"
    server.drops[path] = 100
    try:
        with pytest.raises(ShardError, match=re.escape(url) + ".*failed 3 times"):
            list(iter_samples(url))
        with pytest.raises(ShardError, match=re.escape(url) + ".*failed 3 times"):
            read_sources([(str(src / SHARDS[1]), 0, 512), (url, 0, 4096)])
    finally:
        server.drops[path] = 0


SCHEMES = [  # (URL, the package that reads it, its filesystem class, the path inside it)
    ("gs://bucket/in1k/shard-000000.tar", "gcsfs", "GCSFileSystem", "bucket/in1k/shard-000000.tar"),
    ("gcs://bucket/in1k/shard-000000.tar", "gcsfs", "GCSFileSystem", "bucket/in1k/shard-000000.tar"),
    ("hf://datasets/org/in1k/train/shard-000000.tar", "huggingface_hub", "HfFileSystem",
     "datasets/org/in1k/train/shard-000000.tar"),
    ("s3://bucket/in1k/shard-000000.tar", "s3fs", "S3FileSystem", "bucket/in1k/shard-000000.tar"),
]


@pytest.mark.parametrize("url,package,cls,inside", SCHEMES)
def test_each_scheme_gets_its_filesystem_and_a_missing_package_is_named(monkeypatch, url, package, cls, inside):
    """Without network: the scheme's fsspec filesystem (gcsfs anonymous: NO_GCE_CHECK skips its probe of the GCE
    metadata server, ~15 s off Google Cloud) with the path inside it; with its package missing, a RemoteError that
    names the package to install (not PyPI's unrelated "img2vec")."""
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setattr(remote, "_filesystems", {})
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    if importlib.util.find_spec(package):
        fs, path = remote.filesystem(url)
        assert cls in {c.__name__ for c in type(fs).__mro__} and type(fs).__module__.startswith(package)
        assert path == inside
    monkeypatch.setitem(sys.modules, package, None)  # an import of it now fails, as when it is not installed
    monkeypatch.delitem(registry._registry, remote.scheme(url), raising=False)
    remote._filesystems.clear()
    with pytest.raises(remote.RemoteError, match=re.escape(f"{url}: reading {remote.scheme(url)}:// needs the "
                                                           f"{package} package") + ".*" + re.escape(
                                                               f": pip install {package}")) as e:
        remote.filesystem(url)
    assert ("'.[remote]'" in str(e.value)) == (package in ("s3fs", "gcsfs")) and "img2vec[" not in str(e.value)


def _cache_bytes(cache: Path) -> dict[str, bytes]:
    """Every file of a cache but its JSON (which names the sources)."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.suffix != ".json"}


def _train(config: Path, run: Path, *sets: str) -> dict:
    from train.loop import train

    cfg = load_config(config, ["train.max_steps=3", "train.trace_keys=true", *sets])
    cfg.train.run_dir = str(run)
    summary = train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    mode = json.loads((run / "run.json").read_text())
    return {"summary": summary, "keys": (run / "keys-rank0.txt").read_text(), "losses": losses, "run": mode}


@pytest.mark.slow
def test_extract_and_train_from_http_in_random_mode(tmp_path, served, local_cache, local_run, capsys, monkeypatch,
                                                    one_thread):
    """extract-features on http:// shards writes the cache the local shards give; training on it in random
    mode reads the images by ranged GETs (2 workers) and sees the same keys and losses as from local shards."""
    server = served[1]
    path = write_config(tmp_path, server.url, 2)
    r = run_cli(["extract-features", "--config", str(path), "--no-progress"], env=FAST_RETRIES)
    assert r.returncode == 0, r.stderr
    cache, local = tmp_path / "cache", Path(load_config(local_cache).cache.path)
    assert _cache_bytes(cache) == _cache_bytes(local)
    sources = [s["source"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]
    assert sources == [f"{server.url}/{n}" for n in SHARDS]

    for k, v in FAST_RETRIES.items():
        monkeypatch.setenv(k, v)
    before = len(server.gets)
    a = _train(path, tmp_path / "http", "train.reader=\"random\"", "train.workers=2")
    ranged = [g for g in server.gets[before:] if g[1] and g[1] != "bytes=257-261"]  # past the tar-magic probes
    assert len(ranged) >= 12, server.gets[before:]  # each image of 3 batches of 4 read by its own range
    b = local_run
    assert a["run"]["data"]["reader"] == "random" == b["run"]["data"]["reader"]
    assert a["keys"] == b["keys"] and a["losses"] == b["losses"]

    # the same cache over a server without ranged reads: auto streams, random is refused with a reason
    plain = f"data.shards=\"{served[2].url}/shard-{{000000..000001}}.tar\""
    capsys.readouterr()
    c = _train(path, tmp_path / "plain", plain)
    assert c["run"]["data"]["reader"] == "stream" and len(c["losses"]) == 3
    assert (f"train.reader = 'auto' chose the stream reader (batches only as mixed as train.shuffle_buffer): source "
            f"{served[2].url}/{SHARDS[0]} is served without ranged reads") in capsys.readouterr().err

    from train.loop import main

    args = ["--config", str(path), "--no-progress", "--set", f"train.run_dir=\"{tmp_path / 'fail'}\""]
    assert main([*args, "--set", plain, "--set", "train.reader=\"random\""]) == 2
    assert "byte ranges" in (err := capsys.readouterr().err) and "is served without ranged reads" in err, err
    server.drops.update({f"/{n}": 100 for n in SHARDS})  # a server that keeps cutting every body
    try:
        assert main([*args, "--set", "train.reader=\"random\""]) == 2
    finally:
        server.drops.clear()
    err = capsys.readouterr().err
    assert f"{server.url}/shard-00000" in err and "failed 3 times" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_cache_at_an_http_url_trains_and_verifies(tmp_path, served, local_cache, local_run, capsys, fast_retries,
                                                     one_thread):
    """cache.path may be a URL, read only: training reads the index whole and each view by a ranged GET (wds)
    or through Zarr's fsspec store (zarr); `img2vec verify URL` checks every byte as it does locally."""
    from img2vec.verify import main as verify, verify_cache

    local = Path(load_config(local_cache).cache.path)
    server = RangeServer(local.parent)
    try:
        url = f"{server.url}/{local.name}"
        a = _train(local_cache, tmp_path / "run", f"cache.path=\"{url}\"", "train.reader=\"random\"")
        assert a["keys"] == local_run["keys"] and a["losses"] == local_run["losses"]
        assert verify([url, "--recompute", "2"]) == 0 and "OK: 2 shards" in capsys.readouterr().out
        path = write_config(tmp_path, served[0], 2, fmt="zarr", cache="zarr")
        run_extraction(load_config(path), progress=False)
        zarr_server = RangeServer(tmp_path)
        assert verify_cache(f"{zarr_server.url}/zarr", progress=False).ok
        zarr_server.shutdown()
        report = verify_cache(f"{server.url}/nope", progress=False)
        assert not report.ok and "manifest.json not found" in report.problems[0].what
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------------- S3

class CuttingProxy:
    """A TCP proxy on 127.0.0.1 to `port`; while `cuts` > 0, a connection that receives a large chunk from the
    server (a body, not headers) gets half of it, then is closed: a connection dropped mid-read."""

    def __init__(self, port: int):
        self.port, self.cuts = port, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: bool):
        try:
            while chunk := src.recv(1 << 16):
                if cut and self.cuts > 0 and len(chunk) > 4096:
                    self.cuts -= 1
                    dst.sendall(chunk[:len(chunk) // 2])
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="module")
def s3(served, local_cache):
    """moto's S3 server on 127.0.0.1 (behind a CuttingProxy) with the two shards in bucket `wds`; s3fs reads
    AWS_* from the environment. Yields (bucket URL, proxy)."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = CuttingProxy(server.get_host_and_port()[1])
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": proxy.url}
    mp = pytest.MonkeyPatch()
    for k, v in {**env, **FAST_RETRIES}.items():
        mp.setenv(k, v)
    client = boto3.client("s3")
    client.create_bucket(Bucket="wds")
    for n in SHARDS:
        client.upload_file(str(served[0] / n), "wds", n)
    cache = Path(load_config(local_cache).cache.path)
    for p in cache.rglob("*"):  # the local cache under s3://wds/cache/
        if p.is_file():
            client.upload_file(str(p), "wds", f"cache/{p.relative_to(cache)}")
    yield "s3://wds", proxy
    mp.undo()
    server.stop()


@pytest.mark.slow
def test_s3_sources_and_cache_random_mode(tmp_path, served, local_cache, local_run, s3, one_thread):
    """s3:// shards through an S3-compatible server: streamed as the local ones, seekable, connections dropped
    mid-read retried; the cache copied to the bucket trains on the bucket's shards in random mode as the local
    ones do, and verifies (its listing: no stray files)."""
    from img2vec.verify import verify_cache

    src, (s3, proxy) = served[0], s3
    url = f"{s3}/{SHARDS[0]}"
    assert is_seekable(url) and _members(url) == _members(str(src / SHARDS[0]))
    data = (src / SHARDS[0]).read_bytes()
    assert remote.read_range(url, 700, 900) == data[700:1600]
    proxy.cuts = 2
    assert remote.read_range(url, 1000, 60000) == data[1000:61000] and proxy.cuts == 0
    proxy.cuts = 2
    assert _members(url) == _members(str(src / SHARDS[0])) and proxy.cuts == 0
    with pytest.raises(ShardError, match=re.escape(f"{s3}/nope.tar") + ".*not found"):
        list(iter_samples(f"{s3}/nope.tar"))
    a = _train(local_cache, tmp_path / "s3", f"data.shards=\"{s3}/shard-{{000000..000001}}.tar\"",
               f"cache.path=\"{s3}/cache\"", "train.reader=\"random\"")
    assert a["run"]["data"]["reader"] == "random"
    assert a["keys"] == local_run["keys"] and a["losses"] == local_run["losses"]
    report = verify_cache(f"{s3}/cache", progress=False)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
