"""What a meta-device run must be told about the target device's kernels (see the package docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class TargetKernels(TorchFunctionMode):
    """Make a meta run keep what the target device's kernels keep (see the module docstring)."""

    MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, F.linear, torch.mm, torch.bmm,
               torch.addmm, torch.baddbmm, Tensor.mm, Tensor.bmm}
    FP32_OPS = {F.layer_norm, F.softmax, F.log_softmax, F.cross_entropy, torch.softmax, torch.log_softmax,
                Tensor.softmax, Tensor.log_softmax}

    def __init__(self, device: str, autocast: bool):
        super().__init__()
        self.cuda, self.autocast = device.startswith("cuda"), autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if self.cuda or not dropout:  # CPU's flash kernel has no dropout: it falls back to the math one
                return _FlashLikeAttention.apply(args[0], args[1], args[2], mask, self.cuda)
        if func is F.dropout and self.cuda and kwargs.get("training", args[2] if len(args) > 2 else True):
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if p > 0:
                return _MaskDropout.apply(args[0])
        if self.autocast and func in self.MATMULS:
            args = tuple(a.to(torch.bfloat16) if isinstance(a, Tensor) and a.dtype == torch.float32 else a
                         for a in args)
        elif self.autocast and func in self.FP32_OPS:
            args = tuple(a.float() if isinstance(a, Tensor) and a.dtype == torch.bfloat16 else a for a in args)
        return func(*args, **kwargs)


class _FlashLikeAttention(torch.autograd.Function):
    """Keeps q, k, v, the mask (if any), the output and a float32 log-sum-exp per query and head, as the
    flash / memory-efficient kernels do; their CUDA backward also takes an fp32 accumulator for dq."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cuda: bool) -> Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if isinstance(mask, Tensor) and mask.dtype == torch.bool:  # torch turns a boolean mask into an
            mask = torch.empty(mask.shape, dtype=q.dtype, device=q.device)  # additive one, per call, and keeps it
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if isinstance(mask, Tensor) else []))
        ctx.cuda = cuda
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors[:3]
        scratch = (torch.empty(q.shape, dtype=torch.float32, device=q.device),  # CUDA: dq accumulator and
                   torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)) if ctx.cuda else ()  # row sums
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del scratch
        return *grads, None, None


class _MaskDropout(torch.autograd.Function):
    """CUDA dropout: keeps a 1-byte mask."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return torch.empty_like(grad)


@contextlib.contextmanager
def no_data_dependent_masks() -> Iterator[None]:
    """transformers inspects position ids to find packed sequences; a meta tensor has no values to inspect.

    Training rows have plain 0..seq-1 positions, for which the answer is "none", so that is what a meta run gets.
    """
    import transformers.masking_utils as masking

    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original
