"""Triton kernels for a frozen nf4 / fp4 weight: the 4-bit codes are decoded inside the matmul tile.

Two kernels, one weight layout (bitsandbytes' own, see formats.py): the (N, K) weight flattened row
by row, two codes a byte with the even element in the high nibble, one scale per `blocksize`
consecutive values. With double quantization a scale is itself a uint8 code:
    scale[b] = nested_quant_map[absmax[b]] * nested_absmax[b // 256] + offset.

  _matmul_kernel   the forward   Y = X @ W.T  (+ s * XA @ B.T)  (+ bias)       (M, K) -> (M, N)
                   and the input gradient  dX = dY @ W  (+ keep / (1-p) * (GA @ A))  (M, N) -> (M, K)
  _decode_kernel   the forward for a few rows (decoding): a (N / BN, M) grid, each program one row of X
                   and BN outputs, so each packed byte is read once per row (once for a single token),
                   split over many programs along N, with the same LoRA and bias epilogue.

The LoRA factors enter as already-small products: XA = dropout(X) @ A.T (M, r) and GA = s * dY @ B
(M, r), which the caller keeps for the factors' own gradients. Every tile accumulates in fp32.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (numpy); numpy has no bf16 matmul, so there
the operands of `tl.dot` are rounded to bf16 and then multiplied in fp32 (DOT_F32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..formats import NESTED_BLOCKSIZE

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_NESTED = tl.constexpr(NESTED_BLOCKSIZE)


@triton.jit
def _scale(absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, blk, mask, DOUBLE: tl.constexpr):
    """The fp32 scale of quantization block `blk` (any shape)."""
    # one return for both branches: Triton type-checks every return, and uint8 codes are not fp32 scales
    if DOUBLE:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_map_ptr + code) * tl.load(nested_ptr + blk // _NESTED, mask=mask, other=0.0) \
            + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _weight(w_ptr, qmap_ptr, absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, n, k, K, mask,
            BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr):
    """W[n, k] in fp32 for broadcastable index tiles n and k (zero where masked)."""
    idx = n.to(tl.int64) * K + k  # position in the flattened weight
    byte = tl.load(w_ptr + idx // 2, mask=mask, other=0)
    code = (byte >> ((1 - idx % 2) * 4).to(tl.uint8)) & 0xF  # the even element sits in the high nibble
    scale = _scale(absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, idx // BLOCKSIZE, mask, DOUBLE)
    return tl.load(qmap_ptr + code.to(tl.int32)) * scale


@triton.jit
def _tile(ptr, rows, cols, row_stride, col_stride, n_rows, n_cols, other):
    """The (len(rows), len(cols)) tile ptr[rows[i] * row_stride + cols[j] * col_stride], `other` where a row
    or column index is past n_rows / n_cols."""
    offsets = rows[:, None].to(tl.int64) * row_stride + cols[None, :].to(tl.int64) * col_stride
    return tl.load(ptr + offsets, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=other)


@triton.jit
def _store_tile(ptr, rows, cols, n_rows, n_cols, value):
    """Write `value` into the row-major (n_rows, n_cols) matrix at `ptr`, inside its bounds."""
    tl.store(ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], value,
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _dot(a, b, acc, DTYPE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with both operands rounded to DTYPE (the compute dtype) and fp32 accumulation."""
    a = a.to(DTYPE)
    b = b.to(DTYPE)
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _swizzle(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Tile (m, n) of program `pid`, walking GROUP row tiles at a time so their weight tiles stay in L2."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP * grid_n
    first_m = (pid // width) * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _decoded_product(a_ptr, w_ptr, qmap_ptr, absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, rm, rc, acc,
                     M, N, K, BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, DOT_F32: tl.constexpr,
                     IEEE: tl.constexpr, BI: tl.constexpr, TRANSPOSED: tl.constexpr):
    """acc + A @ W.T[:, rc] (TRANSPOSED: A is (M, K) and rc indexes W's rows) or acc + A @ W[:, rc] (A is
    (M, N), rc indexes W's columns), W (N, K) decoded one (BI, len(rc)) tile at a time."""
    dtype = a_ptr.dtype.element_ty
    if TRANSPOSED:
        inner = K
    else:
        inner = N
    for i0 in range(0, inner, BI):
        ri = i0 + tl.arange(0, BI)
        a = _tile(a_ptr, rm, ri, inner, 1, M, inner, 0.0)  # (BM, BI)
        if TRANSPOSED:
            n = rc[None, :]
            k = ri[:, None]
        else:
            n = ri[:, None]
            k = rc[None, :]
        w = _weight(w_ptr, qmap_ptr, absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, n, k, K,
                    (n < N) & (k < K), BLOCKSIZE, DOUBLE)  # (BI, len(rc))
        acc = _dot(a, w, acc, dtype, DOT_F32, IEEE)
    return acc


@triton.jit
def _matmul_kernel(a_ptr, w_ptr, qmap_ptr, absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr,
                   l_ptr, r_ptr, extra_ptr, out_ptr, M, N, K, R, scale, M_BUCKET,
                   BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_EXTRA: tl.constexpr,
                   TRANSPOSED: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                   BM: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr, GROUP: tl.constexpr):
    """Both tiled kernels; a (BM, BC) tile of the output per program, BI the inner step.

    TRANSPOSED (the forward):  out (M, N) = A @ W.T + scale * (L @ R.T) + extra   A = X, L = XA, R = B (N, r),
                               extra = the bias (N,)
    else (the input gradient): out (M, K) = A @ W + keep * scale * (L @ R)       A = dY, L = GA, R = A (r, K),
                               extra = the 1-byte keep mask (M, K), scale = 1 / (1 - p)
    """
    if TRANSPOSED:
        C = N
    else:
        C = K
    pid_m, pid_c = _swizzle(tl.program_id(0), M, C, BM, BC, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    dtype = a_ptr.dtype.element_ty
    acc = _decoded_product(a_ptr, w_ptr, qmap_ptr, absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, rm, rc,
                           tl.zeros((BM, BC), dtype=tl.float32), M, N, K, BLOCKSIZE, DOUBLE, DOT_F32, IEEE, BI,
                           TRANSPOSED)
    if HAS_LORA:  # the epilogue: the rank-r product on the tile, its left factor computed once by the caller
        rr = tl.arange(0, BR)
        left = _tile(l_ptr, rm, rr, R, 1, M, R, 0.0)  # (BM, BR)
        if TRANSPOSED:
            right = _tile(r_ptr, rr, rc, 1, R, R, N, 0.0)  # (BR, BC): B is (N, R)
        else:
            right = _tile(r_ptr, rr, rc, K, 1, R, K, 0.0)  # (BR, BC): A is (R, K)
        lora = _dot(left, right, tl.zeros((BM, BC), dtype=tl.float32), dtype, DOT_F32, IEEE) * scale
        if not TRANSPOSED and HAS_EXTRA:  # through the dropout mask
            lora = lora * _tile(extra_ptr, rm, rc, K, 1, M, K, 0).to(tl.float32)
        acc += lora
    if TRANSPOSED and HAS_EXTRA:
        acc += tl.load(extra_ptr + rc, mask=rc < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(out_ptr, rm, rc, M, C, acc.to(dtype))


@triton.jit
def _decode_kernel(x_ptr, w_ptr, qmap_ptr, absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr,
                   xa_ptr, b_ptr, bias_ptr, y_ptr, N, K, R, scaling,
                   BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, HAS_LORA: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BK2: tl.constexpr):
    """One row of Y, BN outputs per program; each step reads a (BN, BK2) tile of packed bytes (again for each
    row of X: the grid is (N / BN, M))."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, BK2), dtype=tl.float32)
    for j0 in range(0, K // 2, BK2):  # K is even for every layer this kernel is used on
        rj = j0 + tl.arange(0, BK2)  # byte j of the row holds elements 2j (high nibble) and 2j + 1
        mask = (rn[:, None] < N) & (rj[None, :] < K // 2)
        byte_idx = rn[:, None].to(tl.int64) * (K // 2) + rj[None, :]
        byte = tl.load(w_ptr + byte_idx, mask=mask, other=0)
        scale = _scale(absmax_ptr, nested_ptr, nested_map_ptr, offset_ptr, (byte_idx * 2) // BLOCKSIZE, mask,
                       DOUBLE)  # both nibbles of a byte share a block: blocksizes are even
        hi = tl.load(qmap_ptr + (byte >> 4).to(tl.int32))
        lo = tl.load(qmap_ptr + (byte & 0xF).to(tl.int32))
        x_even = tl.load(x_ptr + m.to(tl.int64) * K + 2 * rj, mask=rj < K // 2, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + m.to(tl.int64) * K + 2 * rj + 1, mask=rj < K // 2, other=0.0).to(tl.float32)
        acc += scale * (hi * x_even[None, :] + lo * x_odd[None, :])
    y = tl.sum(acc, axis=1)  # (BN,)
    if HAS_LORA:
        rr = tl.arange(0, BR)
        xa = tl.load(xa_ptr + m * R + rr, mask=rr < R, other=0.0).to(tl.float32)
        b = _tile(b_ptr, rn, rr, R, 1, N, R, 0.0).to(tl.float32)
        y += scaling * tl.sum(b * xa[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * N + rn, y.to(dtype), mask=rn < N)


# ---- launchers ------------------------------------------------------------------------------------

DECODE_ROWS = 8  # at most this many rows of X go through the decode kernel


def _weight_args(packed: dict[str, Tensor]) -> tuple[list, bool]:
    double = "nested_absmax" in packed
    absmax = packed["absmax"]
    if double:
        return [packed["weight"], packed["quant_map"], absmax, packed["nested_absmax"],
                packed["nested_quant_map"], packed["offset"]], True
    return [packed["weight"], packed["quant_map"], absmax, absmax, absmax, absmax], False  # unused slots


def _operands(a: Tensor, packed: dict[str, Tensor], blocksize: int, left: Tensor | None, right: Tensor | None,
              R: int) -> tuple[list, list, dict]:
    """The weight's pointer arguments, the LoRA factors' (placeholders without LoRA), and the shared
    compile-time flags of a launch."""
    wargs, double = _weight_args(packed)
    lora = [left.contiguous(), right.contiguous()] if left is not None else [a, a]
    return wargs, lora, dict(BLOCKSIZE=blocksize, DOUBLE=double, HAS_LORA=left is not None, BR=_rank_block(R))


def _bucket(m: int) -> int:
    """The autotuner's key for the row count: tiles are re-chosen when it crosses a power of two."""
    return triton.next_power_of_2(m)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


# Tile shapes. In the interpreter every program is a Python loop, so tiles are small and fixed. On a GPU
# they are picked by Triton's autotuner per (row-count bucket, N, K), from shapes that suit bf16 tensor
# cores: (BM, BC, BI) = rows, output columns and inner step of a tile, in either direction.
_INTERPRETER_TILES = dict(BM=16, BC=32, BI=32, GROUP=4)
_INTERPRETER_DECODE_TILES = dict(BN=16, BK2=32)
_GPU_TILES = [  # (BM, BC, BI, warps, stages): the tiled kernels serve up to kernels.FUSED_MAX_ROWS rows
    (16, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 64, 64, 4, 3), (32, 128, 64, 4, 2), (64, 128, 64, 8, 2),
    (128, 64, 64, 4, 3), (128, 128, 64, 8, 2),
]
_DECODE_TILES = [(16, 64, 4), (32, 64, 4), (16, 128, 4), (64, 32, 4), (8, 128, 2)]  # (BN, BK2, warps)


def _tuned(kernel):
    """The kernel autotuned on a GPU; one tuner (and tuning cache) per direction."""
    if INTERPRET:
        return kernel
    configs = [triton.Config(dict(BM=bm, BC=bc, BI=bi, GROUP=8), num_warps=w, num_stages=st)
               for bm, bc, bi, w, st in _GPU_TILES]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "R", "TRANSPOSED"])(kernel)


_forward = _tuned(_matmul_kernel)
_input_grad = _tuned(_matmul_kernel)
_decode = _decode_kernel if INTERPRET else triton.autotune(
    configs=[triton.Config(dict(BN=bn, BK2=bk2), num_warps=w) for bn, bk2, w in _DECODE_TILES],
    key=["N", "K", "R"])(_decode_kernel)


def _launch(kernel, grid, args: list, interpreter_tiles: dict, **meta) -> None:
    """kernel[grid](*args): in the interpreter with its fixed tiles, on a GPU autotuned, on the tensors' device
    (Triton launches on the current one)."""
    if INTERPRET:
        kernel[grid(interpreter_tiles)](*args, **meta, **interpreter_tiles)
        return
    with torch.cuda.device(args[0].device):
        kernel[grid](*args, **meta)


def _dot_flags(dtype: torch.dtype) -> dict:
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(DOT_F32=INTERPRET and dtype == torch.bfloat16, IEEE=ieee)


def forward(x: Tensor, packed: dict[str, Tensor], N: int, blocksize: int, *, xa: Tensor | None = None,
            B: Tensor | None = None, scaling: float = 0.0, bias: Tensor | None = None,
            decode: bool | None = None, out: Tensor | None = None) -> Tensor:
    """x (M, K) @ W.T (+ scaling * xa @ B.T) (+ bias) -> (M, N) in x's dtype.

    Args:
        x: contiguous (M, K) in the compute dtype.
        packed: the layer's nf4 / fp4 packed form for a weight of shape (N, K).
        xa: (M, r) = dropout(x) @ A.T, and B (N, r): the LoRA branch, or both None.
        bias: (N,) or None.
        decode: use the decode kernel (default: when M <= DECODE_ROWS; never for an odd K, whose rows do
            not start on a byte).
        out: an (M, N) buffer to write into (every element is written).
    """
    M, K = x.shape
    y = torch.empty(M, N, device=x.device, dtype=x.dtype) if out is None else out
    R = B.shape[1] if xa is not None else 0
    wargs, lora, common = _operands(x, packed, blocksize, xa, B, R)
    bias_arg = bias if bias is not None else x
    if K % 2 == 0 and ((M <= DECODE_ROWS) if decode is None else decode):  # rows must start on a byte
        _launch(_decode, lambda t: (triton.cdiv(N, t["BN"]), M),
                [x, *wargs, *lora, bias_arg, y, N, K, R, float(scaling)], _INTERPRETER_DECODE_TILES, **common,
                HAS_BIAS=bias is not None)
        return y
    _launch(_forward, lambda t: (triton.cdiv(M, t["BM"]) * triton.cdiv(N, t["BC"]),),
            [x, *wargs, *lora, bias_arg, y, M, N, K, R, float(scaling), _bucket(M)], _INTERPRETER_TILES,
            **common, HAS_EXTRA=bias is not None, TRANSPOSED=True, **_dot_flags(x.dtype))
    return y


def input_grad(dy: Tensor, packed: dict[str, Tensor], K: int, blocksize: int, *, ga: Tensor | None = None,
               A: Tensor | None = None, keep: Tensor | None = None, p: float = 0.0,
               out: Tensor | None = None) -> Tensor:
    """dy (M, N) @ W (+ keep / (1 - p) * (ga @ A)) -> (M, K) in dy's dtype.

    Args:
        ga: (M, r) = scaling * dy @ B, and A (r, K): the LoRA branch's input gradient, or both None.
        keep: the (M, K) 1-byte (uint8 or bool) dropout mask of the forward, or None.
        out: an (M, K) buffer to write into (every element is written).
    """
    M, N = dy.shape
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype) if out is None else out
    R = A.shape[0] if ga is not None else 0
    wargs, lora, common = _operands(dy, packed, blocksize, ga, A, R)
    keep_arg = keep.view(torch.uint8) if keep is not None else dy
    _launch(_input_grad, lambda t: (triton.cdiv(M, t["BM"]) * triton.cdiv(K, t["BC"]),),
            [dy, *wargs, *lora, keep_arg, dx, M, N, K, R, 1.0 / (1.0 - p) if keep is not None else 1.0, _bucket(M)],
            _INTERPRETER_TILES, **common, HAS_EXTRA=keep is not None, TRANSPOSED=False, **_dot_flags(dy.dtype))
    return dx
