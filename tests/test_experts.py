"""Mixture-of-Experts: per-expert checkpoints fused as transformers fuses them, experts stored quantized,
only routed experts computed, LoRA on experts in PEFT's layout (checked against PEFT on the dense base)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import qlora_kit as qk
from qlora_kit.experts import ExpertStack, expert_stacks
from qlora_kit.formats import quantize
from qlora_kit.layers import QuantLinear

from .conftest import randomize_b, rel_err, saved_models, token_batch
from .families import build_small
from .reference import decode_4bit

MOE = ["qwen3_moe", "mixtral", "gpt_oss", "jetmoe"]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return saved_models(tmp_path_factory, MOE, build_small)


def tokens(t: int = 10):
    return token_batch(2, t, seed=3) % 120 + 3


def dense_twin(model, folder):
    """Plain transformers on the quantized model's own dequantized weights: the base PEFT sees."""
    twin = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ExpertStack):
                path = name if not module.replaces_module else f"{name}.weight"
                twin.get_parameter(path).copy_(module.dense(torch.float32))
            elif isinstance(module, QuantLinear) and not isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                                     ExpertStack):
                w = module.dequantize(torch.float32)
                twin.get_submodule(name).weight.copy_(w.t() if module.fan_in_fan_out else w)
    return twin


def test_per_expert_checkpoint_is_fused_as_transformers_fuses_it(moe_dirs):
    folder = moe_dirs["qwen3_moe"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert any(".experts.0.gate_proj.weight" in k for k in f.keys())  # the per-expert layout on disk
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = qk.load_quantized(folder, quant="none")
    for name, stack in expert_stacks(model).items():
        assert torch.equal(stack.dense(torch.float32), ref.get_parameter(name))


@pytest.mark.parametrize("family", MOE)
def test_experts_stored_quantized_per_expert(moe_dirs, family):
    ref = AutoModelForCausalLM.from_pretrained(moe_dirs[family], dtype=torch.float32)
    model = qk.load_quantized(moe_dirs[family], quant="nf4", blocksize=64)
    stacks = expert_stacks(model)
    assert stacks
    for name, stack in stacks.items():
        path = f"{name}.weight" if stack.replaces_module else name
        dense = ref.get_parameter(path).detach()
        for e, expert in enumerate(stack):
            assert expert.quant == "nf4"
            w = dense[e].t() if stack.transposed else dense[e]
            # an independent decode of what was stored, against an independent error bound
            got = decode_4bit(expert.packed(), "nf4", tuple(w.shape), 64)
            assert torch.equal(got, expert.dequantize(torch.float32))
            assert (got - w).abs().max() <= w.abs().max() * 0.2
    for name, p in model.named_parameters():
        assert p.ndim < 3, f"{name} stayed a dense 3-D parameter"


def test_only_routed_experts_run_and_backward_keeps_no_dense_weight(moe_dirs):
    model = qk.load_quantized(moe_dirs["qwen3_moe"], quant="nf4")
    qk.add_lora(model, r=2, alpha=4, dropout=0.0)
    block = model.model.layers[0].mlp
    route = block.gate.forward

    def to_1_and_2(h):  # route every token to experts 1 and 2 only
        logits, weights, idx = route(h)
        return logits, weights, torch.tensor([1, 2]).expand_as(idx)

    block.gate.forward = to_1_and_2
    calls = {}
    stack = block.experts.gate_up_proj
    for e, expert in enumerate(stack):
        expert.register_forward_hook(lambda m, i, o, e=e: calls.__setitem__(e, calls.get(e, 0) + 1))
    x = torch.full((2, 6), 5)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert set(calls) <= {1, 2} and calls, calls
    dense_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantLinear)}
    dense_shapes |= {(i, o) for o, i in dense_shapes}
    assert not dense_shapes & set(saved), "a dense weight was saved for backward"
    assert stack[1].lora_A.grad is not None and stack[0].lora_A.grad is None


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "jetmoe"])
def test_adapter_saved_here_loads_in_peft_with_same_logits(moe_dirs, tmp_path, family):
    model = qk.load_quantized(moe_dirs[family], quant="nf4")
    qk.add_lora(model, r=2, alpha=6, dropout=0.0)
    randomize_b(model, seed=5, std=0.3)
    qk.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and cfg["lora_dropout"] == 0.0
    twin = dense_twin(model, moe_dirs[family])
    pm = peft.PeftModel.from_pretrained(twin, tmp_path / "ad").eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(input_ids=x).logits, pm(input_ids=x).logits
        with qk.adapter_disabled(model):
            base = model(input_ids=x).logits
    assert rel_err(ours, base) > 1e-2  # the experts' factors matter
    assert rel_err(ours, theirs) < 1e-4


