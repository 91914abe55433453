"""Stage one: source shards -> recorded views -> frozen teacher -> compressed feature shards.

DataLoader workers read a shard, decode each image once and cut its V views; the main process
runs the teacher; a writer thread writes while the next batch runs, its views encoded, compressed and
checksummed by `extract.encode_threads` threads (by default the cores the rest leaves free). Each shard has
one writer, is committed atomically and then recorded, so a rerun skips what is complete.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.codecs import check_codec_name, codec_for, get_codec
from common.compiled import compile_forward
from common.config import Config, ConfigError, check_crop_size, check_student_patch, validate
from common import faults
from common.faults import fault_point
from common.runtime import pick_device
from common.signals import StopSignals, watch_workers
from common.stats import TokenStats
from common.teacher import build_teacher
from extract.leasing import complete, extract_shared
from extract.views import in_source_order, view_loader
from shards.errors import CacheError
from shards.index import ShardRecord
from shards.leases import Lease
from shards.manifest import (
    check_replay,
    finalize_manifest,
    make_manifest,
    manifest_differences,
    read_manifest,
    write_manifest,
)
from shards.source import (expand_shards, is_seekable, rank_and_world, rank_shards,
                           shard_names)
from shards.provenance import source_size, sources_differ
from shards.writer import FeatureShardWriter, ShardTaken


class ShardJob:
    """Writer-thread side of one shard: open lazily, add batches, commit. Its `stats` are summed in the main
    thread as batches finish, before the commit that records them is queued."""

    def __init__(self, cache: Path, cfg: Config, name: str, source: str, token_shape, lease: Lease):
        self.cache, self.name, self.source, self.lease = cache, name, source, lease
        self.layout = (cfg.cache.format, get_codec(cfg.cache.codec), cfg.augment.views, *token_shape)
        self.writer: FeatureShardWriter | None = None
        self.skipped: list[dict] = []
        self.stats = TokenStats()
        self.lost = False  # another job took the shard over and removed our temporary

    def _open(self) -> FeatureShardWriter:
        if self.writer is None:
            self.writer = FeatureShardWriter(self.cache, self.name, *self.layout)
        return self.writer

    def add(self, keys, records, src, src_hw, cls, tokens: np.ndarray, skipped, encoders=None) -> None:
        if self.lost:
            return
        writer = self._open()
        try:
            if keys:
                writer.add_batch(keys, records, src, src_hw, cls, tokens, encoders)
        except OSError as e:
            try:
                writer.taken(e)  # a ShardTaken if another job took the shard over; else `e` is ours to raise
            except ShardTaken:
                self.lost = True
                return
            raise
        self.skipped += skipped
        if keys:
            fault_point("write", self.name)

    def commit(self) -> ShardRecord | None:
        """The shard recorded; None (ours dropped, with a message) if another job finished it meanwhile or took
        its lease over (this job was paused or cut off for longer than extract.lease_ttl)."""
        writer = self._open()
        why = ("another job finished it meanwhile" if complete(self.cache, self.name) else
               f"its lease was taken over by another job ({self.lease.holder() or 'released'})"
               if self.lost or not self.lease.held() else None)
        try:
            if why is None:
                return writer.commit(self.skipped, self.source, self.stats, is_seekable(self.source),
                                     source_size(self.source))
        except ShardTaken:
            why = "another job took it over meanwhile (this job was silent past extract.lease_ttl: paused, cut off)"
        writer.abort()
        tqdm.write(f"extract-features: shard {self.name}: {why}; this job's copy is dropped", file=sys.stderr)
        return None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def raise_nonfinite(bad: torch.Tensor, item: dict) -> None:
    """Non-finite teacher tokens are never stored: a CacheError naming the shard and the first bad key."""
    key = item["keys"][int(bad.nonzero()[0])]
    raise CacheError(f"source shard {item['source']}: the teacher's tokens for key {key!r} are not finite "
                     f"({int(bad.sum())} of {len(bad)} images in this batch); nothing was recorded for shard "
                     f"{item['shard']}. Check teacher.weights (a NaN or inf in the checkpoint?) and teacher.dtype")


def teacher_step(teacher, codec, views: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """uint8 views [b, V, 3, S, S] -> on the teacher's device: the packed tokens [b, V, T, C'], which images have
    a non-finite token [b], and the token statistics' sums. Nothing here waits for the device."""
    b, v = views.shape[:2]
    tokens = teacher(views.to(device, non_blocking=True).flatten(0, 1))  # [b*V, T, C]
    bad = (~torch.isfinite(tokens)).flatten(1).any(1).view(b, v).any(1)
    packed = codec.encode_tensor(tokens)
    return {"packed": packed.view(b, v, *packed.shape[1:]), "bad": bad, **TokenStats.partial(tokens)}


