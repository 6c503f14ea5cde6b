"""One training step, the same for training, the memory estimate and measurement, and `qlora-kit smoke`.

A step here is one micro-batch: the forward under the autocast rule, the loss, and the backward. What
happens around it (gradient accumulation, clipping, the optimizer, logging) belongs to the caller.

The autocast rule, written once: on CUDA with a bf16 compute dtype the forward runs under bf16 autocast,
so the fp32 LoRA factors multiply in bf16 beside the base (their gradients are still fp32); everywhere
else there is no autocast and the LoRA branch computes in the adapter dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .layers import QuantLinear
from .loss import causal_lm_loss

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def autocast_enabled(device_type: str, compute_dtype: torch.dtype) -> bool:
    """Whether a step on `device_type` ('cuda', 'cpu', 'meta') with this compute dtype runs under bf16 autocast."""
    return device_type == "cuda" and compute_dtype == torch.bfloat16


def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype the model's base matmuls run in: its quantized layers' (they follow `.to(dtype)`), else the
    model's own dtype (a model that is not this package's, such as the benchmarks' PEFT side)."""
    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    return layer.compute_dtype if layer is not None else model.dtype


def train_step(model: nn.Module, batch: dict[str, Tensor], *, accum: int = 1, loss_fn: LossFn | None = None,
               reduce: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
               before_backward: Callable[[Tensor], None] | None = None) -> Tensor:
    """Forward, loss and backward of one micro-batch; returns the loss (not detached).

    Args:
        batch: input_ids, labels and (optionally) attention_mask, on the model's device.
        accum: micro-batches per optimizer step: the gradient is that of loss / accum.
        loss_fn: loss_fn(model, batch); default `causal_lm_loss`, what `train` uses.
        reduce: reduce(loss) -> (the loss to report, the tensor to back-propagate); under torchrun the
            token-weighted global mean. Default: the loss itself, both times.
        before_backward: called with the reported loss before the backward (to stop on NaN, to switch a
            memory counter's phase).
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast_enabled(device_type, compute_dtype_of(model))):
        loss = (loss_fn or causal_lm_loss)(model, batch)
    reported, backprop = reduce(loss) if reduce is not None else (loss, loss)
    if before_backward is not None:
        before_backward(reported)
    (backprop / accum).backward()
    return reported