@pytest.mark.parametrize("family,modules,params", [
    ("qwen3_moe", ["q_proj", "v_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    ("mixtral", ["q_proj", "v_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    ("gpt_oss", ["q_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),  # stored (E, in, out)
    ("jetmoe", [], ["mlp.input_linear.weight", "mlp.output_linear.weight"]),  # parallel experts, experts only
])
def test_adapter_saved_by_peft_loads_here_with_same_logits(moe_dirs, tmp_path, family, modules, params):
    base = AutoModelForCausalLM.from_pretrained(moe_dirs[family], dtype=torch.float32)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=modules, init_lora_weights=False,
                          target_parameters=params)
    pm = peft.get_peft_model(base, cfg).eval()
    pm.save_pretrained(tmp_path / "peft_ad")
    model = qk.load_quantized(moe_dirs[family], quant="none")
    qk.load_adapter(model, tmp_path / "peft_ad")
    x = tokens()
    with torch.no_grad():
        assert rel_err(model(input_ids=x).logits, pm(input_ids=x).logits) < 1e-4
    with torch.no_grad(), qk.adapter_disabled(model):
        assert rel_err(model(input_ids=x).logits, pm(input_ids=x).logits) > 1e-3  # the factors matter
    stacks = [st for n, st in expert_stacks(model).items() if "self_attention" not in n]
    assert stacks and all(st[0].r == 3 for st in stacks)


def test_all_linear_takes_experts_but_not_routers(moe_dirs):
    model = qk.load_quantized(moe_dirs["mixtral"], quant="nf4")
    names = qk.select_targets(model, "all-linear")
    assert any(n.endswith("experts.gate_up_proj") for n in names)
    assert not any(n.endswith(".gate") or n.endswith("router") for n in names)
    assert qk.select_targets(model, ["experts"]) == [n for n in names if ".experts." in n]
    assert qk.select_targets(model, ["down_proj"]) == [n for n in names if n.endswith("experts.down_proj")]
    # the router stays dense, in the compute dtype
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".gate." in n)


def test_bad_moe_inputs(moe_dirs, model_dirs, tmp_path):
    # a checkpoint missing one expert's tensors
    src = load_file(str(moe_dirs["qwen3_moe"] / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((moe_dirs["qwen3_moe"] / "config.json").read_text())
    save_file({k: v for k, v in src.items() if ".layers.1.mlp.experts.2." not in k}, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has 3 tensors .* for the 4 experts of 'model.layers.1.mlp.experts.\w+': "
                                         r"expert\(s\) 2 missing"):
        qk.load_quantized(broken)
    # expert targets on a dense model
    dense = qk.load_quantized(model_dirs["llama"])
    with pytest.raises(ValueError, match="names expert weights, but LlamaForCausalLM has no experts"):
        qk.add_lora(dense, targets=["experts"])
    # an MoE adapter onto a model with a different expert count
    model = qk.load_quantized(moe_dirs["qwen3_moe"])
    qk.add_lora(model, r=2, alpha=4, dropout=0.0)
    qk.save_adapter(model, tmp_path / "ad")
    other = build_small("qwen3_moe")
    other.config.num_experts = 2
    fewer = AutoModelForCausalLM.from_config(other.config)
    fewer.save_pretrained(tmp_path / "fewer")
    target = qk.load_quantized(tmp_path / "fewer")
    with pytest.raises(ValueError, match=r"holds factors for 4 experts \(r=2\), but this model has 2 experts"):
        qk.load_adapter(target, tmp_path / "ad", check_base=False)
    assert not qk.lora_layers(target)


def test_stack_quantizes_like_a_linear():
    torch.manual_seed(0)
    w = torch.randn(3, 16, 128)
    cfg = qk.QuantConfig(quant="nf4", compute_dtype=torch.float32)
    stack = ExpertStack.from_dense(w, cfg, transposed=False, param_name="down_proj")
    for e in range(3):
        assert torch.equal(stack[e].weight, quantize(w[e], cfg)["weight"])
    t = ExpertStack.from_dense(w.transpose(1, 2).contiguous(), cfg, transposed=True, param_name="down_proj")
    assert torch.equal(t.dense(torch.float32), stack.dense(torch.float32).transpose(1, 2))


def test_training_on_experts_resumes_exactly(moe_run_model, text_file, tmp_path):
    from qlora_kit.checkpoints import latest_checkpoint
    from qlora_kit.train import train

    def cfg(out, **kw):
        return qk.config.TrainConfig(model=str(moe_run_model), data=str(text_file), out=str(out), steps=6,
                                     seq_len=32, batch_size=2, rank=4, lr=1e-2, warmup_steps=1, sample_tokens=0,
                                     eval_sequences=2, eval_fraction=0.1, device="cpu", save_every=3, **kw)

    full = train(cfg(tmp_path / "full"), log=lambda s: None, progress=False)

    def crash(step, model):
        if step == 5:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        train(cfg(tmp_path / "part"), log=lambda s: None, progress=False, _on_step=crash)
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step-000003"
    resumed = train(cfg(tmp_path / "part", resume=True), log=lambda s: None, progress=False)
    a = load_file(str(Path(full.adapter) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(".experts.lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    experts_b = [v for k, v in a.items() if ".experts.lora_B" in k or ".experts.base_layer.lora_B" in k]
    assert experts_b and all(v.abs().sum() > 0 for v in experts_b)  # the experts' factors trained


@pytest.mark.parametrize("fmt", ["fp32", "nf4"])
def test_merge_of_an_moe_adapter_loads_in_plain_transformers(moe_run_model, text_file, tmp_path, fmt):
    from qlora_kit.merge import MergeConfig, merge

    model = qk.load_quantized(moe_run_model)
    qk.add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_b(model, seed=1, std=0.05)
    qk.save_adapter(model, tmp_path / "ad")
    report = merge(MergeConfig(model=str(moe_run_model), adapter=str(tmp_path / "ad"), out=str(tmp_path / "out"),
                               format=fmt, eval_data=str(text_file), seq_len=32, eval_sequences=4,
                               calib_tokens=256), log=lambda s: None)
    kwargs = {"device_map": "cpu"} if fmt == "nf4" else {}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, **kwargs).eval()
    experts = exported.model.layers[0].mlp.experts
    x = tokens()
    with torch.no_grad():
        got, want = exported(input_ids=x).logits, model(input_ids=x).logits
    if fmt == "fp32":  # W' = W + s*BA, experts included
        assert rel_err(got, want) < 1e-5
        assert "experts_exported_dense" not in report
    else:  # linears requantized; the experts stay dense (bf16), as transformers + bitsandbytes can hold them
        assert type(exported.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        assert experts.gate_up_proj.ndim == 3
        assert report["experts_exported_dense"]["stacks"] == 4
        for name, stack in expert_stacks(model).items():  # the experts hold W + s*BA, rounded once to bf16
            merged = torch.stack([e.dequantize(torch.float32) + e.delta_weight() for e in stack]).to(torch.bfloat16)
            assert torch.equal(exported.get_parameter(name).to(torch.bfloat16), merged)
        assert rel_err(got.float(), want) < 0.5  # bf16 compute, requantized linears and re-routed tokens
