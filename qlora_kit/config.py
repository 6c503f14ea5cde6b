"""Typed configuration for quantization and LoRA, validated on construction.

Dtype policy (the one place it is written down):
  * packed base weights: uint8 (two 4-bit codes per byte) for nf4/fp4, int8 for int8;
    their absmax / row scales are float32 (double-quantized absmax: uint8 codes plus a
    float32 second-level absmax per 256 blocks, as in QLoRA).
  * compute dtype (bf16 by default; fp16 or fp32 allowed): the dtype the base matmul
    runs in, and the dtype of every weight left unquantized (embeddings, norms, output head).
  * adapter dtype (fp32 by default): LoRA A and B, their gradients and the LoRA branch's
    arithmetic; the branch's output is cast to the compute dtype before it is added.
  * fp32 is kept for the loss (transformers upcasts logits before cross-entropy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

QUANT_FORMATS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def parse_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """Accept a torch dtype or one of 'bf16', 'fp16', 'fp32' (and their long names)."""
    if isinstance(value, torch.dtype):
        if value not in COMPUTE_DTYPES.values():
            raise ValueError(f"{what} {value} is not supported: use bf16, fp16 or fp32")
        return value
    try:
        return COMPUTE_DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}: use one of bf16, fp16, fp32") from None


@dataclass
class QuantConfig:
    """How the frozen base weights are stored and multiplied."""

    quant: str = "nf4"
    """Weight format: 'nf4' or 'fp4' (4-bit blockwise absmax), 'int8' (row-wise absmax,
    LLM.int8 style) or 'none' (kept in the compute dtype; a dense LoRA baseline)."""
    compute_dtype: torch.dtype = torch.bfloat16
    """dtype of the base matmul and of all unquantized weights."""
    double_quant: bool = True
    """4-bit only: quantize the per-block absmax values again to 8 bits (QLoRA's double quantization)."""
    blocksize: int = 64
    """4-bit only: number of consecutive weights that share one absmax scale."""
    int8_threshold: float = 0.0
    """int8 only: 0 multiplies with the dequantized weight (exact gradients for training);
    > 0 runs LLM.int8's mixed decomposition in the forward: activation columns holding any
    value of magnitude >= threshold stay in 16-bit, the rest go through an int8 x int8 matmul."""

    def __post_init__(self) -> None:
        if self.quant not in QUANT_FORMATS:
            raise ValueError(f"unknown quantization format {self.quant!r}: use one of {', '.join(QUANT_FORMATS)}")
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        if self.quant in ("nf4", "fp4"):
            if not isinstance(self.blocksize, int) or self.blocksize < 2 or self.blocksize & (self.blocksize - 1):
                raise ValueError(f"blocksize {self.blocksize!r} must be a power of two >= 2 (64 is the QLoRA default)")
        if self.int8_threshold < 0:
            raise ValueError(f"int8_threshold {self.int8_threshold} must be >= 0")


@dataclass
class LoRAConfig:
    """Where LoRA goes and how it is shaped and initialised."""

    r: int = 16
    """Rank of the update B @ A."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout applied to the LoRA branch's input during training."""
    targets: str | list[str] = "all-linear"
    """'all-linear' (every linear except the output head), a list of module names (a name
    matches a module whose dotted path equals it or ends with '.' + name), or a regex that
    must match a module's full dotted path."""
    init: str = "kaiming"
    """Initialisation of A: 'kaiming' (Kaiming-uniform, a=sqrt(5), as nn.Linear and PEFT)
    or 'gaussian' (normal with std 1/r). B always starts at zero."""
    rslora: bool = False
    """Use alpha / sqrt(r) as the scale (rank-stabilised LoRA)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: regex (matched against the end of a module's path, as in PEFT) -> rank."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha, matched like rank_pattern."""
    adapter_dtype: torch.dtype = torch.float32
    """dtype of A and B."""

    def __post_init__(self) -> None:
        check_rank(self.r, "r")
        for pattern, rank in self.rank_pattern.items():
            check_rank(rank, f"rank_pattern[{pattern!r}]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"unknown LoRA init {self.init!r}: use 'kaiming' or 'gaussian'")
        self.adapter_dtype = parse_dtype(self.adapter_dtype, "adapter_dtype")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"targets {self.targets!r} is not a valid regex: {e}") from None
        elif not isinstance(self.targets, str):
            self.targets = list(self.targets)
            if not self.targets:
                raise ValueError("targets is an empty list: name at least one module, or use 'all-linear'")

    def rank_for(self, name: str) -> int:
        return pattern_lookup(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_lookup(self.alpha_pattern, name, self.alpha)

    def scaling_for(self, name: str) -> float:
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / (r**0.5) if self.rslora else alpha / r


def check_rank(r: object, what: str = "r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank {what}={r!r} must be an integer >= 1")


def pattern_lookup(patterns: dict, name: str, default):
    # PEFT semantics: the pattern must match a suffix of the module path on a '.' boundary.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default
