"""Choosing target layers, putting LoRA on them, and reporting what trains.

Nothing here knows a model family's module names: a layer is a target because of what it is
(a linear map, and not the output head), never because of what it is called.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import re
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoRAConfig, QuantConfig
from .experts import ExpertStack, expert_stacks, router_linears
from .layers import QuantLinear


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (a linear with its weight stored (in, out)), or a QuantLinear; a
    subclass only when it keeps the plain forward (one with its own forward uses its weight its own way)."""
    if isinstance(module, QuantLinear):
        return True
    if isinstance(module, Conv1D):
        return type(module).forward is Conv1D.forward
    return isinstance(module, nn.Linear) and _plain_linear(type(module))


@functools.cache
def _plain_linear(cls: type) -> bool:
    """Whether an nn.Linear subclass computes x @ W.T + b: its forward, tried on a small instance holding
    only a weight and a bias (a forward that needs more, or computes something else, is not plain)."""
    if cls.forward is nn.Linear.forward:
        return True
    probe = cls.__new__(cls)
    with torch.random.fork_rng(devices=[]):  # its initialisation must not move the caller's random stream
        nn.Linear.__init__(probe, 8, 5, bias=True, device="cpu")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return torch.allclose(probe(x), torch.nn.functional.linear(x, probe.weight, probe.bias), atol=1e-6)
    except Exception:
        return False


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def linear_names(model: nn.Module, device: str | torch.device | None = None) -> list[str]:
    """Dotted paths of every linear layer except the output head and MoE routers, in module order (the
    experts of an ExpertStack are not listed one by one: the stack is a target of its own).

    A linear whose weight its parent module uses itself stays dense and is left out: on a CPU, one the
    parent multiplies with (`self.dt_proj.weight @ x` in Mamba's slow path); on CUDA, also one it hands to
    a fused kernel (Mamba's fast path takes x_proj's and out_proj's weights). `device`: where the model
    runs (default: where its tensors are).
    """
    head = output_head(model)
    routers = router_linears(model)
    inside = _stack_members(expert_stacks(model))
    read_directly = _read_directly(model, device)
    return [name for name, m in model.named_modules() if is_linear(m) and m is not head
            and name not in routers and name not in inside and name not in read_directly]


def _stack_members(stacks: dict[str, ExpertStack]) -> set[str]:
    """The dotted paths of the experts inside each stack (a stack is one target, not E of them)."""
    return {f"{n}.{i}" for n, stack in stacks.items() for i in range(len(stack))}


def _read_directly(model: nn.Module, device: str | torch.device | None = None) -> set[str]:
    if device is None:  # where the model was built for (a meta model for a memory estimate), else its tensors
        device = getattr(model, "qlora_device", None) or next(
            (t.device for t in [*model.parameters(), *model.buffers()] if not t.is_meta), "cpu")
    strict = torch.device(device).type == "cuda"
    return {f"{n}.{c}" if n else c for n, m in model.named_modules() for c in _weights_read_by(type(m), strict)}


