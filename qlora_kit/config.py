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
            if (not isinstance(self.blocksize, int) or not 32 <= self.blocksize <= 4096
                    or self.blocksize & (self.blocksize - 1)):
                raise ValueError(f"blocksize {self.blocksize!r} must be a power of two from 32 to 4096 "
                                 "(64 is the QLoRA default)")
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)):
            raise ValueError(f"int8_threshold {self.int8_threshold!r} must be a number")
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


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line, for the one-line errors users see."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def check_rank(r: object, what: str = "r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank {what}={r!r} must be an integer >= 1")


def pattern_lookup(patterns: dict, name: str, default):
    # PEFT semantics: the pattern must match a suffix of the module path on a '.' boundary.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _opt(default, help: str, **kw):
    """A dataclass field whose help text the CLI shows."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is also a `qlora-kit train` flag."""

    model: str = _opt("smollm2-135m", "HF model folder, .gguf file, or 'smollm2-135m' (the embedded default)")
    data: str = _opt("shakespeare", ".txt or .jsonl file, or 'shakespeare' (the embedded default)")
    eval_data: str | None = _opt(None, "separate held-out file (default: a slice of --data)")
    out: str = _opt("runs/quickstart", "run folder: checkpoints, metrics, final adapter")
    quant: str = _opt("nf4", "base weight format", choices=("nf4", "fp4", "int8", "none"))
    double_quant: bool = _opt(True, "double-quantize the 4-bit absmax values")
    blocksize: int = _opt(64, "4-bit quantization block size")
    compute_dtype: str = _opt("auto", "bf16, fp16, fp32, or auto (bf16 on CUDA, fp32 on CPU)")
    rank: int = _opt(16, "LoRA rank r")
    alpha: float = _opt(32.0, "LoRA alpha (scale alpha/r)")
    dropout: float = _opt(0.05, "dropout on the LoRA branch")
    targets: str = _opt("all-linear", "'all-linear', comma-separated module names, or a regex over module paths")
    rslora: bool = _opt(False, "scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    steps: int = _opt(40, "optimizer steps")
    seq_len: int = _opt(128, "tokens per sequence")
    batch_size: int = _opt(4, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(1e-3, "peak learning rate")
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    warmup_steps: int = _opt(4, "linear warmup steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    optimizer: str = _opt("adamw", "optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (non-reentrant)")
    packing: bool = _opt(True, "pack examples into full sequences (else pad each one)")
    eval_fraction: float = _opt(0.02, "share of --data held out for evaluation")
    eval_sequences: int = _opt(32, "held-out sequences used for perplexity (0: all)")
    eval_every: int = _opt(0, "evaluate every N steps (0: only before and after)")
    save_every: int = _opt(20, "checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (older ones are deleted)")
    sample_tokens: int = _opt(40, "tokens generated for the before/after sample (0: none)")
    seed: int = _opt(0, "seed for LoRA init, data order and dropout")
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")
    device: str = _opt("auto", "cpu, cuda, or auto")
    cache_dir: str | None = _opt(None, "cache for converted models and data (default ~/.cache/qlora-kit)")
    fsdp: bool = _opt(False, "under torchrun: shard the frozen base over the ranks with FSDP2 (else data-parallel)")
    dist_timeout: float = _opt(600.0, "under torchrun: seconds a collective waits for the other ranks before "
                                      "the job stops")

    def __post_init__(self) -> None:
        check_rank(self.rank, "rank")
        for name in ("steps", "seq_len", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} {value!r} must be an integer >= 1")
        for name in ("warmup_steps", "save_every", "eval_every", "eval_sequences", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} {getattr(self, name)} must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep-checkpoints {self.keep_checkpoints} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr} must be > 0")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist-timeout {self.dist_timeout} must be > 0 seconds")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval-fraction {self.eval_fraction} must be in [0, 1)")
        if self.quant not in QUANT_FORMATS:
            raise ValueError(f"unknown quantization format {self.quant!r}: use one of {', '.join(QUANT_FORMATS)}")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype, "compute_dtype")
        LoRAConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.target_spec())

    def target_spec(self) -> str | list[str]:
        """--targets as add_lora takes it: 'all-linear', a list of names (has a comma or is a plain name), or a regex."""
        t = self.targets.strip()
        if t == "all-linear":
            return t
        if "," in t or re.fullmatch(r"[\w.]+", t):
            return [s.strip() for s in t.split(",") if s.strip()]
        return t
