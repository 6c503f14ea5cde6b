"""Update-keeping requantization: codes on a fixed grid chosen with error feedback (GPTQ), and how much of
an intended weight update a rounded weight really applies.

A LoRA update is usually far smaller than one 4-bit step, so round-to-nearest snaps most merged weights
back to their old codes. GPTQ rounds one input column at a time and pushes each column's rounding error
onto the columns not yet rounded, weighted by the inverse of H = X^T X (the layer's calibration inputs),
so the output error ||X (Q - W)^T|| stays small and a small update survives as a pattern of changed codes.

Speed: rows are independent given H, so every layer that reads the same input (q/k/v, gate/up, the
experts of one stack) is rounded in one stacked pass, and of the two candidate grids (the base's scales,
fresh scales) a quarter of the rows chooses: rounded on both, the grid with the lower output error on them
rounds the other rows (1.25 passes where both whole would take 2; the lazy-batch updates' matmuls, rows x
in^2, are most of the time for layers of 1,024 rows and more; smaller ones round both grids whole in one
pass, whose per-column dispatch costs more than the extra rows). The arithmetic is float32 with the paper's
lazy-batch updates (columns in blocks of 128, the rest of the matrix updated once per block by a matmul;
inside a block, sub-blocks of 16 the same way), on a GPU when one is present.
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

CHUNK_BYTES = 64 * 2**20  # stacked rows rounded in one pass: fewer, longer steps; their W^T at most this size


class Grid:
    """The export's grid for a stack of rows: per row, one scale per group of `group` input columns (and, for
    GGUF's _1 types, one offset: value = table[code] * scale + offset), and the code values (a 4/5-bit table,
    or the integers -127..127 of int8 and Q8_0 when table is None)."""

    def __init__(self, scales: Tensor, group: int, table: Tensor | None = None, offsets: Tensor | None = None):
        self.scales = _nonzero(scales)
        self.group = group  # scales: (rows, in / group)
        self.offsets = None if offsets is None else offsets.float()
        self.table = table
        self.uniform = table is None  # codes are consecutive integers: the nearest is rounding and a clamp
        self.lut = None  # a non-uniform table without offsets (nf4, fp4): the nearest by lookup
        if table is not None:
            values, self.perm = table.float().sort()
            self.values = values.to(scales.device)
            self.mids = (values[1:] + values[:-1]).to(scales.device) / 2  # nearest code: a bucket between midpoints
            self.perm = self.perm.to(scales.device)
            self.uniform = bool(values[0] == values[0].round() and
                                torch.equal(values, values[0] + torch.arange(len(values), dtype=values.dtype)))
            if not self.uniform and offsets is None:
                self.lut = _Lut.make(self.values, self.mids)

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

    def rows(self, index: Tensor) -> Grid:
        """The grid of some of its rows (`index`: distinct rows, ascending; all of them: this grid)."""
        if len(index) == self.scales.shape[0]:
            return self
        return Grid(self.scales[index.to(self.scales.device)], self.group, self.table,
                    None if self.offsets is None else self.offsets[index.to(self.offsets.device)])

    def to(self, device: torch.device) -> Grid:
        if self.scales.device == torch.device(device):
            return self
        return Grid(self.scales.to(device), self.group, self.table,
                    None if self.offsets is None else self.offsets.to(device))

    def signature(self) -> tuple:
        """What grids must share to be rounded in one loop: the group size, the table, whether offsets exist."""
        return (self.group, None if self.table is None else tuple(self.table.tolist()), self.offsets is None)

    def columns(self) -> tuple[Tensor, Tensor | None]:
        """Scales and offsets input-major, (in / group, rows), contiguous: a column's are one contiguous row."""
        return (self.scales.t().contiguous(),
                None if self.offsets is None else self.offsets.t().contiguous())


def _nonzero(scales: Tensor) -> Tensor:
    """Scales in float32 with the zero ones (an all-zero block) nudged to 1e-12, so that dividing by them is finite;
    the sign of the others is kept (GGUF's _0 types may store negative scales)."""
    scales = scales.float()
    return torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)


def _below_bin_edges(points: Tensor) -> Tensor | None:
    """For ascending points in units of _Lut's bins (float64): how many lie below each bin's left edge (less a
    margin for the float32 mapping of x), or None when two points are under 3 bins apart or one is within 2 bins
    of the range's ends (then one comparison per bin would not settle it)."""
    gaps = points[1:] - points[:-1]
    if len(points) and (float(points[0]) < 2 or float(points[-1]) > _Lut.BINS - 2 or
                        (len(gaps) and float(gaps.min()) < 3)):
        return None
    return torch.searchsorted(points, torch.arange(_Lut.BINS, dtype=torch.float64) - 0.01)


class _Lut:
    """The nearest entry of a sorted non-uniform table (nf4, fp4) in a few elementwise steps instead of a binary
    search: x is mapped onto BINS equal bins over the table's range; `first[b]` is the index of the nearest
    value at bin b's left edge, and one comparison with the next midpoint settles the rest, exactly, since no
    bin holds two midpoints. (torch.bucketize costs 15-20 ns a value on a CPU; this is several times less.)"""

    BINS = 4096

    def __init__(self, scale: float, shift: float, first: Tensor, mids_t: Tensor):
        self.scale, self.shift, self.first, self.mids_t = scale, shift, first, mids_t
        self.next_mid = mids_t[first]  # per bin, the midpoint the comparison is with (one lookup, not two)
        self.first_f = first.float()  # float: on a CPU, float elementwise steps cost a third of int64 ones

    @classmethod
    def make(cls, values: Tensor, mids: Tensor) -> _Lut | None:
        lo, hi = float(values[0]), float(values[-1])
        scale = cls.BINS / (hi - lo)
        mids_t = (mids.double() - lo) * scale  # midpoints in bin units
        first = _below_bin_edges(mids_t)  # midpoints below each bin's left edge
        if first is None:
            return None  # midpoints too close to each other or to the ends: a binary search instead
        mids_t = torch.cat([mids_t, torch.tensor([math.inf], dtype=torch.float64)]).float()
        return cls(scale, -lo * scale, first.to(values.device), mids_t.to(values.device))


