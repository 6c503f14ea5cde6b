"""Adapter files: round trips with PEFT in both directions, and refusals."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qlora_kit as qk

from .conftest import ARCHS, bnb_exact, make_model, randomize_b, rel_err, token_batch


def ours(folder, quant="none", **lora):
    model = qk.load_quantized(folder, quant=quant, compute_dtype=torch.float32)
    if lora:
        qk.add_lora(model, **lora)
    return model


def peft_on(folder, adapter, quant=None):
    kwargs = {}
    if quant:
        kwargs = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    return bnb_exact(peft.PeftModel.from_pretrained(base, adapter).eval())


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_here_loads_in_peft_with_same_logits(model_dirs, tmp_path, arch):
    model = ours(model_dirs[arch], r=4, alpha=8, dropout=0.0)
    randomize_b(model)
    model.eval()
    qk.save_adapter(model, tmp_path / "ad")
    ids = token_batch()
    pm = peft_on(model_dirs[arch], tmp_path / "ad")
    with torch.no_grad():
        mine, theirs = model(ids).logits, pm(ids).logits
        with pm.disable_adapter():
            plain = pm(ids).logits
    assert rel_err(theirs, plain) > 1e-3  # the adapter changes the output...
    assert rel_err(mine, theirs) < 1e-5  # ...and both toolkits agree on how


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_by_peft_loads_here_with_same_logits(model_dirs, tmp_path, arch):
    base = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32)
    cfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", init_lora_weights=False,
                          fan_in_fan_out=arch == "gpt2", rank_pattern={"up_proj": 3, "c_fc": 3},
                          alpha_pattern={"down_proj": 5, "c_proj": 5})
    pm = peft.get_peft_model(base, cfg).eval()
    pm.save_pretrained(tmp_path / "peft_ad")
    model = ours(model_dirs[arch])
    qk.load_adapter(model, tmp_path / "peft_ad")
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(model(ids).logits, pm(ids).logits) < 1e-5
    assert qk.trainable_parameters(model)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_quantized_round_trip_against_peft_on_bitsandbytes(model_dirs, tmp_path, quant):
    model = ours(model_dirs["qwen2"], quant=quant, r=8, alpha=16, dropout=0.0, rslora=True,
                 rank_pattern={"o_proj": 2})
    randomize_b(model)
    model.eval()
    qk.save_adapter(model, tmp_path / "ad")
    pm = peft_on(model_dirs["qwen2"], tmp_path / "ad", quant=quant)
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(model(ids).logits, pm(ids).logits) < 1e-4
    fresh = ours(model_dirs["qwen2"], quant=quant)
    qk.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert {n: m.r for n, m in qk.lora_layers(fresh).items()} == {n: m.r for n, m in qk.lora_layers(model).items()}


def test_config_records_the_base(model_dirs, tmp_path):
    model = ours(model_dirs["llama"], quant="nf4", r=4)
    qk.save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(model_dirs["llama"])
    assert len(qk.adapters.read_adapter(tmp_path / "ad")[0]["base_model_fingerprint"]) == 16
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == sorted(qk.lora_layers(model))
    assert sorted((tmp_path / "ad").iterdir()) == [tmp_path / "ad" / "adapter_config.json",
                                                  tmp_path / "ad" / "adapter_model.safetensors"]


def test_adapter_into_model_with_existing_lora_copies_values(model_dirs, tmp_path):
    a = ours(model_dirs["mistral"], r=4)
    randomize_b(a, seed=5)
    qk.save_adapter(a, tmp_path / "ad")
    b = ours(model_dirs["mistral"], r=4)
    qk.load_adapter(b, tmp_path / "ad")
    for name, layer in qk.lora_layers(b).items():
        assert torch.equal(layer.lora_B, qk.lora_layers(a)[name].lora_B)
    c = ours(model_dirs["mistral"], r=2)
    with pytest.raises(ValueError, match="does not fit the model's existing LoRA"):
        qk.load_adapter(c, tmp_path / "ad")


# ---- refusals ----------------------------------------------------------------------------------

@pytest.fixture()
def saved(model_dirs, tmp_path):
    model = ours(model_dirs["llama"], r=4)
    randomize_b(model)
    qk.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def _edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(fn(tensors), path, metadata={"format": "pt"})


def test_refuses_wrong_shapes(model_dirs, saved):
    _edit_tensors(saved, lambda t: {k: (v[:, :32].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()})
    model = ours(model_dirs["llama"])
    with pytest.raises(ValueError, match=r"q_proj'.*but the layer is 64 -> 64"):
        qk.load_adapter(model, saved)
    assert not qk.lora_layers(model)  # refused before anything changed


def test_refuses_unknown_target(model_dirs, saved):
    _edit_tensors(saved, lambda t: {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v
                                    for k, v in t.items()})
    model = ours(model_dirs["llama"])
    with pytest.raises(ValueError, match=r"layers.7.self_attn.q_proj.*no such module"):
        qk.load_adapter(model, saved)
    assert not qk.lora_layers(model)


def test_refuses_a_different_base(saved, tmp_path):
    other = tmp_path / "other"
    make_model("llama", num_hidden_layers=3).save_pretrained(other)
    with pytest.raises(ValueError, match="different base model"):
        qk.load_adapter(ours(other), saved)
    model = ours(other)
    qk.load_adapter(model, saved, check_base=False)  # shapes do fit: allowed when asked for
    assert len(qk.lora_layers(model)) == 14


def test_refuses_missing_corrupt_and_pickled(saved, model_dirs, tmp_path):
    model = ours(model_dirs["llama"])
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        qk.load_adapter(model, tmp_path / "nowhere")
    (saved / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        qk.load_adapter(model, saved)
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        qk.load_adapter(model, saved)
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    with pytest.raises(ValueError, match="DoRA adapters"):
        qk.load_adapter(model, saved)


def test_save_without_lora_is_refused(model_dirs, tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        qk.save_adapter(ours(model_dirs["llama"]), tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


def test_save_is_atomic(model_dirs, saved, monkeypatch):
    """A failure while writing leaves the previous adapter whole and no temporary files."""
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = ours(model_dirs["llama"], r=4)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qlora_kit.adapters.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        qk.save_adapter(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ad"]


def test_loading_into_existing_lora_takes_the_adapters_scale(model_dirs, tmp_path):
    """An adapter's alpha / rsLoRA win over the scale the model's LoRA layers had."""
    src = ours(model_dirs["llama"], r=4, alpha=64, rslora=True, dropout=0.0)
    randomize_b(src)
    src.eval()
    qk.save_adapter(src, tmp_path / "ad")
    dst = ours(model_dirs["llama"], r=4, alpha=4, dropout=0.0)
    qk.load_adapter(dst, tmp_path / "ad")
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(dst(ids).logits, src(ids).logits)


def test_rslora_survives_load_then_save(model_dirs, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                                                   target_modules=["q_proj", "down_proj"])).eval()
    pm.save_pretrained(tmp_path / "peft_ad")
    model = ours(model_dirs["llama"])
    qk.load_adapter(model, tmp_path / "peft_ad")
    qk.save_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_rslora"] is True
    fresh = ours(model_dirs["llama"])
    qk.load_adapter(fresh, tmp_path / "again")
    ids = token_batch()
    with torch.no_grad():
        assert rel_err(fresh(ids).logits, pm(ids).logits) < 1e-5


def test_bf16_adapter_file_trains_in_fp32(model_dirs, saved):
    _edit_tensors(saved, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    model = ours(model_dirs["llama"])
    qk.load_adapter(model, saved, check_base=False)
    assert all(m.lora_A.dtype == torch.float32 for m in qk.lora_layers(model).values())


def test_save_refuses_a_folder_with_other_files(model_dirs, tmp_path):
    model = ours(model_dirs["llama"], r=2)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files"):
        qk.save_adapter(model, tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("config,match", [
    ('{"peft_type": "LORA", "lora_alpha": null}', "lora_alpha is None"),
    ('[1, 2]', "expected a JSON object"),
    ('{"peft_type": "LORA", "use_rslora": "yes"}', "use_rslora is 'yes'"),
    ('{not json', "not valid JSON"),
])
def test_malformed_config_is_refused_before_any_change(model_dirs, saved, config, match):
    (saved / "adapter_config.json").write_text(config)
    model = ours(model_dirs["llama"])
    with pytest.raises(ValueError, match=match) as e:
        qk.load_adapter(model, saved)
    assert "\n" not in str(e.value)
    assert not qk.lora_layers(model)
