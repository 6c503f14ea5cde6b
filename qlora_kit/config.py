"""Typed configuration, validated on construction, and the names and dtypes every module shares.

Dtype policy (the one place it is written down):
  * packed base weights: uint8 (two 4-bit codes per byte) for nf4/fp4, int8 for int8;
    their absmax / row scales are float32 (double-quantized absmax: uint8 codes plus a
    float32 second-level absmax per 256 blocks, as in QLoRA).
  * compute dtype (bf16 on CUDA, fp32 on a CPU by default; fp16 allowed): the dtype the base matmul
    runs in, and the dtype of every weight left unquantized (embeddings, norms, output head).
  * adapter dtype (fp32 by default): LoRA A and B and their gradients. The branch's arithmetic is in the
    adapter dtype on a CPU; on CUDA with bf16 compute, training runs under bf16 autocast (step.py), so the
    LoRA matmuls run in bf16, and the Triton path forms dropout(x) @ A.T and the gradient products in the
    compute dtype. The branch's output is added in the compute dtype.
  * fp32 is kept for the loss (transformers upcasts logits before cross-entropy).
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields

import torch

FOUR_BIT = ("nf4", "fp4")
QUANT_FORMATS = (*FOUR_BIT, "int8", "none")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
DTYPE_NAMES = ("bf16", "fp16", "fp32")
GGUF_QUANTS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # GGUF block types a merge writes (an --out ending .gguf)
EXPORT_FORMATS = (*DTYPE_NAMES, *FOUR_BIT, "int8", *GGUF_QUANTS)
MERGE_AWARE_ROUNDINGS = ("nearest", "dither")  # how merge-aware training rounds (see patch.set_merge_aware)
MERGE_METHODS = ("auto", "gptq", "rtn")
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


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are several times slower than fp32."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_compute_dtype(value: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A compute dtype setting ('auto' / None: the device's default; else bf16, fp16, fp32) as a torch dtype."""
    return default_compute_dtype(device) if value in (None, "auto") else parse_dtype(value, "compute_dtype")


def choice(value, allowed: tuple, what: str) -> None:
    """A one-line error unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(map(str, allowed))}")


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
        choice(self.quant, (*QUANT_FORMATS, *GGUF_QUANTS), "quantization format")
        self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        if self.quant in FOUR_BIT:
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
    """Dropout applied to the LoRA branch's input during training (not on experts: PEFT's LoRA for
    3-D expert weights has none)."""
    targets: str | list[str] = "all-linear"
    """'all-linear' (every linear except the output head and MoE routers, and every expert stack),
    a list of module names (a name matches a module whose dotted path equals it or ends with '.' +
    name; 'experts' names an experts module's stacks), or a regex that must match a module's full
    dotted path."""
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


def merge_aware_rounding(fmt: str, rounding: str | None) -> str:
    """The rounding merge-aware training uses for export format `fmt`: `rounding` checked, or by default the fixed
    dither for the 4-bit formats (whose base sits on the grid) and round to nearest for the others."""
    if rounding is None:
        return "dither" if fmt in FOUR_BIT else "nearest"
    choice(rounding, MERGE_AWARE_ROUNDINGS, "merge-aware rounding")
    if rounding == "dither" and fmt not in FOUR_BIT:
        raise ValueError(f"merge-aware rounding 'dither' is for {' / '.join(FOUR_BIT)}, not {fmt}")
    return rounding


def _opt(default, help: str, **kw):
    """A dataclass field whose help text the CLI shows."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is also a `qlora-kit train` flag."""

    model: str = _opt("smollm2-135m", "HF model folder, Hub ID org/name[@rev], .gguf file, or 'smollm2-135m' "
                                      "(the embedded default)")
    data: str = _opt("shakespeare", ".txt or .jsonl file, or 'shakespeare' (the embedded default)")
    eval_data: str | None = _opt(None, "separate held-out file (default: a slice of --data)")
    out: str = _opt("runs/quickstart", "run folder: checkpoints, metrics, final adapter")
    quant: str = _opt("nf4", "base weight format", choices=QUANT_FORMATS)
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
    optimizer: str = _opt("adamw", "optimizer", choices=OPTIMIZERS)
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    merge_aware: str | None = _opt(None, "merge-aware training for an export format (nf4, fp4, int8 or a GGUF type "
                                         "q8_0/q4_0/q4_1/q5_0/q5_1): the forward uses W + s*BA rounded as that "
                                         "export will store it (straight-through gradients), so the merged export "
                                         "is the model that was trained")
    merge_aware_after: int = _opt(0, "with --merge-aware: plain LoRA for this many steps first, then merge-aware "
                                     "(torchtune's fake_quant_after_n_steps)")
    merge_aware_rounding: str | None = _opt(None, "with --merge-aware: how the forward (and the export) rounds: "
                                                  "'dither' (stochastic rounding with a fixed dither on the base's "
                                                  "grid; the default for nf4 / fp4) or 'nearest' (the default for "
                                                  "the others)", choices=list(MERGE_AWARE_ROUNDINGS))
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (non-reentrant)")
    release_memory: bool = _opt(True, "on the CPU, hand memory freed during a step back to the system at every "
                                      "decoder layer (glibc malloc_trim): the process's peak RSS stays near what "
                                      "is allocated, at some cost in step time")
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
        choice(self.quant, QUANT_FORMATS, "quantization format")
        choice(self.optimizer, OPTIMIZERS, "optimizer")
        if self.merge_aware_rounding is not None:
            choice(self.merge_aware_rounding, MERGE_AWARE_ROUNDINGS, "merge-aware rounding")
            if self.merge_aware is None:
                raise ValueError(f"merge-aware-rounding {self.merge_aware_rounding!r} needs --merge-aware FORMAT")
        if self.merge_aware is not None:
            choice(self.merge_aware, [f for f in EXPORT_FORMATS if f not in DTYPE_NAMES], "merge-aware format")
            # resolved here, so that run.json records what the run used
            self.merge_aware_rounding = merge_aware_rounding(self.merge_aware, self.merge_aware_rounding)
        if not isinstance(self.merge_aware_after, int) or not 0 <= self.merge_aware_after < self.steps:
            raise ValueError(f"merge-aware-after {self.merge_aware_after!r} must be an integer from 0 to steps - 1")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype, "compute_dtype")
        self.lora_config()  # validates rank, alpha, dropout and targets

    def quant_config(self, device: str | torch.device) -> QuantConfig:
        """How the base is stored and multiplied when training on `device` ('auto' compute dtype resolved)."""
        return QuantConfig(quant=self.quant, compute_dtype=resolve_compute_dtype(self.compute_dtype, device),
                           double_quant=self.double_quant, blocksize=self.blocksize)

    def lora_config(self) -> LoRAConfig:
        """The LoRA layers this run trains (`rank` is LoRAConfig's `r`, PEFT's name for it)."""
        return LoRAConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.target_spec(),
                          rslora=self.rslora)

    def target_spec(self) -> str | list[str]:
        """--targets as add_lora takes it: 'all-linear', a list of names (has a comma or is a plain name), or a regex."""
        t = self.targets.strip()
        if t == "all-linear":
            return t
        if "," in t or re.fullmatch(r"[\w.]+", t):
            return [s.strip() for s in t.split(",") if s.strip()]
        return t