def gptq_codes(w: Tensor, hessian: Tensor, grid: Grid, block: int = 128, inner: int = 16, damp: float = 0.01,
               device: torch.device | str | None = None, input_major: bool = False,
               return_energy: bool = False, factor: tuple[Tensor, Tensor] | None = None
               ) -> Tensor | tuple[Tensor, Tensor]:
    """Codes (rows, in; int16) for W on a fixed grid, chosen column by column with error feedback through H^-1.

    The inverse Cholesky factor is computed in float32 after 1% damping, as GPTQ does (in float64 when float32
    cannot factor H); the rounding loop runs in float32, on `device` (default: W's). With input_major, `w` is
    given as W^T (in, rows), float32 and contiguous, and is rounded in place (no copy of it is made).

    With return_energy, also each row's output error on the damped statistics, e H' e^T with e = w - q and
    H' = H + damping (+1 on the diagonal of inputs that were always zero), at no extra matmul: with U the
    upper Cholesky factor of H'^-1, e = err U for the loop's errors err_j = (w_j - q_j) / U_jj, so
    e H' e^T = |err|^2. (energy_correction() takes the damping back out.)

    `factor`: gptq_factor(hessian) computed once for several calls on the same H (hessian is then unused).
    gptq_many() rounds several weights with different H in one loop.
    """
    dev = torch.device(device) if device is not None else w.device
    factor = factor if factor is not None else gptq_factor(hessian, damp, dev)
    # input-major: column i of W is row i of wt, so each step reads and updates contiguous memory
    wt = w.to(dev) if input_major else w.to(dev, torch.float32).t().contiguous()  # (in, rows)
    codes, energy = gptq_many([(wt, factor, grid)], dev, block, inner, in_place=True)[0]
    return (codes, energy) if return_energy else codes


def gptq_many(problems: list[tuple[Tensor, tuple[Tensor, Tensor], Grid]], device: torch.device | str = "cpu",
              block: int = 128, inner: int = 16, in_place: bool = False) -> list[tuple[Tensor, Tensor]]:
    """GPTQ rounding of several weights, each with its own H: [(W^T (in, rows) fp32, gptq_factor(H), Grid)] ->
    [(codes (rows, in) int16, damped output error per row)].

    Problems with the same input width and grid layout go through one column loop together, padded to the
    most rows among them (at most BATCH_BYTES of padded W^T per loop): a column's dozen tensor operations are
    dispatched once for all of them. For a few thousand rows a CPU spends most of the loop on that dispatch,
    so a small model's layers rounded together take a fraction of the time they take one by one; large
    layers gain nothing and go alone. The arithmetic of each is that of gptq_codes (the batch shares no
    numbers across problems: rows are independent given their H). With in_place, a problem rounded alone has its
    W^T overwritten (it holds the errors after), and no copy of it is made.
    """
    dev = torch.device(device)
    out: list = [None] * len(problems)
    buckets: dict[tuple, list[int]] = {}
    for k, (wt, _, grid) in enumerate(problems):
        buckets.setdefault((wt.shape[0], grid.signature()), []).append(k)
    for ks in buckets.values():
        ks.sort(key=lambda k: -problems[k][0].shape[1])  # most rows first: little padding within a batch
        batch: list[int] = []
        for k in ks + [None]:
            if k is not None:
                n = problems[k][0].shape[0]
                # the padded W^T of the batch and a copy of each problem's H^-1 factor
                size = (len(batch) + 1) * n * ((problems[batch[0]][0].shape[1] if batch else 0) + n) * 4
                if not batch or size <= BATCH_BYTES:
                    batch.append(k)
                    continue
            done = _gptq_batch([problems[j] for j in batch], dev, block, inner, in_place and len(batch) == 1)
            for j, result in zip(batch, done, strict=True):
                out[j] = result
            batch = [k] if k is not None else []
    return out


BATCH_BYTES = 64 * 2**20  # padded W^T of the problems rounded in one column loop, with a copy of each H^-1 factor


