"""Weight formats: quantize, dequantize and multiply for nf4, fp4 and int8.

This is the only module of the package that talks to bitsandbytes, and only when a job needs it (CUDA, int8,
its optimizers): the 4-bit formats' tables are made here. A quantized weight
travels through the rest of the package as a plain dict of tensors (its "packed" form),
so that a layer can register them as buffers and `.to(device)` / `state_dict()` just work:

  nf4 / fp4:  weight (uint8, two codes per byte, shape (out*in/2, 1)), absmax, quant_map (16
              code values); with double quantization absmax is uint8 and nested_absmax,
              nested_quant_map and offset hold its second level (blocks of 256).
  int8:       weight (int8, (out, in)), scb (float32 row absmax, (out,)).
  none:       weight (compute dtype, (out, in)).

The layout is bitsandbytes' own (its exports and PEFT read it unchanged), and on CUDA its 4-bit kernels
decode (they are exact). Off CUDA the 4-bit decode is this module's, and int8's is everywhere: bitsandbytes'
CPU kernels choose their code path by the instruction set, and some of those paths are wrong (4-bit blocks
that span two rows decode with the next row's scale on AVX512 CPUs) or approximate (bf16 scales). One
definition holds everywhere:

  weight[i] = value(code[i]) * scale(block of i)        in float32, rounded once to the output dtype

with value() the format's code table (int8: the code itself), scale() the block's absmax (with double
quantization: nested_quant_map[absmax_code] * nested_absmax[block // 256], then + offset, two float32
roundings as bitsandbytes' CUDA kernels make them) and, for int8, the row's scb / 127. Blocks run over
the flattened (out, in) weight, so a block may span two rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import warnings
from collections.abc import Iterator


class _DropNotice(logging.Filter):
    """Drops one known bitsandbytes log message, by its start; everything else it logs still gets through."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# At import on AVX512-BF16 CPUs bitsandbytes warns that the optional `kernels` package (a faster CPU inference
# GEMM that this package never calls) is missing: nothing for a user to act on. The filter goes on before the
# import that logs it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNotice("Failed to load CPU gemm_4bit_forward"))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from . import gguf_types  # noqa: E402
from .config import QuantConfig  # noqa: E402


def _bnb():
    """bitsandbytes.functional, imported on first use: its import takes 2-3 s (it loads torch's compiler), and a
    CPU job in nf4 / fp4 (loading, training, merging, GGUF) never calls it. Those need only the formats' tables,
    which this module makes itself (the tests hold them equal to bitsandbytes' byte for byte)."""
    import bitsandbytes.functional as bnbF

    return bnbF

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the second level of double quantization
DECODE_CHUNK = 1 << 16  # most values decoded per step off CUDA (see _decode)


