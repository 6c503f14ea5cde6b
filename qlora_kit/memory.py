"""Training memory: estimate it from config.json alone, measure it on real steps, fit a budget, sweep.

Both the estimate and the measurement count the same thing, the bytes of every tensor storage alive,
with `LiveTensors` (a dispatch mode that sees every tensor an operator returns and a weak reference
that sees it freed), split into the categories of `CATEGORIES`:

  * static: quantized weights (codes + absmax + double-quantization levels), weights left unquantized
    (embeddings, norms, output head, biases, rotary tables), LoRA parameters;
  * per step: LoRA gradients, optimizer state, activations (what the forward through the decoder keeps
    for backward, including the recomputation boundaries under checkpointing), logits & loss (what the
    fused loss of loss.py keeps: a chunk of fp32 logits and the last hidden state's gradient; or
    transformers' logits, fp32 upcast and log-softmax), backward temporaries (gradients in flight,
    recomputed activations under checkpointing, the weight dequantized for an input gradient) and
    optimizer temporaries.

The estimate builds the model from its config on the meta device (shapes and dtypes, no storage), gives
every linear layer the exact packed layout bitsandbytes would produce (`packed_layout`), attaches LoRA,
and runs the training steps there: the same transformers forward, the same autograd graph, the same
optimizer code. What differs between a meta run and a real one is emulated in `_TargetKernels`:
attention runs a flash-type kernel that keeps O(seq) per head (the CPU and CUDA kernels both do); on CUDA,
dropout keeps a 1-byte mask and bf16 autocast casts the fp32 LoRA matmuls to bf16 and upcasts norms and
softmax. On CUDA the estimate adds the cuBLAS workspaces, and paged optimizer state (CUDA managed memory,
outside torch's allocator) is left out of the total and named in a note. The peak is the largest live
total seen. The optimizer step is not run on the meta device: its state is allocated by formula and its
temporaries by a rule (`optimizer_step_temporaries`).

The measurement runs the same steps on real tensors (random weights: values do not change memory) and
reports the peak of the same count per category; on CUDA also the allocator's own peak
(torch.cuda.max_memory_allocated), which is the figure to compare with the estimate there.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import defaults
from .config import LoRAConfig, QuantConfig, TrainConfig, one_line
from .formats import NESTED_BLOCKSIZE
from .io import atomic_write_bytes
from .layers import QuantLinear
from .loss import causal_lm_loss
from .train import check_seq_len, resolve_device

CATEGORIES = (
    "quantized weights", "unquantized weights", "FSDP gathered weights", "LoRA parameters", "LoRA gradients", "optimizer state",
    "activations", "logits & loss", "backward temporaries", "optimizer temporaries", "CUDA workspace",
)
STATIC = ("quantized weights", "unquantized weights", "LoRA parameters")
CUBLAS_WORKSPACE = 32 * 2**20  # torch's default cuBLAS workspace per handle on Hopper (":4096:8"), from the
# caching allocator; the forward and autograd's backward thread each get a handle (an approximation: check on a GPU)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors with fewer values than this

# The training settings that change memory (the `qlora-kit memory` flags shared with `train`).
MEMORY_FIELDS = ("quant", "double_quant", "blocksize", "compute_dtype", "rank", "dropout", "targets", "seq_len",
                 "batch_size", "grad_accum", "optimizer", "gradient_checkpointing", "fsdp", "cache_dir")
SWEEP_KEYS = {"rank": int, "seq-len": int, "batch-size": int, "quant": str, "optimizer": str,
              "gradient-checkpointing": lambda v: _bool(v), "double-quant": lambda v: _bool(v)}


# ---- counting live tensors --------------------------------------------------------------------------

_BACKEND_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA, "meta": torch._C.DispatchKey.Meta}


class LiveTensors(TorchDispatchMode):
    """Bytes of every tensor storage alive, by category, and their peak.

    Tensors that exist before the mode is entered are counted once `add`ed; every tensor an operator
    returns while the mode is active is counted under the current `phase`, and stops counting the moment
    its storage is freed. Views share their base's storage and count once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = "activations"
        self.current = 0
        self.peak = 0
        self.by_category: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.at_peak: dict[str, int] = dict(self.by_category)
        self._live: dict[int, list] = {}  # storage address -> [nbytes, category, weakref]

    def add(self, t: Tensor, category: str | None = None) -> None:
        """Count t's storage under `category` (default: the current phase); a counted one is re-filed."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, ...)
            return
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None:
            n = st.nbytes()
            if n != entry[0]:  # resized in place
                self._move(entry[1], n - entry[0])
                entry[0] = n
            if category is not None and category != entry[1]:
                self.by_category[entry[1]] -= entry[0]
                self.by_category[category] += entry[0]
                entry[1] = category
            return
        category = category or self.phase
        n = st.nbytes()
        self._live[key] = [n, category, weakref.ref(st, self._freed(key))]
        self._move(category, n)

    def _freed(self, key: int) -> Callable:
        def callback(_ref) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._move(entry[1], -entry[0])
        return callback

    def _move(self, category: str, n: int) -> None:
        self.by_category[category] += n
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.by_category)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.at_peak = dict(self.by_category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func.namespace not in ("aten", "prim", "prims"):
            # A custom op (bitsandbytes' kernels) may be Python that allocates its own temporaries: run it
            # with this mode active so those are counted too (aten ops' internal buffers stay invisible).
            key = _BACKEND_KEYS.get(next((t.device.type for t in tree_leaves((args, kwargs))
                                          if isinstance(t, Tensor)), "cpu"))
            if key is not None:
                try:
                    with self:
                        out = func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
                except (RuntimeError, NotImplementedError):
                    out = None
        if out is None:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.add(t)
        return out


# ---- the arithmetic of the static parts -------------------------------------------------------------

def packed_layout(out_features: int, in_features: int, cfg: QuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor `formats.quantize` makes for an (out, in) weight.

    nf4/fp4: codes (ceil(n/2), 1) uint8, absmax per block of `blocksize` (uint8 with double quantization,
    plus a float32 absmax per 256 blocks, the 256-entry level-2 code table and an offset; float32
    without), and the 16-entry code table. int8: (out, in) int8 codes and one float32 scale per row.
    """
    n = out_features * in_features
    if cfg.quant == "none":
        return {"weight": ((out_features, in_features), cfg.compute_dtype)}
    if cfg.quant == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "scb": ((out_features,), torch.float32)}
    blocks = math.ceil(n / cfg.blocksize)
    layout = {"weight": (((n + 1) // 2, 1), torch.uint8), "quant_map": ((16,), torch.float32)}
    if cfg.double_quant:
        layout.update(absmax=((blocks,), torch.uint8),
                      nested_absmax=((math.ceil(blocks / NESTED_BLOCKSIZE),), torch.float32),
                      nested_quant_map=((256,), torch.float32), offset=((1,), torch.float32))
    else:
        layout["absmax"] = ((blocks,), torch.float32)
    return layout


def bytes_per_weight(cfg: QuantConfig) -> float:
    """Bytes per quantized value for a large weight (codes + scales), e.g. 0.516 for nf4 + double quant."""
    if cfg.quant == "none":
        return torch.empty(0, dtype=cfg.compute_dtype).element_size()
    if cfg.quant == "int8":
        return 1.0
    if cfg.double_quant:
        return 0.5 + 1 / cfg.blocksize + 4 / (cfg.blocksize * NESTED_BLOCKSIZE)
    return 0.5 + 4 / cfg.blocksize


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


class _PlannedOptimizer:
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


# ---- reading a config -------------------------------------------------------------------------------

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def read_model_config(model: str, cache_dir: str | None = None):
    """The transformers config of --model: a config.json file, a model folder, a .gguf, or the default.

    Only the config is read (no weights). Raises ValueError / FileNotFoundError with one line naming
    the file and the field at fault.
    """
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model)
    if str(model) == defaults.DEFAULT_MODEL or path.suffix == ".gguf":
        path = defaults.model_folder(model, cache_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file (give a config.json or a model folder)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not model_type:
        raise ValueError(f"{path}: no 'model_type' field, so the architecture is unknown")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: unknown architecture model_type {model_type!r} (transformers does not know it)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a causal language model transformers can build")
    cls = CONFIG_MAPPING[model_type]
    text_raw = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    text_cls = cls.sub_configs.get("text_config", cls) if hasattr(cls, "sub_configs") else cls
    aliases = dict(getattr(text_cls, "attribute_map", {}))  # canonical name -> the name this config stores
    for name in REQUIRED:
        if name not in text_raw and aliases.get(name) not in text_raw:
            alias = f" (or {aliases[name]!r})" if name in aliases else ""
            raise ValueError(f"{path}: missing field {name!r}{alias}; the memory estimate needs the model's sizes")
    for where, fields in (("", raw), ("text_config.", text_raw if text_raw is not raw else {})):
        for key, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int):  # sizes are integers
                continue
            if re.search(r"(^|_)(size|sizes|dim|layers?|heads?|embd|inner|positions|vocab)($|_)|^n_|^num_", key) \
                    and value <= 0 and not key.endswith(("_id", "_index")):
                raise ValueError(f"{path}: field '{where}{key}' is {value}; sizes must be positive")
    try:
        config = cls.from_dict(raw)
    except Exception as e:  # config classes raise several types for bad values
        raise ValueError(f"{path}: config rejected by transformers ({one_line(e)})") from None
    text = config.get_text_config()
    heads, kv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise ValueError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    config.qlora_config_path = str(path)
    return config


# ---- building the model -----------------------------------------------------------------------------

def _lora_config(cfg: TrainConfig) -> LoRAConfig:
    return LoRAConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.target_spec())


def quant_config(cfg: TrainConfig, device: str) -> QuantConfig:
    from .loading import resolve_compute_dtype

    return QuantConfig(quant=cfg.quant, compute_dtype=resolve_compute_dtype(cfg.compute_dtype, device), double_quant=cfg.double_quant, blocksize=cfg.blocksize)


def meta_model(config, cfg: TrainConfig, device: str) -> nn.Module:
    """The quantized model with LoRA, all on the meta device: exact shapes and dtypes, no storage."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from .patch import add_lora, linear_names, set_submodule

    qcfg = quant_config(cfg, device)
    where = getattr(config, "qlora_config_path", "config")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=qcfg.compute_dtype)
    except Exception as e:
        raise ValueError(f"{where}: transformers cannot build the model ({one_line(e)})") from None
    for name in linear_names(model):
        dense = model.get_submodule(name)
        fan_in_fan_out = isinstance(dense, Conv1D)
        out_f, in_f = dense.weight.shape[::-1] if fan_in_fan_out else dense.weight.shape
        if qcfg.quant in ("nf4", "fp4") and (out_f * in_f) % qcfg.blocksize:
            raise ValueError(f"{where}: weight {name} of shape {(out_f, in_f)} ({out_f * in_f} values) does not "
                             f"divide into blocks of {qcfg.blocksize}; loading it would fail too")
        packed = {key: torch.empty(shape, dtype=dtype, device="meta")
                  for key, (shape, dtype) in packed_layout(out_f, in_f, qcfg).items()}
        set_submodule(model, name, QuantLinear(in_f, out_f, packed, qcfg, dense.bias, fan_in_fan_out))
    add_lora(model, config=_lora_config(cfg))
    model.qlora_quant_config = qcfg
    return model


def random_model(config, cfg: TrainConfig, device: str, seed: int = 0) -> nn.Module:
    """The quantized model with LoRA on `device`, with random weights (values do not change memory)."""
    from .loading import load_from_tensors
    from .patch import add_lora

    qcfg = quant_config(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def tensors(expected: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        for name, t in expected.items():
            if t.is_floating_point():
                yield name, (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
            else:
                yield name, torch.zeros(t.shape, dtype=t.dtype)

    model = load_from_tensors(config, tensors, qcfg, device)
    add_lora(model, config=_lora_config(cfg))
    return model


# ---- running steps ----------------------------------------------------------------------------------

def _register_static(model: nn.Module, tracker: LiveTensors) -> None:
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        tracker.add(t, "LoRA parameters" if name.endswith(("lora_A", "lora_B")) else "unquantized weights")
    for module in model.modules():  # packed buffers: re-filed
        if isinstance(module, QuantLinear) and module.fmt != "none":
            for t in module.packed().values():
                tracker.add(t, "quantized weights")


def run_steps(model: nn.Module, cfg: TrainConfig, tracker: LiveTensors, device: str, steps: int = 2,
              meta: bool = False, recompute_context: Callable | None = None, params: list[Tensor] | None = None,
              register_static: Callable | None = None, compute_dtype: torch.dtype | None = None,
              warmup: bool = False, on_warm: Callable | None = None, loss_fn: Callable | None = None) -> None:
    """`steps` optimizer steps of `cfg.grad_accum` micro-batches each, as train() takes them, counted.

    warmup: take one step more first and restart the peak after it, so that the peak is a steady-state
    step's (optimizers create their state lazily inside their first step).

    recompute_context: a context (factory) the recomputation of checkpointed layers runs in; torch
    function modes are not active inside backward, so a meta run re-enters its kernels there.
    params, register_static, compute_dtype: for a model that is not qlora-kit's (the benchmark's PEFT
    side): its trainable tensors, a function(model, tracker) that files its weights, its compute dtype,
    and loss_fn(model, batch) (default: causal_lm_loss, what train() uses).
    """
    from .formats import make_optimizer
    from .patch import enable_checkpointing, lora_layers

    if params is None:
        params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    (register_static or _register_static)(model, tracker)
    compute_dtype = compute_dtype or model.qlora_quant_config.compute_dtype
    if cfg.gradient_checkpointing:
        extra = {"context_fn": lambda: (contextlib.nullcontext(), recompute_context())} if recompute_context else {}
        enable_checkpointing(model, **extra)
    model.train()
    hooks = [_decoder(model).register_forward_pre_hook(lambda *_: setattr(tracker, "phase", "activations")),
             _decoder(model).register_forward_hook(lambda *_: setattr(tracker, "phase", "logits & loss"))]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.add(p.grad, "LoRA gradients")) for p in params]
    vocab = model.config.get_text_config().vocab_size
    use_autocast = not meta and device.startswith("cuda") and compute_dtype == torch.bfloat16
    try:
        with tracker:
            tracker.phase = "optimizer state"
            if meta:
                opt = _PlannedOptimizer(params, cfg.optimizer, "cuda" if device.startswith("cuda") else "cpu")
            else:
                opt = make_optimizer(cfg.optimizer, params, 1e-4, 0.0)
            for step in range(steps + warmup):
                if warmup and step == 1:
                    tracker.reset_peak()
                    if on_warm is not None:
                        on_warm()
                for _ in range(cfg.grad_accum):
                    tracker.phase = "activations"
                    shape = (cfg.batch_size, cfg.seq_len)
                    ids = (torch.empty(shape, dtype=torch.long, device="meta") if meta
                           else torch.randint(0, vocab, shape, device=device))
                    batch = {"input_ids": ids, "labels": ids}
                    if not meta:  # the packed batches of training: all ones (a meta run cannot look inside)
                        batch["attention_mask"] = torch.ones_like(ids)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                        loss = (loss_fn or causal_lm_loss)(model, batch)
                    tracker.phase = "backward temporaries"
                    (loss / cfg.grad_accum).backward()
                    del loss, batch, ids
                tracker.phase = "optimizer temporaries"
                if not meta:  # in place on real tensors; meta's decomposition would copy every gradient
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                for t in tree_leaves(opt.state if meta else list(opt.state.values())):
                    if isinstance(t, Tensor):
                        tracker.add(t, "optimizer state")
                opt.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()


class _TargetKernels(TorchFunctionMode):
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
def _no_data_dependent_masks() -> Iterator[None]:
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


# ---- estimate, measure ------------------------------------------------------------------------------

@dataclasses.dataclass
class MemoryReport:
    """Peak training memory and what it is made of, in bytes."""

    device: str
    settings: dict
    model: dict
    components: dict[str, int]  # alive at the moment of the peak, by category (they add up to `peak`)
    peak: int
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # whole sizes (grads, optimizer, saved acts)
    method: str = "estimate"
    allocator_peak: int | None = None  # CUDA measurement: torch.cuda.max_memory_allocated
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.allocator_peak if self.allocator_peak is not None else self.peak

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["total"] = self.total
        return out


def _settings(cfg: TrainConfig, device: str, qcfg: QuantConfig) -> dict:
    s = {f: getattr(cfg, f) for f in MEMORY_FIELDS if f != "cache_dir"}
    s["compute_dtype"] = str(qcfg.compute_dtype).removeprefix("torch.")
    s["device"] = device
    return s


def _model_info(config, model: nn.Module) -> dict:
    from .patch import lora_layers

    text = config.get_text_config()
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    lora = lora_layers(model)
    return {
        "config": getattr(config, "qlora_config_path", None), "model_type": config.model_type,
        "layers": text.num_hidden_layers, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
        "quantized_params": quantized,
        "unquantized_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "lora_layers": len(lora), "lora_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in lora.values()),
    }


def _sizes(model: nn.Module, cfg: TrainConfig, tracker: LiveTensors, saved: int) -> dict[str, int]:
    from .patch import lora_layers

    numels = [p.numel() for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    return {"LoRA gradients": 4 * sum(numels), "optimizer state": optimizer_state_bytes(numels, cfg.optimizer),
            "activations saved by the forward": saved}


def _simulate(config, cfg: TrainConfig, device: str) -> tuple[nn.Module, LiveTensors, int]:
    model = meta_model(config, cfg, device)
    autocast = device.startswith("cuda") and model.qlora_quant_config.compute_dtype == torch.bfloat16
    tracker = LiveTensors()
    saved = {}
    head_hook = _saved_at_head(model, tracker, saved)
    try:
        with _no_data_dependent_masks(), _TargetKernels(device, autocast):
            run_steps(model, cfg, tracker, device, steps=1, meta=True,
                      recompute_context=lambda: _TargetKernels(device, autocast))
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        where = getattr(config, "qlora_config_path", "config")
        if "meta" in str(e):  # e.g. mixture-of-experts routing looks at values
            raise ValueError(f"{where}: {config.model_type} cannot be estimated from its config: its forward "
                             f"depends on tensor values (such as mixture-of-experts routing) ({one_line(e)}); "
                             "use --measure on a machine that fits it") from None
        raise ValueError(f"{where}: the model cannot run with these sizes ({one_line(e)})") from None
    finally:
        head_hook.remove()
    return model, tracker, saved.get("activations", 0)


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer under the LM head (model.model, model.transformer, ...; through wrappers such as
    PEFT's): its output is the last hidden state, after which come the head and the loss."""
    from .loss import decoder_of

    return decoder_of(model) or model


