"""qlora-kit: QLoRA fine-tuning with a frozen 4/8-bit base and trainable LoRA factors."""

from .adapters import load_adapter, save_adapter
from .config import LoRAConfig, LoraExportConfig, QuantConfig
from .engine import Engine, SamplingParams
from .gguf_export import export_lora
from .layers import QuantLinear
from .loading import load_quantized
from .merge import MergeConfig, merge
from .multi_lora import AdapterBank
from .patch import (
    adapter_disabled,
    add_lora,
    lora_layers,
    parameter_report,
    select_targets,
    set_adapter_enabled,
    set_merge_aware,
    trainable_parameters,
)

__all__ = [
    "LoRAConfig", "QuantConfig", "QuantLinear",
    "load_quantized", "add_lora", "select_targets", "lora_layers", "trainable_parameters", "parameter_report",
    "set_adapter_enabled", "adapter_disabled", "save_adapter", "load_adapter", "MergeConfig", "merge",
    "LoraExportConfig", "export_lora", "set_merge_aware", "AdapterBank", "Engine", "SamplingParams",
]
__version__ = "0.1.0"
