"""Token codecs: teacher tokens [V, T, C] (fp32) <-> a few small arrays, then a Blosc byte compressor.

A codec is a pure transform (`encode` / `decode`) plus the byte compressor both cache formats
use (numcodecs.Blosc in tars, zarr's BloscCodec in Zarr groups), so a `wds` and a `zarr` cache
of the same input decode to the same tokens.

- `fp32`      raw float32, uncompressed (the baseline of the codec study)
- `bf16`      the teacher's 16-bit output, uncompressed
- `bf16-zstd` lossless for the 16-bit output: bf16 bits, byte shuffle, zstd
- `u8-zstd`   lossy: per-token affine uint8, |error| <= (max - min) / 510 of that token, bitshuffle, zstd
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numcodecs
import numpy as np
import torch

FORMAT_VERSION = 1


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even, as torch does."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TokenCodec:
    name: str
    kind: str                    # "fp32", "bf16", "u8"
    shuffle: int | None          # Blosc shuffle mode, None = no compression
    clevel: int = 3

    @property
    def lossy(self) -> bool:
        return self.kind == "u8"

    @property
    def error_bound(self) -> str:
        return {"fp32": "exact", "bf16": "exact for the teacher's bf16 output (fp32 rounded to bf16)",
                "u8": "|error| <= (max - min) / 510 per token"}[self.kind]

    def array_specs(self, views: int, tokens: int, channels: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of the arrays one sample is stored as."""
        if self.kind == "u8":
            return {"q": ((views, tokens, channels), "uint8"), "lo": ((views, tokens), "float32"),
                    "scale": ((views, tokens), "float32")}
        return {"q": ((views, tokens, channels), "uint16" if self.kind == "bf16" else "float32")}

    def encode(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """tokens [V, T, C] fp32 -> arrays."""
        tokens = np.ascontiguousarray(tokens, np.float32)
        if self.kind == "fp32":
            return {"q": tokens}
        if self.kind == "bf16":
            return {"q": to_bf16_bits(tokens)}
        lo = tokens.min(-1)
        scale = (tokens.max(-1) - lo) / 255.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint((tokens - lo[..., None]) / scale[..., None])
        return {"q": np.clip(q, 0, 255).astype(np.uint8), "lo": lo.astype(np.float32), "scale": scale}

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """arrays -> tokens [V, T, C] fp32."""
        q = arrays["q"]
        if self.kind == "fp32":
            return q.astype(np.float32, copy=False)
        if self.kind == "bf16":
            return from_bf16_bits(q)
        return q.astype(np.float32) * arrays["scale"][..., None] + arrays["lo"][..., None]

    def blosc(self, name: str) -> numcodecs.Blosc | None:
        if self.shuffle is None:
            return None
        shuffle = self.shuffle if name == "q" else numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(cname="zstd", clevel=self.clevel, shuffle=shuffle)

    def to_bytes(self, name: str, array: np.ndarray) -> bytes:
        comp = self.blosc(name)
        return bytes(comp.encode(np.ascontiguousarray(array))) if comp else np.ascontiguousarray(array).tobytes()

    def from_bytes(self, name: str, data: bytes, shape, dtype) -> np.ndarray:
        comp = self.blosc(name)
        raw = comp.decode(data) if comp else data
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


CODECS = {c.name: c for c in (
    TokenCodec("fp32", "fp32", None),
    TokenCodec("bf16", "bf16", None),
    TokenCodec("bf16-zstd", "bf16", numcodecs.Blosc.SHUFFLE),
    TokenCodec("u8-zstd", "u8", numcodecs.Blosc.BITSHUFFLE),
)}


def get_codec(name: str) -> TokenCodec:
    from common.config import ConfigError

    if name not in CODECS:
        raise ConfigError(f"cache.codec: unknown codec {name!r} (choose from {', '.join(CODECS)})")
    return CODECS[name]


def arrays_crc32(arrays: dict[str, np.ndarray]) -> int:
    """Checksum of one sample's stored arrays, in name order; recorded per key, checked on read."""
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), crc)
    return crc
