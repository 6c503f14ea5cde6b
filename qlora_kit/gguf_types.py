"""GGUF's legacy block types, the ones a merge can write with its update kept: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Every type cuts a row into blocks of 32 consecutive input columns. A block stores an f16 scale d (and, for
the _1 types, an f16 minimum m) and one code per value:

    Q8_0: value = q * d,          q in -128..127 (int8)
    Q4_0: value = (q - 8) * d,    q in 0..15      Q4_1: value = q * d + m, q in 0..15
    Q5_0: value = (q - 16) * d,   q in 0..31      Q5_1: value = q * d + m, q in 0..31

Byte layout of one block (ggml-common.h): d, then m (_1 types), then the fifth bits of the 32 codes as one
little-endian uint32 (Q5 types), then the codes: 32 int8 (Q8_0), or 16 bytes whose low nibbles hold codes
0..15 and high nibbles codes 16..31.

A packed weight here is {"blocks": uint8 (out, in / 32 * block bytes)}: the tensor's bytes exactly as a GGUF
file stores them, row by row. Round to nearest follows llama.cpp's reference quantizer step for step, in
torch (so it also runs on a GPU, and as merge-aware training's forward); the tests hold it, the decode and
the packing to the `gguf` package's numpy port byte for byte.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import GGUF_QUANTS

TYPES = GGUF_QUANTS
BLOCK = 32  # values per block, every type here
_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5}
_HAS_MIN = {"q4_1", "q5_1"}
_ROWS = 4096  # rows rounded at a time


def ggml_type(name: str):
    """The gguf package's GGMLQuantizationType for a type name here (or f16 / bf16 / f32)."""
    from gguf import GGMLQuantizationType

    return {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
            **{t: GGMLQuantizationType[t.upper()] for t in TYPES}}[name]


def block_bytes(t: str) -> int:
    """Bytes of one block of 32 values."""
    bits = _BITS[t]
    return 2 + (2 if t in _HAS_MIN else 0) + (4 if bits == 5 else 0) + (32 if bits == 8 else 16)


def row_bytes(t: str, in_features: int) -> int:
    return in_features // BLOCK * block_bytes(t)


def fits(t: str, in_features: int) -> bool:
    """Whether rows of this length split into whole blocks (GGUF has no partial blocks)."""
    return in_features % BLOCK == 0