@functools.cache
def _weights_read_by(cls: type, strict: bool) -> frozenset[str]:
    """Children whose weight the class's own code uses directly, not through their forward: multiplied with
    (`@`, `matmul(`), or with `strict` any use of the weight itself (not its device, dtype or shape)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return frozenset()
    if strict:
        return frozenset(re.findall(r"self\.(\w+)\.weight\b(?!\s*\.\s*(?:device|dtype|shape|size|ndim))", source))
    pattern = r"self\.(\w+)\.weight\s*@|@\s*self\.(\w+)\.weight\b|matmul\(\s*self\.(\w+)\.weight\b"
    return frozenset(n for groups in re.findall(pattern, source) for n in groups if n)


def target_candidates(model: nn.Module) -> list[str]:
    """What LoRA can go on: the linear layers of `linear_names` and the expert stacks, in module order."""
    stacks = set(expert_stacks(model))
    linears = set(linear_names(model))
    return [n for n, _ in model.named_modules() if n in linears or n in stacks]


def select_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Resolve 'all-linear', a list of module names, or a regex into the linear layers it means.

    Raises:
        ValueError: when nothing matches, or a listed name is not a linear layer.
    """
    candidates = target_candidates(model)
    stacks = expert_stacks(model)
    inside = _stack_members(stacks)
    kept_dense = router_linears(model) | _read_directly(model)  # routers, and weights a parent uses itself
    if targets == "all-linear":
        chosen = candidates
    elif isinstance(targets, str):
        # A regex picks among the linear layers and expert stacks (the output head included, if it matches).
        chosen = [n for n, m in model.named_modules()
                  if (is_linear(m) or isinstance(m, ExpertStack)) and n not in inside and n not in kept_dense
                  and re.fullmatch(targets, n)]
    else:
        modules = dict(model.named_modules())
        chosen = []
        for want in targets:
            bare = want.removesuffix(".weight")  # a parallel-experts stack named as PEFT names its parameter
            if bare != want and any(k == bare or k.endswith("." + bare) for k in stacks):
                want = bare
            hits = [n for n in modules if (n == want or n.endswith("." + want)) and n not in inside]
            # an experts module stands for its stacks (the module that holds them, not any ancestor)
            hits = [k for n in hits for k in ([k for k in stacks if k.rpartition(".")[0] == n] or [n])]
            if not hits:
                if "expert" in want and not stacks:
                    raise ValueError(f"target {want!r} names expert weights, but {type(model).__name__} has no "
                                     "experts (a dense model); use its linear layers: "
                                     f"{', '.join(_short_names(candidates))}")
                raise ValueError(f"target {want!r} matches no module of {type(model).__name__}; "
                                 f"linear layers are named like: {', '.join(_short_names(candidates))}")
            bad = [n for n in hits if not is_linear(modules[n]) and not isinstance(modules[n], ExpertStack)]
            if bad:
                raise ValueError(f"target {want!r} matches {bad[0]!r}, a {type(modules[bad[0]]).__name__}, "
                                 "not a linear layer")
            dense = [n for n in hits if n in kept_dense]
            if dense:
                why = "a router" if dense[0] in router_linears(model) else "a layer whose weight its parent uses directly"
                raise ValueError(f"target {want!r} matches {dense[0]!r}, {why}: it stays dense and takes no LoRA")
            chosen += hits
        order = {n: i for i, n in enumerate(modules)}
        chosen = sorted(set(chosen), key=order.__getitem__)
    if not chosen:
        raise ValueError(f"targets {targets!r} match no linear layer; linear layers are named like: "
                         f"{', '.join(_short_names(candidates))}")
    return chosen


def _short_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def to_quant_linear(module: nn.Module, cfg: QuantConfig) -> QuantLinear:
    """Wrap a dense nn.Linear / Conv1D as a frozen QuantLinear in cfg's format."""
    if isinstance(module, QuantLinear):
        return module
    return QuantLinear.from_dense(module.weight.data, cfg, module.bias.data if module.bias is not None else None,
                                  fan_in_fan_out=isinstance(module, Conv1D))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.05,
             targets: str | list[str] = "all-linear", *, config: LoRAConfig | None = None,
             **options) -> nn.Module:
    """Freeze the model and put trainable LoRA factors on the target linear layers.

    Args:
        model: a model from `load_quantized` (or any transformers model: dense target layers are
            kept in their dtype, frozen, as format 'none').
        r, alpha, dropout, targets: see LoRAConfig; ignored when `config` is given.
        options: further LoRAConfig fields (rslora, init, rank_pattern, alpha_pattern, adapter_dtype).
    Returns:
        The same model, patched in place.
    Raises:
        ValueError: bad options, targets that match nothing, or a model that already has LoRA.
    """
    cfg = config or LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=targets, **options)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; use load_adapter to replace their values")
    names = select_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ExpertStack):  # no dropout on experts, as in PEFT's LoRA for 3-D parameters
            for expert in module:
                expert.attach_lora(cfg.rank_for(name), cfg.alpha_for(name), 0.0, rslora=cfg.rslora,
                                   init=cfg.init, dtype=cfg.adapter_dtype)
            continue
        if not isinstance(module, QuantLinear):
            dtype = module.weight.dtype
            module = to_quant_linear(module, QuantConfig(quant="none", compute_dtype=dtype)).to(module.weight.device)
            set_submodule(model, name, module)
        module.attach_lora(cfg.rank_for(name), cfg.alpha_for(name), cfg.dropout, rslora=cfg.rslora,
                           init=cfg.init, dtype=cfg.adapter_dtype)
    return model


