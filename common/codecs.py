"""Token codecs: teacher tokens [T, C] (fp32) of one view <-> one packed array, then a Blosc byte compressor.

A codec is a pure transform (`encode` / `decode`) plus the byte compressor both cache formats
use (numcodecs.Blosc in tars, zarr's BloscCodec in Zarr groups), so a `wds` and a `zarr` cache
of the same input decode to the same tokens. docs/BENCHMARKS.md measures them all.

- `fp32`       raw float32, uncompressed (the baseline of the codec study)
- `bf16`       the teacher's 16-bit output, uncompressed
- `bf16-zstd`  lossless for the 16-bit output: bf16 bits, byte shuffle, zstd (the default)
- `bf16-lz4`   the same bits with lz4: larger, faster to encode and decode
- `u8-zstd`    lossy, sized by the paper's metric: per-token uint8 with the coarsest step that keeps the
               token's cosine >= 0.9995 (at least 16 levels, at most 255; a token 255 linear levels cannot
               bring there is square-root companded instead), zstd. |error| <= (max - min) / 32 of a token
- `u8lin-zstd` lossy, the first scheme: per-token affine uint8 over 255 levels, |error| <= (max - min) / 510

Both u8 codecs store `q` [T, C] uint8 per view with each token's `lo` and `scale` (float32) packed
as 8 trailing bytes of its row, and decode alike: y = q * |scale| + lo, and x = y * |y| where scale < 0
(companded token), else x = y.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numcodecs
import numpy as np
import torch

FORMAT_VERSION = 2  # 2: view-major tokens, a per-sample index (shards/features.py)

U8_TARGET_COS = 0.9995  # per token; DESIGN's goal is >= 0.999, the margin absorbs teacher run-to-run noise
U8_MIN_LEVELS = 16      # the coarsest step is (max - min) / 16: |error| <= (max - min) / 32


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., C] x [..., C] -> cosine per token [...]; two all-zero tokens count as identical."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp(min=1e-30)
    return torch.where((na == 0) & (nb == 0), 1.0, cos)


def quantize_u8(tokens: torch.Tensor, target_cos: float | None, min_levels: int = U8_MIN_LEVELS):
    """tokens [N, C] fp32 (any device) -> q [N, C] uint8, lo [N], scale [N] (scale < 0: square-root companded).

    target_cos None: 255 levels per token (the first scheme). Else each token gets the coarsest step
    whose decoded token keeps cosine >= target_cos, between (max - min) / 255 and (max - min) / min_levels.
    The step is predicted from the token's energy (uniform rounding error: 1 - cos ~ n s^2 / 24 |x|^2 over
    the n values off the grid), then checked exactly and shrunk for the tokens that miss."""
    tokens = tokens.float()
    lo = tokens.amin(-1)
    span = tokens.amax(-1) - lo
    flat = span == 0  # constant tokens (all zero included) are exact with any step
    finest = torch.where(flat, 1.0, span / 255)
    if target_cos is None:
        step = finest
    else:
        off_grid = (tokens != lo[:, None]).sum(-1)
        energy = (tokens * tokens).sum(-1)
        step = torch.sqrt(24 * (1 - target_cos) * 0.8 * energy / off_grid.clamp(min=1))  # 0.8: aim inside
        step = torch.where(flat, 1.0, torch.minimum(torch.maximum(step, finest), span / min_levels))
    q = torch.round((tokens - lo[:, None]) / step[:, None])
    if target_cos is not None:
        cos = token_cosines(q * step[:, None] + lo[:, None], tokens)
        todo = torch.nonzero(cos < target_cos).flatten()
        for shrink in (0.7, 0.5, 0.0):  # 0.0: the last round takes the finest step
            todo = todo[step[todo] > finest[todo]]
            if not len(todo):
                break
            step[todo] = torch.maximum(step[todo] * shrink, finest[todo])
            q[todo] = torch.round((tokens[todo] - lo[todo, None]) / step[todo, None])
            cos[todo] = token_cosines(q[todo] * step[todo, None] + lo[todo, None], tokens[todo])
            todo = todo[cos[todo] < target_cos]
    q = q.clamp(0, 255).to(torch.uint8)
    if target_cos is not None:
        miss = torch.nonzero(cos < target_cos).flatten()
        if len(miss):
            _compand(tokens, q, lo, step, miss, cos[miss])
    return q, lo, step


def _compand(tokens, q, lo, scale, miss, cos) -> None:
    """Tokens that even 255 linear levels leave below the target (a few huge channels): quantize
    sign(x) sqrt|x| instead, which spends the levels on the many small values; kept where it is better."""
    t = tokens[miss]
    y = torch.sign(t) * torch.sqrt(t.abs())
    ylo = y.amin(-1)
    ystep = (y.amax(-1) - ylo) / 255
    yq = torch.round((y - ylo[:, None]) / ystep[:, None]).clamp(0, 255).to(torch.uint8)
    better = token_cosines(_uncompand(yq.float() * ystep[:, None] + ylo[:, None]), t) > cos
    idx = miss[better]
    q[idx], lo[idx], scale[idx] = yq[better], ylo[better], -ystep[better]


def _uncompand(y):
    return y * y.abs()


def pack_u8(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., C] uint8, lo / scale [...] float32 -> [..., C + 8] uint8: each token's lo and scale as 8 trailing bytes."""
    side = torch.stack([lo.float(), scale.float()], -1).view(torch.uint8)  # [..., 8]
    return torch.cat([q, side], -1)