@dataclass(kw_only=True)
class MergeConfig:
    """What to merge and how to export it; every field is also a `qlora-kit merge` flag."""

    model: str = _opt("smollm2-135m", "base: HF model folder, Hub ID org/name[@rev], .gguf, or 'smollm2-135m'")
    adapter: str = _opt(MISSING, "adapter folder (PEFT layout)")
    out: str = _opt(MISSING, "output model folder, or a .gguf file for llama.cpp / Ollama (refused if it exists, "
                             "unless --force)")
    format: str = _opt("nf4", "export format: bf16/fp16/fp32, nf4/fp4/int8 (bitsandbytes folder), or a GGUF type "
                              "q8_0/q4_0/q4_1/q5_0/q5_1 (with an --out ending in .gguf)", choices=EXPORT_FORMATS)
    method: str = _opt("auto", "requantization: gptq (error feedback on calibration data; what auto means) or "
                               "rtn (round to nearest)", choices=MERGE_METHODS)
    onto: str = _opt("quantized", "merge onto the dequantized 4/8-bit weights the adapter was trained on, or the "
                                  "originals", choices=("quantized", "original"))
    calib_data: str | None = _opt(None, "calibration text (default: held-out rows of --eval-data)")
    calib_tokens: int = _opt(2048, "calibration tokens")
    eval_data: str = _opt("shakespeare", "held-out text for the perplexity report")
    eval_sequences: int = _opt(32, "held-out sequences scored")
    seq_len: int = _opt(128, "tokens per sequence")
    dtype: str = _opt("bf16", "dtype of the unquantized tensors of a bitsandbytes 4/8-bit export")
    eval: bool = _opt(True, "score base, unmerged adapter and export on the held-out rows (--no-eval: skip it, "
                            "for the largest models)")
    dry_run: bool = _opt(False, "print the planned peak memory and output size, then stop")
    force: bool = _opt(False, "replace an existing --out, and run even when the plan exceeds the available memory")
    cache_dir: str | None = _opt(None, "cache for converted models and data")

    def __post_init__(self) -> None:
        if re.fullmatch(r"(i?q\d_[a-z0-9_]+|q\d_k.*)", str(self.format).lower()) and self.format not in GGUF_QUANTS:
            raise ValueError(f"export format {self.format!r}: GGUF k-quants and i-quants are not written here; export "
                             "f16 (or q8_0) and run llama.cpp's llama-quantize on it, or use one of "
                             f"{', '.join(GGUF_QUANTS)}")
        choice(self.format, EXPORT_FORMATS, "export format")
        choice(self.method, MERGE_METHODS, "method")
        if self.gguf and self.format in (*FOUR_BIT, "int8"):
            raise ValueError(f"{self.out}: {self.format} is a bitsandbytes format and cannot be stored in GGUF; use "
                             f"one of {', '.join(GGUF_QUANTS)} or bf16/fp16/fp32")
        if not self.gguf and self.format in GGUF_QUANTS:
            raise ValueError(f"{self.out}: {self.format} is a GGUF type; give --out a file name ending in .gguf")
        choice(self.onto, ("quantized", "original"), "--onto")
        if self.calib_tokens < 1 or self.seq_len < 1:
            raise ValueError("calib-tokens and seq-len must be >= 1")
        parse_dtype(self.dtype, "dtype")

    @property
    def quantized(self) -> bool:
        return self.format not in DTYPE_NAMES

    @property
    def gguf(self) -> bool:
        """Whether the export is one GGUF file (for llama.cpp, Ollama, LM Studio) rather than a folder."""
        return str(self.out).endswith(".gguf")

    def resolved_method(self) -> str:
        if not self.quantized:
            return "none"
        return "gptq" if self.method == "auto" else self.method