def _saved_at_head(model: nn.Module, tracker: LiveTensors, saved: dict):
    def hook(*_):
        saved["activations"] = tracker.by_category["activations"]
    return _decoder(model).register_forward_hook(hook)


def estimate(cfg: TrainConfig, device: str = "cuda", config=None, compare: bool = True,
             ranks: int = 1) -> MemoryReport:
    """Peak memory of training with `cfg` on `device` ('cuda' or 'cpu'), from the model's config alone.

    With `compare`, the same is also simulated with checkpointing switched the other way, for `sizes`.
    With `ranks` > 1 the figure is one rank's of a torchrun launch (batch_size is per rank): the same as one
    process for data-parallel training; with cfg.fsdp the weights are each rank's share plus what FSDP2
    gathers (see `_fsdp_weights`).
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"--ranks {ranks!r} must be an integer >= 1")
    if cfg.fsdp and ranks < 2:
        raise ValueError("--fsdp shards the model over ranks: give --ranks N with N >= 2")
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    config = config or read_model_config(cfg.model, cfg.cache_dir)
    check_seq_len(config, cfg.seq_len)
    model, tracker, saved = _simulate(config, cfg, device)
    components = dict(tracker.at_peak)
    notes = []
    if device == "cuda":
        components["CUDA workspace"] = 2 * CUBLAS_WORKSPACE  # one cuBLAS handle for the forward's thread, one
        notes.append("CUDA: add the CUDA context (~0.5 GiB, outside torch's allocator) and allocator "  # backward's
                     "fragmentation (typically 5-10%) when comparing with a GPU's total memory")
    if cfg.optimizer == "paged_adamw8bit" and device == "cuda":
        paged = components.pop("optimizer state")
        components["optimizer state"] = 0
        notes.append(f"paged optimizer state ({_fmt(paged)}) lives in CUDA managed memory, outside torch's "
                     "allocator and this total; it moves to CPU memory under pressure")
    fsdp_change = 0  # what sharding changes in the peak, also for the comparison run below
    if cfg.fsdp:
        shared, gathered = _fsdp_weights(model, ranks)
        weights = components.get("quantized weights", 0) + components.get("unquantized weights", 0)
        for cat in ("quantized weights", "unquantized weights"):
            components[cat] = -(-components.get(cat, 0) // ranks)
        components["FSDP gathered weights"] = gathered
        fsdp_change = components["quantized weights"] + components["unquantized weights"] + gathered - weights
        notes.append(f"FSDP2 over {ranks} ranks: each holds 1/{ranks} of the {_fmt(weights)} of weights, and "
                     f"at the peak the gathered root (head, final norm{', tied embedding' if shared else ''}) and "
                     "two decoder layers plus one layer's all-gather buffer; LoRA factors, gradients and optimizer "
                     "state are whole on every rank")
    elif ranks > 1:
        notes.append(f"data-parallel over {ranks} ranks: every rank holds the whole model and trains its own "
                     f"batch of {cfg.batch_size}; after backward a flat fp32 copy of the LoRA gradients "
                     "is all-reduced (outside the peak)")
    sizes = _sizes(model, cfg, tracker, saved)
    if compare:
        other = dataclasses.replace(cfg, gradient_checkpointing=not cfg.gradient_checkpointing)
        _, other_tracker, other_saved = _simulate(config, other, device)
        sizes["activations saved by the forward " + ("without" if cfg.gradient_checkpointing else "with")
              + " checkpointing"] = other_saved
        sizes["peak " + ("without" if cfg.gradient_checkpointing else "with") + " checkpointing"] = (
            other_tracker.peak + components.get("CUDA workspace", 0) + fsdp_change)
    settings = _settings(cfg, device, model.qlora_quant_config)
    settings["ranks"] = ranks
    return MemoryReport(device=device, settings=settings, model=_model_info(config, model), components=components,
                        peak=sum(components.values()), sizes=sizes, notes=notes)


def _fsdp_weights(model: nn.Module, ranks: int) -> tuple[bool, int]:
    """(whether the head is tied to the embedding, the bytes FSDP2 holds gathered at the peak).

    qlora_kit.distributed.shard_model makes each decoder layer, the input embedding (unless tied) and the
    root (head, final norm) FSDP2 units. The root is gathered from the start of the forward to the end of
    the backward; decoder layers are gathered one at a time with the next one prefetched, and a gather
    briefly holds the all-gather buffer next to the unsharded tensors: two layers plus one buffer.
    """
    from .loss import decoder_of

    def nbytes(module: nn.Module) -> int:
        seen, total = set(), 0
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if "lora_" not in name and id(t) not in seen and not name.endswith("inv_freq"):
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or []
    layer = max((nbytes(m) for m in layers), default=0)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embed is not None and embed.weight is head.weight
    root = nbytes(model) - sum(nbytes(m) for m in layers) - (0 if tied or embed is None else nbytes(embed))
    return tied, root + 3 * layer


def measure(cfg: TrainConfig, device: str = "auto", steps: int = 1, config=None, seed: int = 0) -> MemoryReport:
    """Run one warm-up step and `steps` measured training steps (random weights and tokens); report the
    measured steps' peak, counted per category (and on CUDA the allocator's peak over them)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--measure-steps {steps!r} must be an integer >= 1 (steps measured after one warm-up step)")
    device = resolve_device(device)
    config = config or read_model_config(cfg.model, cfg.cache_dir)
    check_seq_len(config, cfg.seq_len)
    torch.manual_seed(seed)
    is_cuda = device.startswith("cuda")
    tracker = LiveTensors()
    saved = {}
    try:
        model = random_model(config, cfg, device, seed)
        head_hook = _saved_at_head(model, tracker, saved)
        if is_cuda:
            torch.cuda.synchronize()
        try:
            run_steps(model, cfg, tracker, device, steps=steps, warmup=True,
                      on_warm=torch.cuda.reset_peak_memory_stats if is_cuda else None)
        finally:
            head_hook.remove()
    except (RuntimeError, IndexError, TypeError) as e:
        raise ValueError(f"{getattr(config, 'qlora_config_path', 'config')}: measuring failed ({one_line(e)})") from None
    report = MemoryReport(device="cuda" if is_cuda else "cpu",
                          settings=_settings(cfg, device, model.qlora_quant_config),
                          model=_model_info(config, model), components=dict(tracker.at_peak), peak=tracker.peak,
                          sizes=_sizes(model, cfg, tracker, saved.get("activations", 0)), method="measured")
    if is_cuda:
        torch.cuda.synchronize()
        report.allocator_peak = torch.cuda.max_memory_allocated()
        report.notes.append("total = torch.cuda.max_memory_allocated; the categories count live tensors, the rest "
                            "is workspace and allocator rounding")
    else:
        report.notes.append("total = peak of live tensor bytes (not process RSS: interpreter, libraries and "
                            "allocator caches are not training memory)")
    return report


