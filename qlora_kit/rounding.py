"""Update-keeping requantization: codes on a fixed grid chosen with error feedback (GPTQ), and how much of
an intended weight update a rounded weight really applies.

A LoRA update is usually far smaller than one 4-bit step, so round-to-nearest snaps most merged weights
back to their old codes. GPTQ rounds one input column at a time and pushes each column's rounding error
onto the columns not yet rounded, weighted by the inverse of H = X^T X (the layer's calibration inputs),
so the output error ||X (Q - W)^T|| stays small and a small update survives as a pattern of changed codes.

Speed: rows are independent given H, so every layer that reads the same input (q/k/v, gate/up, the
experts of one stack) and both candidate grids (the base's scales, fresh scales) are rounded in one
stacked pass; the arithmetic is float32 with the paper's lazy-batch updates (columns in blocks of 128,
the rest of the matrix updated once per block by a matmul), on a GPU when one is present.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import formats, gguf_types
from .config import QuantConfig


class Grid:
    """The export's grid for a stack of rows: per row, one scale per group of `group` input columns (and, for
    GGUF's _1 types, one offset: value = table[code] * scale + offset), and the code values (a 4/5-bit table,
    or the integers -127..127 of int8 and Q8_0 when table is None)."""

    def __init__(self, scales: Tensor, group: int, table: Tensor | None = None, offsets: Tensor | None = None):
        scales = scales.float()  # GGUF's _0 types may store negative scales: only zero ones are nudged
        self.scales = torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)
        self.group = group  # scales: (rows, in / group)
        self.offsets = None if offsets is None else offsets.float()
        self.table = table
        if table is not None:
            values, self.perm = table.float().sort()
            self.values = values.to(scales.device)
            self.mids = (values[1:] + values[:-1]).to(scales.device) / 2  # nearest code: a bucket between midpoints
            self.perm = self.perm.to(scales.device)

    @classmethod
    def four_bit(cls, table: Tensor, block_scales: Tensor, shape: tuple[int, int], blocksize: int) -> Grid:
        """bitsandbytes' 4-bit layout: blocks of `blocksize` consecutive values of the row-major (out, in) weight."""
        out_f, in_f = shape
        if in_f % blocksize == 0:
            return cls(block_scales.view(out_f, in_f // blocksize), blocksize, table)
        index = torch.arange(out_f * in_f, device=block_scales.device) // blocksize  # blocks straddle rows
        return cls(block_scales[index].view(out_f, in_f), 1, table)

    @classmethod
    def stack(cls, grids: list[Grid]) -> Grid:
        """One grid for the rows of several (same group size and table)."""
        g = grids[0]
        offsets = None if g.offsets is None else torch.cat([x.offsets for x in grids])
        if any(x.group != g.group for x in grids):  # mixed layouts: per-element scales (and offsets) for all
            if offsets is not None:
                offsets = torch.cat([x.offsets.repeat_interleave(x.group, dim=1) for x in grids])
            return cls(torch.cat([x.scales.repeat_interleave(x.group, dim=1) for x in grids]), 1, g.table, offsets)
        return cls(torch.cat([x.scales for x in grids]), g.group, g.table, offsets)

    def to(self, device: torch.device) -> Grid:
        if self.scales.device == torch.device(device):
            return self
        return Grid(self.scales.to(device), self.group, self.table,
                    None if self.offsets is None else self.offsets.to(device))

    def __call__(self, w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        """The nearest grid value of column `col` of W, w (rows,), and its codes."""
        s = self.scales[:, col // self.group]
        if self.offsets is not None:
            o = self.offsets[:, col // self.group]
            i = torch.bucketize((w - o) / s, self.mids)
            return self.values[i] * s + o, self.perm[i]
        x = w / s
        if self.table is None:
            codes = x.round_().clamp_(-127, 127)
            return codes * s, codes
        i = torch.bucketize(x, self.mids)
        return self.values[i] * s, self.perm[i]


def gptq_codes(w: Tensor, hessian: Tensor, grid: Grid, block: int = 128, damp: float = 0.01,
               device: torch.device | str | None = None, input_major: bool = False) -> Tensor:
    """Codes (rows, in; int16) for W on a fixed grid, chosen column by column with error feedback through H^-1.

    The inverse Cholesky factor is computed in float32 after 1% damping, as GPTQ does (in float64 when float32
    cannot factor H); the rounding loop runs in float32, on `device` (default: W's). With input_major, `w` is
    given as W^T (in, rows), float32 and contiguous, and is rounded in place (no copy of it is made).
    """
    dev = torch.device(device) if device is not None else w.device
    hinv = _inverse_factor(hessian.to(dev), damp, torch.float32)
    if hinv is None:  # H too ill-conditioned for float32 even with damping: float64 (twice the memory)
        hinv = _inverse_factor(hessian.to(dev), damp, torch.float64).float()
    # input-major: column i of W is row i of wt, so each step reads and updates contiguous memory
    wt = w.to(dev) if input_major else w.to(dev, torch.float32).t().contiguous()  # (in, rows)
    n = wt.shape[0]
    grid = grid.to(dev)
    codes = torch.empty(wt.shape, dtype=torch.int16, device=dev)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, h1 = wt[i1:i2], hinv[i1:i2, i1:i2]  # w1 is a view: updates land in wt
        diag = torch.diagonal(h1).tolist()
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            q, c = grid(w1[i], i1 + i)
            codes[i1 + i] = c
            err = torch.sub(w1[i], q, out=err1[i]).div_(diag[i])
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(h1[i, i + 1:], err, alpha=-1)
        if i2 < n:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    codes = codes.t()
    return codes.contiguous().cpu()  # int16: a quarter of int64's memory for the stacked rows


def _inverse_factor(hessian: Tensor, damp: float, dtype: torch.dtype) -> Tensor | None:
    """The upper Cholesky factor of H^-1 after damping (as GPTQ does), in `dtype`; None if it does not exist there."""
    h = hessian.to(dtype, copy=True)
    dead = torch.diag(h) == 0  # inputs that were always zero: any value works
    h[dead, dead] = 1
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    try:
        h = torch.linalg.cholesky(h)  # one n x n matrix more at a time, not three
        h = torch.cholesky_inverse(h)
        h = torch.linalg.cholesky(h, upper=True)
    except torch.linalg.LinAlgError:
        return None
    return None if not torch.isfinite(h).all() else h


@dataclass
class Rounded:
    """One layer's export: packed tensors, their dequantized value, which scales won, and (when asked for) the
    value the same rounding gives the weight without the update."""

    packed: dict[str, Tensor]
    value: Tensor
    scales: str
    without: Tensor | None = None


def requantize_group(merged: dict[str, Tensor], base_packed: dict[str, dict[str, Tensor] | None], q: QuantConfig,
                     method: str, hessian: Tensor | None, device: torch.device | str | None = None,
                     without: dict[str, Tensor] | None = None) -> dict[str, Rounded]:
    """The packed exports of weights that share one input statistics matrix H, rounded in one stacked pass.

    Args:
        merged: layer name -> merged (out, in) fp32 weight.
        base_packed: layer name -> packed tensors whose scales are a candidate grid (the trained layer's own when
            they are in q.quant: a small update then moves only the codes it must), or None.
        method: 'gptq' or 'rtn'.
        without: layer name -> the weight without the update; each is rounded the same way (on its own base
            grid, in the same stacked pass) into Rounded.without: the export's format alone, the floor the
            update is measured against.
    """
    fresh = {n: formats.quantize(w, q) for n, w in merged.items()}
    without = without or {}
    if method == "rtn":  # the floor: the weight without the update rounded to nearest too
        return {n: Rounded(p, _dequantize(p, merged[n].shape, q), "fresh",
                           _dequantize(formats.quantize(without[n], q), merged[n].shape, q) if n in without else None)
                for n, p in fresh.items()}
    alone = {n: base_packed.get(n) or formats.quantize(w, q) for n, w in without.items()}
    # two candidate grids per layer: fresh scales from the merged weight (needed when the update changes a
    # block's range), and the base's own; the lower output error on the calibration inputs wins
    cands = [(n, "fresh", p, merged[n]) for n, p in fresh.items()]
    cands += [(n, "base", p, merged[n]) for n, p in base_packed.items() if p is not None]
    cands += [(n, "without", p, without[n]) for n, p in alone.items()]
    grids = []
    for _, _, like, w in cands:
        shape = tuple(w.shape)
        if q.quant in gguf_types.TYPES:  # GGUF blocks of 32: the f16 scales (and minima) the file will store
            d, m = gguf_types.scales(like, q.quant, shape)
            grids.append(Grid(d, gguf_types.BLOCK, gguf_types.table(q.quant), m))
            continue
        scales = formats.block_scales(like, q.quant, shape, q.blocksize)
        grids.append(Grid(scales[:, None], shape[1]) if q.quant == "int8" else
                     Grid.four_bit(formats.code_table(q.quant), scales, shape, q.blocksize))
    wt = torch.cat([w.t() for _, _, _, w in cands], dim=1)  # (in, all rows): the one copy the rounding uses
    codes = gptq_codes(wt, hessian, Grid.stack(grids), device=device, input_major=True)
    del wt
    best: dict[str, tuple[float, Rounded]] = {}
    floors: dict[str, Tensor] = {}
    row = 0
    h = hessian.float()
    for n, label, like, w in cands:
        c = codes[row:row + w.shape[0]]
        row += w.shape[0]
        packed = _pack(c, like, q.quant, tuple(w.shape))
        value = _dequantize(packed, w.shape, q)
        if label == "without":
            floors[n] = value
            continue
        err = output_energy(value - w, h)  # ||X (Q - W')^T||^2 on the calibration inputs
        if n not in best or err < best[n][0]:
            best[n] = (err, Rounded(packed, value, label))
    for n, f in floors.items():
        best[n][1].without = f
    return {n: r for n, (_, r) in best.items()}


def _pack(codes: Tensor, like: dict[str, Tensor], quant: str, shape: tuple[int, int]) -> dict[str, Tensor]:
    """The packed form with these codes on the grid of `like`."""
    if quant in gguf_types.TYPES:
        return gguf_types.pack(codes, *gguf_types.scales(like, quant, shape), quant)
    return formats.pack_int8_codes(codes, like) if quant == "int8" else formats.pack_4bit_codes(codes, like)


def _dequantize(packed: dict[str, Tensor], shape, q: QuantConfig) -> Tensor:
    return formats.dequantize(packed, q.quant, tuple(shape), q.blocksize, torch.float32)


def output_energy(d: Tensor, h: Tensor) -> float:
    """trace(D H D^T) = ||X D^T||^2 for H = X^T X."""
    return float(torch.dot((d @ h).reshape(-1), d.reshape(-1)))


def retained(actual: Tensor, intended: Tensor, hessian: Tensor) -> dict:
    """How much of the intended update dW the export really applies (actual = its weight change).

    Weight space: cosine and norm ratio of the two (out, in) matrices. Output space, what the model
    feels: the same on the calibration activations, <A, B>_H = trace(A H B^T) with H = X^T X.
    Inner products are taken without elementwise temporaries (one (out, in) product at a time).
    """
    a, b, h = actual.float(), intended.float(), hessian.float()

    def dot(x: Tensor, y: Tensor) -> float:
        return float(torch.dot(x.reshape(-1), y.reshape(-1)))

    def cos_ratio(ab: float, aa: float, bb: float) -> tuple[float, float]:
        if aa <= 0 or bb <= 0:
            return 0.0, 0.0
        return round(ab / math.sqrt(aa * bb), 4), round(math.sqrt(aa / bb), 4)

    w_cos, w_ratio = cos_ratio(dot(a, b), dot(a, a), dot(b, b))
    ah = a @ h
    ah_a, ah_b = dot(ah, a), dot(ah, b)
    del ah
    bh_b = dot(b @ h, b)
    o_cos, o_ratio = cos_ratio(ah_b, ah_a, bh_b)
    return {"update_cos": w_cos, "update_norm_ratio": w_ratio, "output_cos": o_cos, "output_norm_ratio": o_ratio}


class InputStats:
    """H = sum of x x^T over the calibration tokens of each LoRA layer's input (adapter on). Layers that read
    the same input tensor (q/k/v, gate/up) are found by identity and share one matrix, as do the experts of
    one stack (their routed inputs together)."""

    def __init__(self, stack_of: dict[str, str]):
        self.stack_of = stack_of
        self.h: dict[str, Tensor] = {}
        self.key: dict[str, str] = dict(stack_of)
        self.live: dict[tuple, tuple[Tensor, str]] = {}  # inputs of one call, held so their memory is not reused

    def _hook(self, name: str):
        def fn(module, args, output):
            x = args[0]
            if name not in self.key:
                sig = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
                self.key[name] = self.live.setdefault(sig, (x, name))[1]
            key = self.key[name]
            if key != name and name not in self.stack_of:
                return  # its group's first layer has added this input already
            x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if key not in self.h:
                self.h[key] = torch.zeros(x.shape[1], x.shape[1])
            self.h[key].addmm_(x.t(), x)
        return fn

    @contextlib.contextmanager
    def collecting(self, layers: dict[str, nn.Module]) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.live.clear()
