"""Procedural labelled images for tests and the demo: a few visually distinct classes, varied sizes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("stripes_h", "stripes_v", "checker", "disc", "ring", "gradient", "triangle", "noise")


def synthetic_image(cls: int, rng: np.random.Generator, height: int, width: int, noise: float = 8) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    period = rng.uniform(6, 24)
    name = CLASSES[cls % len(CLASSES)]
    if name == "stripes_h":
        m = (np.sin(yy / period * 2 * np.pi + rng.uniform(0, 6)) > 0).astype(np.float32)
    elif name == "stripes_v":
        m = (np.sin(xx / period * 2 * np.pi + rng.uniform(0, 6)) > 0).astype(np.float32)
    elif name == "checker":
        m = ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float32)
    elif name in ("disc", "ring"):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        r = rng.uniform(0.2, 0.4) * min(height, width)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        m = (d < r).astype(np.float32) if name == "disc" else (np.abs(d - r) < r * 0.25).astype(np.float32)
    elif name == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        m = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    elif name == "triangle":
        img = Image.new("L", (width, height), 0)
        pts = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(3)]
        ImageDraw.Draw(img).polygon(pts, fill=255)
        m = np.asarray(img, np.float32) / 255
    else:
        m = rng.uniform(0, 1, (height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
    pix = m[..., None] * c1 + (1 - m[..., None]) * c2 + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8))


def synthetic_samples(n: int, classes: int = 4, seed: int = 0, size: tuple[int, int] = (64, 160), noise: float = 8,
                      quality: int = 90, width: tuple[int, int] | None = None):
    """n JPEG samples cycling through `classes` classes, with random sides in [size[0], size[1]] (widths in `width` if
    given); pixel `noise` (std) and JPEG `quality` set how many bytes an image takes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = i % classes
        h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        if width is not None:
            w = int(rng.integers(width[0], width[1] + 1))
        buf = io.BytesIO()
        synthetic_image(cls, rng, h, w, noise).save(buf, format="JPEG", quality=quality)
        yield {"key": f"s{seed:03d}_{i:06d}", "image": buf.getvalue(), "ext": "jpg", "cls": cls,
               "meta": {"class": CLASSES[cls % len(CLASSES)]}}
