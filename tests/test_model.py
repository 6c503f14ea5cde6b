"""Whole models: loading, targets, LoRA on every family, against plain transformers and bitsandbytes."""

import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import qlora_kit as qk
from qlora_kit.layers import QuantLinear
from qlora_kit.patch import linear_names

from . import reference
from .conftest import ARCHS, VOCAB, bnb_exact, rel_err, token_batch


def dense_with_dequantized_weights(folder, qmodel):
    """The plain transformers model, each quantized weight replaced by its dequantized value."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, layer in qmodel.named_modules():
            if isinstance(layer, QuantLinear):
                w = layer.dequantize(torch.float32)
                ref.get_submodule(name).weight.copy_(w.t() if layer.fan_in_fan_out else w)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_model_equals_transformers_with_dequantized_weights(model_dirs, arch, quant):
    model = qk.load_quantized(model_dirs[arch], quant=quant, compute_dtype=torch.float32)
    head = model.get_output_embeddings()
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized == linear_names(model) and len(quantized) >= 8
    assert not isinstance(head, QuantLinear)
    ids = token_batch()
    ref = dense_with_dequantized_weights(model_dirs[arch], model)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids).logits) < 1e-5
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_transformers_bitsandbytes_loading(model_dirs, arch, double_quant):
    """Independent reference: transformers' own bitsandbytes integration on the same checkpoint (exact mode).

    The 4-bit codes and block scales are bitsandbytes' own. The second level of double quantization is not:
    bitsandbytes' CPU 8-bit quantizer rounds about one scale in a thousand to the farther of two nearly
    equidistant values (test_formats checks that ours takes the nearest), which moves that block's scale by
    one step of the 8-bit map, about 1e-4 of these logits at most."""
    ours = qk.load_quantized(model_dirs[arch], quant="nf4", compute_dtype=torch.float32, double_quant=double_quant)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                 bnb_4bit_compute_dtype=torch.float32)
    theirs = bnb_exact(AutoModelForCausalLM.from_pretrained(
        model_dirs[arch], quantization_config=bnb_cfg, device_map="cpu", dtype=torch.float32).eval())
    codes = {n: m.weight.data for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"}
    assert codes and all(torch.equal(ours.get_submodule(n).weight, c) for n, c in codes.items())
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, theirs(ids).logits) < (3e-4 if double_quant else 1e-6)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [128, 256])
def test_blocks_spanning_rows_give_the_logits_of_an_independent_quantization(fmt, blocksize):
    """Widths 320 and 640 are not multiples of these block sizes, so blocks span two rows (where bitsandbytes'
    AVX512 CPU dequantization used the next row's scale). Reference: plain transformers with every weight
    rounded to the format and back by tests/reference.py."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=320, intermediate_size=640, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    dense = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as folder:
        dense.save_pretrained(folder)
        model = qk.load_quantized(folder, quant=fmt, compute_dtype=torch.float32, blocksize=blocksize)
    with torch.no_grad():
        for name in linear_names(dense):
            if name != "lm_head":
                w = dense.get_submodule(name).weight
                w.copy_(reference.quantize_dequantize(w, fmt, blocksize, double_quant=True))
        ids = token_batch()
        assert rel_err(model(ids).logits, dense(ids).logits) < 1e-6  # measured: 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_every_family(model_dirs, arch):
    model = qk.load_quantized(model_dirs[arch], quant="nf4", compute_dtype=torch.float32)
    ids = token_batch()
    with torch.no_grad():
        base = model(ids).logits
    qk.add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # B = 0: exactly the quantized base
    layers = qk.lora_layers(model)
    assert set(layers) == set(linear_names(model))
    loss = model(ids, labels=ids).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {f"{n}.lora_{x}" for n in layers for x in "AB"}
    assert with_grad == expected
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)
    trainable, total = qk.trainable_parameters(model)
    assert trainable == sum(m.r * (m.in_features + m.out_features) for m in layers.values())
    assert total > 10 * trainable
    if arch == "gpt2":
        assert all(m.fan_in_fan_out for m in layers.values())
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert not model.model.layers[0].self_attn.q_proj.bias.requires_grad


