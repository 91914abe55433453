"""Figures of the teacher study. Similarity maps (the paper's Figure 3): per teacher, a view with numbered query
points and, per query, the cosine similarity of the token under that point to every token of the view, the same
points for every teacher whatever its token grid; `img2vec diversity --maps` and the demo draw them. A bar plot of
each teacher's token diversity and forward GFLOPs (`img2vec diversity --plot`)."""
from __future__ import annotations

import math
import textwrap
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


def shared_queries(grids: dict[str, int], n: int = 3) -> dict[str, list[tuple[int, int]]]:
    """The same n query points for teachers of different token grids ({name: side}): query_tokens on the coarsest
    grid (so they stay distinct on every grid), each point the center of its token there, and on each grid the
    token under that point."""
    ref = min(grids.values())
    points = [((r + 0.5) / ref, (c + 0.5) / ref) for r, c in query_tokens(ref, ref, n)]  # fractions of the view
    return {name: [(int(y * h), int(x * h)) for y, x in points] for name, h in grids.items()}


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
    """`resnet50=/ckpt/dir/dino_resnet50_pretrain.pth` -> `resnet50 (dino_resnet50_pretrain)`: no paths in titles;
    per-teacher options follow (`vit_b=mae.pth,norm=false` -> `vit_b (mae, norm=false)`)."""
    from common.teacher import split_teacher_spec

    arch, weights, options = split_teacher_spec(spec)
    what = ["random init" if weights == "random" else Path(weights).stem]
    return f"{arch} ({', '.join(what + [f'{k}={str(v).lower()}' for k, v in options.items()])})"


def short_key(key: str, width: int = 28) -> str:
    name = key.rsplit("/", 1)[-1]
    return name if len(name) <= width else name[:width - 3] + "..."


def draw_map(path: Path, key: str, pixels: torch.Tensor, tokens: dict[str, torch.Tensor], queries: int = 3) -> None:
    """One PNG per view, `tokens` {teacher label: [T, C]}: a row per teacher, the view with its numbered query points,
    then for each query the cosine similarity of the token under it to every token (the paper's Figure 3), one
    square per token. Bright = similar; a teacher of high token diversity lights up the query's own region, not the
    whole view."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    size = pixels.shape[-1]
    image = pixels.permute(1, 2, 0).numpy()
    grids = {spec: math.isqrt(t.shape[0]) for spec, t in tokens.items()}
    qs = shared_queries(grids, queries)
    sims = {spec: [similarity_map(t, q)[0] for q in qs[spec]] for spec, t in tokens.items()}
    vmin = min(float(m.min()) for maps in sims.values() for m in maps)  # one colour scale per image
    vmin = min(vmin, 0.99)
    rows, cols = len(tokens), 1 + len(next(iter(qs.values())))
    fig = Figure(figsize=(2.2 * cols + 0.7, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)

    def mark(ax, i, q, number, cell):
        row, col = q
        for color, width in (("black", 3.6), (QUERY_COLORS[i % len(QUERY_COLORS)], 2.0)):  # visible on any colour
            ax.add_patch(Rectangle((col * cell - 0.5, row * cell - 0.5), cell, cell, fill=False, edgecolor=color,
                                   linewidth=width))
        if number:
            ax.text(col * cell + 2, row * cell + 2, str(i + 1), color="black", fontsize=8, fontweight="bold",
                    va="top", ha="left", bbox=dict(boxstyle="square,pad=0.1", fc=QUERY_COLORS[i % len(QUERY_COLORS)],
                                                   ec="none"))

    for r, (label, t) in enumerate(tokens.items()):
        td, h = float(token_diversity_per_image(t[None])), grids[label]
        ax = axes[r, 0]
        ax.imshow(image)
        ax.set_title(f"{h}x{h} tokens, TD {td:.3f}", fontsize=8)
        ax.set_ylabel("\n".join(textwrap.wrap(label, 26)), fontsize=8)
        for i, q in enumerate(qs[label]):
            mark(ax, i, q, number=True, cell=size / h)
        for i, (q, sim) in enumerate(zip(qs[label], sims[label])):
            ax = axes[r, 1 + i]
            im = ax.imshow(sim.numpy(), cmap="viridis", vmin=vmin, vmax=1.0, interpolation="nearest",
                           extent=(-0.5, size - 0.5, size - 0.5, -0.5))
            mark(ax, i, q, number=False, cell=size / h)
            ax.set_title(f"query {i + 1} vs every token", fontsize=8)
        fig.colorbar(im, ax=list(axes[r, 1:]), fraction=0.03, pad=0.01, label="cosine")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(short_key(key), fontsize=9)
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


def draw_bars(path: str | Path, rows: list[dict]) -> Path:
    """`img2vec diversity --plot`: a bar per teacher row, its TD (mean, and the spread over images as an error bar)
    beside its forward GFLOPs per view (log scale), each labelled with the token grid."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"{r.get('label', r['teacher'])}\n{'x'.join(map(str, r.get('grid', [])))} x {r.get('channels', '?')}"
             for r in rows]
    y = list(range(len(rows)))[::-1]  # the first row on top
    fig = Figure(figsize=(9, 0.9 * len(rows) + 1.4), layout="constrained")
    td_ax, flop_ax = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    td_ax.barh(y, [r["token_diversity"] for r in rows], xerr=[r.get("token_diversity_std", 0) for r in rows],
               color="#4c72b0", capsize=3)
    td_ax.set_yticks(y, names, fontsize=8)
    td_ax.set_xlabel("token diversity (mean +- std over images)")
    td_ax.set_xlim(0, 1)
    flop_ax.barh(y, [r.get("gflops") or 0 for r in rows], color="#dd8452")
    if any(r.get("gflops") for r in rows):  # a cache's row has none
        flop_ax.set_xscale("log")
    flop_ax.set_xlabel("teacher GFLOPs per view (log)")
    for yi, r in zip(y, rows):
        td_ax.text(r["token_diversity"] + r.get("token_diversity_std", 0) + 0.02, yi, f"{r['token_diversity']:.3f}",
                   va="center", fontsize=8)
        if r.get("gflops"):
            flop_ax.text(r["gflops"], yi, f" {r['gflops']:.3g}", va="center", fontsize=8)
    fig.suptitle("Teacher study: token diversity and cost", fontsize=10)
    fig.savefig(path, dpi=100)
    return path
