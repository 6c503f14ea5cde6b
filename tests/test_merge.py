"""Merge and export: W' = W + s*BA exactly for 16-bit, plain-transformers loading, update-keeping requantization."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qlora_kit as qk
from qlora_kit.merge import MergeConfig, _FourBitGrid, gptq_codes, merge
from qlora_kit.train import train

from .conftest import rel_err


@pytest.fixture(scope="module")
def trained(run_model, text_file, tmp_path_factory):
    """A real adapter: a short training run on the tiny model."""
    out = tmp_path_factory.mktemp("merge_run") / "run"
    train(qk.config.TrainConfig(model=str(run_model), data=str(text_file), out=str(out), steps=30, seq_len=32,
                                lr=1e-2, rank=8, alpha=16, warmup_steps=2, sample_tokens=0, eval_sequences=8,
                                eval_fraction=0.1, device="cpu", save_every=0),
          log=lambda s: None, progress=False)
    return out / "adapter"


def mcfg(run_model, text_file, trained, out, **kw):
    base = dict(model=str(run_model), adapter=str(trained), out=str(out), eval_data=str(text_file), seq_len=32,
                eval_sequences=8, calib_tokens=512)
    base.update(kw)
    return MergeConfig(**base)


def unmerged(run_model, trained):
    model = qk.load_quantized(run_model, compute_dtype=torch.float32)
    qk.load_adapter(model, trained)
    return model.eval()


@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-5), ("bf16", 2e-2), ("fp16", 3e-3)])
def test_16bit_export_matches_the_unmerged_model(run_model, text_file, trained, tmp_path, fmt, tol):
    report = merge(mcfg(run_model, text_file, trained, tmp_path / "out", format=fmt), log=lambda s: None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ref = unmerged(run_model, trained)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert rel_err(exported(ids).logits, ref(ids).logits) < tol
    m = report["model_metrics"]
    assert m["ppl_unmerged"] < m["ppl_base"]
    assert abs(m["kept_gain"] - 1) < (1e-3 if fmt == "fp32" else 0.05)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[fmt]
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_fp32_export_is_w_plus_scaled_ba(run_model, text_file, trained, tmp_path):
    merge(mcfg(run_model, text_file, trained, tmp_path / "out", format="fp32"), log=lambda s: None)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    model = unmerged(run_model, trained)
    for name, layer in qk.lora_layers(model).items():
        expected = layer.dequantize(torch.float32) + layer.scaling * (layer.lora_B @ layer.lora_A)
        assert torch.allclose(tensors[f"{name}.weight"], expected.detach(), atol=1e-6), name


def test_merging_onto_original_weights_reports_the_quantization_gap(run_model, text_file, trained, tmp_path):
    report = merge(mcfg(run_model, text_file, trained, tmp_path / "out", format="fp32", onto="original"),
                   log=lambda s: None)
    gaps = [r["quant_err_rel"] for r in report["layers"]]
    assert all(0.03 < g < 0.2 for g in gaps)  # nf4 rounding of Gaussian-like weights: ~10%


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_requantized_export_loads_in_plain_transformers_and_generates(run_model, text_file, trained, tmp_path, fmt):
    report = merge(mcfg(run_model, text_file, trained, tmp_path / "out", format=fmt), log=lambda s: None)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu", dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear4bit" if fmt == "nf4" else "Linear8bitLt")
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert saved["layers"] and {"update_cos", "update_norm_ratio", "output_cos", "codes_changed", "update_rel"} <= set(
        saved["layers"][0])
    assert saved["model_metrics"]["kept_gain"] == report["model_metrics"]["kept_gain"]


@pytest.fixture(scope="module")
def small_update(trained, tmp_path_factory):
    """The trained adapter with B scaled down 20x: an update of a few percent of the weights, the size
    a real fine-tune makes, and smaller than one 4-bit step for most weights."""
    from safetensors.torch import save_file
    out = tmp_path_factory.mktemp("small") / "adapter"
    out.mkdir()
    tensors = load_file(trained / "adapter_model.safetensors")
    from safetensors import safe_open
    with safe_open(str(trained / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file({k: v / 20 if "lora_B" in k else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata=meta)
    (out / "adapter_config.json").write_text((trained / "adapter_config.json").read_text())
    return out


def test_gptq_keeps_the_update_round_to_nearest_loses(run_model, text_file, small_update, tmp_path):
    gptq = merge(mcfg(run_model, text_file, small_update, tmp_path / "gptq", format="nf4"), log=lambda s: None)
    rtn = merge(mcfg(run_model, text_file, small_update, tmp_path / "rtn", format="nf4", method="rtn"),
                log=lambda s: None)
    g, r = gptq["model_metrics"], rtn["model_metrics"]
    assert 0.005 < sum(x["update_rel"] for x in gptq["layers"]) / len(gptq["layers"]) < 0.2
    assert g["kl_merged_vs_unmerged"] < 0.5 * r["kl_merged_vs_unmerged"]
    assert g["kept_gain"] > r["kept_gain"] and g["kept_gain"] > 0.8


def test_gptq_with_identity_hessian_is_round_to_nearest_and_otherwise_beats_it():
    torch.manual_seed(0)
    out_f, in_f, bs = 16, 128, 64
    table = qk.formats.code_table("nf4").float()
    scales = torch.rand(out_f * in_f // bs) + 0.5
    grid = _FourBitGrid(table, scales, in_f, bs)
    w = torch.randn(out_f, in_f) * 0.5
    rtn = torch.stack([grid(w[:, j], j)[1] for j in range(in_f)], dim=1)
    assert torch.equal(gptq_codes(w, torch.eye(in_f), grid, damp=0.0), rtn)
    x = torch.randn(512, in_f) @ torch.randn(in_f, in_f) * 0.2  # correlated inputs
    codes = gptq_codes(w, x.t() @ x, grid)
    deq = lambda c: torch.stack([table[c[:, j]] * scales[(torch.arange(out_f) * in_f + j) // bs]  # noqa: E731
                                 for j in range(in_f)], dim=1)
    err_gptq = (x @ (deq(codes) - w).t()).norm()
    err_rtn = (x @ (deq(rtn) - w).t()).norm()
    assert err_gptq < 0.8 * err_rtn


def test_refusals(run_model, text_file, trained, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="use --force"):
        merge(mcfg(run_model, text_file, trained, tmp_path / "exists"), log=lambda s: None)
    with pytest.raises(ValueError, match="unknown export format"):
        mcfg(run_model, text_file, trained, tmp_path / "x", format="q3")
    other = tmp_path / "other_base"
    from .conftest import make_model, make_tokenizer
    make_tokenizer(other)
    make_model("llama", vocab_size=300, num_hidden_layers=3).save_pretrained(other)
    with pytest.raises(ValueError, match="different base model"):
        merge(mcfg(other, text_file, trained, tmp_path / "y"), log=lambda s: None)
    assert not (tmp_path / "y").exists()


def test_output_is_atomic(run_model, text_file, trained, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    import sys  # qlora_kit.merge is also the name of the function the package exports
    monkeypatch.setattr(sys.modules["qlora_kit.merge"], "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        merge(mcfg(run_model, text_file, trained, tmp_path / "out", format="bf16"), log=lambda s: None)
    assert [p.name for p in Path(tmp_path).iterdir()] == []


def test_cli_merge(run_model, text_file, trained, tmp_path, capsys):
    from qlora_kit.cli import main
    args = ["merge", "--model", str(run_model), "--adapter", str(trained), "--out", str(tmp_path / "m"),
            "--format", "fp4", "--eval-data", str(text_file), "--seq-len", "32", "--eval-sequences", "4",
            "--calib-tokens", "256"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "kept" in printed.out and "merged model written to" in printed.out
    assert printed.err == ""  # nothing from transformers (loading bars) or bitsandbytes while scoring the export
    assert main(args) == 2
    assert "already exists (use --force" in capsys.readouterr().err


def test_partial_adapter_exported_in_another_format(run_model, text_file, tmp_path):
    """Layers the adapter does not touch are converted to the export format too."""
    train(qk.config.TrainConfig(model=str(run_model), data=str(text_file), out=str(tmp_path / "run"), steps=2,
                                seq_len=32, quant="int8", targets="q_proj,v_proj", rank=4, sample_tokens=0,
                                eval_sequences=4, eval_fraction=0.1, device="cpu"),
          log=lambda s: None, progress=False)
    merge(mcfg(run_model, text_file, tmp_path / "run" / "adapter", tmp_path / "out", format="nf4"),
          log=lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu", dtype=torch.float32)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_calibration_never_overlaps_evaluation(run_model, text_file, trained):
    from transformers import AutoTokenizer

    from qlora_kit.merge import _eval_and_calibration
    tok = AutoTokenizer.from_pretrained(run_model)
    for eval_sequences in (4, 8, 0):
        ev, cal = _eval_and_calibration(mcfg(run_model, text_file, trained, "unused", eval_sequences=eval_sequences),
                                        tok, log=lambda s: None)
        rows = {tuple(r) for r in ev.input_ids.tolist()}
        assert len(cal) > 0 and not any(tuple(r) in rows for r in cal.input_ids.tolist())
