"""The model of a memory estimate or measurement: its config.json (validated, no weights read), and the
quantized model with LoRA built from it, on the meta device (shapes only) or with random weights."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import defaults, hub
from ..config import FOUR_BIT, QuantConfig, TrainConfig, one_line
from ..experts import ExpertStack, expert_parameters, place_stack
from ..formats import packed_layout
from ..layers import QuantLinear

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def read_model_config(model: str, cache_dir: str | None = None):
    """The transformers config of --model: a config.json file, a model folder, a Hub ID, a .gguf, or the default.

    Only the config is read (no weights). Raises ValueError / FileNotFoundError with one line naming
    the file and the field at fault.
    """
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model)
    if hub.is_hub_id(model):  # only its config.json is fetched
        path = hub.hub_snapshot(model, files=hub.CONFIG_FILES)
    elif str(model) == defaults.DEFAULT_MODEL or path.suffix == ".gguf":
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


def meta_model(config, cfg: TrainConfig, device: str) -> nn.Module:
    """The quantized model with LoRA, all on the meta device: exact shapes and dtypes, no storage."""
    from ..patch import add_lora

    model = meta_quantized(config, cfg.quant_config(device), device)
    add_lora(model, config=cfg.lora_config())
    return model


def meta_quantized(config, qcfg: QuantConfig, device: str, file_order: list[str] | None = None) -> nn.Module:
    """The quantized model load_quantized would build, on the meta device: exact shapes and dtypes, no storage.

    file_order: the checkpoint's tensor names in file order; the loader places expert stacks in that order, and so
    does this (the module order is part of the model's fingerprint).
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from ..patch import linear_names, set_submodule

    where = getattr(config, "qlora_config_path", "config")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=qcfg.compute_dtype)
    except Exception as e:
        raise ValueError(f"{where}: transformers cannot build the model ({one_line(e)})") from None
    model.qlora_device = device  # the target's rules for which linears stay dense (patch.linear_names)

    def packed_linear(what: str, out_f: int, in_f: int, bias, fan_in_fan_out: bool) -> QuantLinear:
        if qcfg.quant in FOUR_BIT and (out_f * in_f) % qcfg.blocksize:
            raise ValueError(f"{where}: {what} of shape {(out_f, in_f)} ({out_f * in_f} values) does not "
                             f"divide into blocks of {qcfg.blocksize}; loading it would fail too")
        packed = {key: torch.empty(shape, dtype=dtype, device="meta")
                  for key, (shape, dtype) in packed_layout(out_f, in_f, qcfg).items()}
        return QuantLinear(in_f, out_f, packed, qcfg, bias, fan_in_fan_out)

    for name in linear_names(model, device):
        dense = model.get_submodule(name)
        fan_in_fan_out = isinstance(dense, Conv1D)
        out_f, in_f = dense.weight.shape[::-1] if fan_in_fan_out else dense.weight.shape
        set_submodule(model, name, packed_linear(f"weight {name}", out_f, in_f, dense.bias, fan_in_fan_out))
    rank = {n: i for i, n in enumerate(file_order or [])}
    stacks = sorted(expert_parameters(model).items(), key=lambda kv: rank.get(kv[0], len(rank)))
    for path, (transposed, whole, order) in stacks:  # each expert packed on its own
        n_exp, d1, d2 = model.get_parameter(path).shape
        out_f, in_f = (d2, d1) if transposed else (d1, d2)
        experts = [packed_linear(f"each expert of {path}", out_f, in_f, None, transposed) for _ in range(n_exp)]
        place_stack(model, path, ExpertStack(experts, transposed, path.rpartition(".")[2], whole, order))
    model.qlora_quant_config = qcfg
    return model


def random_model(config, cfg: TrainConfig, device: str, seed: int = 0) -> nn.Module:
    """The quantized model with LoRA on `device`, with random weights (values do not change memory)."""
    from ..loading import load_from_tensors
    from ..patch import add_lora

    qcfg = cfg.quant_config(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def tensors(expected: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        for name, t in expected.items():
            if t.is_floating_point():
                yield name, (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
            else:
                yield name, torch.zeros(t.shape, dtype=t.dtype)

    model = load_from_tensors(config, tensors, qcfg, device)
    add_lora(model, config=cfg.lora_config())
    return model
