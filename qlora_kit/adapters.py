"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's (`base_model.model.<module path>.lora_A.weight`, A is (r, in), B is (out, r)), so
`peft.PeftModel.from_pretrained` reads what is saved here and this module reads what PEFT saves.
Only safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import MERGE_AWARE_ROUNDINGS, QuantConfig, one_line, pattern_lookup
from .experts import ExpertStack, expert_stacks, peft_key, peft_target
from .io import atomic_dir
from .layers import QuantLinear
from .patch import fingerprint, is_linear, lora_layers, set_merge_aware, set_submodule, to_quant_linear

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
FINGERPRINT = "base_model_fingerprint"
BASE_QUANT = "base_model_quantization"
MERGE_AWARE = "merge_aware_format"  # trained against this export format's rounding (see patch.set_merge_aware)
MERGE_AWARE_ROUNDING = "merge_aware_rounding"  # and how it rounds ("dither"; absent: round to nearest)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
CONFIG_TYPES = {"lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": (bool,),
                "alpha_pattern": (dict,), "rank_pattern": (dict,), "r": (int,)}
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "use_qalora": "QA-LoRA"}


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA factors as a PEFT adapter folder (atomically; replaces an existing one).

    Returns:
        The adapter folder.
    Raises:
        ValueError: when the model has no LoRA layers.
    """
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers to save; call add_lora first")
    path = Path(path)
    if path.exists():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ADAPTER_FILES) if path.is_dir() else [""]
        if foreign:
            raise FileExistsError(f"{path}: exists and holds other files ({foreign[0] or 'it is a file'}); "
                                  "choose an empty or new folder for the adapter")
    with atomic_dir(path) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path)
    return Path(path)


def write_adapter_files(model: nn.Module, folder: Path, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing folder."""
    every = lora_layers(model)
    if not every:
        raise ValueError("model has no LoRA layers to save; call add_lora first")
    stacks = {n: st for n, st in expert_stacks(model).items() if st[0].lora_A is not None}
    layers = {n: m for n, m in every.items() if n.rpartition(".")[0] not in stacks}
    # expert stacks by their parameter's path, the key PEFT looks their rank and alpha up by
    ranks = {n: m.r for n, m in layers.items()} | {peft_target(n, st): st[0].r for n, st in stacks.items()}
    alphas = {n: m.lora_alpha for n, m in layers.items()} | {peft_target(n, st): st[0].lora_alpha
                                                             for n, st in stacks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    first = next(iter(every.values()))
    source = getattr(model, "qlora_source", {})
    if len({m.rslora for m in every.values()}) > 1:
        raise ValueError("LoRA layers mix rsLoRA and plain scaling, which PEFT's adapter_config cannot express")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or source.get("name") or source.get("path") or getattr(
            getattr(model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        # PEFT's LoRA on 3-D parameters takes no dropout and refuses a config that asks for it; dropout is a
        # training setting, so an adapter with expert factors records none
        "lora_dropout": 0.0 if stacks else max((m.dropout for m in layers.values()), default=0.0),
        "target_modules": sorted(layers),
        "target_parameters": sorted(peft_key(model, n, set(stacks))[1] for n in stacks) or None,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": first.rslora,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    for name, stack in stacks.items():
        key = peft_key(model, name, set(stacks))[0]
        a, b = stack.peft_factors()
        tensors[f"{PREFIX}{key}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{PREFIX}{key}.lora_B.weight"] = b.cpu().contiguous()
    # The base's fingerprint goes in the safetensors header, where PEFT does not warn about it.
    metadata = {"format": "pt", FINGERPRINT: fingerprint(model)}
    quant = getattr(model, "qlora_quant_config", None)
    if quant is not None:  # how the base was quantized: the function the adapter was trained against
        metadata[BASE_QUANT] = json.dumps({"quant": quant.quant, "blocksize": quant.blocksize,
                                           "double_quant": quant.double_quant,
                                           "compute_dtype": str(quant.compute_dtype).removeprefix("torch.")})
    if getattr(model, "qlora_merge_aware", None):
        metadata[MERGE_AWARE] = model.qlora_merge_aware
        metadata[MERGE_AWARE_ROUNDING] = getattr(model, "qlora_merge_aware_rounding", None) or "nearest"
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read an adapter folder: its config (with the recorded base fingerprint) and {module path: (A, B)}.

    Raises:
        FileNotFoundError, ValueError: missing files, unreadable or unsupported contents.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; is this an adapter folder?")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    for key, kinds in CONFIG_TYPES.items():
        if key in config and not isinstance(config[key], kinds):
            raise ValueError(f"{cfg_file}: {key} is {config[key]!r}, expected {' or '.join(k.__name__ for k in kinds)}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {config.get('peft_type')!r} is not supported; only LORA is")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{cfg_file}: {what} adapters ({key}=true) are not supported")
    if not weights.is_file():
        hint = " (adapter_model.bin is pickled and is never loaded)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}{hint}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get(FINGERPRINT):
                config[FINGERPRINT] = meta[FINGERPRINT]
            if meta.get(BASE_QUANT):
                config[BASE_QUANT] = json.loads(meta[BASE_QUANT])
            if meta.get(MERGE_AWARE):
                config[MERGE_AWARE] = meta[MERGE_AWARE]
                config[MERGE_AWARE_ROUNDING] = meta.get(MERGE_AWARE_ROUNDING, "nearest")  # older adapters: nearest
                if config[MERGE_AWARE_ROUNDING] not in MERGE_AWARE_ROUNDINGS:
                    raise ValueError(f"{path}: unknown {MERGE_AWARE_ROUNDING} {config[MERGE_AWARE_ROUNDING]!r} "
                                     f"({', '.join(MERGE_AWARE_ROUNDINGS)})")
            for key in f.keys():
                module, part = _split_key(key)
                if part is None:
                    raise ValueError(f"{weights}: tensor {key!r} is not a LoRA A/B weight (only LoRA factors "
                                     "are supported; modules_to_save and embedding adapters are not)")
                pairs.setdefault(module, {})[part] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({one_line(e)})") from None
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights}: module {module!r} has lora_{next(iter(ab))} but not both factors")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights}: module {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                             "which are not (r, in) and (out, r)")
        out[module] = (a, b)
    if not out:
        raise ValueError(f"{weights}: holds no LoRA tensors")
    return config, out


def _split_key(key: str) -> tuple[str, str | None]:
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if name.endswith(suffix):
                return name[: -len(suffix)], part
    return name, None


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a PEFT LoRA adapter into the model: creates the LoRA layers, or fills existing ones.

    Args:
        check_base: refuse an adapter whose recorded base fingerprint differs from the model's.
        dtype: adapter dtype of newly created LoRA layers (the file's values are cast to it).
    Returns:
        The model, patched in place.
    Raises:
        ValueError: the adapter's target names or shapes do not fit the model; nothing is changed then.
    """
    path = Path(path)
    config, pairs = read_adapter(path)
    apply_adapter(model, path, config, pairs, check_base, dtype)
    if config.get(MERGE_AWARE):  # the model it was trained as: its export's rounding in the forward
        set_merge_aware(model, config[MERGE_AWARE], config.get(MERGE_AWARE_ROUNDING, "nearest"))
    return model


def apply_adapter(model: nn.Module, path: Path, config: dict, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  check_base: bool = True, dtype: torch.dtype = torch.float32, under: str | None = None) -> nn.Module:
    """load_adapter with the adapter already read (read_adapter); with `under`, only the modules whose names
    start with it (one decoder block of a model read a block at a time) are checked and patched."""
    pairs = {n: ab for n, ab in pairs.items() if n.startswith(under or "")}  # a copy: expert factors are taken out
    if check_base:
        check_fingerprint(path, config, fingerprint(model))
    modules = dict(model.named_modules())
    stack_pairs = _stack_pairs(model, path, config, pairs, under)  # expert factors, by stack name
    existing = {n: m for n, m in lora_layers(model).items()
                if not isinstance(modules.get(n.rpartition(".")[0]), ExpertStack) and n.startswith(under or "")}
    with_lora = {n for n, st in expert_stacks(model).items() if st[0].lora_A is not None and n.startswith(under or "")}
    if (existing or with_lora) and with_lora != set(stack_pairs):
        extra = sorted(with_lora ^ set(stack_pairs))[0]
        raise ValueError(f"{path}: adapter and model differ on LoRA for the experts {extra!r}; load it into a "
                         "model without LoRA instead")
    for name, experts in stack_pairs.items():
        if name in with_lora and modules[name][0].r != experts[0][0].shape[0]:
            raise ValueError(f"{path}: adapter for the experts {name!r} (r={experts[0][0].shape[0]}) does not fit "
                             f"the model's existing LoRA (r={modules[name][0].r}); load it into a model without LoRA")
    for name, (a, b) in pairs.items():  # check everything before changing anything
        module = modules.get(name)
        if module is None or not is_linear(module):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise ValueError(f"{path}: adapter targets {name!r}, which this {type(model).__name__} has not ({what})")
        in_f, out_f = in_out(module)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise ValueError(f"{path}: adapter for {name!r} has A {tuple(a.shape)}, B {tuple(b.shape)}, but the "
                             f"layer is {in_f} -> {out_f}")
        if existing and (name not in existing or existing[name].r != a.shape[0]):
            raise ValueError(f"{path}: adapter for {name!r} (r={a.shape[0]}) does not fit the model's existing "
                             "LoRA layers; load it into a model without LoRA instead")
    if existing and set(existing) != set(pairs):
        extra = sorted(set(existing) - set(pairs))[0]
        raise ValueError(f"{path}: adapter has no factors for the model's LoRA layer {extra!r}")
    alphas = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    for name, experts in stack_pairs.items():
        alpha = pattern_lookup(alphas, peft_target(name, modules[name]), config.get("lora_alpha", 8))
        for expert, (a, b) in zip(modules[name], experts, strict=True):
            if expert.lora_A is None:
                expert.attach_lora(a.shape[0], alpha, 0.0, rslora=rslora, dtype=dtype)
            expert.set_scale(alpha, rslora)
            with torch.no_grad():
                expert.lora_A.copy_(a)
                expert.lora_B.copy_(b)
    for name, (a, b) in pairs.items():
        layer = modules[name]
        if not isinstance(layer, QuantLinear):
            layer = to_quant_linear(layer, QuantConfig(quant="none", compute_dtype=layer.weight.dtype))
            set_submodule(model, name, layer.to(layer.weight.device))
        alpha = pattern_lookup(alphas, name, config.get("lora_alpha", 8))
        if layer.lora_A is None:
            layer.attach_lora(a.shape[0], alpha, float(config.get("lora_dropout", 0.0)), rslora=rslora, dtype=dtype)
        layer.set_scale(alpha, rslora)  # the adapter's own scale, also over existing LoRA layers
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    trainable = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def check_fingerprint(path: Path, config: dict, base: str) -> None:
    """Refuse an adapter whose recorded base fingerprint (read_adapter puts it in `config`) is not `base`; an
    adapter without one (PEFT's own files) passes, and its shapes are checked instead."""
    recorded = config.get(FINGERPRINT)
    if recorded and recorded != base:
        raise ValueError(f"{path}: adapter was trained on a different base model (fingerprint {recorded}, this "
                         f"model's is {base}; base was {config.get('base_model_name_or_path')!r})")


def _stack_pairs(model: nn.Module, path: Path, config: dict, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 under: str | None = None) -> dict[str, list]:
    """Take the expert factors (PEFT's `target_parameters`) out of `pairs`: {stack name: [(A, B) per expert]}.

    Raises ValueError, changing nothing, when a targeted parameter is not an expert stack of this model or
    the factors hold a different number of experts.
    """
    wanted = config.get("target_parameters") or []
    if not wanted:
        return {}
    stacks = {n: st for n, st in expert_stacks(model).items() if n.startswith(under or "")}
    names = {}
    for entry in wanted:
        hits = [n for n, st in stacks.items() if peft_target(n, st) == entry or peft_target(n, st).endswith("." + entry)]
        if not hits and under is None:
            why = "it has no experts" if not stacks else "no expert stack has that name"
            raise ValueError(f"{path}: adapter targets the expert weights {entry!r}, which this "
                             f"{type(model).__name__} has not ({why})")
        names.update(dict.fromkeys(hits))
    targeted = set(names)
    out = {}
    for name in names:
        stack = stacks[name]
        key = peft_key(model, name, targeted)[0]
        if key not in pairs:
            raise ValueError(f"{path}: adapter targets the expert weights of {name!r} but holds no factors for "
                             f"{key!r}")
        a, b = pairs.pop(key)
        r = int(pattern_lookup(config.get("rank_pattern") or {}, peft_target(name, stack), config.get("r", a.shape[0])))
        if a.shape[1] != stack.in_features or b.shape[0] != stack.out_features or a.shape[0] % max(r, 1):
            raise ValueError(f"{path}: adapter for the experts {name!r} has A {tuple(a.shape)}, B {tuple(b.shape)}, "
                             f"which do not fit {stack.num_experts} experts of {stack.in_features} -> "
                             f"{stack.out_features} at r={r}")
        if a.shape[0] != r * stack.num_experts:
            raise ValueError(f"{path}: adapter for {name!r} holds factors for {a.shape[0] // r} experts (r={r}), "
                             f"but this model has {stack.num_experts} experts there")
        out[name] = stack.split_peft_factors(a, b, r)
    return out


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer: a QuantLinear, an nn.Linear, or a transposed Conv1D."""
    if isinstance(module, QuantLinear):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[0], w.shape[1]) if not isinstance(module, nn.Linear) else (w.shape[1], w.shape[0])
