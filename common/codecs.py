"""Token codecs: teacher tokens [T, C] (fp32) of one view <-> one packed array, then a Blosc byte compressor.

A codec is a pure transform (`encode` / `decode`) plus the byte compressor both cache formats
use (numcodecs.Blosc in tars, zarr's BloscCodec in Zarr groups), so a `wds` and a `zarr` cache
of the same input decode to the same tokens. docs/BENCHMARKS.md measures them all.

- `fp32`       raw float32, uncompressed (the baseline of the codec study)
- `bf16`       the teacher's 16-bit output, uncompressed
- `bf16-zstd`  lossless for the 16-bit output: bf16 bits, byte shuffle, zstd ("auto" for ViT teachers)
- `bf16z-zstd` the same bits, lossless, exact zeros as a bitmap and the nonzero values' bytes as two planes
               (`pack_zero_bitmap`), zstd ("auto" for convnet teachers): ~19 % smaller and ~2x faster to
               compress than `bf16-zstd` on post-ReLU tokens (about half zeros); the training step unpacks it on
               its device
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

import math
import zlib
from dataclasses import dataclass

import numcodecs
import numpy as np
import torch

FORMAT_VERSION = 2  # 2: view-major tokens, a per-sample index (shards/index.py, shards/writer.py)

U8_TARGET_COS = 0.9995  # per token; the goal is >= 0.999 (docs/BENCHMARKS.md), the margin absorbs teacher noise
U8_MIN_LEVELS = 16      # the coarsest step is (max - min) / 16: |error| <= (max - min) / 32


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., C] x [..., C] -> cosine per token [...]; two all-zero tokens count as identical."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp(min=1e-30)
    return torch.where((na == 0) & (nb == 0), 1.0, cos)


def quantize_u8(tokens: torch.Tensor, target_cos: float | None, min_levels: int = U8_MIN_LEVELS,
                sync_free: bool | None = None):
    """tokens [N, C] fp32 (any device) -> q [N, C] uint8, lo [N], scale [N] (scale < 0: square-root companded).

    target_cos None: 255 levels per token (the first scheme). Else each token gets the coarsest step
    whose decoded token keeps cosine >= target_cos, between (max - min) / 255 and (max - min) / min_levels.
    The step is predicted from the token's energy (uniform rounding error: 1 - cos ~ n s^2 / 24 |x|^2 over
    the n values off the grid), then checked exactly and shrunk for the tokens that miss.

    sync_free (default: on a GPU): every round runs on every token, so nothing waits for the device; else rounds
    nobody needs are skipped. The result is the same."""
    tokens = tokens.float()
    sync_free = tokens.is_cuda if sync_free is None else sync_free
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
    if target_cos is None:
        return q.clamp(0, 255).to(torch.uint8), lo, step
    cos = token_cosines(q * step[:, None] + lo[:, None], tokens)
    for shrink in (0.7, 0.5, 0.0):  # 0.0: the last round takes the finest step
        todo = (cos < target_cos) & (step > finest)
        if not sync_free and not todo.any():
            break
        step = torch.where(todo, torch.maximum(step * shrink, finest), step)
        q = torch.where(todo[:, None], torch.round((tokens - lo[:, None]) / step[:, None]), q)
        cos = torch.where(todo, token_cosines(q * step[:, None] + lo[:, None], tokens), cos)
    q = q.clamp(0, 255).to(torch.uint8)
    miss = cos < target_cos
    if sync_free or miss.any():
        q, lo, step = _compand(tokens, q, lo, step, miss, cos)
    return q, lo, step


def _compand(tokens, q, lo, scale, miss, cos):
    """Tokens that even 255 linear levels leave below the target (`miss`: a few huge channels): quantize
    sign(x) sqrt|x| instead, which spends the levels on the many small values; kept where it is better."""
    y = torch.sign(tokens) * torch.sqrt(tokens.abs())
    ylo = y.amin(-1)
    ystep = torch.where(miss, (y.amax(-1) - ylo) / 255, 1.0)  # 1.0 where unused (a flat token's span is 0)
    yq = torch.round((y - ylo[:, None]) / ystep[:, None]).clamp(0, 255).to(torch.uint8)
    better = miss & (token_cosines(_uncompand(yq.float() * ystep[:, None] + ylo[:, None]), tokens) > cos)
    return (torch.where(better[:, None], yq, q), torch.where(better, ylo, lo), torch.where(better, -ystep, scale))


def _uncompand(y):
    return y * y.abs()


def pack_u8(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., C] uint8, lo / scale [...] float32 -> [..., C + 8] uint8: each token's lo and scale as 8 trailing bytes."""
    side = torch.stack([lo.float(), scale.float()], -1).view(torch.uint8)  # [..., 8]
    return torch.cat([q, side], -1)