@dataclass(frozen=True)
class TokenCodec:
    name: str
    kind: str                    # "fp32", "bf16", "u8" (cosine-sized levels), "u8lin" (255 levels)
    shuffle: int | None          # Blosc shuffle mode of `q`, None = no compression
    clevel: int = 1              # zstd level 1 with 256 KiB blocks: smaller AND 2-4x faster than level 3 here
    cname: str = "zstd"
    blocksize: int = 1 << 18     # bytes per Blosc block (0 = Blosc's choice)

    @property
    def lossy(self) -> bool:
        return self.kind in ("u8", "u8lin")

    @property
    def error_bound(self) -> str:
        return {"fp32": "exact", "bf16": "exact for the teacher's bf16 output (fp32 rounded to bf16)",
                "u8": f"per-token cosine >= {U8_TARGET_COS} wherever 255 levels reach it; "
                      f"|error| <= (max - min) / {2 * U8_MIN_LEVELS} per token",
                "u8lin": "|error| <= (max - min) / 510 per token"}[self.kind]

    def max_abs_error(self, tokens: np.ndarray) -> np.ndarray:
        """The elementwise bound on |decode(encode(tokens)) - tokens| for fp32 tokens [..., C], as
        `error_bound` states it (no slack for float rounding or teacher noise: callers add theirs)."""
        span = tokens.max(-1, keepdims=True) - tokens.min(-1, keepdims=True)
        if self.kind == "u8":
            return np.broadcast_to(span / (2 * U8_MIN_LEVELS), tokens.shape)
        if self.kind == "u8lin":
            return np.broadcast_to(span / 510, tokens.shape)
        if self.kind == "bf16":
            return np.abs(tokens) * 2.0 ** -8
        return np.zeros_like(tokens)

    def packed_spec(self, tokens: int, channels: int) -> tuple[tuple[int, int], str]:
        """(shape, dtype) of one stored view. u8 codecs pack each token's `lo` and `scale` (float32) as
        8 trailing bytes of its row, so a view is ONE array: one read, one checksum, one Zarr chunk."""
        if self.lossy:
            return (tokens, channels + 8), "uint8"
        return (tokens, channels), "uint16" if self.kind == "bf16" else "float32"

    def encode_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., T, C] (fp32 or the teacher's dtype, on the teacher's device) -> packed [..., T, C'] on the
        same device (int16 bit patterns for bf16 codecs; see packed_spec). Extraction encodes on the teacher's
        device, so on a GPU neither the rounding nor the u8 quantization costs CPU time, and half (bf16) or a
        quarter (u8) of the fp32 bytes cross to the host."""
        if self.kind == "fp32":
            return tokens.float().contiguous()
        if self.kind == "bf16":
            return tokens.to(torch.bfloat16).contiguous().view(torch.int16)  # round to nearest even
        q, lo, scale = quantize_u8(tokens.reshape(-1, tokens.shape[-1]), U8_TARGET_COS if self.kind == "u8" else None)
        return pack_u8(q, lo, scale).reshape(*tokens.shape[:-1], tokens.shape[-1] + 8)

    @staticmethod
    def to_numpy(packed: torch.Tensor) -> np.ndarray:
        """encode_tensor's output -> the numpy array the shard writers store (uint16 for bf16 bit patterns)."""
        out = packed.cpu().numpy()
        return out.view(np.uint16) if out.dtype == np.int16 else out

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [..., T, C] fp32 -> packed [..., T, C'] (see packed_spec), on the CPU."""
        return self.to_numpy(self.encode_tensor(torch.from_numpy(np.ascontiguousarray(tokens, np.float32))))

    def decode(self, packed: np.ndarray) -> np.ndarray:
        """packed [..., T, C'] -> tokens [..., T, C] fp32."""
        if self.kind == "fp32":
            return packed.astype(np.float32)  # a copy: stored arrays may be read-only buffers
        if self.kind == "bf16":
            return from_bf16_bits(packed)
        return self.decode_tensor(torch.from_numpy(np.array(packed, np.uint8))).numpy()

    def to_tensor(self, packed: np.ndarray) -> torch.Tensor:
        """One view for the training loader, as stored: a bfloat16 tensor for bf16 codecs, the packed uint8
        array for u8 codecs (2x / 4x fewer bytes than fp32 through the DataLoader's queue); the step decodes
        the batch on its device with `decode_tensor`."""
        packed = np.array(packed, copy=True)
        if self.kind == "bf16":
            return torch.from_numpy(packed.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(packed)

    def decode_tensor(self, packed: torch.Tensor) -> torch.Tensor:
        """`to_tensor`'s output (batched, on any device) -> tokens [..., T, C] fp32, as `decode` computes them."""
        if not self.lossy:
            return packed.float()
        side = packed[..., -8:].contiguous().view(torch.float32)  # [..., T, 2]: lo, scale
        lo, scale = side[..., 0:1], side[..., 1:2]
        y = packed[..., :-8].float() * scale.abs() + lo
        return torch.where(scale < 0, y * y.abs(), y)  # companded tokens (scale < 0): x = y |y|

    def blosc(self) -> numcodecs.Blosc | None:
        if self.shuffle is None:
            return None
        return numcodecs.Blosc(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, blocksize=self.blocksize)

    def compress(self, packed: np.ndarray) -> bytes:
        """One packed view -> the bytes a wds cache stores (Blosc, or raw)."""
        comp = self.blosc()
        return bytes(comp.encode(np.ascontiguousarray(packed))) if comp else np.ascontiguousarray(packed).tobytes()

    def decompress(self, data: bytes, tokens: int, channels: int) -> np.ndarray:
        shape, dtype = self.packed_spec(tokens, channels)
        comp = self.blosc()
        raw = comp.decode(data) if comp else data
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


CODECS = {c.name: c for c in (
    TokenCodec("fp32", "fp32", None),
    TokenCodec("bf16", "bf16", None),
    TokenCodec("bf16-zstd", "bf16", numcodecs.Blosc.SHUFFLE),
    TokenCodec("bf16-lz4", "bf16", numcodecs.Blosc.SHUFFLE, clevel=5, cname="lz4"),
    TokenCodec("u8-zstd", "u8", numcodecs.Blosc.BITSHUFFLE),
    TokenCodec("u8lin-zstd", "u8lin", numcodecs.Blosc.NOSHUFFLE),
)}


def get_codec(name: str) -> TokenCodec:
    from common.config import ConfigError

    if name not in CODECS:
        raise ConfigError(f"cache.codec: unknown codec {name!r} (choose from {', '.join(CODECS)})")
    return CODECS[name]


def view_crc32(packed: np.ndarray) -> int:
    """Checksum of one stored view (its packed array, the same in both formats); recorded, checked on read."""
    return zlib.crc32(np.ascontiguousarray(packed).data)
