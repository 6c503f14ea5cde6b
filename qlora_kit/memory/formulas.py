"""The arithmetic of what is not simulated: optimizer state and the temporaries of an optimizer step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import OPTIMIZERS

CUBLAS_WORKSPACE = 32 * 2**20  # torch's default cuBLAS workspace per handle on Hopper (":4096:8"), from the
# caching allocator; the forward and autograd's backward thread each get a handle (an approximation: check on a GPU)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors with fewer values than this


def optimizer_state_bytes(numels: list[int], optimizer: str) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes (fp32 parameters).

    adamw: two fp32 moments plus a 4-byte step counter per tensor. adamw8bit / paged_adamw8bit
    (bitsandbytes): two uint8 moments with a float32 absmax per 256 values, for tensors of at least
    4096 values; smaller tensors keep two fp32 moments. Step counters of the 8-bit optimizers are Python ints.
    """
    return sum(_optimizer_state_tensors(numels, optimizer))


def _optimizer_state_tensors(numels: list[int], optimizer: str) -> list[int]:
    """Bytes of every state tensor; the 8-bit optimizers' two 256-entry code tables are shared by all
    parameters (listed once)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    out = []
    for n in numels:
        if optimizer == "adamw":
            out += [4 * n, 4 * n, 4]  # exp_avg, exp_avg_sq, step
        elif n >= BNB_MIN_8BIT_SIZE:
            out += [n, n, 4 * math.ceil(n / 256), 4 * math.ceil(n / 256)]
        else:
            out += [4 * n, 4 * n]
    if optimizer != "adamw" and any(n >= BNB_MIN_8BIT_SIZE for n in numels):
        out += [1024, 1024]
    return out


def optimizer_step_temporaries(numels: list[int], optimizer: str, device: str) -> int:
    """Peak bytes the optimizer step allocates and frees again, for trainable fp32 tensors of these sizes.

    CUDA: torch AdamW runs its foreach kernels, one fp32 list as large as all parameters (the
    denominator); bitsandbytes' 8-bit step is one fused kernel (nothing). CPU, one tensor at a time
    (rules measured on torch 2.13's AdamW and bitsandbytes 0.50's Python 8-bit step, which works on fp32
    copies of each tensor's state): AdamW 8 B per value of the largest tensor plus 4 B per value of the
    second largest; 8-bit 20 B per value of the largest tensor (12 B below 4096 values, kept in 32 bits).
    """
    if not numels:
        return 0
    if device == "cuda":
        return 4 * sum(numels) if optimizer == "adamw" else 0
    if optimizer == "adamw":
        top = sorted(numels, reverse=True)
        return 8 * top[0] + 4 * (top[1] if len(top) > 1 else 0)
    return max((20 if n >= BNB_MIN_8BIT_SIZE else 12) * n for n in numels)


class PlannedOptimizer:
    """A meta run's optimizer: the state of `optimizer_state_bytes`, allocated up front (the one step
    simulated is a steady-state step), and the temporaries of a step; no arithmetic."""

    def __init__(self, params: list[Tensor], name: str, device: str):
        self.params, self.name, self.device = params, name, device
        self.numels = [p.numel() for p in params]
        self.state = [torch.empty(n, dtype=torch.uint8, device="meta")
                      for n in _optimizer_state_tensors(self.numels, name)]

    def step(self) -> None:
        torch.empty(optimizer_step_temporaries(self.numels, self.name, self.device),
                    dtype=torch.uint8, device="meta")  # allocated and freed at once: the count sees it

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
