"""Independent references for the weight formats, written here from the formats' definitions.

Nothing here calls the package or bitsandbytes' kernels: the 4-bit code tables are the published ones
(NF4 from the QLoRA paper, appendix E; FP4 as bitsandbytes defines its e2m1 variant), blocks run over the
flattened (out, in) weight, two codes a byte with the high nibble first, and every value is
code_value * block_scale computed in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import torch

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25, -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25]
TABLES = {"nf4": torch.tensor(NF4, dtype=torch.float32), "fp4": torch.tensor(FP4, dtype=torch.float32)}
NESTED = 256  # the second level of double quantization: one float32 absmax per 256 block scales


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (the second level's 256 values), rebuilt from its definition:
    for each exponent e = 0..6, the midpoints of 2**e equal steps from 0.1 to 1, times 10**(e - 6), with both
    signs; then 0 and 1. Ascending."""
    values = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = ((bounds[:-1] + bounds[1:]) / 2 * 10 ** (e - 6)).tolist()
        values += mids + [-v for v in mids]
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    b = codes.flatten()
    return torch.stack([b >> 4, b & 0xF], dim=1).flatten().long()


def scales_4bit(packed: dict) -> torch.Tensor:
    """float32 scale of every block: the absmax, or with double quantization map[code] * nested[b // 256]
    and then + offset (two float32 roundings)."""
    if "nested_absmax" not in packed:
        return packed["absmax"].float()
    a8 = packed["absmax"].long()
    nested = packed["nested_absmax"].float().repeat_interleave(NESTED)[: a8.numel()]
    return packed["nested_quant_map"].float()[a8] * nested + packed["offset"].float()


def decode_4bit(packed: dict, fmt: str, shape, blocksize: int, dtype=torch.float32) -> torch.Tensor:
    values = TABLES[fmt][unpack_nibbles(packed["weight"])]  # (out*in,)
    return (values.view(-1, blocksize) * scales_4bit(packed)[:, None]).view(shape).to(dtype)


def decode_int8(packed: dict, dtype=torch.float32) -> torch.Tensor:
    return (packed["weight"].float() * (packed["scb"].float() / 127)[:, None]).to(dtype)


def nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value for each x (float64 distances)."""
    return (x.double()[:, None] - table.double()[None]).abs().argmin(dim=1)


def quantize_dequantize(w: torch.Tensor, fmt: str, blocksize: int, double_quant: bool) -> torch.Tensor:
    """Round a weight to the format and back: absmax per block, the nearest code value to w / absmax, and with
    double quantization the absmax itself rounded through the dynamic map in blocks of 256 after removing
    its mean."""
    blocks = w.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    codes = nearest((blocks / absmax[:, None]).flatten(), TABLES[fmt])
    if double_quant:
        offset = absmax.mean()
        centered = absmax - offset
        pad = (-centered.numel()) % NESTED
        nested = torch.nn.functional.pad(centered, (0, pad)).view(-1, NESTED).abs().amax(dim=1)
        per_block = nested.repeat_interleave(NESTED)[: centered.numel()]
        dmap = dynamic_map()
        absmax = dmap[nearest(centered / per_block, dmap)] * per_block + offset
    return (TABLES[fmt][codes].view(-1, blocksize) * absmax[:, None]).view(w.shape)
