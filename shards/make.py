"""Writing source shards: an ImageNet-layout folder (one subfolder per class) -> WebDataset tars.

Each sample keeps the original image bytes, its `.cls` label, and `.json` with the class name and
the file's relative path; `classes.json` maps class names to indices. The order is sorted, so the
same folder always gives the same shards.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from shards.features import write_json_atomic
from shards.source import IMAGE_EXTS


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000,
                 total: int | None = None, progress: bool = True) -> list[Path]:
    """samples: dicts with `key` (no dots), `image` (bytes), `ext`, `cls` and optional `meta`.
    Shards are written as `<prefix>-000000.tar`, ... (each to a temporary name, then renamed)."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar = f = None
    for i, s in enumerate(tqdm(samples, total=total, unit="img", disable=not progress, desc="make-shards")):
        if i % maxcount == 0:
            if tar is not None:
                tar.close(), f.close(), os.replace(f.name, paths[-1])
            paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
            f = open(f"{paths[-1]}.tmp", "wb")
            tar = wds.TarWriter(f, encoder=False, mtime=0.0)
        entry = {"__key__": s["key"], s["ext"]: s["image"], "cls": str(s["cls"]).encode()}
        if s.get("meta") is not None:
            entry["json"] = json.dumps(s["meta"]).encode()
        tar.write(entry)
    if tar is not None:
        tar.close(), f.close(), os.replace(f.name, paths[-1])
    return paths


def folder_samples(folder: Path, classes: list[str]):
    for idx, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTS)
        for p in files:
            rel = p.relative_to(folder)
            key = f"{cls}/{p.stem}".replace(".", "_")
            yield {"key": key, "image": p.read_bytes(), "ext": p.suffix[1:].lower(), "cls": idx,
                   "meta": {"class": cls, "path": str(rel)}}


def make_shards(folder: str | Path, out_dir: str | Path, maxcount: int = 1000, prefix: str = "train",
                progress: bool = True) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (expected one subfolder per class)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class subfolders (ImageNet layout: {folder}/<class>/<image>)")
    total = sum(1 for c in classes for p in (folder / c).rglob("*") if p.suffix[1:].lower() in IMAGE_EXTS)
    paths = write_shards(folder_samples(folder, classes), out_dir, prefix, maxcount, total, progress)
    write_json_atomic(Path(out_dir) / "classes.json", {c: i for i, c in enumerate(classes)})
    return paths