def _gptq_batch(problems: list, dev: torch.device, block: int, inner: int, in_place: bool) -> list:
    """One column loop over G problems (same input width and grid layout), W^T stacked as (G, in, rows).

    Speed: a column costs a few tensor operations (its nearest grid values, the error, the update of the block's
    later columns), all into preallocated buffers: for rows in the thousands a CPU spends most of the loop on
    their dispatch. Integer grids round; nf4/fp4 look up a fine table (_Lut) instead of a binary search.
    H^-1's rows are divided by their diagonal once, so the error needs no division of its own. A column's
    rank-1 update reaches only the rest of its sub-block of `inner` columns (a few rows of W^T, in cache);
    each finished sub-block updates the rest of its block by one matmul per problem.
    """
    g_n = len(problems)
    n = problems[0][0].shape[0]
    rows = max(p[0].shape[1] for p in problems)
    grid0 = problems[0][2]
    if in_place:
        wt = problems[0][0].to(dev)[None]  # (1, in, rows): rounded in place
    else:
        wt = torch.zeros(g_n, n, rows, device=dev)
        for g, (w, _, _) in enumerate(problems):
            wt[g, :, :w.shape[1]] = w
    columns = [p[2].to(dev).columns() for p in problems]  # per problem: (in / group, its rows)
    if g_n == 1:
        scales, offsets = (None if t is None else t[None] for t in columns[0])
    else:  # padding rows: scale 1, offset 0, weight 0 (any finite value rounds)
        scales = torch.ones(g_n, columns[0][0].shape[0], rows, device=dev)
        offsets = None if grid0.offsets is None else torch.zeros_like(scales)
        for g, (s, o) in enumerate(columns):
            scales[g, :, :s.shape[1]] = s
            if offsets is not None:
                offsets[g, :, :s.shape[1]] = o
    del columns
    if g_n == 1 or all(p[1] is problems[0][1] for p in problems):  # one H for all: a view, not G copies
        hinv, diag = (t.to(dev)[None].expand(g_n, *t.shape) for t in problems[0][1])
    else:
        hinv = torch.stack([p[1][0].to(dev) for p in problems])  # (G, in, in)
        diag = torch.stack([p[1][1].to(dev) for p in problems])  # (G, in)
    grid = grid0.to(dev)
    lut = grid.lut
    qmin, qmax = (-127.0, 127.0) if grid.table is None else (float(grid.values[0]), float(grid.values[-1]))
    if lut is not None:
        scales_t = scales / lut.scale  # x / scale_t + shift: x in LUT bins
        shift = torch.tensor(lut.shift, device=dev)
    codes = torch.empty((n, g_n, rows), dtype=torch.int16, device=dev)
    flat = g_n * rows
    x = torch.empty(g_n, rows, device=dev)  # the column in grid units (or LUT bins)
    q = torch.empty(flat, device=dev)  # its nearest grid value, in grid units
    m = torch.empty(flat, device=dev)
    bins = torch.empty(flat, dtype=torch.int32, device=dev)
    above = torch.empty(g_n, rows, device=dev)
    q2, m2, bins2 = q.view(g_n, rows), m.view(g_n, rows), bins.view(g_n, rows)
    b = min(block, n)
    # a block's codes (index into the sorted table); with a LUT as float, which holds them exactly
    idx = torch.empty((b, g_n, rows), dtype=torch.float32 if lut is not None else torch.int64, device=dev)
    qs = torch.empty((b, g_n, rows), device=dev) if grid.uniform else None  # a block's values, for integer codes
    perm = None
    if grid.table is not None and not torch.equal(grid.perm, torch.arange(len(grid.perm), device=grid.perm.device)):
        perm = grid.perm.to(torch.int16)
    energy = torch.zeros(g_n, 1, rows, device=dev)
    dinv2 = diag.square().reciprocal()[:, None, :]  # (G, 1, in)
    # the per-column views, made once (a view costs a dispatch of its own)
    w_cols, w_cols_u = list(wt.unbind(1)), list(wt.unsqueeze(2).unbind(1))  # (G, rows), (G, 1, rows)
    h_cols = list(hinv.unsqueeze(-1).unbind(1))  # row i of each H^-1 factor: (G, in, 1)
    scale_cols = list(scales.unbind(1))
    offset_cols = list(offsets.unbind(1)) if offsets is not None else None
    scale_t_cols = list(scales_t.unbind(1)) if lut is not None else None
    idx_rows, idx_flat = list(idx), list(idx.view(b, flat))
    qs_rows = list(qs) if qs is not None else None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        for i in range(i1, i2):
            wi = w_cols[i]
            c = i - i1
            g = i // grid.group
            s = scale_cols[g]
            if lut is not None:  # nf4, fp4: bin, the nearest value at its edge, one comparison
                torch.addcdiv(shift, wi, scale_t_cols[g], out=x).clamp_(0, lut.BINS - 1)
                bins2.copy_(x)
                ii = idx_rows[c]
                torch.index_select(lut.first_f, 0, bins, out=idx_flat[c])
                torch.index_select(lut.next_mid, 0, bins, out=m)
                ii.add_(torch.gt(x, m2, out=above))
                bins2.copy_(ii)
                torch.index_select(grid.values, 0, bins, out=q)
                qi = q2
            else:
                if offset_cols is None:
                    torch.div(wi, s, out=x)
                else:
                    torch.sub(wi, offset_cols[g], out=x).div_(s)
                if grid.uniform:  # int8, GGUF's integer grids: rounding and a clamp
                    qi = torch.round(x, out=qs_rows[c]).clamp_(qmin, qmax)
                else:
                    torch.bucketize(x, grid.mids, out=idx_rows[c])
                    torch.index_select(grid.values, 0, idx_flat[c], out=q)
                    qi = q2
            if offset_cols is None:  # the error w - value, in place of the column
                wi.addcmul_(qi, s, value=-1)
            else:
                torch.sub(x, qi, out=wi).mul_(s)
            j2 = min(c - c % inner + inner, i2 - i1) + i1  # the end of this column's sub-block
            if i + 1 < j2:  # the sub-block's later columns, one rank-1 update (cache-resident)
                wt[:, i + 1:j2].addcmul_(h_cols[i][:, i + 1:j2], w_cols_u[i], value=-1)
            elif j2 < i2:  # the sub-block is done: the block's later columns, in one matmul per problem
                j1 = j2 - inner
                wt[:, j2:i2].baddbmm_(hinv[:, j1:j2, j2:i2].transpose(1, 2), wt[:, j1:j2], alpha=-1)
        k = i2 - i1
        if grid.table is None:
            codes[i1:i2] = qs[:k]
        elif perm is None:  # a sorted table (nf4): its indices are the codes
            codes[i1:i2] = qs[:k].sub(qmin) if grid.uniform else idx[:k]
        else:  # stored codes: the sorted table's indices through its permutation (a flat lookup: fastest)
            sorted_idx = (qs[:k].sub(qmin) if grid.uniform else idx[:k]).to(torch.int32)
            torch.index_select(perm, 0, sorted_idx.view(-1), out=codes[i1:i2].view(-1))
        w1 = wt[:, i1:i2]  # at the end of a block it holds the errors
        energy.baddbmm_(dinv2[:, :, i1:i2], w1.square())
        if i2 < n:
            wt[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), w1, alpha=-1)
    out = []
    for g, (w, _, _) in enumerate(problems):
        r = w.shape[1]
        out.append((codes[:, g, :r].t().contiguous().cpu(), energy[g, 0, :r].cpu()))
    return out