def quantize(w: Tensor, cfg: QuantConfig, codes: bool = True) -> dict[str, Tensor]:
    """Quantize a dense (out, in) weight.

    Args:
        w: the weight in any float dtype, on the device the packed form should live on.
        cfg: format, block size, double quantization.
        codes: False: nf4/fp4 on a CPU leave the codes out ("weight"): the scales alone, for a rounding that
            chooses its own codes on that grid (the same scales as with codes).
    Returns:
        The packed tensors (see the module docstring).
    Raises:
        ValueError: when the weight is not 2-D or its size does not split into blocks.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if cfg.quant in gguf_types.TYPES:  # an export format: GGUF's blocks of 32 (llama.cpp's reference rounding)
        return gguf_types.quantize(w, cfg.quant)
    if cfg.quant == "none":
        return {"weight": w.detach().to(cfg.compute_dtype).contiguous()}
    if cfg.quant == "int8":
        cb, scb, _ = _bnb().int8_vectorwise_quant(w.detach().to(torch.float16).contiguous())
        return {"weight": cb, "scb": scb.float()}
    if w.numel() % cfg.blocksize:
        raise ValueError(
            f"weight of shape {tuple(w.shape)} ({w.numel()} values) does not divide into blocks of {cfg.blocksize}"
        )
    src = w.detach().contiguous()
    if src.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        src = src.float()
    # Off CUDA bitsandbytes' 4-bit quantizer is plain torch (the same on every CPU), but its 8-bit one for
    # the second level is a native kernel: that level is done here instead (_double_quantize).
    nested_here = cfg.double_quant and not src.is_cuda
    if not src.is_cuda:  # the same arithmetic as bitsandbytes' torch quantizer, several times faster
        packed, absmax = _quantize_4bit_cpu(src, cfg.blocksize, cfg.quant, codes)
        out = {"absmax": absmax, "quant_map": code_table(cfg.quant).float()}
        if packed is not None:
            out["weight"] = packed
        if cfg.double_quant:
            out.update(_double_quantize(absmax))
        return out
    packed, state = _bnb().quantize_4bit(
        src, blocksize=cfg.blocksize, quant_type=cfg.quant, compress_statistics=cfg.double_quant and not nested_here
    )
    out = {"weight": packed, "absmax": state.absmax, "quant_map": state.code}
    if nested_here:
        out.update(_double_quantize(state.absmax))
    elif state.nested:
        out.update(
            nested_absmax=state.state2.absmax,
            nested_quant_map=state.state2.code,
            offset=state.offset.reshape(1).float(),
        )
    return out


def _quantize_4bit_cpu(w: Tensor, blocksize: int, quant: str, codes: bool = True) -> tuple[Tensor | None, Tensor]:
    """bitsandbytes' torch 4-bit quantizer, step for step (the tests hold the two equal byte for byte): per block
    of `blocksize` values, absmax and the scaled values clamped to [-1, 1]; the code is the number of code
    boundaries below a value (what its torch.bucketize returns), read from a table over 4,096 equal bins of
    [-1, 1] and settled by one comparison with the boundary in the value's bin (_CodeBins), instead of one
    comparison per boundary. (None, absmax) when not `codes`."""
    blocks = w.reshape(-1, blocksize).float()
    # max |x| as max(max x, -min x): the same values (+0.0 for a block of zeros), a third of abs().max()'s time
    absmax = torch.maximum(blocks.amax(dim=-1), blocks.amin(dim=-1).neg_()).add_(0.0)
    if not codes:
        return None, absmax
    lut = _code_bins(quant, w.device)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    q = lut.codes(scaled)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


class _CodeBins:
    """The sorted position of x in [-1, 1] among a 4-bit table's boundaries (midpoints), exactly, in a few
    elementwise steps: x falls in one of BINS equal bins; `first[b]` counts the boundaries below bin b (with a
    margin far beyond float32's error in the mapping), and at most one boundary lies inside a bin, so one
    comparison with it (on x itself, not on its bin) settles the count. Then the table's order gives the code."""

    BINS = 4096

    def __init__(self, quant: str, device: torch.device):
        bounds, order = _quantize_bounds(quant, device)
        half = self.BINS / 2
        edges = torch.arange(self.BINS, dtype=torch.float64) / half - 1  # left edge of each bin
        b64 = bounds.double().cpu()
        gaps = (b64[1:] - b64[:-1]) * half
        if float(gaps.min()) < 3 or float(b64.abs().max()) * half > half - 2:  # (holds for nf4 and fp4)
            raise ValueError(f"{quant}: code boundaries too close for one comparison per bin")
        first = torch.searchsorted(b64, edges - 0.01 / half)  # boundaries below the edge, less a margin
        nxt = torch.cat([b64, torch.tensor([math.inf], dtype=torch.float64)])[first]
        self.half = half
        self.first = first.to(torch.uint8).to(device)
        self.next_bound = nxt.float().to(device)
        self.order = None if quant == "nf4" else order.to(torch.uint8).to(device)  # nf4's table is sorted

    def codes(self, x: Tensor, chunk: int = 1 << 22) -> Tensor:
        """uint8 codes of x (flat, in [-1, 1]); a NaN gets code 0, as the comparisons would give it."""
        out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        for a in range(0, x.numel(), chunk):
            xs = x[a:a + chunk]
            bins = torch.add(xs, 1).mul_(self.half).to(torch.int32).clamp_(0, self.BINS - 1)
            q = torch.index_select(self.first, 0, bins)
            q += xs > torch.index_select(self.next_bound, 0, bins)
            out[a:a + chunk] = q if self.order is None else torch.index_select(self.order, 0, q.to(torch.int32))
        return out


@functools.cache
def _code_bins(quant: str, device: torch.device) -> _CodeBins:
    return _CodeBins(quant, device)


def _double_quantize(absmax: Tensor) -> dict[str, Tensor]:
    """QLoRA's second level, as bitsandbytes stores it: absmax - mean, in blocks of 256, to the nearest value
    of bitsandbytes' signed 8-bit dynamic map (uint8 codes), with a float32 absmax per block."""
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, blocks * NESTED_BLOCKSIZE - n)).view(blocks, NESTED_BLOCKSIZE)
    nested_absmax = padded.abs().amax(dim=1)  # (blocks,)
    scaled = (padded / nested_absmax.clamp_min(1e-38)[:, None]).clamp(-1, 1).flatten()[:n]
    table = dynamic_map().to(absmax.device)  # 256 values, ascending
    codes = torch.bucketize(scaled, (table[1:] + table[:-1]) / 2)  # the nearest value (ties to the lower)
    return {"absmax": codes.to(torch.uint8), "nested_absmax": nested_absmax, "nested_quant_map": table,
            "offset": offset.reshape(1).float()}