def check_measurable(est: MemoryReport) -> None:
    """Refuse a CPU measurement that would need more than half of this machine's memory."""
    if est.device != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if est.total > total / 2:
        raise ValueError(f"--measure on the CPU would need about {_fmt(est.total)} of this machine's "
                         f"{_fmt(total)}; measure on a GPU, or with a smaller --seq-len / --batch-size")


# ---- fitting a budget -------------------------------------------------------------------------------

def parse_size(text: str, allow_zero: bool = False) -> int:
    """'24GiB', '24GB', '512MiB', '80G' (G = GiB) or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m or not m.group(1):
        raise ValueError(f"memory size {text!r} is not a size like 24GiB, 24GB or 512MiB")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".find(prefix) + 1 if prefix else 0
    base = 1000 if suffix.upper() == "B" and prefix else 1024  # GB = 10^9, GiB and bare G = 2^30
    value = int(number * base**power)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"memory size {text!r} must be positive")
    return value


@dataclasses.dataclass
class FitResult:
    what: str  # 'seq_len' or 'batch_size'
    budget: int
    reserve: int
    best: int | None  # the largest value that fits with the given settings (None: nothing fits)
    report: MemoryReport | None  # the estimate at `best`
    alternatives: list[dict]  # switches and the largest value that fits with them
    limit: int = 0  # the search's upper end (the model's context for a sequence length)


SWITCHES = (  # what to switch on, in order of what it costs (speed or quality)
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("8-bit optimizer", {"optimizer": "adamw8bit"}),
    ("gradient checkpointing + 8-bit optimizer", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    ("nf4 weights", {"quant": "nf4"}),
    ("nf4 + double quant + checkpointing + 8-bit optimizer",
     {"quant": "nf4", "double_quant": True, "gradient_checkpointing": True, "optimizer": "adamw8bit"}),
)


def fit(cfg: TrainConfig, budget: int, device: str = "cuda", what: str = "seq_len", reserve: int | None = None,
        config=None, ranks: int = 1) -> FitResult:
    """The largest sequence length (or batch size) whose estimated peak fits in `budget` bytes.

    `reserve` is memory the budget does not have for tensors (default on CUDA 1 GiB: the CUDA context
    and allocator fragmentation; 0 on CPU). Sequence lengths are searched in multiples of 64 (below 64:
    any length), batch sizes one by one. Switches that raise the limit are listed too; when nothing fits
    they say what to switch on.
    """
    if what not in ("seq_len", "batch_size"):
        raise ValueError(f"--fit-for {what!r}: use seq-len or batch-size")
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    config = config or read_model_config(cfg.model, cfg.cache_dir)
    reserve = (2**30 if device == "cuda" else 0) if reserve is None else reserve
    if budget <= reserve:
        raise ValueError(f"budget {_fmt(budget)} is not more than the reserve {_fmt(reserve)}")
    max_ctx = getattr(config.get_text_config(), "max_position_embeddings", None) or 2**20
    limit = max_ctx if what == "seq_len" else 2**14

    def largest(c: TrainConfig) -> tuple[int | None, MemoryReport | None]:
        return _largest(c, what, limit, budget - reserve, device, config, ranks)

    best, report = largest(cfg)
    alternatives = []
    for label, change in SWITCHES:
        if all(getattr(cfg, k) == v for k, v in change.items()):
            continue
        if best is not None and label != "gradient checkpointing":  # it fits: only the cheapest lever is shown
            continue
        value, rep = largest(dataclasses.replace(cfg, **change))
        if value is not None and (best is None or value > best):
            alternatives.append({"switch": label, "change": change, "best": value, "peak": rep.total})
    return FitResult(what, budget, reserve, best, report, alternatives, limit)


def _largest(cfg: TrainConfig, what: str, limit: int, room: int, device: str,
             config, ranks: int = 1) -> tuple[int | None, MemoryReport | None]:
    """The largest value of `what` in 1..limit whose estimated peak is at most `room`.

    Candidates are 1..63 and then multiples of 64 for a sequence length, every integer for a batch.
    The peak grows almost linearly in both, so the bracket is narrowed by linear interpolation
    (falling back to bisection), which needs a handful of estimates rather than a dozen.
    """
    grid = 64 if what == "seq_len" else 1
    cache: dict[int, MemoryReport] = {}

    def peak(v: int) -> int:
        if v not in cache:
            cache[v] = estimate(dataclasses.replace(cfg, **{what: v}), device, config, compare=False, ranks=ranks)
        return cache[v].total

    def snap(v: float) -> int:
        v = int(v)
        return v if v < grid else v // grid * grid

    if peak(1) > room:
        return None, None
    lo, hi = 1, snap(limit)
    if peak(hi) <= room:
        return hi, cache[hi]
    for i in itertools.count():  # peak(lo) <= room < peak(hi)
        first = lo + 1 if lo + 1 < grid else (lo // grid + 1) * grid  # candidates strictly inside the bracket
        last = hi - 1 if hi - 1 < grid else (hi - 1) // grid * grid
        if first > last:
            return lo, cache[lo]
        if i < 3:
            guess = lo + (room - peak(lo)) * (hi - lo) / max(peak(hi) - peak(lo), 1)
        else:  # interpolation did not settle it: bisect
            guess = (lo + hi) / 2
        mid = min(max(snap(guess), first), last)
        if peak(mid) <= room:
            lo = mid
        else:
            hi = mid
    raise AssertionError("unreachable")


# ---- sweeps -----------------------------------------------------------------------------------------

def _bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{v!r} is not true/false")


def parse_sweep(items: list[str]) -> dict[str, list]:
    """['rank=8,16', 'seq-len=128,256'] -> {'rank': [8, 16], 'seq_len': [128, 256]}."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or key not in SWEEP_KEYS or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
        name = key.replace("-", "_")
        if name in out:
            raise ValueError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        try:
            out[name] = [SWEEP_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"--sweep {item!r}: {one_line(e)}") from None
        if not out[name]:
            raise ValueError(f"--sweep {item!r}: no values")
    return out