DITHER_LEVELS = 1024  # the fixed dither's resolution: u = (k + 1/2) / 1024, exact in float16
DITHER_CHUNK = 1 << 22  # values hashed at a time
_DITHERS: dict[tuple, Tensor] = {}


def _mul32(h: Tensor, c: int) -> Tensor:
    """h * c mod 2**32 for h in [0, 2**32), in int64 without overflow (16 bits of h at a time)."""
    return ((h & 0xFFFF) * c + (((h >> 16) * c) & 0xFFFF) * 65536) & 0xFFFFFFFF


def fixed_dither(shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """A fixed u in (0, 1) for every element of an (out, in) weight, float16: from a 32-bit integer hash
    (murmur3's finalizer) of the row-major index, in exact integer arithmetic, so training and the merge draw the
    same u for the same weight on any device and CPU. u = (k + 1/2) / DITHER_LEVELS: never 0 or 1, so a value a
    rounding error off a grid point still rounds to it. Cached by shape and device (2 bytes a weight per shape)."""
    key = (tuple(shape), str(device))
    u = _DITHERS.get(key)
    if u is None:
        n = shape[0] * shape[1]
        u = torch.empty(n, dtype=torch.float16, device=device)
        for lo in range(0, n, DITHER_CHUNK):  # int64 temporaries of at most DITHER_CHUNK values
            h = _mul32(torch.arange(lo, min(lo + DITHER_CHUNK, n), dtype=torch.int64, device=device), 0x9E3779B1)
            h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
            h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
            k = (h ^ (h >> 16)) >> (32 - int(math.log2(DITHER_LEVELS)))
            u[lo:lo + len(k)] = (k * 2 + 1).to(torch.float32) / (2 * DITHER_LEVELS)
        u = u.view(shape)
        _DITHERS[key] = u
    return u


def dithered_codes(w: Tensor, scales: Tensor, table: Tensor, blocksize: int) -> Tensor:
    """The (out, in) 4-bit codes (uint8) of W on the grid table x block scale, by stochastic rounding with the
    fixed dither: of the two grid values around x = w / scale, the upper one when u < (x - lo) / (hi - lo).

    Unbiased over the weights (the expected value is x), and a weight on the grid keeps its value exactly (its
    code too, but for fp4's two codes of zero, which become the lower one): the
    base alone is exported unchanged, and an update far smaller than a step still moves codes, a share of them in
    proportion to its size, where round to nearest moves none. Merge-aware training (nf4, fp4) computes its
    forward with these codes and the merge stores the same ones. Values beyond the grid's ends are clamped.
    Speed: about round to nearest's (every lookup an index_select into a small table).
    """
    shape = tuple(w.shape)
    t = _FloorTable.of(table, w.device)
    x = (w.reshape(-1, blocksize).float() / _nonzero(scales).view(-1, 1)).reshape(-1)
    x = x.nan_to_num_(0.0).clamp_(t.lo, t.hi)  # (a NaN weight would index outside the tables)
    j = t.floor_index(x)  # the grid value at or below x (never the last)
    lo, gap = torch.index_select(t.values, 0, j), torch.index_select(t.gaps, 0, j)
    up = fixed_dither(shape, w.device).view(-1) < x.sub_(lo).div_(gap)
    return torch.index_select(t.codes, 0, j.add_(up)).view(shape)


class _FloorTable:
    """A 4-bit table's distinct values sorted (fp4's two zeros as one, with the lower code), the gaps between
    them, their codes, and a lookup of the largest value at or below x: as _Lut finds the nearest, x is mapped
    onto _Lut.BINS equal bins, the count of values below each bin's left edge is looked up, and one comparison
    with the next value settles the rest, exactly, since no bin holds two of them (else one comparison per
    value)."""

    _cache: dict[tuple, _FloorTable] = {}

    def __init__(self, table: Tensor, device: torch.device):
        values, order = table.float().sort(stable=True)  # equal values: the lowest code, on every device
        keep = torch.ones_like(values, dtype=torch.bool)
        keep[1:] = values[1:] != values[:-1]
        values, order = values[keep], order[keep]
        self.lo, self.hi = float(values[0]), float(values[-1])
        self.values = values.to(device)
        self.gaps = torch.cat([values[1:] - values[:-1], torch.ones(1)]).to(device)  # (the last: never used)
        self.codes = order.to(torch.uint8).to(device)
        inner = values[1:-1].double()
        self.scale = _Lut.BINS / (self.hi - self.lo)
        count = _below_bin_edges((inner - self.lo) * self.scale)  # inner values below each bin's left edge
        self.count = self.next = None
        if count is not None:
            self.count = count.int().to(device)
            self.next = torch.cat([values[1:-1], torch.tensor([math.inf])])[count].to(device)  # the one to compare

    @classmethod
    def of(cls, table: Tensor, device: torch.device) -> _FloorTable:
        key = (tuple(table.tolist()), str(device))
        if key not in cls._cache:
            cls._cache[key] = cls(table, device)
        return cls._cache[key]

    def floor_index(self, x: Tensor) -> Tensor:
        """For x within the range: the index (int32, 0 .. len - 2) of the largest value at or below x."""
        if self.count is None:
            j = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
            for v in self.values[1:-1].tolist():
                j += x >= v
            return j
        b = ((x - self.lo) * self.scale).clamp_(0, _Lut.BINS - 1).int()
        return torch.index_select(self.count, 0, b).add_(x >= torch.index_select(self.next, 0, b))


def dithered_export(w: Tensor, base: dict[str, Tensor] | None, q: QuantConfig) -> dict[str, Tensor]:
    """A 4-bit export of W (out, in) by stochastic rounding with the fixed dither (dithered_codes), on the scales
    of `base` (the trained layer's packed tensors, in q's format: the base then keeps its values exactly) or,
    without one, on fresh scales of W. Merge-aware training's forward and the merge both call this: they store
    the same codes where they compute the same W bit for bit (a merge on another device than the training's
    computes B·A by another matmul, and a weight within a rounding error of its decision may fall the other way,
    as with round to nearest)."""
    like = base if base is not None else formats.quantize(w, q, codes=False)
    scales = formats.block_scales(like, q.quant, tuple(w.shape), q.blocksize)
    return formats.pack_4bit_codes(dithered_codes(w, scales, formats.code_table(q.quant), q.blocksize), like)


def energy_correction(d: Tensor, hessian: Tensor, damp: float = 0.01) -> Tensor:
    """Per row of D (rows, in), what gptq_codes' energy counts beyond D H D^T: the damping's
    damp * mean(diag H) * |d|^2, and |d_j|^2 for inputs that were always zero (their diagonal set to 1)."""
    dead, lam = _damping(torch.diag(hessian).float(), damp)
    sq = d.square()
    out = sq.sum(1) * lam
    if dead.any():
        out += sq[:, dead].sum(1)
    return out


def gptq_factor(hessian: Tensor, damp: float = 0.01, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """What the rounding loop reads of H: U (upper Cholesky factor of the damped H^-1) with each row divided by
    its diagonal, and that diagonal. float32, or float64 when float32 cannot factor H."""
    hinv = _inverse_factor(hessian.to(device), damp, torch.float32)
    if hinv is None:  # H too ill-conditioned for float32 even with damping: float64 (twice the memory)
        hinv = _inverse_factor(hessian.to(device), damp, torch.float64).float()
    diag = torch.diagonal(hinv).clone()
    hinv.div_(diag[:, None])  # err_j = (w_j - q_j) / d_j, folded into row j
    return hinv, diag


def _damping(diag: Tensor, damp: float) -> tuple[Tensor, float]:
    """What the factorization adds to H, from its diagonal: 1 on inputs that were always zero (any value works
    there), then damp x the mean of the diagonal so set, on every input (as GPTQ does)."""
    dead = diag == 0
    return dead, damp * float(torch.where(dead, torch.ones_like(diag), diag).mean())


def _inverse_factor(hessian: Tensor, damp: float, dtype: torch.dtype) -> Tensor | None:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U) after damping (as GPTQ does), in `dtype`; None if it
    does not exist there.

    One factorization and one triangular solve, where factoring H, inverting and factoring again takes three:
    with J the order-reversing permutation and J H J = L L^T, U = J L^-1 J, since U^T U = J L^-T L^-1 J = H^-1.
    """
    h = hessian.flip(0, 1).to(dtype)  # J H J (a copy)
    dead, lam = _damping(torch.diag(h), damp)
    h[dead, dead] = 1
    h.diagonal().add_(lam)
    low, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info) != 0:
        return None
    u = _invert_lower_(low).flip(0, 1)
    del low
    return u if torch.isfinite(u.sum()) else None  # an inf or nan anywhere makes the sum so (an overflow too: float64)


def _invert_lower_(low: Tensor, leaf: int = 512) -> Tensor:
    """A lower-triangular matrix inverted in place, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1,
    D^-1]], the products with triangular factors skipping their zero halves. A third of the arithmetic of a
    triangular solve against the identity (which does not know its right-hand side is triangular), in matmuls,
    and a quarter of the matrix as working memory."""
    n = len(low)
    if n <= leaf:
        eye = torch.eye(n, dtype=low.dtype, device=low.device)
        low.copy_(torch.linalg.solve_triangular(low, eye, upper=False))
        return low
    k = n // 2
    a_inv, d_inv = _invert_lower_(low[:k, :k], leaf), _invert_lower_(low[k:, k:], leaf)
    c_a = _times_lower(low[k:, :k], a_inv, leaf)
    low[k:, :k] = _lower_times(d_inv, c_a, leaf).neg_()
    return low


def _times_lower(x: Tensor, t: Tensor, leaf: int) -> Tensor:
    """x @ t for a lower-triangular t, by halves of t ([[P, 0], [Q, R]]: x1 P + x2 Q, x2 R), skipping its zero
    quarter: about half the arithmetic of a plain matmul."""
    k = t.shape[0]
    if k <= leaf:
        return x @ t
    h = k // 2
    out = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    out[:, :h] = _times_lower(x[:, :h], t[:h, :h], leaf)
    out[:, :h].addmm_(x[:, h:], t[h:, :h])
    out[:, h:] = _times_lower(x[:, h:], t[h:, h:], leaf)
    return out


def _lower_times(t: Tensor, y: Tensor, leaf: int) -> Tensor:
    """t @ y for a lower-triangular t, by halves as _times_lower ([[P, 0], [Q, R]]: P y1, Q y1 + R y2)."""
    k = t.shape[0]
    if k <= leaf:
        return t @ y
    h = k // 2
    out = torch.empty(k, y.shape[1], dtype=y.dtype, device=y.device)
    out[:h] = _lower_times(t[:h, :h], y[:h], leaf)
    out[h:] = _lower_times(t[h:, h:], y[h:], leaf)
    out[h:].addmm_(t[h:, :h], y[:h])
    return out


@dataclass
class Rounded:
    """One layer's export: packed tensors, their dequantized value, which scales won, (when asked for) the value
    the same rounding gives the weight without the update, and (GPTQ) its output error on the calibration
    inputs."""

    packed: dict[str, Tensor]
    value: Tensor
    scales: str
    without: Tensor | None = None
    error_energy: float | None = None  # GPTQ: ||X (value - W)^T||^2 on the calibration inputs, from its own errors


def requantize_group(merged: dict[str, Tensor], base_packed: dict[str, dict[str, Tensor] | None], q: QuantConfig,
                     method: str, hessian: Tensor | None, device: torch.device | str | None = None,
                     without: dict[str, Tensor] | None = None) -> dict[str, Rounded]:
    """The packed exports of weights that share one input statistics matrix H, their rows rounded in stacked passes.

    Args:
        merged: layer name -> merged (out, in) fp32 weight.
        base_packed: layer name -> packed tensors whose scales are a candidate grid (the trained layer's own when
            they are in q.quant: a small update then moves only the codes it must), or None.
        method: 'gptq', 'rtn', or 'dither' (dithered_export on the base's grid: merge-aware nf4 / fp4).
        without: layer name -> the weight without the update; each is rounded the same way (on its own base
            grid, in the same stacked pass) into Rounded.without: the export's format alone, the floor the
            update is measured against.
    """
    return requantize_groups([(merged, base_packed, hessian, without)], q, method, device)[0]


def requantize_groups(groups: list[tuple], q: QuantConfig, method: str, device: torch.device | str | None = None
                      ) -> list[dict[str, Rounded]]:
    """requantize_group for several groups at once, [(merged, base_packed, hessian, without)] -> [{name: Rounded}]:
    GPTQ's rounds of all of them go through gptq_many together (a small block's groups of one input width in one
    column loop), each group with its own H."""
    if method != "gptq":
        return [_requantize_direct(m, b, q, method, w or {}) for m, b, _, w in groups]
    dev = device or "cpu"
    plans = [_GroupRound(m, b, q, h, dev, w or {}) for m, b, h, w in groups]
    done = _run_rounds([(p, p.first()) for p in plans], dev)
    rest = _run_rounds([(p, p.second(d)) for p, d in zip(plans, done, strict=True)], dev)
    return [p.finish(d, r) for p, d, r in zip(plans, done, rest, strict=True)]


def _requantize_direct(merged: dict, base_packed: dict, q: QuantConfig, method: str, without: dict) -> dict:
    """Round to nearest, or the fixed dither (merge-aware nf4 / fp4: the rounding the training forward used, on
    the same grid); the floor (the weight without the update) the same way."""
    out = {}
    for n, w in merged.items():
        if method == "dither":
            packed = dithered_export(w, base_packed.get(n), q)
            floor = (_dequantize(dithered_export(without[n], base_packed.get(n), q), w.shape, q)
                     if n in without else None)
            out[n] = Rounded(packed, _dequantize(packed, w.shape, q), "base" if base_packed.get(n) else "fresh", floor)
        else:
            packed = formats.quantize(w, q)
            floor = _dequantize(formats.quantize(without[n], q), w.shape, q) if n in without else None
            out[n] = Rounded(packed, _dequantize(packed, w.shape, q), "fresh", floor)
    return out


class _GroupRound:
    """GPTQ for one group of layers sharing H, in two rounds of row jobs.

    Two candidate grids per layer: fresh scales from the merged weight (needed when the update changes a
    block's range), and the base's own; the lower output error on the calibration inputs wins. Rows are
    independent given H, so a quarter of them (every TRIAL_STRIDE-th) rounded on both grids chooses, and only
    the winner rounds the rest (1.25 passes, not 2). The first round holds the trials, the small layers' both
    grids whole and the floor's rows (every layer's: the weight without the update, on its own grid); the
    second, the winners' remaining rows."""

    def __init__(self, merged: dict, base_packed: dict, q: QuantConfig, hessian: Tensor, device, without: dict):
        self.merged, self.q, self.hessian = merged, q, hessian
        fresh = {n: formats.quantize(w, q, codes=False) for n, w in merged.items()}  # scales alone
        alone = {n: base_packed.get(n) or formats.quantize(w, q, codes=False) for n, w in without.items()}
        self.cands = {(n, "fresh"): (p, merged[n]) for n, p in fresh.items()}
        self.cands.update({(n, "base"): (p, merged[n]) for n, p in base_packed.items() if p is not None})
        self.cands.update({(n, "without"): (p, without[n]) for n, p in alone.items()})
        self.grids = {k: _grid(like, tuple(w.shape), q) for k, (like, w) in self.cands.items()}
        self.factor = gptq_factor(hessian, device=device)  # once for all the group's rows
        contested = [n for n in merged if (n, "base") in self.cands and merged[n].shape[0] >= TRIAL_MIN_ROWS]
        self.trial = {n: torch.arange(0, merged[n].shape[0], TRIAL_STRIDE) for n in contested}
        self.winner: dict[str, str] = {}
        self.rest: dict[str, Tensor] = {}  # per contested layer, the rows the trial left

    def first(self) -> dict:
        jobs = {(n, label): (t, self.grids[n, label], self.merged[n]) for n, t in self.trial.items()
                for label in ("fresh", "base")}
        jobs.update({(n, label): (torch.arange(w.shape[0]), self.grids[n, label], w)
                     for (n, label), (_, w) in self.cands.items() if n not in self.trial or label == "without"})
        return jobs

    def second(self, done: dict) -> dict:
        self.winner = {n: min(("fresh", "base"), key=lambda label: float(done[n, label][1].sum(dtype=torch.float64)))
                       for n in self.trial}
        jobs = {}
        for n, label in self.winner.items():  # the winner's rows the trial left
            rows = torch.arange(self.merged[n].shape[0])
            self.rest[n] = rows[rows % TRIAL_STRIDE != 0]
            jobs[n, label] = (self.rest[n], self.grids[n, label], self.merged[n])
        return jobs

    def finish(self, done: dict, rest: dict) -> dict[str, Rounded]:
        q, hessian = self.q, self.hessian
        self.factor = None
        best: dict[str, tuple[float, Rounded]] = {}
        floors: dict[str, Tensor] = {}
        for (n, label), (like, w) in self.cands.items():
            if n in self.winner and label not in (self.winner[n], "without"):
                continue
            if n in self.winner and label != "without":  # the trial's rows and the rest's
                codes = torch.empty(w.shape, dtype=torch.int16)
                energy = torch.empty(w.shape[0])
                codes[self.rest[n]], energy[self.rest[n]] = rest[n, label]
                codes[self.trial[n]], energy[self.trial[n]] = done[n, label]
            else:
                codes, energy = done[n, label]
            packed = _pack(codes, like, q.quant, tuple(w.shape))
            value = _dequantize(packed, w.shape, q)
            del codes
            if label == "without":
                floors[n] = value
                continue
            # ||X (Q - W')^T||^2 on the calibration inputs, from the rounding's own errors
            err = float(energy.sum(dtype=torch.float64) - energy_correction(value - w, hessian).sum(dtype=torch.float64))
            if n not in best or err < best[n][0]:  # (without a trial: both grids rounded whole, the lower error)
                best[n] = (err, Rounded(packed, value, label, error_energy=max(err, 0.0)))
        for n, f in floors.items():
            best[n][1].without = f
        return {n: r for n, (_, r) in best.items()}