def enable_checkpointing(model: nn.Module, **kwargs) -> None:
    """transformers' non-reentrant activation checkpointing of every decoder layer (kwargs: for checkpoint())."""
    kwargs = {"use_reentrant": False, **kwargs}
    if hasattr(model, "enable_input_require_grads"):
        # With a frozen embedding the checkpointed blocks would see inputs that do not require grad, and
        # reentrant checkpointing would give the LoRA factors inside them no gradient. Only here: the hook
        # makes the embedding output a leaf that requires grad, which models scaling it in place (CTRL)
        # cannot take.
        model.enable_input_require_grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def set_merge_aware(model: nn.Module, fmt: str | None, rounding: str | None = None) -> None:
    """Merge-aware training: every LoRA layer's forward computes with W + s*BA rounded into the export format `fmt`
    (nf4 / fp4 / int8, or a GGUF type q8_0 / q4_0 / q4_1 / q5_0 / q5_1), the weight the merged export will store;
    A and B learn through a straight-through estimator. None turns it off.

    `rounding`: "dither" (the default for nf4 / fp4: stochastic rounding with a fixed dither on the base's own
    grid, rounding.dithered_codes) or "nearest" (the default otherwise, and what adapters saved without the
    setting were trained with). The base of a 4-bit model already sits on its grid, so round to nearest moves a
    code only where the update reaches half a step, and a LoRA update rarely does; the dither moves codes in
    proportion to the update's size.

    Raises: ValueError for an unknown format or rounding, expert stacks with LoRA, or rows that GGUF blocks do
    not split.
    """
    import dataclasses

    from .config import EXPORT_FORMATS, GGUF_QUANTS, choice, merge_aware_rounding

    layers = lora_layers(model)
    q = None
    if fmt is not None:
        choice(fmt, [f for f in EXPORT_FORMATS if f not in ("bf16", "fp16", "fp32")], "merge-aware format")
        stacks = {n for n, st in expert_stacks(model).items() if st[0].lora_A is not None}
        if stacks:
            raise ValueError(f"merge-aware training of expert stacks ({sorted(stacks)[0]}) is not supported")
        if fmt in GGUF_QUANTS:
            odd = next((n for n, m in layers.items() if m.in_features % 32), None)
            if odd is not None:
                raise ValueError(f"{odd}: {layers[odd].in_features} inputs do not split into {fmt}'s blocks of 32")
        base = getattr(model, "qlora_quant_config", None) or QuantConfig()
        q = dataclasses.replace(base, quant=fmt, compute_dtype=torch.float32)  # as the merge rounds it
        rounding = merge_aware_rounding(fmt, rounding)
    else:
        rounding = None
    for layer in layers.values():
        layer.merge_aware = q
        layer.merge_aware_rounding = rounding or "nearest"
    model.qlora_merge_aware = fmt
    model.qlora_merge_aware_rounding = rounding


def lora_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.lora_A is not None}


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA branch on or off without removing it."""
    for layer in lora_layers(model).values():
        layer.lora_enabled = enabled


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block: `with qk.adapter_disabled(model): ...`."""
    layers = lora_layers(model).values()
    before = [layer.lora_enabled for layer in layers]
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.lora_enabled = was


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts as its out x in values."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total


def parameter_report(model: nn.Module) -> str:
    """A short text report: trainable vs total, and the d*k -> r*(d+k) arithmetic per target shape."""
    trainable, total = trainable_parameters(model)
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"]
    shapes: dict[tuple[int, int, int], int] = {}
    for layer in lora_layers(model).values():
        key = (layer.out_features, layer.in_features, layer.r)
        shapes[key] = shapes.get(key, 0) + 1
    for (d, k, r), count in sorted(shapes.items()):
        full, lora = d * k, r * (d + k)
        lines.append(f"  {count:4d} x ({d} x {k}), r={r}: {lora:,} trainable instead of {full:,} "
                     f"({full / lora:.1f}x fewer)")
    return "\n".join(lines)


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture: type, and every weight's logical shape by name."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            shape = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            shape = tuple(module.weight.shape[::-1])
        elif getattr(module, "weight", None) is not None and isinstance(module.weight, torch.Tensor):
            shape = tuple(module.weight.shape)
        else:
            continue
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]