@dataclass(kw_only=True)
class LoraExportConfig:
    """`qlora-kit export-lora`: the adapter alone as a GGUF LoRA file (llama.cpp's --lora, Ollama's ADAPTER)."""

    model: str = _opt("smollm2-135m", "the adapter's base: HF model folder, Hub ID org/name[@rev], .gguf, or "
                                      "'smollm2-135m'")
    adapter: str = _opt(MISSING, "adapter folder (PEFT layout)")
    out: str = _opt(MISSING, "output .gguf file (refused if it exists, unless --force)")
    force: bool = _opt(False, "replace an existing --out")
    cache_dir: str | None = _opt(None, "cache for converted models")


@dataclass(kw_only=True)
class InferenceConfig:
    """The base model (and adapter) that `qlora-kit eval` and `generate` load."""

    model: str = _opt("smollm2-135m", "HF model folder, Hub ID org/name[@rev], .gguf, or 'smollm2-135m' (default)")
    adapter: str | None = _opt(None, "adapter folder to apply (default: none, the base model)")
    quant: str = _opt("nf4", "base weight format", choices=QUANT_FORMATS)
    compute_dtype: str = _opt("auto", "bf16, fp16, fp32 or auto")
    device: str = _opt("auto", "cpu, cuda or auto")
    cache_dir: str | None = _opt(None, "cache for converted models and data")
    seed: int = _opt(0, "random seed")

    def __post_init__(self) -> None:
        choice(self.quant, QUANT_FORMATS, "quantization format")
        if self.compute_dtype != "auto":
            parse_dtype(self.compute_dtype, "compute_dtype")

    def quant_config(self, device: str | torch.device) -> QuantConfig:
        return QuantConfig(quant=self.quant, compute_dtype=resolve_compute_dtype(self.compute_dtype, device))


@dataclass(kw_only=True)
class EvalConfig(InferenceConfig):
    """`qlora-kit eval`: perplexity of a model, with or without an adapter, on a data file."""

    data: str = _opt("shakespeare", ".txt / .jsonl file or 'shakespeare'")
    split: str = _opt("heldout", "the held-out slice training used, or the whole file", choices=("heldout", "all"))
    eval_fraction: float = _opt(0.02, "held-out share (as in training)")
    seq_len: int = _opt(128, "tokens per sequence")
    batch_size: int = _opt(4, "sequences per forward")
    eval_sequences: int = _opt(32, "sequences to score (0: all)")


@dataclass(kw_only=True)
class GenerateConfig(InferenceConfig):
    """`qlora-kit generate`: continue a prompt, with or without an adapter."""

    prompt: str = _opt(MISSING, "text to continue")
    chat: bool = _opt(False, "wrap the prompt as a user turn with the chat template")
    max_new_tokens: int = _opt(60, "tokens to generate")
    temperature: float = _opt(0.0, "0: greedy")


@dataclass(kw_only=True)
class ServeConfig(InferenceConfig):
    """`qlora-kit serve`: an OpenAI-compatible server of one quantized base with many adapters."""

    adapter: list[str] = field(default_factory=list, metadata={"help": "NAME=DIR: serve the adapter in DIR as model "
                                                               "NAME (repeat the flag for more)"})
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    served_model_name: str | None = _opt(None, "the base model's name in requests (default: --model as given)")
    max_batch: int = _opt(16, "requests decoded together at most; more wait their turn")
    adapter_dtype: str = _opt("fp32", "dtype the adapters are kept in: fp32, bf16 or fp16")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_dtype(self.adapter_dtype, "adapter_dtype")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must be in 0..65535")
        names = set()
        for spec in self.adapter:
            name, eq, folder = spec.partition("=")
            if not eq or not name or not folder:
                raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
            if name in names or name == self.base_name:
                raise ValueError(f"--adapter {spec!r}: the name {name!r} is already taken")
            names.add(name)

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model

    def adapters(self) -> dict[str, str]:
        return dict(spec.split("=", 1) for spec in self.adapter)


def cli_fields(cls) -> list:
    """The dataclass fields of `cls` that are command-line flags (those with help text)."""
    return [f for f in fields(cls) if "help" in f.metadata]
