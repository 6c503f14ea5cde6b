"""What a merged export holds: its tensors in the layout transformers (+ bitsandbytes) loads, its
config.json and tokenizer, and its size, all one part of the model at a time."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from . import formats
from .config import MergeConfig, QuantConfig, parse_dtype
from .experts import ExpertStack, expert_stacks
from .layers import QuantLinear


def dense_dtype(cfg: MergeConfig) -> torch.dtype:
    """The dtype of the export's unquantized tensors."""
    return parse_dtype(cfg.dtype if cfg.quantized else cfg.format)


def cast_changes_values(source: torch.dtype, stored: torch.dtype) -> bool:
    """Whether storing tensors of dtype `source` as `stored` can change their values (a 16-bit value widened to
    fp32 is kept exactly)."""
    return source != stored and (stored != torch.float32 or source == torch.float64)


def module_tensors(root: nn.Module, prefix: str, values: dict[str, object], cfg: MergeConfig, export_q: QuantConfig,
                   trained_dtype: torch.dtype, seen: set[int],
                   skip: str | None = None) -> Iterator[tuple[str, Tensor, torch.dtype]]:
    """(checkpoint key, tensor, dtype to store it in) for every tensor of `root` (named `prefix`) as the export
    stores it; the cast is left to the writer, so a large tensor is never held twice.

    values: layer name -> its merged value (a dense (out, in) tensor, or packed tensors in cfg.format);
    a linear layer not in it is converted as it is. `seen` holds tensors already written (tied weights
    are written once, under their first name); modules under `skip` are left out.
    """
    dense = dense_dtype(cfg)
    stacks = expert_stacks(root)
    for rel, module in root.named_modules():
        name = f"{prefix}{rel}" if rel else prefix.rstrip(".")
        if skip and (name == skip or name.startswith(skip + ".")):
            continue
        if rel.rpartition(".")[0] in stacks:
            continue  # an expert: written with its stack
        if isinstance(module, ExpertStack):  # transformers' 3-D parameter, in the dense dtype
            mats = []
            for e, expert in enumerate(module):
                value = values.get(f"{name}.{e}")
                value = expert.dequantize(torch.float32) if value is None else value
                mats.append(value.to(dense).t() if module.transposed else value.to(dense))
            yield (f"{name}.weight" if module.replaces_module else name), torch.stack(mats), dense
            continue
        if isinstance(module, QuantLinear):
            yield from _linear_tensors(module, name, values.get(name), cfg, export_q, trained_dtype, dense)
            continue
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if p.is_meta or id(p) in seen or pname in getattr(module, "_non_persistent_buffers_set", set()):
                continue  # not read (yet), tied and already written, or not part of a checkpoint
            seen.add(id(p))
            yield (f"{name}.{pname}" if name else pname), p, (dense if p.is_floating_point() else p.dtype)


def _linear_tensors(module: QuantLinear, name: str, value, cfg: MergeConfig, export_q: QuantConfig,
                    trained_dtype: torch.dtype, dense: torch.dtype) -> Iterator[tuple[str, Tensor, torch.dtype]]:
    if value is None:  # a layer the adapter did not touch
        value = export_value(module, cfg, export_q)
    if isinstance(value, dict) and cfg.gguf:  # GGUF blocks, the file's own bytes
        yield f"{name}.weight", value["blocks"], torch.uint8
    elif isinstance(value, dict):
        shape = (module.out_features, module.in_features)
        for k, t in formats.bnb_checkpoint_tensors(value, cfg.format, shape, export_q.blocksize, trained_dtype).items():
            yield f"{name}.{k}", t, t.dtype
    else:
        yield f"{name}.weight", (value.t().contiguous() if module.fan_in_fan_out else value), dense
    if module.bias is not None:
        yield f"{name}.bias", module.bias, dense


def export_value(module: QuantLinear, cfg: MergeConfig, export_q: QuantConfig) -> Tensor | dict[str, Tensor]:
    """A linear layer without an update, as the export stores it: dense, or packed in the export's format."""
    if not cfg.quantized:
        return module.dequantize(torch.float32).to(dense_dtype(cfg))
    if module.quant == cfg.format:
        return module.packed()
    return formats.quantize(module.dequantize(torch.float32), export_q)


def stored_value(value, module: QuantLinear, cfg: MergeConfig, export_q: QuantConfig) -> Tensor:
    """The fp32 (out, in) weight a stored value stands for (what a reader of the export computes with)."""
    if isinstance(value, dict):
        return formats.dequantize(value, cfg.format, (module.out_features, module.in_features), export_q.blocksize,
                                  torch.float32)
    return value.to(dense_dtype(cfg)).float()


def output_bytes(model: nn.Module, cfg: MergeConfig, export_q: QuantConfig) -> int:
    """Bytes of the export's tensors, from the shapes of the (meta) quantized model."""
    dense = dense_dtype(cfg).itemsize
    total, seen = 0, set()
    stacks = expert_stacks(model)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if cfg.quantized and name.rpartition(".")[0] not in stacks:
                total += sum(math.prod(s) * d.itemsize
                             for s, d in formats.packed_layout(module.out_features, module.in_features,
                                                               export_q).values())
            else:
                total += module.out_features * module.in_features * dense
            if module.bias is not None:
                total += module.bias.numel() * dense
            continue
        for p in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * (dense if p.is_floating_point() else p.element_size())
    return total


def write_config(src: Path, folder: Path, cfg: MergeConfig, export_q: QuantConfig, tok) -> None:
    """config.json (with bitsandbytes' quantization_config for a 4/8-bit export), tokenizer, generation config."""
    dense = dense_dtype(cfg)
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = str(dense).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    if cfg.quantized:
        from transformers import BitsAndBytesConfig

        four = cfg.format != "int8"
        config["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=four, load_in_8bit=not four, bnb_4bit_quant_type=cfg.format if four else "nf4",
            bnb_4bit_use_double_quant=export_q.double_quant, bnb_4bit_compute_dtype=dense,
            llm_int8_threshold=0.0 if not four else 6.0).to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(folder)  # the tokenizer and generation settings travel with the weights
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", folder / "generation_config.json")
