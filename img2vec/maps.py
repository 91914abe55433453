"""Similarity maps (the paper's Figure 3): per teacher, a view with numbered query tokens and, per query,
the cosine similarity of that token to every token of the view. `img2vec diversity --maps` and the demo
draw them."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from common.stats import token_diversity_per_image

QUERY_COLORS = ("#ff3b30", "#ffcc00", "#00e5ff", "#ff66ff", "#ffffff")


def query_tokens(h: int, w: int, n: int = 3) -> list[tuple[int, int]]:
    """Up to n distinct query tokens (row, col) spread over an h x w grid: the center, then the centers of the
    top-left, bottom-right, top-right and bottom-left quadrants."""
    a, b, c, d = h // 4, h - 1 - h // 4, w // 4, w - 1 - w // 4
    out = []
    for q in ((h // 2, w // 2), (a, c), (b, d), (a, d), (b, c)):
        if q not in out:
            out.append(q)
    return out[:n]


def similarity_map(tokens: torch.Tensor, query: tuple[int, int] | None = None):
    """tokens [T, C] of a square view -> cosine of the query token (default: the center) to every token [h, w],
    and the query's (row, col)."""
    h = math.isqrt(tokens.shape[0])
    if h * h != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} tokens do not form a square grid")
    u = F.normalize(tokens.float(), dim=-1)
    row, col = query if query is not None else (h // 2, h // 2)
    return (u @ u[row * h + col]).view(h, h), (row, col)


def teacher_label(spec: str) -> str:
    """`resnet50=/ckpt/dir/dino_resnet50_pretrain.pth` -> `resnet50 (dino_resnet50_pretrain)`: no paths in titles."""
    arch, eq, weights = spec.partition("=")
    return f"{arch} ({Path(weights).stem})" if eq else f"{arch} (random init)"


def short_key(key: str, width: int = 28) -> str:
    name = key.rsplit("/", 1)[-1]
    return name if len(name) <= width else name[:width - 3] + "..."


def draw_map(path: Path, key: str, pixels: torch.Tensor, tokens: dict[str, torch.Tensor], queries: int = 3) -> None:
    """One PNG per view: a row per teacher, the view with its numbered query tokens, then for each query the
    cosine similarity of that token to every token (the paper's Figure 3), one square per token. Bright =
    similar; a teacher of high token diversity lights up the query's own region, not the whole view."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    size = pixels.shape[-1]
    image = pixels.permute(1, 2, 0).numpy()
    h = math.isqrt(next(iter(tokens.values())).shape[0])
    qs = query_tokens(h, h, queries)
    sims = {spec: [similarity_map(t, q)[0] for q in qs] for spec, t in tokens.items()}
    vmin = min(float(m.min()) for maps in sims.values() for m in maps)  # one colour scale per image
    vmin = min(vmin, 0.99)
    rows, cols = len(tokens), 1 + len(qs)
    fig = Figure(figsize=(2.2 * cols + 0.7, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    cell = size / h

    def mark(ax, i, q, number):
        row, col = q
        for color, width in (("black", 3.6), (QUERY_COLORS[i % len(QUERY_COLORS)], 2.0)):  # visible on any colour
            ax.add_patch(Rectangle((col * cell - 0.5, row * cell - 0.5), cell, cell, fill=False, edgecolor=color,
                                   linewidth=width))
        if number:
            ax.text(col * cell + 2, row * cell + 2, str(i + 1), color="black", fontsize=8, fontweight="bold",
                    va="top", ha="left", bbox=dict(boxstyle="square,pad=0.1", fc=QUERY_COLORS[i % len(QUERY_COLORS)],
                                                   ec="none"))

    for r, (spec, t) in enumerate(tokens.items()):
        td = float(token_diversity_per_image(t[None]))
        ax = axes[r, 0]
        ax.imshow(image)
        ax.set_title(f"{short_key(key)}\n{teacher_label(spec)}, TD {td:.3f}", fontsize=8)
        for i, q in enumerate(qs):
            mark(ax, i, q, number=True)
        for i, (q, sim) in enumerate(zip(qs, sims[spec])):
            ax = axes[r, 1 + i]
            im = ax.imshow(sim.numpy(), cmap="viridis", vmin=vmin, vmax=1.0, interpolation="nearest",
                           extent=(-0.5, size - 0.5, size - 0.5, -0.5))
            mark(ax, i, q, number=False)
            ax.set_title(f"query {i + 1} vs every token", fontsize=8)
        fig.colorbar(im, ax=list(axes[r, 1:]), fraction=0.03, pad=0.01, label="cosine")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=100)


def write_maps(out_dir: str | Path, maps, queries: int = 3) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (key, pixels, tokens) in enumerate(maps):
        path = out_dir / f"{i:03d}-{key.replace('/', '_')}.png"
        draw_map(path, key, pixels, tokens, queries)
        paths.append(path)
    return paths
