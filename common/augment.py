"""Decoding, recorded views and exact replay: the one place pixels are made.

A view is recorded as its crop box in source pixels and its flip, `[top, left, height,
width, flip]` (int32), not as an RNG state: the record survives library upgrades, and
`replay(image, record, size, cut)` rebuilds the exact uint8 pixels the teacher saw.

Two ways to cut a view (`augment.cut`, recorded in the manifest; stage two replays with the cache's):

- `torch`: torch's uint8 antialiased bicubic resize of the crop (integer arithmetic: the same bytes with
  and without AVX2/AVX-512), ~4x fewer core-ms than Pillow's. The default.
- `pil`: Pillow's bicubic resize with the crop as its box (filter taps may reach past the box into the
  image). Caches made before `augment.cut` existed were cut this way.

The two differ in a few % of pixels by 1-17 levels, so a cache is replayed with the path that made it, and
`replay_probe` lets a machine check that its libraries still cut the way the extracting machine's did.
"""
from __future__ import annotations

import io
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.runtime import seed_from

VIEW_FIELDS = ("top", "left", "height", "width", "flip")
CENTER_CROP = 0.875  # ImageNet evaluation's resize 256 / crop 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # pixel normalisation of the teachers and the student
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes) -> Image.Image:
    """Image bytes -> fully loaded RGB image. Grayscale, 16-bit, CMYK, palette and alpha become RGB
    (alpha is composited on white). Raises on undecodable or truncated data."""
    if not data:
        raise ValueError("empty image entry (0 bytes)")
    img = Image.open(io.BytesIO(data))
    img.load()  # truncated files raise here, not later in a worker's resize
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I") else max(float(arr.max()), 1e-12)
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_error(e: Exception) -> str:
    """Why an image could not be decoded, as text fit to store: no object reprs or memory addresses (PIL
    names its stream `<_io.BytesIO object at 0x7f...>`), so reruns record the same bytes."""
    text = re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", f"{type(e).__name__}: {e}")
    return re.sub(r"0x[0-9a-fA-F]{6,}", "<address>", text)[:300]


def decode_samples(samples: Iterable[dict], reject: Callable[[dict], str | None] | None = None,
                   decode: Callable[[bytes], Image.Image] = decode_image
                   ) -> Iterator[tuple[dict, Image.Image | None, str | None]]:
    """The decode-and-skip stage of every reader of source samples (extraction, k-NN, diversity): each sample
    as (sample, its RGB image, None), or as (sample, None, why) when it is skipped: `reject(sample)` names a
    reason, it has no image entry, or its image does not decode (decode_error's text). A bad image is data,
    not a crash: the caller counts or records it and goes on."""
    for s in samples:
        why = reject(s) if reject is not None else None
        if why is None and s["image"] is None:
            why = "no image entry (.jpg/.jpeg/.png/.webp)"
        if why is not None:
            yield s, None, why
            continue
        try:
            img = decode(s["image"])
        except Exception as e:  # noqa: BLE001 - any decoder error is the sample's, not the run's
            yield s, None, decode_error(e)
            continue
        yield s, img, None


def pixel_scale(device=None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalisation's mean and std (per channel, of pixels in [0, 1]) on the uint8 scale: two fp32
    [1, 3, 1, 1] tensors on `device`, made once and passed to normalize_pixels for every batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize_pixels(x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels [B, 3, H, W] -> (x - mean) / std in fp32, mean and std from pixel_scale (default: ImageNet's,
    made on x's device)."""
    if mean is None or std is None:
        mean, std = pixel_scale(x.device)
    return (x.float() - mean) / std


def center_view(height: int, width: int, crop: float = CENTER_CROP) -> np.ndarray:
    """Evaluation's view: the central square covering `crop` of the shorter side, as a view record [1, 5]
    (no flip)."""
    side = max(1, min(height, width, round(min(height, width) * crop)))
    return np.array([[(height - side) // 2, (width - side) // 2, side, side, 0]], np.int32)


def _rng(seed: int, key: str, view: int) -> np.random.Generator:
    return np.random.default_rng(seed_from(seed, key, view))


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: central crop with the ratio clamped into range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def sample_views(seed: int, key: str, height: int, width: int, views: int,
                 scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5) -> np.ndarray:
    """The `views` recorded views of one image, deterministic in (seed, key, view index): [V, 5] int32."""
    out = np.zeros((views, 5), np.int32)
    for v in range(views):
        rng = _rng(seed, key, v)
        out[v, :4] = random_resized_crop_box(rng, height, width, tuple(scale), tuple(ratio))
        out[v, 4] = rng.uniform() < flip
    return out


CUTS = ("torch", "pil")  # the first is the default of new caches


def replay(img: Image.Image, record, size: int, cut: str) -> torch.Tensor:
    """(decoded image, view record) -> the view's pixels, uint8 [3, size, size] (bicubic, as MAE)."""
    return replay_views(img, np.asarray(record)[None], size, cut)[0]


def replay_views(img: Image.Image, records: np.ndarray, size: int, cut: str) -> torch.Tensor:
    """All recorded views [V, 5] of one decoded image: uint8 [V, 3, size, size], cut by `cut` (see CUTS)."""
    if cut == "torch":
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]  # [1, 3, H, W], HWC memory

        def cut_one(top, left, h, w):
            return F.interpolate(pixels[..., top:top + h, left:left + w], size=(size, size), mode="bicubic",
                                 antialias=True, align_corners=False)[0]
    elif cut == "pil":
        def cut_one(top, left, h, w):
            view = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            return torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1)
    else:
        raise ValueError(f"unknown cut {cut!r} (choose from {', '.join(CUTS)})")
    out = torch.empty(len(records), 3, size, size, dtype=torch.uint8)
    for v, (top, left, h, w, flip) in enumerate(np.asarray(records).tolist()):
        view = cut_one(top, left, h, w)
        out[v] = view.flip(-1) if flip else view
    return out


def replay_probe(cut: str) -> str:
    """crc32 of a fixed set of views of a fixed image, cut by `cut`: the manifest records it at extraction, and a
    machine whose torch / Pillow cut other pixels (another version's kernel) finds out before it trains."""
    rng = np.random.default_rng(20231124)
    yy, xx = np.mgrid[0:157, 0:211]
    pix = np.stack([xx * 1.2, yy * 1.6, (xx + yy) * 0.7], -1) + rng.normal(0, 20, (157, 211, 3))
    img = Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8))
    records = np.array([[0, 0, 157, 211, 0], [10, 31, 40, 57, 1], [3, 5, 150, 190, 1], [60, 100, 97, 111, 0]], np.int32)
    return f"{zlib.crc32(replay_views(img, records, 96, cut).numpy().tobytes()):08x}"


def view_order(seed: int, key: str, views: int) -> np.ndarray:
    """Which cached view each epoch uses: epoch e takes view_order(...)[e % V], so every view is seen
    once before any repeats."""
    return _rng(seed, key, -1).permutation(views)
