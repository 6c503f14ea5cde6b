"""Small random configs for every causal-LM family in transformers' registry.

A family's default config describes a full-size model; `small_config` shrinks every size field it
knows by name (hidden size, layers, heads, experts, vocabulary ...) so the model builds in
milliseconds. Families whose config cannot be shrunk this way (custom kernels, vision towers with
fixed sizes) are reported as not building small, as the coverage test requires.
"""

from __future__ import annotations

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
)

VOCAB = 128
MAX_PARAMS = 20_000_000

# field name -> small value; applied only where the config has the field
SIZES = {
    "vocab_size": VOCAB, "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "intermediate_size": 96, "ffn_hidden_size": 96, "n_inner": 96, "ffn_dim": 96, "inner_hidden_size": 96,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 24,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "n_shared_experts": 1,
    "max_position_embeddings": 256, "n_positions": 256, "max_sequence_length": 256, "seq_length": 256,
    "sliding_window": 64, "attention_chunk_size": 64,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
}
# structural per-layer lists that must follow the layer count
LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "hybrid_override_pattern", "block_types")


def causal_families() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def encoder_style() -> set[str]:
    """Causal-LM entries that are encoders used as decoders, or the decoder half of an encoder-decoder:
    transformers also registers them as masked-LM or sequence-to-sequence models."""
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & (set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
                                                     | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
                                                     | set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES))


def decoder_families() -> list[str]:
    skip = encoder_style()
    return [f for f in causal_families() if f not in skip]


def small_config(model_type: str):
    """A tiny config of this family, or raise (the family does not build small)."""
    cls = CONFIG_MAPPING[model_type]
    base = cls()
    text = base.get_text_config() if hasattr(base, "get_text_config") else base
    kwargs = {}
    for obj_kwargs, obj in ((kwargs, text),):
        for key, value in SIZES.items():
            if isinstance(getattr(type(obj), key, None), property):
                continue  # derived from other fields (e.g. Falcon's head_dim)
            if key in obj.to_dict() or hasattr(type(obj), key):
                obj_kwargs[key] = value
    if "qk_rope_head_dim" in kwargs and "head_dim" in kwargs:  # MLA (DeepSeek-V3): rotary over the rope part
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    rotary = getattr(text, "rotary_dim", None)
    if isinstance(rotary, int):  # GPT-J / CodeGen: rotary dims within a head
        kwargs["rotary_dim"] = 8
    if text is base:
        cfg = cls(**kwargs)
    else:
        cfg = cls(text_config={**text.to_dict(), **kwargs})
    text = cfg.get_text_config()
    for key in LAYER_LISTS:  # one layer of each kind the full model has (attention, linear attention, ...)
        value = getattr(text, key, None)
        if isinstance(value, (list, tuple)) and len(value) > 2:
            kinds = list(dict.fromkeys(value))[:4]
            setattr(text, key, kinds if len(kinds) > 1 else list(value[:2]))
            if len(kinds) > 2 and hasattr(text, "num_hidden_layers"):
                text.num_hidden_layers = len(kinds)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(text, key, None)
        if isinstance(v, int) and v >= VOCAB:
            setattr(text, key, 1)
    return cfg


def build_small(model_type: str, seed: int = 0, dtype=torch.float32):
    """A small random model of the family (eval mode), with non-trivial biases and norms."""
    config = small_config(model_type)
    with torch.device("meta"):  # sized first, without memory
        count = AutoModelForCausalLM.from_config(config, dtype=dtype).num_parameters()
    if count > MAX_PARAMS:  # parts the size fields above do not reach (vision/audio towers)
        raise ValueError(f"{model_type} keeps {count:,} parameters in a small config")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def check_family(model_type: str, folder) -> dict:
    """The coverage test's checks for one family; returns its figures, raises AssertionError on a miss.

    1. quant='none' gives plain transformers' logits (relative error < 1e-4);
    2. nf4 stores >= 90% of the matmul weights (linears and expert stacks, not the output head or the
       routers, which stay in the compute dtype by design) quantized;
    3. LoRA goes on every linear layer and expert stack;
    4. one backward gives finite gradients on the LoRA factors and on nothing else.
    """
    from transformers.pytorch_utils import Conv1D

    import qlora_kit as qk
    from qlora_kit.experts import expert_stacks
    from qlora_kit.layers import QuantLinear

    ref = build_small(model_type)
    ref.save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(folder)  # raises: transformers cannot reload its own small save
    ids = torch.randint(3, VOCAB - 8, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits.float()  # raises: the family does not run small
        got = qk.load_quantized(folder, quant="none")(input_ids=ids, use_cache=False).logits.float()
    err = float((got - want).norm() / want.norm())
    assert err < 1e-4, f"quant='none' logits differ from transformers' by {err:.2e}"

    model = qk.load_quantized(folder, quant="nf4")
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if isinstance(m, QuantLinear) and m.quant != "none")
    # the matmul weights, counted on plain transformers' model: every linear (routers included) but the
    # output head, and every 3-D expert stack
    head = ref.get_output_embeddings()
    matmul = sum(m.weight.numel() for m in ref.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head)
    matmul += sum(p.numel() for p in ref.parameters() if p.ndim == 3)
    share = quantized / max(matmul, 1)
    assert share >= 0.9, f"only {share:.0%} of the matmul weights are stored quantized"

    qk.add_lora(model, r=2, alpha=4, dropout=0.0)
    stacks = expert_stacks(model)
    assert all(st[0].lora_A is not None for st in stacks.values())
    bare = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.quant != "none" and m.lora_A is None]
    assert not bare, f"quantized layers without LoRA: {bare[:3]}"
    model.train()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    lora = {id(p) for m in qk.lora_layers(model).values() for p in (m.lora_A, m.lora_B)}
    for name, p in model.named_parameters():
        if id(p) not in lora:
            assert p.grad is None, f"{name} got a gradient"
        elif p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    grads = sum(p.grad is not None for m in qk.lora_layers(model).values() for p in (m.lora_A, m.lora_B))
    assert grads > 0, "no LoRA factor got a gradient"
    return {"err": err, "quantized": share, "experts": len(stacks)}