def sweep(cfg: TrainConfig, axes: dict[str, list], device: str = "cuda", do_measure: bool = False,
          log: Callable[[str], None] = print, ranks: int = 1) -> list[dict]:
    """Estimate (and measure) every combination of the swept settings; one row per combination."""
    config = read_model_config(cfg.model, cfg.cache_dir)
    rows = []
    keys = list(axes)
    for values in itertools.product(*(axes[k] for k in keys)):
        label = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in zip(keys, values, strict=True))
        try:
            c = dataclasses.replace(cfg, **dict(zip(keys, values, strict=True)))
            if c.optimizer not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {c.optimizer!r}")
            est = estimate(c, device if not do_measure else resolve_device(device), config, compare=False, ranks=ranks)
        except ValueError as e:
            raise ValueError(f"--sweep point {label}: {e}") from None
        row = {k: v for k, v in zip(keys, values, strict=True)}
        row.update({f"est_{_key(k)}": v for k, v in est.components.items()}, est_total=est.total)
        if do_measure:
            check_measurable(est)
            mes = measure(c, device, config=config)
            row.update({f"meas_{_key(k)}": v for k, v in mes.components.items()}, meas_total=mes.total,
                       error=round(est.total / mes.total - 1, 4))
        rows.append(row)
        log(f"{label}: estimate {_fmt(est.total)}"
            + (f", measured {_fmt(row['meas_total'])} ({100 * row['error']:+.1f}%)" if do_measure else ""))
    return rows