def test_generate_and_adapter_toggle(model_dirs):
    model = qk.load_quantized(model_dirs["llama"], quant="nf4", compute_dtype=torch.float32)
    qk.add_lora(model, r=4, dropout=0.0)
    ids = token_batch(1, 6)
    with torch.no_grad():
        base = model(ids).logits
        for layer in qk.lora_layers(model).values():
            layer.lora_B.normal_()
        tuned = model(ids).logits
        with qk.adapter_disabled(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, tuned)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_targets_list_regex_and_per_module_rank(model_dirs):
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    qk.add_lora(model, r=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4})
    layers = qk.lora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert {n: m.r for n, m in layers.items() if n.endswith("v_proj")} == {
        "model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 2}
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 4 / 8
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    qk.add_lora(model, targets=r".*layers\.1\..*mlp\..*")
    assert sorted(qk.lora_layers(model)) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]


@pytest.mark.parametrize("targets,match", [
    (["nonexistent"], "matches no module"),
    (["input_layernorm"], "not a linear layer"),
    ("nothing_matches_this", "match no linear layer"),
    ("[unclosed", "not a valid regex"),
    ([], "empty list"),
])
def test_bad_targets(model_dirs, targets, match):
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        qk.add_lora(model, targets=targets)


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(model_dirs, r):
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        qk.add_lora(model, r=r)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        qk.add_lora(model, r=4, rank_pattern={"q_proj": r})


def test_lora_twice_is_refused(model_dirs):
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    qk.add_lora(model, r=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        qk.add_lora(model, r=2)


def test_add_lora_on_a_plain_transformers_model(model_dirs):
    """A dense model works too: target layers become frozen 'none'-format layers."""
    plain = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], dtype=torch.float32).eval()
    ids = token_batch()
    with torch.no_grad():
        before = plain(ids).logits
    qk.add_lora(plain, r=4)
    with torch.no_grad():
        assert rel_err(plain(ids).logits, before) < 1e-6
    assert all(m.quant == "none" for m in qk.lora_layers(plain).values())


def test_parameter_report_arithmetic(model_dirs):
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    qk.add_lora(model, r=4)
    report = qk.parameter_report(model)
    assert "trainable parameters:" in report
    assert "(64 x 64), r=4: 512 trainable instead of 4,096 (8.0x fewer)" in report


@pytest.mark.parametrize("arch", ARCHS)
def test_model_gradients_match_float64_reference(model_dirs, tmp_path, arch):
    """Loss and every A/B gradient against a float64 transformers + PEFT model on the dequantized weights."""
    import peft

    model = qk.load_quantized(model_dirs[arch], quant="nf4", compute_dtype=torch.float32)
    qk.add_lora(model, r=4, alpha=8, dropout=0.0, rank_pattern={"v_proj": 2, "c_fc": 2})
    with torch.no_grad():
        for layer in qk.lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    qk.save_adapter(model, tmp_path / "ad")
    ref = dense_with_dequantized_weights(model_dirs[arch], model).double()
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "ad", is_trainable=True).double()
    ids = token_batch()
    loss = model(ids, labels=ids).loss
    loss.backward()
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    checked = 0
    for name, layer in qk.lora_layers(model).items():
        for part in "AB":
            g_ref = ref_grads[f"base_model.model.{name}.lora_{part}.default.weight"]
            assert rel_err(getattr(layer, f"lora_{part}").grad, g_ref) < 1e-4, (name, part)
            checked += 1
    assert checked == 2 * len(qk.lora_layers(model)) >= 16


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(model_dirs, reentrant):
    grads = []
    for checkpointing in (False, True):
        model = qk.load_quantized(model_dirs["llama"], quant="nf4", compute_dtype=torch.float32)
        torch.manual_seed(0)
        qk.add_lora(model, r=4, dropout=0.0)
        with torch.no_grad():
            for layer in qk.lora_layers(model).values():
                layer.lora_B.normal_(std=0.05)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        ids = token_batch()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 28
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-6, name


def test_model_cast_after_loading_keeps_working(model_dirs):
    model = qk.load_quantized(model_dirs["qwen2"], quant="nf4", compute_dtype=torch.float32)
    qk.add_lora(model, r=4)
    ids = token_batch()
    with torch.no_grad():
        ref = model(ids).logits
        model.to(torch.bfloat16)
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 5e-2
    assert all(m.lora_A.dtype == torch.float32 for m in qk.lora_layers(model).values())