TRIAL_STRIDE = 4  # every 4th row of a layer, rounded on both candidate grids, chooses between them
TRIAL_MIN_ROWS = 1024  # smaller layers round both grids whole: their loop is dispatch-bound, a trial would add one


def _run_rounds(rounds: list[tuple[_GroupRound, dict]], device) -> list[dict]:
    """Row jobs of several groups, {key: (row indices (distinct, ascending), Grid, W)} each -> {key: (codes (rows,
    in) int16, damped output error per row)} each. A group's jobs are stacked into problems of at most
    CHUNK_BYTES of W^T (rows of one H). A problem of more than half of BATCH_BYTES is rounded as soon as it is
    stacked and freed (a large layer's copies are never all held at once); the small ones of all groups are
    rounded together by gptq_many."""
    small, where = [], []
    out: list[dict] = [{} for _ in rounds]

    def spread(g: int, keys: list, sizes: list[int], codes: Tensor, energy: Tensor) -> None:
        at = 0
        for k, size in zip(keys, sizes, strict=True):
            out[g][k] = (codes[at:at + size], energy[at:at + size])
            at += size

    for g, (plan, jobs) in enumerate(rounds):
        keys = list(jobs)
        for chunk in _chunks([len(jobs[k][0]) * jobs[k][2].shape[1] * 4 for k in keys], CHUNK_BYTES):
            n_in = jobs[keys[chunk[0]]][2].shape[1]
            wt = torch.empty(n_in, sum(len(jobs[keys[i]][0]) for i in chunk))  # (in, rows): the copy rounded
            at = 0
            for i in chunk:  # one weight's chosen rows at a time
                rows, _, w = jobs[keys[i]]
                wt[:, at:at + len(rows)] = (w if len(rows) == w.shape[0] else w[rows]).t()
                at += len(rows)
            grid = Grid.stack([jobs[keys[i]][1].rows(jobs[keys[i]][0]) for i in chunk])
            place = (g, [keys[i] for i in chunk], [len(jobs[keys[i]][0]) for i in chunk])
            if wt.numel() * 4 > BATCH_BYTES // 2:  # alone, now, in place
                spread(*place, *gptq_many([(wt, plan.factor, grid)], device, in_place=True)[0])
                del wt
                continue
            small.append((wt, plan.factor, grid))
            where.append(place)
    results = gptq_many(small, device, in_place=True)
    del small
    for place, result in zip(where, results, strict=True):
        spread(*place, *result)
    return out