class ToHost:
    """A dict of device tensors on its way to the host. On a GPU the copies are queued behind the batch's compute
    into pinned memory and waited for later (one batch later, in ShardsInFlight), so the GPU runs the next batch
    meanwhile; on the CPU they are the tensors themselves."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.event = tensors, None
        device = next((t.device for t in tensors.values() if t.is_cuda), None)
        if device is not None:
            self.tensors = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for k, t in tensors.items()}
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))  # the stream the copies were queued on

    def wait(self) -> dict[str, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.tensors


def prepare_cache(cfg: Config, teacher, token_shape, urls: list[str], mine: dict[str, str] | None = None) -> Path:
    """Create the cache and its manifest, or check that an existing one matches this config, and that this rank's
    recorded shards (`mine`: name -> URL) reached at other paths are the same shards."""
    cache = Path(cfg.cache.path)
    cache.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(cfg, teacher.fingerprint, token_shape, urls)
    if (cache / "manifest.json").exists():
        old = read_manifest(cache)
        diffs = manifest_differences(old, manifest)
        if diffs:
            raise CacheError(f"cache {cache} was made with another recipe; refusing to mix features:\n  "
                             + "\n  ".join(diffs) + "\nUse another cache.path, or delete the cache to redo it.")
        check_replay(old)  # the shards this run adds must be cut as the ones already there
        differ = sources_differ(cache, old, mine or {})  # the same names at other paths must be the same shards
        if differ:
            raise CacheError(f"cache {cache}: {len(differ)} recorded shard(s) are not the sources given now (the same "
                             "name, another file):\n  " + "\n  ".join(differ[:10]) + "\nRefusing to mix features "
                             "of another dataset; use another cache.path, or give the sources the cache was made from.")
    else:
        write_manifest(cache, manifest)
    return cache


def run_extraction(cfg: Config, progress: bool = True) -> dict:
    check_codec_name(cfg.cache.codec)  # config errors before any work
    validate(cfg, "extract")
    urls = expand_shards(cfg.data.shards)
    names = dict(zip(urls, shard_names(urls)))  # unique, or a ConfigError naming the URLs, before any work
    rank, world = rank_and_world(cfg.extract.rank, cfg.extract.world_size)
    device = pick_device(cfg.extract.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU is the current one: streams, events, pinned memory
    teacher = build_teacher(cfg.teacher, device)
    check_crop_size(cfg.augment.size, teacher.stride, cfg.teacher.layer)
    try:  # training refuses a student whose patch does not tile the tokens: said now, not after the extraction
        check_student_patch(cfg.student.arch, teacher.stride)
    except ConfigError as e:
        if rank == 0:  # the cache is right for any student: a warning
            print(f"extract-features: warning: {e}; the cache is right as it is, training refuses this student",
                  file=sys.stderr)
    cfg.cache.codec = codec_for(cfg.cache.codec, teacher.kind).name  # "auto" -> the teacher kind's codec
    with torch.no_grad():
        token_shape = tuple(teacher(torch.zeros(1, 3, cfg.augment.size, cfg.augment.size, dtype=torch.uint8,
                                                device=device)).shape[1:])
    if cfg.teacher.compile:  # after the one-image probe: the first compiled shape is a real batch's
        compile_forward(teacher, "teacher.compile: the teacher")
    mine = rank_shards(urls, rank, world)
    cache = prepare_cache(cfg, teacher, token_shape, urls, {names[u]: u for u in mine})
    faults.MAIN_PID = os.getpid()

    todo = [u for u in mine if not complete(cache, names[u])]
    for u in set(mine) - set(todo):
        Lease(cache, names[u]).clear_stale()  # a job killed between its last commit and releasing the lease
    already = len(mine) - len(todo)
    if cfg.extract.limit:
        todo = todo[:cfg.extract.limit]
    if not todo:  # and nothing is written: a finished cache may be on a read-only mount
        print(f"extract-features: nothing to do: the {already} shard(s) of rank {rank}/{world} are recorded in "
              f"{cache}", file=sys.stderr)
    result = extract_shared(cache, todo, names, cfg.extract, lambda pending, leases: _extract(
        cfg, cache, pending, names, leases, teacher, token_shape, device, progress, f"{rank}/{world}"))
    manifest = finalize_manifest(cache)
    return {"rank": rank, "world_size": world, "shards_mine": len(mine), "shards_already_complete": already,
            **result, "cache_complete": manifest is not None,
            "token_diversity": manifest.stats.token_diversity if manifest else None}


class ShardsInFlight:
    """The shards being written, one ShardJob each from its first batch on, and the writer thread's queue.

    The teacher runs batch k while the host stores batch k - 1: `push` takes batch k, launched on the device,
    and finishes the one before it (its tokens handed to the writer thread); a shard's last batch queues its
    commit (or its abort, if its source broke) and then its lease's release. On a stop, a batch not the last of
    its shard is dropped uncompressed, and `close` aborts the shards still open: nothing of them is recorded.
    """

    QUEUED = 4  # writer-thread tasks the main thread runs ahead by: bounds the host memory held in tokens

    def __init__(self, cache: Path, cfg: Config, token_shape, leases: dict[str, Lease], *, pool: ThreadPoolExecutor,
                 encoders: ThreadPoolExecutor, stop: StopSignals, bar: tqdm, shards: int):
        self.cache, self.cfg, self.token_shape, self.leases = cache, cfg, token_shape, leases
        self.pool, self.encoders, self.stop, self.bar, self.shards = pool, encoders, stop, bar, shards
        self.codec = get_codec(cfg.cache.codec)
        self.jobs: dict[str, ShardJob] = {}
        self.futures: list[Future] = []  # the writer thread's tasks, oldest first
        self.waiting: tuple[dict, ToHost | None] | None = None  # launched on the device, not yet stored
        self.done, self.failed, self.images, self.skipped = 0, [], 0, 0
        self.t0 = time.time()

    def push(self, item: dict, launched: ToHost | None) -> None:
        if self.waiting is not None:
            self.finish(*self.waiting)
        self.waiting = (item, launched)
        if item["last"]:  # commit a finished shard now, not when the next batch comes: that may be long (a stall)
            self.flush()

    def flush(self) -> None:
        """The batch launched last (before any stop request): stored, its shard committed if it was its last."""
        if self.waiting is not None:
            self.finish(*self.waiting)
            self.waiting = None

    def close(self) -> None:
        """Wait for the writer thread; after a stop, the shards still open are aborted first."""
        if self.stop.requested:
            self.abort_open()
        while self.futures:
            self.futures.pop(0).result()

    def finish(self, item: dict, launched: ToHost | None) -> None:
        if self.stop.requested and not item["last"]:  # its shard will be aborted: do not compress it first
            return
        self.store(item, launched.wait() if item["keys"] else None)
        while len(self.futures) > self.QUEUED or (self.futures and self.futures[0].done()):
            self.futures.pop(0).result()  # re-raises a writer error here, e.g. no space left on the device
        self.bar.update(len(item["keys"]))
        views_per_s = self.images * self.cfg.augment.views / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"shards {self.done}/{self.shards} views/s {views_per_s:.1f} skipped {self.skipped}")

    def store(self, item: dict, out: dict[str, torch.Tensor] | None) -> None:
        """A batch's tokens (`out` of teacher_step) and skipped samples to the writer thread; at its shard's last
        batch, the commit (or the abort, if the source broke) and then the lease's release."""
        job = self.job(item)
        if item["keys"]:
            if out["bad"].any():
                self.abort_open()
                while self.futures:
                    self.futures.pop(0).result()
                raise_nonfinite(out["bad"], item)
            job.stats.add(out)
            self.submit(job.add, item["keys"], item["records"], item["src"], item["src_hw"], item["cls"],
                        self.codec.to_numpy(out["packed"]), item["skipped"], self.encoders)
        elif item["skipped"]:
            self.submit(job.add, [], None, [], [], [], None, item["skipped"])
        self.images += len(item["keys"])
        self.skipped += len(item["skipped"])
        if item["last"]:
            if item["error"]:
                self.failed.append(f"{item['source']}: {item['error']}")
                self.submit(job.abort)
            else:
                self.submit(self.commit, job)
            self.submit(job.lease.release)
            del self.jobs[job.name]

    def commit(self, job: ShardJob) -> None:
        """On the writer thread: a shard recorded counts as done (one another job finished meanwhile does not)."""
        if job.commit() is not None:
            self.done += 1

    def job(self, item: dict) -> ShardJob:
        name = item["shard"]
        if name not in self.jobs:
            self.jobs[name] = ShardJob(self.cache, self.cfg, name, item["source"], self.token_shape, self.leases[name])
        return self.jobs[name]

    def submit(self, fn, *args) -> None:
        self.futures.append(self.pool.submit(fn, *args))

    def abort_open(self) -> None:
        """The shards not at their end are dropped, unrecorded (their leases are released by run_extraction)."""
        for job in self.jobs.values():
            self.submit(job.abort)