_BIT = 2 ** torch.arange(7, -1, -1, dtype=torch.int32)  # packbits order: the first value is the high bit


def pack_zero_bitmap(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns [..., T, C] (int16) -> uint8 [..., T, 2C + ceil(C/8)], the bytes of one view being
    [a bitmap of the nonzero values, ceil(C/8) bytes per token | the high bytes of the nonzero values, in order |
    their low bytes | zeros]. A post-ReLU view is about half exact zeros: they cost one bit instead of two bytes,
    and the entropy coder gets ~half the bytes to model. Fixed size (a Zarr chunk), no data-dependent shapes
    (nothing waits for a GPU): values are scattered to their places, zeros to a slot that is cut off."""
    *lead, t, c = bits.shape
    v, n, b = math.prod(lead), t * c, (c + 7) // 8
    nz = (bits != 0).reshape(v, t, c)
    padded = torch.cat([nz, nz.new_zeros(v, t, 8 * b - c)], -1).view(v, t, b, 8)
    bitmap = (padded.int() * _BIT.to(bits.device)).sum(-1).to(torch.uint8).view(v, t * b)
    nz = nz.view(v, n)
    word = bits.reshape(v, n).int() & 0xFFFF
    rank = nz.cumsum(-1) - 1                      # place of each nonzero value among the nonzero values
    count = rank[:, -1:] + 1                      # nonzero values of each view
    dump = t * b + 2 * n                          # zeros (whose bytes are 0) all go here, then it is cut off
    out = torch.zeros(v, dump + 1, dtype=torch.uint8, device=bits.device)
    out[:, :t * b] = bitmap
    out.scatter_(1, torch.where(nz, t * b + rank, dump), (word >> 8).to(torch.uint8))
    out.scatter_(1, torch.where(nz, t * b + count + rank, dump), (word & 0xFF).to(torch.uint8))
    return out[:, :dump].reshape(*lead, t, 2 * c + b)


def unpack_zero_bitmap(packed: torch.Tensor) -> torch.Tensor:
    """pack_zero_bitmap's output [..., T, W] (any device) -> the bf16 bit patterns [..., T, C] (int16)."""
    *lead, t, w = packed.shape
    c = next((c for c in range(max(1, 8 * w // 17 - 1), 8 * w // 17 + 2) if 2 * c + (c + 7) // 8 == w), None)
    if c is None:
        raise ValueError(f"a zero-bitmap view row has 2C + ceil(C/8) bytes; {w} fits no channel count C")
    v, n, b = math.prod(lead), t * c, (c + 7) // 8
    flat = packed.reshape(v, t * w)
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    nz = ((flat[:, :t * b].view(v, t, b, 1) >> shifts) & 1).view(v, t, 8 * b)[..., :c].reshape(v, n).bool()
    rank = (nz.cumsum(-1) - 1).clamp(min=0)
    count = nz.sum(-1, keepdim=True)
    hi = flat.gather(1, t * b + rank).int()
    lo = flat.gather(1, (t * b + count + rank).clamp(max=t * w - 1)).int()
    word = torch.where(nz, (hi << 8) | lo, 0)
    return torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16).view(*lead, t, c)


@dataclass(frozen=True)
class TokenCodec:
    name: str
    kind: str                    # "fp32", "bf16", "u8" (cosine-sized levels), "u8lin" (255 levels)
    shuffle: int | None          # Blosc shuffle mode of `q`, None = no compression
    clevel: int = 1              # zstd level 1 with 256 KiB blocks: smaller AND 2-4x faster than level 3 here
    cname: str = "zstd"
    blocksize: int = 1 << 18     # bytes per Blosc block (0 = Blosc's choice)
    zero_bitmap: bool = False    # bf16 only: exact zeros as a bitmap, the nonzero values' bytes as two planes

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
        if self.zero_bitmap:
            return (tokens, 2 * channels + (channels + 7) // 8), "uint8"
        return (tokens, channels), "uint16" if self.kind == "bf16" else "float32"

    def encode_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., T, C] (fp32 or the teacher's dtype, on the teacher's device) -> packed [..., T, C'] on the
        same device (int16 bit patterns for bf16 codecs; see packed_spec). Extraction encodes on the teacher's
        device, so on a GPU neither the rounding nor the u8 quantization costs CPU time, and half (bf16) or a
        quarter (u8) of the fp32 bytes cross to the host."""
        if self.kind == "fp32":
            return tokens.float().contiguous()
        if self.kind == "bf16":
            bits = tokens.to(torch.bfloat16).contiguous().view(torch.int16)  # round to nearest even
            return pack_zero_bitmap(bits) if self.zero_bitmap else bits
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
        if self.kind == "bf16" and not self.zero_bitmap:
            return from_bf16_bits(packed)
        return self.decode_tensor(torch.from_numpy(np.array(packed, np.uint8))).numpy()

    def to_tensor(self, packed: np.ndarray) -> torch.Tensor:
        """One view for the training loader, as stored: a bfloat16 tensor for bf16 codecs, the packed uint8
        array for u8 codecs (2x / 4x fewer bytes than fp32 through the DataLoader's queue); the step decodes
        the batch on its device with `decode_tensor`."""
        packed = np.array(packed, copy=True)
        return self.as_loaded(torch.from_numpy(packed.view(np.int16) if packed.dtype == np.uint16 else packed))

    def as_loaded(self, bits: torch.Tensor) -> torch.Tensor:
        """Packed views as a tensor of their bits (uint8, int16 for uint16 patterns, float32) -> what the loader
        hands the step: bf16 bit patterns as bfloat16, the rest as stored."""
        return bits.view(torch.bfloat16) if self.kind == "bf16" and not self.zero_bitmap else bits

    def decode_tensor(self, packed: torch.Tensor) -> torch.Tensor:
        """`to_tensor`'s output (batched, on any device) -> tokens [..., T, C] fp32, as `decode` computes them."""
        if self.zero_bitmap:
            return unpack_zero_bitmap(packed).view(torch.bfloat16).float()
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

    def decompress(self, data: bytes, tokens: int, channels: int, out: np.ndarray | None = None) -> np.ndarray:
        """Stored bytes -> the packed view [T, C'], written into `out` when given (the loader's batch buffer)."""
        shape, dtype = self.packed_spec(tokens, channels)
        comp = self.blosc()
        if comp is None:
            view = np.frombuffer(data, dtype=dtype).reshape(shape)
            return view if out is None else np.copyto(out, view) or out
        # into a buffer of the view's size: a frame whose header claims more is an error, never that allocation
        return comp.decode(data, out=np.empty(shape, dtype) if out is None else out)


CODECS = {c.name: c for c in (
    TokenCodec("fp32", "fp32", None),
    TokenCodec("bf16", "bf16", None),
    TokenCodec("bf16-zstd", "bf16", numcodecs.Blosc.SHUFFLE),
    TokenCodec("bf16z-zstd", "bf16", numcodecs.Blosc.NOSHUFFLE, blocksize=1 << 19, zero_bitmap=True),
    TokenCodec("bf16-lz4", "bf16", numcodecs.Blosc.SHUFFLE, clevel=5, cname="lz4"),
    TokenCodec("u8-zstd", "u8", numcodecs.Blosc.BITSHUFFLE),
    TokenCodec("u8lin-zstd", "u8lin", numcodecs.Blosc.NOSHUFFLE),
)}


# `cache.codec = "auto"` (the default): the lossless codec that suits the teacher's kind (docs/BENCHMARKS.md,
# section 7). A convnet's last stage ends in a ReLU (about half its values, 91 % of EfficientNet-Lite0's, are exact
# zeros): the zero bitmap makes its views 19-47 % smaller and their compression 2-3x cheaper. A ViT's tokens come out
# of a LayerNorm and have no zeros: the bitmap saves 2 % there, and packing and unpacking it cost ~8 ms a view on a
# core (35-50x plain bf16's), on the GPU in every training step.
AUTO = "auto"
CODEC_FOR_KIND = {"convnet": "bf16z-zstd", "vit": "bf16-zstd"}


def get_codec(name: str) -> TokenCodec:
    from common.config import ConfigError

    if name not in CODECS:
        raise ConfigError(f"cache.codec: unknown codec {name!r} (choose from {AUTO}, {', '.join(CODECS)})")
    return CODECS[name]


def check_codec_name(name: str) -> None:
    """A ConfigError before any work if `name` is neither "auto" nor a codec."""
    if name != AUTO:
        get_codec(name)


def codec_for(name: str, kind: str) -> TokenCodec:
    """`cache.codec` for a teacher of `kind` ("convnet" or "vit"): "auto" -> CODEC_FOR_KIND[kind], else the named one."""
    return get_codec(CODEC_FOR_KIND[kind] if name == AUTO else name)


def view_crc32(packed: np.ndarray) -> int:
    """Checksum of one stored view (its packed array, the same in both formats); recorded, checked on read."""
    return zlib.crc32(np.ascontiguousarray(packed).data)