def _grid(like: dict[str, Tensor], shape: tuple[int, int], q: QuantConfig) -> Grid:
    """The grid of the packed tensors `like` (their scales) for a weight of this shape."""
    if q.quant in gguf_types.TYPES:  # GGUF blocks of 32: the f16 scales (and minima) the file will store
        d, m = gguf_types.scales(like, q.quant, shape)
        return Grid(d, gguf_types.BLOCK, gguf_types.table(q.quant), m)
    scales = formats.block_scales(like, q.quant, shape, q.blocksize)
    if q.quant == "int8":
        return Grid(scales[:, None], shape[1])
    return Grid.four_bit(formats.code_table(q.quant), scales, shape, q.blocksize)


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices of consecutive items whose sizes add up to at most `limit` (an item alone when larger)."""
    out, total = [], limit
    for k, size in enumerate(sizes):
        if total + size > limit:
            out.append([])
            total = 0
        out[-1].append(k)
        total += size
    return out


def _pack(codes: Tensor, like: dict[str, Tensor], quant: str, shape: tuple[int, int]) -> dict[str, Tensor]:
    """The packed form with these codes on the grid of `like`."""
    if quant in gguf_types.TYPES:
        return gguf_types.pack(codes, *gguf_types.scales(like, quant, shape), quant)
    return formats.pack_int8_codes(codes, like) if quant == "int8" else formats.pack_4bit_codes(codes, like)


def _dequantize(packed: dict[str, Tensor], shape, q: QuantConfig) -> Tensor:
    return formats.dequantize(packed, q.quant, tuple(shape), q.blocksize, torch.float32)


def retained(actual: Tensor, intended: Tensor, hessian: Tensor, intended_h: Tensor | None = None,
             miss_energy: float | None = None) -> dict:
    """How much of the intended update dW the export really applies (actual = its weight change).

    Weight space: cosine and norm ratio of the two (out, in) matrices. Output space, what the model
    feels: the same on the calibration activations, <A, B>_H = trace(A H B^T) with H = X^T X.
    Inner products are taken without elementwise temporaries (one product of a block of H at a time).
    `intended_h`: dW H when the caller has it cheaper (a LoRA update's s B (A H) costs r x in^2, not out x in^2).
    `miss_energy`: <A - B, A - B>_H when the caller has it (GPTQ's output error, where the weight without the
    update is the one rounded onto: A - B = the export less the merged weight). Then <A, A>_H = miss +
    2 <A, B>_H - <B, B>_H costs no out x in^2 product.
    """
    a, b, h = actual.float(), intended.float(), hessian.float()

    def dot(x: Tensor, y: Tensor) -> float:
        return float(torch.dot(x.reshape(-1), y.reshape(-1)))

    def cos_ratio(ab: float, aa: float, bb: float) -> tuple[float, float]:
        if aa <= 0 or bb <= 0:
            return 0.0, 0.0
        return round(ab / math.sqrt(aa * bb), 4), round(math.sqrt(aa / bb), 4)

    w_cos, w_ratio = cos_ratio(dot(a, b), dot(a, a), dot(b, b))
    bh = b @ h if intended_h is None else intended_h.float()
    ah_b, bh_b = dot(a, bh), dot(bh, b)
    del bh
    if miss_energy is not None:
        ah_a = max(miss_energy + 2 * ah_b - bh_b, 0.0)
    else:  # A H A^T over H's blocks on and above its diagonal (symmetric: those off it count twice)
        ah_a = sum((1 if rows == cols else 2) * dot(a[:, rows] @ h[rows, cols], a[:, cols])
                   for rows, cols in _gram_blocks(h.shape[0]))
    o_cos, o_ratio = cos_ratio(ah_b, ah_a, bh_b)
    return {"update_cos": w_cos, "update_norm_ratio": w_ratio, "output_cos": o_cos, "output_norm_ratio": o_ratio}


GRAM_BLOCK = 512  # H = X^T X (and the report's A H A^T) of wider inputs: a block at a time, on and above the diagonal


def _gram_blocks(n: int) -> list[tuple[slice, slice]]:
    """The (rows, cols) blocks of an n x n symmetric matrix on and above its diagonal: a split into parts of about
    GRAM_BLOCK, 3 at least from 384 (6 of 9 blocks: a third less arithmetic, in products still wide enough to run
    at the matmul's speed) and 8 at most (36 of 64 blocks)."""
    parts = min(8, max(1 if n < 384 else 3, n // GRAM_BLOCK))
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    spans = [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
    return [(spans[i], spans[j]) for i in range(parts) for j in range(i, parts)]


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
            for rows, cols in _gram_blocks(x.shape[1]):  # H is symmetric: the blocks on and above the diagonal
                self.h[key][rows, cols].addmm_(x[:, rows].t(), x[:, cols])
        return fn

    def pop(self, key: str) -> Tensor | None:
        """The statistics of one input, whole (the blocks below the diagonal mirrored), no longer held here."""
        h = self.h.pop(key, None)
        if h is not None:
            for rows, cols in _gram_blocks(h.shape[0]):
                if rows != cols:
                    h[cols, rows] = h[rows, cols].t()
        return h

    @contextlib.contextmanager
    def collecting(self, layers: dict[str, nn.Module]) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.live.clear()