def _extract(cfg: Config, cache: Path, pending: list[str], names: dict[str, str], leases: dict[str, Lease], teacher,
             token_shape, device, progress: bool, rank: str) -> dict:
    """Each loader item is launched on the device, then handed to the shards in flight, which store the one
    before it meanwhile (see ShardsInFlight)."""
    loader, workers, teams = view_loader(cfg, pending, names, device)
    if progress:
        print(f"extract rank {rank}: {len(pending)} shard(s) to do, {workers} data worker(s), {teams} shard(s) at a time",
              file=sys.stderr)
    codec = get_codec(cfg.cache.codec)
    t0 = time.time()
    bar = tqdm(total=None, unit="img", disable=not progress, dynamic_ncols=True,
               desc=f"extract rank {rank}")
    threads = cfg.extract.encode_threads or max(1, len(os.sched_getaffinity(0)) - cfg.data.workers - 1)
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as pool, StopSignals() as stop, \
            ThreadPoolExecutor(threads, thread_name_prefix="encode") as encoders:
        shards = ShardsInFlight(cache, cfg, token_shape, leases, pool=pool, encoders=encoders, stop=stop, bar=bar,
                                shards=len(pending))
        for item in in_source_order(watch_workers(iter(loader))):
            if stop.requested:  # SIGTERM / SIGUSR1 / SIGINT (to the main process: the workers ignore them)
                break
            shards.push(item, ToHost(teacher_step(teacher, codec, item["views"], device)) if item["keys"] else None)
        shards.flush()
        shards.close()
    bar.close()
    elapsed = time.time() - t0
    images = shards.images
    return {"preempted": stop.received, "shards_done": shards.done, "shards_failed": shards.failed, "images": images,
            "views": images * cfg.augment.views, "data_workers": workers,
            "skipped_samples": shards.skipped, "seconds": round(elapsed, 2),
            "images_per_s": round(images / elapsed, 2) if elapsed > 0 else 0.0}
