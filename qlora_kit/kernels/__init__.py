"""When the Triton 4-bit kernels run, and the autograd function that runs them.

QLORA_KIT_KERNELS (read once, at the first forward; `kernel_mode` changes it for a block) chooses:
  auto    (default) Triton for nf4 / fp4 layers on CUDA tensors, when triton imports;
  triton  also on CPU tensors, which Triton runs only in its interpreter (TRITON_INTERPRET=1): the tests;
  off     formats.dequantize and a torch matmul everywhere (the reference path).
Everything else (int8, unquantized layers, the meta device of memory estimates, a missing triton) takes
the reference path in layers.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from ..config import FOUR_BIT
from ..formats import PackedWeight

MODES = ("auto", "triton", "off")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Up to this many rows (tokens) the fused kernels run: decode and small batches, where reading the weight is
# the cost. Above it the weight is decoded once per call into a transient 16-bit matrix (bitsandbytes'
# kernel, about 0.1 ms for 4096 x 14336) and the matmuls go to cuBLAS, with the LoRA product and the bias
# added by addmm into the same output: at thousands of rows the tensor-core GEMM dominates, and decoding
# per tile would repeat the decode once per row tile.
FUSED_MAX_ROWS = 256


_mode: str | None = None  # QLORA_KIT_KERNELS, read on first use


def mode() -> str:
    """The kernel mode: QLORA_KIT_KERNELS as it was at the first forward, or what `kernel_mode` set."""
    global _mode
    if _mode is None:
        value = os.environ.get("QLORA_KIT_KERNELS", "auto").strip().lower() or "auto"
        if value not in MODES:
            raise ValueError(f"QLORA_KIT_KERNELS={value!r}: use one of {', '.join(MODES)}")
        _mode = value
    return _mode


@contextlib.contextmanager
def kernel_mode(value: str) -> Iterator[None]:
    """Run the block with the kernel mode `value` (auto, triton, off), then restore the previous one."""
    global _mode
    if value not in MODES:
        raise ValueError(f"kernel mode {value!r}: use one of {', '.join(MODES)}")
    before = _mode
    _mode = value
    try:
        yield
    finally:
        _mode = before


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(weight: PackedWeight, bias: Tensor | None, compute_dtype: torch.dtype, x: Tensor) -> bool:
    """Whether a layer with this weight, bias and compute dtype computes `x` with the Triton kernels."""
    if weight.quant not in FOUR_BIT or weight.is_meta or x.is_meta:
        return False
    if compute_dtype not in COMPUTE_DTYPES:
        return False
    if bias is not None and bias.requires_grad:  # the kernels treat the bias as frozen
        return False
    m = mode()
    if m == "off" or not (x.is_cuda or m == "triton"):
        return False
    if not triton_importable():
        if m == "triton":
            raise RuntimeError("QLORA_KIT_KERNELS=triton but triton is not installed: pip install triton")
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("QLORA_KIT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
    return True


def dropout_mask(x: Tensor, p: float) -> tuple[Tensor | None, float]:
    """The LoRA branch's input dropout, the same on both paths: a 1-byte keep mask shaped like x (kept with
    probability 1 - p, drawn without fp32 noise) and the factor 1 / (1 - p), which the callers put on the
    rank-r products rather than on x. (None, 1.0) when p is 0."""
    if p <= 0:
        return None, 1.0
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1 - p), 1.0 / (1 - p)


def masked(x: Tensor, dtype: torch.dtype, keep: Tensor | None) -> Tensor:
    """x in `dtype` with the dropped elements zeroed: at most one new (tokens, in) tensor."""
    t = x.to(dtype)
    if keep is None:
        return t
    return t.mul_(keep) if t is not x else t * keep


class QuantLoRALinear(torch.autograd.Function):
    """y = x @ dequant(W).T + scaling * dropout(x) @ A.T @ B.T + bias, never keeping a 16-bit weight.

    Forward: xa = dropout(x) @ A.T (tokens, r) once; then, up to FUSED_MAX_ROWS rows, one kernel decodes
    the 4-bit tiles inside the matmul with the LoRA product and the bias in its epilogue; above it, a
    transient decoded weight, cuBLAS, and addmm of the LoRA product into the output. Backward: ga =
    scaling * dy @ B, the factors' gradients from xa and ga, and dx = dy @ W + dropout'(ga @ A) the same two
    ways. Kept for backward: x as it came (shared by every layer that reads it), a 1-byte dropout mask, xa,
    and the packed weight (the layer's own tensors). The dropout's 1 / (1 - p) goes on the rank-r products.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, weight: PackedWeight, bias: Tensor | None, cd: torch.dtype, A: Tensor | None,
                B: Tensor | None, scaling: float, p: float, versions: tuple[int, ...] | None) -> Tensor:
        from . import fourbit

        (N, K), lead = weight.shape, x.shape[:-1]
        x2 = x.reshape(-1, K).to(cd).contiguous()  # (T, K)
        ctx.weight, ctx.versions, ctx.cd, ctx.scaling, ctx.p = weight, versions, cd, scaling, p
        ctx.fused = x2.shape[0] <= FUSED_MAX_ROWS
        keep = xa = None
        if A is not None:
            keep, inv_keep = dropout_mask(x2, p)
            xa = masked(x2, cd, keep) @ A.to(cd).t()  # (T, r)
            xa = (xa.mul_(inv_keep) if keep is not None else xa).to(A.dtype)
        if ctx.fused:
            y = fourbit.forward(x2, weight.tensors, N, weight.blocksize, xa=xa, B=B, scaling=scaling, bias=bias)
        else:
            w = weight.dequantize(cd)  # (N, K), freed on return
            y = x2 @ w.t() if bias is None else torch.addmm(bias.to(cd), x2, w.t())
            del w
            if xa is not None:
                y.addmm_(xa.to(cd), B.to(cd).t(), alpha=scaling)
        ctx.save_for_backward(x, keep, xa, A, B)
        return y.reshape(*lead, N)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor):
        from . import fourbit

        x, keep, xa, A, B = ctx.saved_tensors
        weight, cd = ctx.weight, ctx.cd
        weight.check_unchanged(ctx.versions)
        (N, K) = weight.shape
        g2 = grad.reshape(-1, N).to(cd).contiguous()  # (T, N)
        grad_A = grad_B = ga = None
        if A is not None:
            if ctx.needs_input_grad[5]:
                grad_B = ((g2.t() @ xa.to(cd)).float() * ctx.scaling).to(B.dtype)  # (N, r)
            ga = (g2 @ B.to(cd)).float() * ctx.scaling  # (T, r)
            if ctx.needs_input_grad[4]:
                inv_keep = 1.0 / (1 - ctx.p) if keep is not None else 1.0
                grad_A = ((ga * inv_keep).to(cd).t() @ masked(x.reshape(-1, K), cd, keep)).to(A.dtype)  # (r, K)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.fused:
                dx = fourbit.input_grad(g2, weight.tensors, K, weight.blocksize, ga=ga, A=A, keep=keep, p=ctx.p)
            else:
                w = weight.dequantize(cd)
                dx = g2 @ w
                del w
                if ga is not None:
                    lora = (ga if keep is None else ga / (1 - ctx.p)).to(cd) @ A.to(cd)  # (T, K)
                    dx += lora.mul_(keep) if keep is not None else lora
            grad_x = dx.reshape(x.shape).to(x.dtype)
        return grad_x, None, None, None, grad_A, grad_B, None, None, None


def quant_lora_linear(x: Tensor, weight: PackedWeight, bias: Tensor | None, compute_dtype: torch.dtype,
                      A: Tensor | None, B: Tensor | None, scaling: float, p: float,
                      versions: tuple[int, ...] | None) -> Tensor:
    """A QuantLinear's forward through the kernels: the base, plus the LoRA branch (A, B; dropout p) when A
    is given; `versions` of the packed tensors are checked in backward (None: not checked)."""
    return QuantLoRALinear.apply(x, weight, bias, compute_dtype, A, B, scaling, p, versions)
