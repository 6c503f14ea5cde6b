"""When the Triton 4-bit kernels run, and the autograd function that runs them.

QLORA_KIT_KERNELS chooses:
  auto    (default) Triton for nf4 / fp4 layers on CUDA tensors, when triton imports;
  triton  also on CPU tensors, which Triton runs only in its interpreter (TRITON_INTERPRET=1): the tests;
  off     bitsandbytes' dequantize and a torch matmul everywhere (the reference path).
Everything else (int8, unquantized layers, the meta device of memory estimates, a missing triton) takes
the reference path in layers.py.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

MODES = ("auto", "triton", "off")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mode() -> str:
    value = os.environ.get("QLORA_KIT_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"QLORA_KIT_KERNELS={value!r}: use one of {', '.join(MODES)}")
    return value


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(layer, x: Tensor) -> bool:
    """Whether `layer` (a QuantLinear) computes `x` with the Triton kernels."""
    if layer.fmt not in ("nf4", "fp4") or layer.weight.is_meta or x.is_meta:
        return False
    if layer.compute_dtype not in COMPUTE_DTYPES:
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


class QuantLoRALinear(torch.autograd.Function):
    """y = x @ dequant(W).T + scaling * dropout(x) @ A.T @ B.T + bias, with the 4-bit weight decoded
    inside the matmul tiles in both directions.

    Forward: xa = dropout(x) @ A.T (tokens, r) once, then one kernel for the base matmul with the LoRA
    product and the bias in its epilogue. Backward: ga = scaling * dy @ B, the factors' gradients from
    xa and ga, and one kernel for dx = dy @ W + dropout'(ga @ A). Kept for backward: x as it came (shared
    by every layer that reads it), a 1-byte dropout mask, xa; the weight only as the packed buffers.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, A: Tensor | None, B: Tensor | None, layer, scaling: float, p: float) -> Tensor:
        from . import fourbit

        lead, K, N = x.shape[:-1], layer.in_features, layer.out_features
        x2 = x.reshape(-1, K).to(layer.compute_dtype).contiguous()  # (T, K)
        ctx.layer, ctx.versions, ctx.scaling, ctx.p = layer, layer.packed_versions(), scaling, p
        keep = xa = None
        if A is not None:
            xd = x.reshape(-1, K).to(A.dtype)
            if p > 0:
                keep = torch.rand(xd.shape, device=x.device) >= p
                xd = xd * keep / (1 - p)
            xa = xd @ A.t()  # (T, r)
            del xd
        y = fourbit.forward(x2, layer.packed(), N, layer.blocksize, xa=xa, B=B, scaling=scaling, bias=layer.bias)
        ctx.save_for_backward(x, keep, xa, A, B)
        return y.reshape(*lead, N)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor):
        from . import fourbit

        x, keep, xa, A, B = ctx.saved_tensors
        layer = ctx.layer
        if layer.packed_versions() != ctx.versions:
            raise RuntimeError("a frozen base weight was modified in place between forward and backward")
        K, N = layer.in_features, layer.out_features
        g2 = grad.reshape(-1, N)  # (T, N)
        grad_A = grad_B = ga = None
        if A is not None:
            gs = g2.to(A.dtype) * ctx.scaling
            grad_B = (gs.t() @ xa).to(B.dtype)  # (N, r)
            ga = gs @ B.to(gs.dtype)  # (T, r)
            del gs
            if ctx.needs_input_grad[1]:
                xd = x.reshape(-1, K).to(A.dtype)
                if keep is not None:
                    xd = xd * keep / (1 - ctx.p)
                grad_A = (ga.t() @ xd).to(A.dtype)  # (r, K)
                del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            dx = fourbit.input_grad(g2.to(layer.compute_dtype).contiguous(), layer.packed(), K, layer.blocksize,
                                    ga=ga, A=A, keep=keep, p=ctx.p)
            grad_x = dx.reshape(x.shape).to(x.dtype)
        return grad_x, grad_A, grad_B, None, None, None


def quant_lora_linear(layer, x: Tensor, lora: bool, p: float) -> Tensor:
    """The layer's forward through the kernels: base plus, when `lora`, its LoRA branch with dropout p."""
    A, B = (layer.lora_A, layer.lora_B) if lora else (None, None)
    return QuantLoRALinear.apply(x, A, B, layer, layer.scaling if lora else 0.0, p)
