"""`img2vec make-shards`: an ImageNet-layout folder (one subfolder per class) -> WebDataset tars
(written by shards.source.write_shards).

Each sample keeps the original image bytes, its `.cls` label, and `.json` with the class name and
the file's relative path; `classes.json` maps class names to indices. The samples are shuffled (seeded)
before the shards are cut, so every shard holds a mix of classes: folder order would give class-sorted
shards, and a rank, a worker or a shuffle buffer that reads a few shards would see a few classes only.
The same folder and seed always give the same shards; `--no-shuffle` keeps folder order (classes
sorted, files sorted within a class).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from common.files import write_json_atomic
from shards.source import IMAGE_EXTS, write_shards


def folder_files(folder: Path, classes: list[str]) -> list[tuple[int, Path]]:
    """(label, file) of every image, in folder order: classes sorted, files sorted within a class."""
    return [(idx, p) for idx, cls in enumerate(classes)
            for p in sorted(p for p in (folder / cls).rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTS)]


def folder_samples(folder: Path, classes: list[str], files: list[tuple[int, Path]]):
    for idx, p in files:
        rel = p.relative_to(folder)
        key = f"{classes[idx]}/{p.stem}".replace(".", "_")
        yield {"key": key, "image": p.read_bytes(), "ext": p.suffix[1:].lower(), "cls": idx,
               "meta": {"class": classes[idx], "path": str(rel)}}


def make_shards(folder: str | Path, out_dir: str | Path, maxcount: int = 1000, prefix: str = "train",
                progress: bool = True, shuffle: bool = True, seed: int = 0) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (expected one subfolder per class)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class subfolders (ImageNet layout: {folder}/<class>/<image>)")
    files = folder_files(folder, classes)
    if shuffle:
        random.Random(seed).shuffle(files)  # the file list only: images are read once, in the shuffled order
    paths = write_shards(folder_samples(folder, classes, files), out_dir, prefix, maxcount, len(files), progress)
    write_json_atomic(Path(out_dir) / "classes.json", {c: i for i, c in enumerate(classes)})
    return paths


def main(argv: list[str] | None = None, prog: str = "img2vec make-shards") -> int:
    """`img2vec make-shards IMAGE_FOLDER OUT_DIR [--maxcount N] [--prefix train] [--seed S | --no-shuffle]`"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog=prog, description="An image folder in ImageNet layout (IMAGE_FOLDER/<class>/"
                                "<image>) -> WebDataset shards <prefix>-000000.tar, ... with .cls labels in sorted "
                                "class order, plus classes.json (class name -> label). Samples are shuffled (seeded) "
                                "before the shards are cut, so each shard mixes classes.")
    p.add_argument("folder", metavar="IMAGE_FOLDER", help="one subfolder per class")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the shards and classes.json are written")
    p.add_argument("--maxcount", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep folder order (classes sorted, files sorted in each): shards are then class-sorted")
    p.add_argument("--overwrite", action="store_true", help="replace shards of this prefix already in OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.maxcount < 1:
        p.error("--maxcount must be >= 1")
    if not args.prefix or "/" in args.prefix or "." in args.prefix:
        p.error(f"--prefix {args.prefix!r}: give a plain name without '/' or '.' (e.g. train)")
    if not Path(args.folder).is_dir():
        print(f"{prog}: error: {args.folder} is not a directory (expected one subfolder per class)", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    old = sorted(out_dir.glob(f"{args.prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")) if out_dir.is_dir() else []
    if old and not args.overwrite:
        print(f"{prog}: error: {out_dir} already holds {len(old)} shards named {args.prefix}-*.tar; pass --overwrite "
              "to replace them, or choose another OUT_DIR or --prefix", file=sys.stderr)
        return 2
    try:
        paths = make_shards(args.folder, out_dir, args.maxcount, args.prefix, progress=not args.no_progress,
                            shuffle=not args.no_shuffle, seed=args.seed)
    except FileNotFoundError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for stale in set(old) - set(paths):  # a smaller folder than last time: shards beyond the new last one
        stale.unlink()
    if not paths:
        print(f"{prog}: error: no images ({', '.join(IMAGE_EXTS)}) found under {args.folder}", file=sys.stderr)
        return 2
    classes = json.loads((out_dir / "classes.json").read_text())
    total = sum(1 for c in classes for f in (Path(args.folder) / c).rglob("*")
                if f.is_file() and f.suffix[1:].lower() in IMAGE_EXTS)
    for i, path in enumerate(paths):
        print(f"{path}  {min(args.maxcount, total - i * args.maxcount)} samples")
    order = "folder order (class-sorted)" if args.no_shuffle else f"shuffled with seed {args.seed}"
    print(f"{len(paths)} shard{'s' if len(paths) != 1 else ''}, {total} samples, {len(classes)} classes, {order} "
          f"({out_dir / 'classes.json'})")
    print(f'data.shards = "{out_dir}/{args.prefix}-{{000000..{len(paths) - 1:06d}}}.tar"')
    return 0