def _key(category: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")


def write_csv(rows: list[dict], path: str | Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def write_plot(rows: list[dict], axes: dict[str, list], path: str | Path) -> None:
    """Estimated (and measured) peak per sweep point, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'qlora-kit[plot]'") from None
    keys = list(axes)
    labels = [", ".join(f"{k}={row[k]}" for k in keys) for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.plot(x, [r["est_total"] / 2**20 for r in rows], "o-", label="estimate")
    if any("meas_total" in r for r in rows):
        ax.plot(x, [r["meas_total"] / 2**20 for r in rows], "s--", label="measured")
    ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("peak training memory (MiB)")
    ax.set_title("qlora-kit memory sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


# ---- text ------------------------------------------------------------------------------------------

def _fmt(n: int | float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_report(est: MemoryReport, meas: MemoryReport | None = None) -> str:
    """The breakdown as a table: estimate (and measurement) per category, then the total."""
    s, m = est.settings, est.model
    qcfg = QuantConfig(quant=s["quant"], double_quant=s["double_quant"], blocksize=s["blocksize"],
                       compute_dtype=s["compute_dtype"])
    fmt = s["quant"] + (f" (block {s['blocksize']}{', double quant' if s['double_quant'] else ''})"
                        if s["quant"] in ("nf4", "fp4") else "")
    lines = [
        f"model: {m['model_type']}, {m['layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']:,} "
        f"({m['config']})",
        f"training: {fmt} weights, {s['compute_dtype']} compute on {est.device}; LoRA r={s['rank']} on "
        f"{m['lora_layers']} layers ({m['lora_params']:,} parameters); batch {s['batch_size']} x seq {s['seq_len']}"
        + (f" x accum {s['grad_accum']}" if s["grad_accum"] > 1 else "")
        + f"; {s['optimizer']}; checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
        + (f"; one of {s['ranks']} ranks ({'FSDP2' if s.get('fsdp') else 'data-parallel'})"
           if s.get("ranks", 1) > 1 else ""),
        "",
        f"  {'':24}{'estimate':>12}" + (f"{'measured':>12}{'diff':>8}" if meas else ""),
    ]
    explain = {
        "quantized weights": f"{m['quantized_params'] / 1e6:,.1f}M values x {bytes_per_weight(qcfg):.4f} B",
        "unquantized weights": f"{m['unquantized_params'] / 1e6:,.1f}M values: embeddings, norms, head",
        "LoRA parameters": f"{m['lora_params'] / 1e6:,.2f}M x 4 B",
    }
    for cat in CATEGORIES:
        e = est.components.get(cat, 0)
        v = meas.components.get(cat, 0) if meas else 0
        if not e and not v:
            continue
        row = f"  {cat:24}{_fmt(e):>12}"
        if meas:
            row += f"{_fmt(v):>12}{_pct(e, v):>8}"
        if cat in explain:
            row += f"   {explain[cat]}"
        lines.append(row)
    if meas and meas.allocator_peak is not None:
        lines.append(f"  {'other (allocator)':24}{'':>12}{_fmt(meas.allocator_peak - meas.peak):>12}")
    lines.append(f"  {'peak':24}{_fmt(est.total):>12}" + (f"{_fmt(meas.total):>12}{_pct(est.total, meas.total):>8}"
                                                         if meas else ""))
    lines.append("")
    for k, v in est.sizes.items():
        lines.append(f"  {k}: {_fmt(v)}")
    for note in est.notes + (meas.notes if meas else []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _pct(est: int, meas: int) -> str:
    return f"{100 * (est / meas - 1):+.1f}%" if meas else ""


def format_fit(res: FitResult) -> str:
    what = "sequence length" if res.what == "seq_len" else "batch size"
    room = f"{_fmt(res.budget)} budget, {_fmt(res.reserve)} reserved for the CUDA context and fragmentation" \
        if res.reserve else f"{_fmt(res.budget)} budget"
    if res.best is None:
        lines = [f"nothing fits in {room}: even a {what} of 1 needs more."]
    else:
        cap = ((" (the model's context)" if res.what == "seq_len" else " (the largest tried)")
               if res.best == res.limit else "")
        lines = [f"largest {what} that fits in {room}: {res.best}{cap} (estimated peak {_fmt(res.report.total)})"]
    for alt in res.alternatives:
        cap = " (the model's context)" if res.what == "seq_len" and alt["best"] == res.limit else ""
        lines.append(f"  with {alt['switch']}: up to {alt['best']}{cap} (peak {_fmt(alt['peak'])})")
    if res.best is None and not res.alternatives:
        lines.append("  no switch makes it fit: use a smaller model, a lower rank, or more memory")
    return "\n".join(lines)
