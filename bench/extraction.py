"""Extraction pipeline: images/s of run_extraction against the teacher's forward alone on pre-decoded
batches of the same size, views/s as views per decoded image grow, and the two CPU-side stages that
bound a GPU extraction (decode + crop producer, encode + write writer). Prints markdown tables.

    python bench/extraction.py [--quick] [--device cuda --images 2048 --batch 128 --workers 8]

Teacher: timm resnet50 with random weights (what `teacher.weights = "random"` builds), 224 px views
of synthetic JPEGs of 192-320 px sides.
"""
from __future__ import annotations

import argparse
import os
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import header, make_source, median, random_teacher, table
from _extract_speed import markdown as extract_markdown, measure

from common.augment import CUTS, decode_image, replay_views, sample_views
from common.codecs import codec_for, get_codec
from common.config import Config
from common.stats import TokenStats
from extract.pipeline import run_extraction
from extract.views import ViewBatches
from shards.source import expand_shards, iter_samples, shard_names
from shards.writer import FeatureShardWriter


def config(pattern: str, cache: Path, views: int, batch: int, workers: int, codec: str, device: str) -> Config:
    cfg = Config()
    cfg.data.shards, cfg.data.workers = pattern, workers
    cfg.augment.views = views
    cfg.teacher.arch, cfg.teacher.weights = "resnet50", "random"
    cfg.cache.path, cfg.cache.codec = str(cache), codec
    cfg.extract.batch_size, cfg.extract.device = batch, device
    return cfg


def predecoded(pattern: str, views: int, batch: int) -> list[torch.Tensor]:
    """The exact views extraction makes, decoded and cut beforehand: batches uint8 [batch * V, 3, 224, 224]."""
    out = []
    for url in expand_shards(pattern):
        for s in iter_samples(url):
            img = decode_image(s["image"])
            out.append(replay_views(img, sample_views(0, s["key"], img.height, img.width, views), 224, CUTS[0]))
    return [torch.cat(out[i:i + batch]) for i in range(0, len(out), batch)]


def teacher_alone(teacher, batches: list[torch.Tensor], device: str) -> float:
    """Seconds of the teacher's forward over pre-decoded batches (moved to the device beforehand)."""
    batches = [b.to(device) for b in batches]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        teacher(batches[0])  # warm-up at the measured shape (oneDNN / cudnn plans, allocator)
        sync()
        t0 = time.perf_counter()
        for b in batches:
            teacher(b)
        sync()
    return time.perf_counter() - t0


def extraction(pattern: str, tmp: Path, tag: str, views: int, batch: int, workers: int, codec: str,
               device: str) -> dict:
    return run_extraction(config(pattern, tmp / f"cache-{tag}", views, batch, workers, codec, device), progress=False)


def producer_rate(pattern: str, views: int) -> float:
    """Views/s of ViewBatches alone (read, decode once, cut V views), one process, one torch thread."""
    cfg = config(pattern, Path("unused"), views, 16, 0, "bf16-zstd", "cpu")
    t0, n = time.perf_counter(), 0
    urls = expand_shards(pattern)
    for item in ViewBatches(urls, dict(zip(urls, shard_names(urls))), cfg):
        n += item["views"].shape[0] * item["views"].shape[1]
    return n / (time.perf_counter() - t0)


def write_shard(tmp: Path, codec, batch: np.ndarray, batches: int, pool=None, commit: bool = True):
    """A wds feature shard of `batches` x packed `batch` [b, V, T, C'] (dummy records), as extraction writes one."""
    b, views = batch.shape[:2]
    w = FeatureShardWriter(tmp, f"w-{codec.name}-{time.monotonic_ns()}", "wds", codec, views, 49, 2048)
    for i in range(batches):
        w.add_batch([f"k{i}-{j}" for j in range(b)], [np.zeros((views, 5), np.int32)] * b,
                    [{"offset": -1, "size": 0, "crc": 0}] * b, [(224, 224)] * b, [0] * b, batch, pool)
    if commit:
        w.commit([], "bench", TokenStats(), False)
    return w