def table(t: str) -> Tensor | None:
    """The value each code stands for before scaling (4/5-bit types); None for Q8_0 (the code is the value)."""
    if t == "q8_0":
        return None
    n = 1 << _BITS[t]
    return torch.arange(n, dtype=torch.float32) - (0 if t in _HAS_MIN else n // 2)


def quantize(w: Tensor, t: str) -> dict[str, Tensor]:
    """Round to nearest exactly as llama.cpp's reference quantizer does (ggml-quants.c, and the `gguf` package's
    numpy port, which the tests hold this to byte for byte): an (out, in) weight to its GGUF blocks."""
    if w.dim() != 2 or not fits(t, w.shape[1]):
        raise ValueError(f"{t}: a weight of shape {tuple(w.shape)} does not split into rows of {BLOCK}-value blocks")
    out = torch.empty(w.shape[0], row_bytes(t, w.shape[1]), dtype=torch.uint8)
    for lo in range(0, w.shape[0], _ROWS):  # a slice of rows at a time: an embedding's temporaries stay small
        d, m, codes = nearest(w[lo:lo + _ROWS].detach(), t)
        out[lo:lo + _ROWS] = pack(codes.cpu(), d.cpu(), None if m is None else m.cpu(), t)["blocks"]
    return {"blocks": out}


def fake_quantize(w: Tensor, t: str) -> Tensor:
    """The float32 values `quantize` would store for w, computed in torch on w's device (no bytes)."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for lo in range(0, w.shape[0], _ROWS):
        part = w[lo:lo + _ROWS].detach()
        out[lo:lo + _ROWS] = decode(*nearest(part, t), t, tuple(part.shape))
    return out


def decode(d: Tensor, m: Tensor | None, codes: Tensor, t: str, shape: tuple[int, int]) -> Tensor:
    """float32 (out, in) values of per-block scales d (minima m) and codes."""
    tab = table(t)
    values = codes.float() if tab is None else tab.to(codes.device)[codes.long()]
    out = values.view(shape[0], -1, BLOCK) * d[..., None]
    if m is not None:
        out = out + m[..., None]
    return out.view(shape)


def nearest(w: Tensor, t: str) -> tuple[Tensor, Tensor | None, Tensor]:
    """(d, m, codes) of llama.cpp's reference round to nearest: d and m rounded to f16 (as stored), codes chosen
    with the unrounded float32 scale, as the reference does."""
    x = w.float().reshape(w.shape[0], -1, BLOCK)
    bits = _BITS[t]
    m = None
    if t == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = x * inv
        a = v.abs()  # round half away from zero, exactly as the reference (floor(a) + floor(2 (a - floor(a))))
        fl = a.floor()
        codes = (torch.sign(v) * (fl + (2 * (a - fl)).floor())).to(torch.int16)
    elif t in _HAS_MIN:
        hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        d = (hi - lo) / ((1 << bits) - 1)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = ((x - lo) * inv + 0.5).trunc().clamp_(0, (1 << bits) - 1).to(torch.int16)
        m = lo[..., 0].to(torch.float16).float()
    else:
        idx = x.abs().argmax(-1, keepdim=True)
        d = torch.gather(x, -1, idx) / -(1 << (bits - 1))
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        codes = (x * inv + (1 << (bits - 1)) + 0.5).trunc().clamp_(0, (1 << bits) - 1).to(torch.int16)
    return d[..., 0].to(torch.float16).float(), m, codes.view(w.shape)


def scales(packed: dict[str, Tensor], t: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """(d, m) of a packed weight: per-block scales and minima (out, in / 32) float32 (m None for the _0 types),
    read without decoding the codes."""
    b = packed["blocks"].view(shape[0], shape[1] // BLOCK, block_bytes(t))

    def f16(lo: int) -> Tensor:
        return b[..., lo:lo + 2].contiguous().view(torch.float16)[..., 0].float()

    return f16(0), (f16(2) if t in _HAS_MIN else None)


def fields(packed: dict[str, Tensor], t: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor | None, Tensor]:
    """(d, m, codes) of a packed weight: `scales`, and codes (out, in) int16 (Q8_0: the signed value; others:
    0..2^bits - 1)."""
    out_f, in_f = shape
    b = packed["blocks"].view(out_f, in_f // BLOCK, block_bytes(t))
    d, m = scales(packed, t, shape)
    pos = 4 if t in _HAS_MIN else 2
    if t == "q8_0":
        codes = b[..., pos:pos + 32].contiguous().view(torch.int8).to(torch.int16)
        return d, m, codes.view(out_f, in_f)
    high = None
    if _BITS[t] == 5:
        qh = b[..., pos:pos + 4].to(torch.int64)
        qh = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24
        high = (qh[..., None] >> torch.arange(32)) & 1
        pos += 4
    qs = b[..., pos:pos + 16].to(torch.int16)
    codes = torch.cat([qs & 15, qs >> 4], dim=-1)
    if high is not None:
        codes = codes | (high.to(torch.int16) << 4)
    return d, m, codes.view(out_f, in_f)


def dequantize(packed: dict[str, Tensor], t: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) weight the blocks stand for."""
    d, m, codes = fields(packed, t, shape)
    tab = table(t)
    values = codes.float() if tab is None else tab[codes.long()]
    w = values.view(shape[0], -1, BLOCK) * d[..., None]
    if m is not None:
        w = w + m[..., None]
    return w.view(shape).to(dtype)


def pack(codes: Tensor, d: Tensor, m: Tensor | None, t: str) -> dict[str, Tensor]:
    """GGUF blocks from (out, in) codes (as `fields` returns them) and per-block d (and m), which must already
    be f16 values."""
    out_f, in_f = codes.shape
    nb = in_f // BLOCK
    c = codes.view(out_f, nb, BLOCK)
    parts = [d.to(torch.float16).view(out_f, nb, 1).view(torch.uint8)]
    if t in _HAS_MIN:
        parts.append(m.to(torch.float16).view(out_f, nb, 1).view(torch.uint8))
    if t == "q8_0":
        parts.append(c.to(torch.int8).view(torch.uint8))
    else:
        c = c.to(torch.int64)
        if _BITS[t] == 5:
            qh = ((c >> 4) & 1) << torch.arange(32)
            qh = qh.sum(-1)
            parts.append(torch.stack([(qh >> s) & 255 for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8))
        parts.append(((c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)).to(torch.uint8))
    return {"blocks": torch.cat(parts, dim=-1).reshape(out_f, nb * block_bytes(t))}


def bits_per_weight(t: str) -> float:
    return block_bytes(t) * 8 / BLOCK


def nbytes(t: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this shape stored as type t (or f32 / f16 / bf16)."""
    n = math.prod(shape)
    if t in TYPES:
        return n // BLOCK * block_bytes(t)
    return n * {"f32": 4, "f16": 2, "bf16": 2}[t]