def _quant_state(packed: dict[str, Tensor], quant: str, shape: tuple[int, int], blocksize: int,
                 dtype: torch.dtype):
    bnbF = _bnb()
    state2 = None
    if "nested_absmax" in packed:
        state2 = bnbF.QuantState(absmax=packed["nested_absmax"], code=packed["nested_quant_map"],
                                 blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return bnbF.QuantState(
        absmax=packed["absmax"], shape=torch.Size(shape), code=packed["quant_map"], blocksize=blocksize,
        quant_type=quant, dtype=dtype, offset=packed["offset"][0] if state2 is not None else None, state2=state2,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
    """One frozen (out, in) weight in its stored form: format, shape, block size and packed tensors.

    The value the kernels and the reference matmul take instead of the layer that holds it. The tensors are
    the holder's own (a layer's buffers), not copies: `version()` tells whether any was changed in place.
    """

    quant: str
    shape: tuple[int, int]
    blocksize: int
    tensors: dict[str, Tensor]

    @property
    def is_meta(self) -> bool:
        return self.tensors["weight"].is_meta

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The dense (out, in) weight in `dtype`; on the meta device (a memory estimate) an empty one, which
        allocates what the real decode allocates."""
        if self.is_meta and self.quant != "none":
            return torch.empty(self.shape, dtype=dtype, device="meta")
        return dequantize(self.tensors, self.quant, self.shape, self.blocksize, dtype)

    def version(self) -> tuple[int, ...]:
        """The in-place version counters of the tensors (they change when a tensor is written to)."""
        return tuple(t._version for t in self.tensors.values())

    def check_unchanged(self, versions: tuple[int, ...] | None) -> None:
        """Refuse a backward through a weight modified in place since its forward (None: not checked)."""
        if versions is not None and self.version() != versions:
            raise RuntimeError("a frozen base weight was modified in place between forward and backward")


def dequantize(packed: dict[str, Tensor], quant: str, shape: tuple[int, int], blocksize: int,
               dtype: torch.dtype) -> Tensor:
    """The dense (out, in) weight in `dtype` that the packed form stands for (the module docstring's
    definition, exactly, on every device)."""
    if quant == "none":
        return packed["weight"].to(dtype)
    if quant in gguf_types.TYPES:
        return gguf_types.dequantize(packed, quant, shape, dtype)
    if quant == "int8":
        codes = packed["weight"].reshape(-1)
        return _decode(lambda lo, hi, dst: dst.copy_(codes[lo:hi]), block_scales(packed, quant, shape, blocksize),
                       shape[1], shape, dtype)
    if packed["weight"].is_cuda:
        return _bnb().dequantize_4bit(packed["weight"], _quant_state(packed, quant, shape, blocksize, dtype))
    return _decode_4bit(packed["weight"], packed["quant_map"], block_scales(packed, quant, shape, blocksize),
                        blocksize, shape, dtype)


def _decode_4bit(codes: Tensor, table: Tensor, scales: Tensor, blocksize: int, shape, dtype: torch.dtype) -> Tensor:
    """value(code) * scale for packed 4-bit codes, two a byte, high nibble first."""
    nib = torch.arange(256, device=codes.device)
    # both float32 values of every byte value, side by side in one 8-byte word: a byte decodes with one gather
    pairs = torch.stack([table.float()[nib >> 4], table.float()[nib & 15]], dim=1).contiguous().view(torch.int64)
    flat = codes.view(torch.uint8).view(-1)

    def fill(lo: int, hi: int, dst: Tensor) -> None:  # lo is even: chunks hold whole blocks
        idx = flat[lo // 2:(hi + 1) // 2].int()
        if (hi - lo) % 2 == 0:
            torch.index_select(pairs.view(-1), 0, idx, out=dst.view(torch.int64))
        else:  # an odd count of values in all (bitsandbytes allows one; this package's weights never have it)
            dst.copy_(pairs.view(-1).index_select(0, idx).view(torch.float32)[:hi - lo])

    return _decode(fill, scales, blocksize, shape, dtype)


def _decode(fill, scales: Tensor, group: int, shape, dtype: torch.dtype) -> Tensor:
    """out[i] = value(i) * scales[i // group] in float32, rounded once to `dtype`.

    `fill(lo, hi, dst)` writes the float32 values of the flat range [lo, hi) into `dst`: the output itself
    when it is float32, else a float32 buffer. Off CUDA this goes a chunk of whole groups at a time, at most
    DECODE_CHUNK values and an eighth of the weight (but at least one group), so what the decode allocates
    besides its output stays small (the index of one chunk, and the buffer) and in cache."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=scales.device)
    step = max(n, 1) if scales.is_cuda else max(1, min(DECODE_CHUNK, n // 8) // group) * group
    buf = None if dtype == torch.float32 else torch.empty(min(step, n), dtype=torch.float32, device=out.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        dst = out[lo:hi] if buf is None else buf[:hi - lo]
        fill(lo, hi, dst)
        whole = (hi - lo) // group
        first = lo // group
        dst[:whole * group].view(whole, group).mul_(scales[first:first + whole, None])
        if whole * group < hi - lo:  # a partial last group
            dst[whole * group:].mul_(scales[first + whole])
        if buf is not None:
            out[lo:hi].copy_(dst)  # one rounding, to nearest even
    return out.view(shape)


def int8_mixed_matmul(x: Tensor, packed: dict[str, Tensor], threshold: float, dtype: torch.dtype) -> Tensor:
    """LLM.int8 forward: x @ W.T with outlier activation columns kept in 16-bit.

    Columns of x holding any |value| >= threshold are multiplied with the matching dequantized
    weight columns in `dtype`; the rest are quantized row-wise to int8 and go through an
    int8 x int8 -> int32 matmul.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    bnbF = _bnb()
    cx, sx, outliers = bnbF.int8_vectorwise_quant(x2.to(torch.float16).contiguous(), threshold=threshold)
    acc = _int8_matmul(cx, packed["weight"])  # (N, out) int32
    y = bnbF.int8_mm_dequant(acc, sx, packed["scb"]).to(dtype)
    if outliers is not None and outliers.numel():
        cols = packed["weight"][:, outliers]  # (out, outlier columns)
        flat = cols.reshape(-1)
        w_cols = _decode(lambda lo, hi, dst: dst.copy_(flat[lo:hi]), packed["scb"].float() / 127,
                         cols.shape[1], tuple(cols.shape), dtype)
        y = y + x2[:, outliers].to(dtype) @ w_cols.t()
    return y.reshape(*x.shape[:-1], y.shape[-1])


INT8_EXACT_K = 1024  # columns per float64 matmul in _int8_matmul: bounds its float64 copies of the operands


def _int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T for int8 (N, K) and (M, K): the exact int32 result.

    bitsandbytes' CPU version depends on the instruction set: torch._int_mm (exact) with AVX512, otherwise a
    float32 matmul rounded back to int32, inexact once K passes about 1,040 (127 * 127 * K > 2**24). Off CUDA
    this multiplies in float64, where every partial sum is an integer below 2**53 whatever torch's float32
    matmul precision is set to, 1,024 columns at a time."""
    if a.is_cuda:
        return _bnb().int8_linear_matmul(a, b)
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for k in range(0, a.shape[1], INT8_EXACT_K):
        acc += a[:, k:k + INT8_EXACT_K].double() @ b[:, k:k + INT8_EXACT_K].double().t()
    return acc.to(torch.int32)


def packed_layout(out_features: int, in_features: int, cfg: QuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor `formats.quantize` makes for an (out, in) weight.

    nf4/fp4: codes (ceil(n/2), 1) uint8, absmax per block of `blocksize` (uint8 with double quantization,
    plus a float32 absmax per 256 blocks, the 256-entry level-2 code table and an offset; float32
    without), and the 16-entry code table. int8: (out, in) int8 codes and one float32 scale per row.
    """
    n = out_features * in_features
    if cfg.quant == "none":
        return {"weight": ((out_features, in_features), cfg.compute_dtype)}
    if cfg.quant in gguf_types.TYPES:
        return {"blocks": ((out_features, gguf_types.row_bytes(cfg.quant, in_features)), torch.uint8)}
    if cfg.quant == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "scb": ((out_features,), torch.float32)}
    blocks = math.ceil(n / cfg.blocksize)
    layout = {"weight": (((n + 1) // 2, 1), torch.uint8), "quant_map": ((16,), torch.float32)}
    if cfg.double_quant:
        layout.update(absmax=((blocks,), torch.uint8),
                      nested_absmax=((math.ceil(blocks / NESTED_BLOCKSIZE),), torch.float32),
                      nested_quant_map=((256,), torch.float32), offset=((1,), torch.float32))
    else:
        layout["absmax"] = ((blocks,), torch.float32)
    return layout


def bytes_per_weight(cfg: QuantConfig) -> float:
    """Bytes per quantized value for a large weight (codes + scales), e.g. 0.516 for nf4 + double quant."""
    if cfg.quant == "none":
        return torch.empty(0, dtype=cfg.compute_dtype).element_size()
    if cfg.quant == "int8":
        return 1.0
    if cfg.double_quant:
        return 0.5 + 1 / cfg.blocksize + 4 / (cfg.blocksize * NESTED_BLOCKSIZE)
    return 0.5 + 4 / cfg.blocksize


def packed_nbytes(packed: dict[str, Tensor]) -> int:
    """Bytes held by the packed form (codes plus every scale)."""
    return sum(t.numel() * t.element_size() for t in packed.values())


def code_table(quant: str) -> Tensor:
    """The 16 values a 4-bit code stands for (before scaling by the block's absmax), float32, by code."""
    return _code_table(quant).clone()


@functools.cache
def _code_table(quant: str) -> Tensor:
    if quant == "nf4":  # NormalFloat (QLoRA): quantiles of N(0, 1), 8 positive and 7 negative, and an exact 0
        offset = 0.9677083  # the outermost quantile, so that 1 and -1 are values (after the scaling below)
        # (the probabilities in float32, their quantiles in float64, the values in float32: the published table)
        pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
        neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
        values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
        return values / values.abs().max()
    if quant == "fp4":  # 1 sign, 2 exponent (bias 2), 1 mantissa bit; bitsandbytes' code order, then scaled to 1
        magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
        values = torch.tensor(magnitudes + [0.0 - m for m in magnitudes], dtype=torch.float32)  # (+0.0 twice)
        return values / values.abs().max()
    raise ValueError(f"no 4-bit code table for {quant!r} (nf4, fp4)")


@functools.cache
def _quantize_bounds(quant: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """The midpoints between a 4-bit table's sorted values and the sort's order (code of the k-th smallest)."""
    table = _code_table(quant).to(device)
    order = torch.argsort(table)
    return (table[order[:-1]] + table[order[1:]]) / 2, order


@functools.cache
def _dynamic_map() -> Tensor:
    # signed: for each of 7 decimal exponents e = -6..0, 2^(e+6) fractions, the midpoints of an even split of
    # [0.1, 1], times 10^e, with both signs; then 0 and 1: 256 values
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * (10.0 ** (i - 6))
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (the second level's code values), 256 float32 values, ascending."""
    return _dynamic_map().clone()


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """'adamw' (torch), or bitsandbytes' 'adamw8bit' / 'paged_adamw8bit' (8-bit blockwise moments).

    Paged optimizers page their state to host memory under GPU memory pressure; on a CPU they
    behave as the plain 8-bit one.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes.optim as bnb_optim

    classes = {"adamw8bit": bnb_optim.AdamW8bit, "paged_adamw8bit": bnb_optim.PagedAdamW8bit}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}: use adamw, adamw8bit or paged_adamw8bit")
    return classes[name](params, lr=lr, weight_decay=weight_decay)


def block_scales(packed: dict[str, Tensor], quant: str, shape: tuple[int, int], blocksize: int) -> Tensor:
    """The float32 scale of every 4-bit block (with double quantization: nested_quant_map[code] times the
    block's nested absmax, then + offset), or int8's row scale / 127."""
    if quant == "int8":
        return packed["scb"].float() / 127
    if "nested_absmax" not in packed:
        return packed["absmax"].float()
    return _decode_8bit(packed["absmax"], packed["nested_quant_map"], packed["nested_absmax"], NESTED_BLOCKSIZE,
                        torch.float32).view(-1) + packed["offset"].float()[0]


def _decode_8bit(codes: Tensor, table: Tensor, scales: Tensor, blocksize: int, dtype: torch.dtype) -> Tensor:
    """table[code] * scale for blockwise 8-bit codes (one a byte), in the shape of `codes`."""
    flat, values = codes.reshape(-1), table.float()
    return _decode(lambda lo, hi, dst: torch.index_select(values, 0, flat[lo:hi].int(), out=dst),
                   scales.float(), blocksize, tuple(codes.shape), dtype)


def pack_4bit_codes(codes: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed form with the given (out, in) 4-bit codes and the scales of `like` (two codes a byte, high nibble first)."""
    flat = codes.flatten().to(torch.uint8)
    out = dict(like)
    out["weight"] = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
    return out


def pack_int8_codes(codes: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed int8 form with the given (out, in) codes in [-127, 127] and the row scales of `like`."""
    return {"weight": codes.to(torch.int8).contiguous(), "scb": like["scb"]}


def bnb_checkpoint_tensors(packed: dict[str, Tensor], quant: str, shape: tuple[int, int], blocksize: int,
                           dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors bitsandbytes' transformers integration stores for one linear layer, keyed relative to
    the layer ("weight", "weight.absmax", ... / "weight", "SCB", "weight_format")."""
    if quant == "int8":
        return {"weight": packed["weight"], "SCB": packed["scb"].float(),
                "weight_format": torch.tensor(0, dtype=torch.uint8)}  # 0: row-major, the only format left
    # bitsandbytes' serialized QuantState (its `as_dict(packed=True)`), written here so that an export need not
    # import it: the tensors, then the rest as JSON bytes under one key, in the order its loader was written for
    out = {"weight": packed["weight"], "weight.absmax": packed["absmax"], "weight.quant_map": packed["quant_map"]}
    meta = {"quant_type": quant, "blocksize": blocksize, "dtype": _dtype_name(dtype), "shape": list(shape)}
    if "nested_absmax" in packed:
        out["weight.nested_absmax"] = packed["nested_absmax"]
        out["weight.nested_quant_map"] = packed["nested_quant_map"].clone()  # not shared with other layers' maps
        meta.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                     "nested_offset": float(packed["offset"][0])})
    out[f"weight.quant_state.bitsandbytes__{quant}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as bitsandbytes names it in a serialized QuantState ("bfloat16", "float32")."""
    return str(dtype).removeprefix("torch.")


# ---- bitsandbytes' own modules, made exact -------------------------------------------------------------

def _bnb_dequantize_4bit(A: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape, dtype: torch.dtype):
    return _decode_4bit(A, code_table(quant_type).to(A.device), absmax.float(), blocksize, tuple(shape), dtype)


def _bnb_dequantize_blockwise(A: Tensor, absmax: Tensor, code: Tensor, blocksize: int, dtype: torch.dtype):
    return _decode_8bit(A, code, absmax, blocksize, dtype)


def _bnb_int8_linear_matmul(A: Tensor, B: Tensor) -> Tensor:
    return _int8_matmul(A.reshape(-1, A.shape[-1]), B).reshape(*A.shape[:-1], B.shape[0])


@contextlib.contextmanager
def exact_bitsandbytes(model: nn.Module | None = None) -> Iterator[None]:
    """Inside, bitsandbytes' own modules compute on the CPU by this module's definitions.

    Every bitsandbytes `Linear4bit` in `model` is switched off the bf16 repacking that bitsandbytes does on
    AVX512-BF16 CPUs at its first no-grad evaluation (a per-module switch, `support_avx512bf16_for_cpu`, that
    stays off after the block; a weight already repacked is refused, its bf16 scales cannot be undone).
    Until the block ends, bitsandbytes' CPU kernels `dequantize_4bit` and `dequantize_blockwise` (which all
    its 4-bit matmuls go through) are replaced by this module's decode, and `int8_linear_matmul` by its exact
    int8 product. Used to score an export as transformers loads it, so that the score does not depend on
    which CPU computes it. The replacement is process-wide while it lasts.
    """
    import bitsandbytes as bnb

    for name, m in model.named_modules() if model is not None else ():
        if isinstance(m, bnb.nn.Linear4bit):
            if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False):
                raise ValueError(f"{name}: bitsandbytes has already repacked this weight with bf16 block scales "
                                 "(a no-grad evaluation on an AVX512-BF16 CPU), and the exact scales are gone: "
                                 "load the model again")
            m.support_avx512bf16_for_cpu = False
    lib = torch.library.Library("bitsandbytes", "FRAGMENT")
    with warnings.catch_warnings():  # torch warns, once, that a registered kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        lib.impl("dequantize_4bit", _bnb_dequantize_4bit, "CPU")
        lib.impl("dequantize_blockwise", _bnb_dequantize_blockwise, "CPU")
        lib.impl("int8_linear_matmul", _bnb_int8_linear_matmul, "CPU")
    # bitsandbytes' int8 matmul logs, at every call, that 16-bit inputs other than fp16 are cast to fp16
    cast_notice = _DropNotice("MatMul8bitLt: inputs will be cast")
    int8_log = logging.getLogger("bitsandbytes.autograd._functions")
    int8_log.addFilter(cast_notice)
    try:
        yield
    finally:
        lib._destroy()  # bitsandbytes' own kernels are back
        int8_log.removeFilter(cast_notice)