def writer_rate(tmp: Path, codec: str, tokens: np.ndarray, samples: int, threads: int = 0) -> float:
    """Views/s of FeatureShardWriter.add_batch (compress + checksum + tar write) from the writer thread, on its own
    (threads = 0) or with a pool of encode threads, in batches of 8 samples of the views `tokens` [V, 49, 2048]."""
    from concurrent.futures import ThreadPoolExecutor

    packed = get_codec(codec).encode(tokens)
    batch = np.broadcast_to(packed, (8, *packed.shape))
    pool = ThreadPoolExecutor(threads) if threads else None
    t0 = time.perf_counter()
    w = write_shard(tmp, get_codec(codec), batch, samples // 8, pool, commit=False)
    dt = time.perf_counter() - t0
    w.commit([], "bench", TokenStats(), False)
    if pool:
        pool.shutdown()
    return samples * len(tokens) / dt


IMAGENET_IMAGES, IMAGENET_SHARDS = 1_281_167, 1_282


def thread_ms(fn, per: int, reps: int = 3) -> float:
    """CPU milliseconds of this thread per unit (median of `reps` runs of fn(), divided by `per`)."""
    out = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        out.append((time.thread_time() - t0) * 1e3 / per)
    return median(out)


def realistic_tokens(views: int) -> np.ndarray:
    """Tokens [views, 49, 2048] of a ResNet-50 with BatchNorm statistics recalibrated on other images (trained-like
    zero fraction and spread; bench/codec_study.py): what the codecs' costs depend on."""
    from _common import recalibrate_bn, source_views, teacher_tokens

    teacher = random_teacher()
    recalibrate_bn(teacher, source_views(16, 1, seed=2)[0])
    return teacher_tokens(teacher, source_views(max(1, views // 10), 10)[0][:views])


def codec_costs(codec, tokens: np.ndarray, tmp: Path) -> dict:
    """Core-ms per view of encoding on the host, compressing + checksumming, and storing (tar append, hashes, index,
    commit; fsync waits are not CPU time), before and after this version's changes."""
    import numcodecs

    from common.codecs import view_crc32
    from common.files import file_sha256

    packed = codec.encode(tokens)
    host_encode = thread_ms(lambda: codec.encode(tokens), len(tokens))
    before_comp = codec.blosc()
    if codec.kind == "u8":  # before: no shuffle (bit-shuffling came with this version)
        before_comp = numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.NOSHUFFLE, blocksize=1 << 18)
    compress = {"before": thread_ms(lambda: [(before_comp.encode(p), view_crc32(p)) for p in packed], len(packed)),
                "after": thread_ms(lambda: [(codec.compress(p), view_crc32(p)) for p in packed], len(packed))}
    batch = np.stack([packed[:10], packed[10:20]])

    def write(reread: bool):
        w = write_shard(tmp, codec, batch, 20)
        if reread:  # before: the record's sha256 was computed by reading every tar back
            for f in sorted(w.final.glob("v*.tar")):
                file_sha256(f)

    store = {when: thread_ms(lambda w=when: write(w == "before"), 400) - compress["after"]  # add_batch compresses too
             for when in ("before", "after")}
    kib = float(np.mean([len(codec.compress(p)) for p in packed])) / 1024
    return {"encode": host_encode, "compress": compress, "store": store, "kib": kib}


HEADLINE_CODECS = ("bf16-zstd", "bf16z-zstd", "u8-zstd")


def core_ms_per_view(pattern: str, views: int, tmp: Path) -> tuple[list[str], list[list], dict]:
    """One core's milliseconds per view of each CPU stage of extraction, before and after this version's changes,
    for each of HEADLINE_CODECS (bf16z-zstd is new: no "before"). Returns table headers, rows and the totals."""
    import numcodecs

    numcodecs.blosc.use_threads = False  # as in the encode pool's threads: one core per call
    samples = [s["image"] for url in expand_shards(pattern) for s in iter_samples(url)]
    imgs = [decode_image(b) for b in samples]
    records = [sample_views(0, f"k{i}", im.height, im.width, views) for i, im in enumerate(imgs)]
    n = len(imgs) * views
    decode = thread_ms(lambda: [decode_image(b) for b in samples], n)
    draw = thread_ms(lambda: [sample_views(0, f"k{i}", im.height, im.width, views) for i, im in enumerate(imgs)], n)
    cut = {c: thread_ms(lambda c=c: [replay_views(im, r, 224, c) for im, r in zip(imgs, records)], n) for c in CUTS}
    tokens = realistic_tokens(20)
    costs = {name: codec_costs(get_codec(name), tokens, tmp) for name in HEADLINE_CODECS}
    totals = {}
    for name, c in costs.items():
        totals[name] = {
            "before": decode + draw + cut["pil"] + c["encode"] + c["compress"]["before"] + c["store"]["before"],
            "after": decode + draw + cut["torch"] + c["compress"]["after"] + c["store"]["after"],
            "after_cpu_teacher": decode + draw + cut["torch"] + c["encode"] + c["compress"]["after"] + c["store"]["after"]}
    f = "{:.3f}".format
    cols = [(name, when) for name in HEADLINE_CODECS for when in (("after",) if name == "bf16z-zstd" else ("before", "after"))]
    note = {"u8-zstd": {"before": " (no shuffle)", "after": " (bit shuffle)"}}

    def row(label, cell):
        return [label] + [cell(name, when) for name, when in cols]

    rows = [
        row("decode the JPEG once (its share per view)", lambda n, w: f(decode)),
        row("draw the view records", lambda n, w: f(draw)),
        row("cut: crop + bicubic resize + flip (`augment.cut`)",
            lambda n, w: f"{f(cut['pil'])} (`pil`)" if w == "before" else f"{f(cut['torch'])} (`torch`)"),
        row("encode: bf16 rounding (+ zero bitmap) / u8 quantization", lambda n, w: f(costs[n]["encode"]) if w == "before"
            else f"0 on a GPU ({f(costs[n]['encode'])} on a CPU)"),
        row("compress (Blosc zstd) + crc32", lambda n, w: f(costs[n]["compress"][w]) + note.get(n, {}).get(w, "")),
        row("tar append + sha256 + index + commit",
            lambda n, w: f(costs[n]["store"][w]) + (" (sha256 re-read)" if w == "before" else "")),
        row("**core-ms per view outside the teacher**", lambda n, w: f"**{f(totals[n][w])}**"),
        row("KiB per view", lambda n, w: f"{costs[n]['kib']:.1f}")]
    headers = ["stage"] + [f"`{n}` {'before' if w == 'before' else 'now'}" for n, w in cols]
    return headers, rows, totals


def headline(args, tmp: Path) -> None:
    """What the issue asks in one table: extract-features vs the teacher alone vs decode + cut alone in interleaved
    rounds over a source of many shards, cores used, core-ms per view outside the teacher (before / after), and the
    ImageNet x V projection on this machine."""
    v, n, k = args.imagenet_views, args.imagenet_images, args.imagenet_shards
    pattern = make_source(tmp / "imagenet-like", k, -(-n // k), seed=11, imagenet_like=True)
    urls = expand_shards(pattern)
    samples = [s["image"] for url in urls for s in iter_samples(url)]
    kb = np.mean([len(b) for b in samples]) / 1024
    hw = np.mean([decode_image(b).size for b in samples], 0)
    print(f"### ImageNet-like inputs, V = {v}: {len(samples)} JPEGs in {k} shards, {hw[0]:.0f} x {hw[1]:.0f} px and "
          f"{kb:.0f} KiB on average (ImageNet: ~400 x 350, ~110 KB)\n")
    headers, rows, totals = core_ms_per_view(pattern, v, tmp)
    print("CPU core-ms per view of each stage outside the teacher (`time.thread_time` of one thread; Blosc on one "
          "thread; \"before\" = the previous version's path, measured in this run):\n")
    print(table(headers, rows))

    cores = len(os.sched_getaffinity(0))
    batch = -(-n // k)  # one teacher batch per shard
    cfg = config(pattern, tmp / "unused", v, batch, args.workers, HEADLINE_CODECS[0], args.device)
    result = measure(cfg, [v], list(HEADLINE_CODECS), args.imagenet_rounds, tmp, teacher_batches=k)
    print(f"extract-features (run_extraction: {result['workers']} data worker(s), extract.batch_size {batch} = one "
          f"shard, device {args.device}) against its two stages alone, median (min-max) over {args.imagenet_rounds} "
          f"interleaved rounds; the teacher alone runs as many batches of the same shape on pixels already on the "
          "device:\n")
    print(extract_markdown(result, cores))
    total, default = IMAGENET_IMAGES * v, codec_for(Config().cache.codec, "convnet").name  # the ResNet-50's
    per_view = totals[default]["after_cpu_teacher" if args.device == "cpu" else "after"]
    alone = next(r for r in result["rows"] if r["what"] == "teacher alone")["views_per_s"]["median"]
    rate = min(alone, cores * 1000 / per_view)
    measured = next(r for r in result["rows"] if r["codec"] == default)["views_per_s"]["median"]
    host = ", ".join(f"`{c}` {cores * 1000 / t['after']:.0f}" for c, t in totals.items())
    need = ", ".join(f"`{c}` {5.7 * t['after']:.1f}" for c, t in totals.items())
    print(f"ImageNet-1k x {v} views = {total / 1e6:.1f} M views ({IMAGENET_SHARDS} shards), default codec `{default}`: "
          f"at the rate measured here ({measured:.1f} views/s) {total / measured / 3600:.1f} h on this machine; its "
          f"bound, min(teacher alone, {cores} cores / core-ms per view), is {rate:.1f} views/s = "
          f"{total / rate / 3600:.1f} h. The host side alone on {cores} cores, views/s: {host}. Cores of host work "
          f"that 5,700 views/s (ImageNet x 16 in an hour) needs on a GPU node: {need}.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images, views 1 and 4 only (about a minute)")
    p.add_argument("--images", help="image counts of the one-view comparison (default 16,64; quick 8,24): two "
                   "counts separate the fixed cost of a run from the per-image rate")
    p.add_argument("--batch", type=int, default=4, help="extract.batch_size (images per teacher batch)")
    p.add_argument("--workers", type=int, default=1, help="data.workers")
    p.add_argument("--rounds", type=int, help="interleaved extraction / teacher-alone rounds (default 3, quick 2)")
    p.add_argument("--views", help="views per image of the sweep (default 1,2,4,8; quick 1,4)")
    p.add_argument("--sweep-images", type=int, help="images per sweep point (default 8, quick 2)")
    p.add_argument("--sweep-rounds", type=int, help="interleaved rounds of the sweep (default 2, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the teacher (default 1: on a small "
                   "shared CPU, more threads than free cores make timings erratic; 0 = torch's default)")
    p.add_argument("--codec", default="bf16-zstd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--imagenet-views", type=int, default=10, help="views per image of the ImageNet-like headline")
    p.add_argument("--imagenet-images", type=int, help="images of the ImageNet-like headline (default 16, quick 8)")
    p.add_argument("--imagenet-shards", type=int, help="source shards of the headline (default 8, quick 4)")
    p.add_argument("--imagenet-rounds", type=int, help="interleaved rounds of the headline (default 3, quick 2)")
    p.add_argument("--only-headline", action="store_true", help="the ImageNet-like headline section only")
    args = p.parse_args()
    args.imagenet_images = args.imagenet_images or (8 if args.quick else 16)
    args.imagenet_shards = min(args.imagenet_shards or (4 if args.quick else 8), args.imagenet_images)
    args.imagenet_rounds = args.imagenet_rounds or (2 if args.quick else 3)
    counts = [int(n) for n in (args.images or ("8,24" if args.quick else "16,64")).split(",")]
    rounds = args.rounds or (2 if args.quick else 3)
    sweep = [int(v) for v in (args.views or ("1,4" if args.quick else "1,2,4,8")).split(",")]
    sweep_images = args.sweep_images or (2 if args.quick else 8)
    sweep_rounds = args.sweep_rounds or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    header("Extraction pipeline vs the teacher alone", args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    atexit.register(shutil.rmtree, tmp, True)  # caches and runs can take hundreds of MB
    headline(args, tmp)
    if args.only_headline:
        return
    teacher = random_teacher(device=args.device)
    print("### One view per image\n")
    sources = {n: make_source(tmp / f"src{n}", 1, n) for n in counts}  # the first images of each are the same
    batches = {n: predecoded(sources[n], 1, args.batch) for n in counts}
    t_ext = {n: [] for n in counts}
    t_alone = {n: [] for n in counts}
    for r in range(rounds):  # interleaved
        for n in counts:
            t_ext[n].append(extraction(sources[n], tmp, f"v1-{n}-{r}", 1, args.batch, args.workers, args.codec,
                                       args.device)["seconds"])
            t_alone[n].append(teacher_alone(teacher, batches[n], args.device))
    print(f"1 view per image, extract.batch_size {args.batch}, data.workers {args.workers}, codec `{args.codec}`, "
          f"device {args.device}, {torch.get_num_threads()} torch thread(s); run_extraction's own seconds (from its "
          f"first batch request to the last shard committed; teacher construction excluded); median of {rounds} "
          f"interleaved rounds (ratio: median of the per-round ratios).\n")
    rows = []
    for n in counts:
        ratios = [a / b for a, b in zip(t_alone[n], t_ext[n])]
        rows.append([f"{n} images", f"{n / median(t_alone[n]):.2f}", f"{n / median(t_ext[n]):.2f}",
                     f"{median(ratios):.2f}", "yes" if median(ratios) >= 0.9 else "no"])
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        d_ext = [b - a for a, b in zip(t_ext[lo], t_ext[hi])]
        d_alone = [b - a for a, b in zip(t_alone[lo], t_alone[hi])]
        ratios = [a / b for a, b in zip(d_alone, d_ext)]
        rows.append([f"per-image rate between {lo} and {hi} images (fixed costs removed)",
                     f"{(hi - lo) / median(d_alone):.2f}", f"{(hi - lo) / median(d_ext):.2f}", f"{median(ratios):.2f}",
                     "yes" if median(ratios) >= 0.9 else "no"])
        fixed = [e - lo * de / (hi - lo) for e, de in zip(t_ext[lo], d_ext)]
        print(f"Fixed cost of a run_extraction call beyond its per-image work: {median(fixed):.2f} s (DataLoader "
              f"worker start, first batch latency, shard commit with fsync and sha256, manifest).\n")
    print(table(["images", "teacher alone, images/s", "run_extraction, images/s", "ratio", ">= 0.9"], rows))

    b = args.batch
    print(f"### Views per decoded image: {sweep_images} images per point, extract.batch_size {b} images "
          f"(x V views per teacher batch), median of {sweep_rounds} interleaved round(s)\n")
    spattern = make_source(tmp / "sweep", 1, sweep_images, seed=5)
    res = {v: ([], [], []) for v in sweep}
    for r in range(sweep_rounds):
        for v in sweep:
            s = extraction(spattern, tmp, f"sweep-v{v}-{r}", v, b, args.workers, args.codec, args.device)
            vps = s["views"] / s["seconds"]
            vps_alone = sweep_images * v / teacher_alone(teacher, predecoded(spattern, v, b), args.device)
            res[v][0].append(s["images_per_s"])
            res[v][1].append(vps)
            res[v][2].append(vps_alone)
    rows = [[v, f"{median(a):.2f}", f"{median(e):.2f}", f"{median(t):.2f}",
             f"{median([x / y for x, y in zip(e, t)]):.2f}"] for v, (a, e, t) in res.items()]
    print(table(["views per image", "images/s", "views/s, run_extraction", "views/s, teacher alone", "ratio"], rows))

    n_prod = 32 if args.quick else 64
    ppattern = make_source(tmp / "producer", 1, n_prod, seed=7)
    with torch.no_grad():  # one sample of 10 real views for the writer
        real = teacher(predecoded(ppattern, 1, 10)[0].to(args.device)).cpu().numpy()
    torch.set_num_threads(1)  # as in a DataLoader worker / the writer thread
    print(f"### The CPU side a GPU extraction has to keep up with (one core each, {n_prod} images)\n")
    rows = []
    base = None
    for v in sorted(set(sweep) | {1, 2, 4, 8}):
        rate = median([producer_rate(ppattern, v) for _ in range(3)])
        base = base or rate
        rows.append([v, f"{rate:.0f}", f"{rate / v:.0f}", f"{rate / base:.2f}x"])
    print("Producer (one DataLoader worker's work: read shard, decode each image once, cut V views):\n")
    print(table(["views per image", "views/s per worker", "images/s per worker", "views/s vs 1 view"], rows))
    rows, cores = [], len(os.sched_getaffinity(0))
    for codec in ("bf16z-zstd", "bf16-zstd", "bf16-lz4", "u8-zstd", "u8lin-zstd", "bf16", "fp32"):
        one = median([writer_rate(tmp, codec, real, 16) for _ in range(3)])
        many = median([writer_rate(tmp, codec, real, 16, cores) for _ in range(3)])
        rows.append([f"`{codec}`", f"{one:.0f}", f"{many:.0f}", f"{many / one:.2f}x"])
    print("Writer (FeatureShardWriter.add_batch: compress, checksum, tar write; samples of 10 ResNet-50 views, packed "
          f"beforehand as on the teacher's device), on the writer thread alone and with {cores} encode threads "
          "(`extract.encode_threads`); core-ms per view of every stage: the headline section:\n")
    print(table(["codec", "views/s, 1 thread", f"views/s, {cores} encode threads", "speed-up"], rows))


if __name__ == "__main__":
    main()
