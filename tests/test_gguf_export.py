"""GGUF export: the block types against the gguf package's decoder, every supported family read back by
transformers' GGUF loader (an independent reader), the update-keeping rounding on GGUF grids, the GGUF LoRA
file, a GGUF-in / fine-tune / GGUF-out round trip, and the refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora_kit as qk
from qlora_kit import gguf_types
from qlora_kit.config import LoraExportConfig, MergeConfig
from qlora_kit.gguf_export import export_lora, permute_rows
from qlora_kit.merge import _eval_and_calibration, merge

from .conftest import CHATML, make_sp_tokenizer, make_tokenizer, randomize_b, rel_err

gguf = pytest.importorskip("gguf")

PLAIN = "The king walks to the castle. Anne eats bread, and the queen sleeps."


def quiet(*_):
    pass


# ---- block types ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", gguf_types.TYPES)
def test_block_types_decode_and_pack_as_the_gguf_package_does(t):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 128, generator=g) * 0.05
    w[0, :32] += 1.0  # a block off centre (the _1 types' minimum matters)
    w[1, 32:64] = 0.0  # an all-zero block
    w[2, 5] = -3.0  # an outlier
    w[3, :32] = torch.linspace(-1, 1, 32)  # exact ties between two codes
    w[4] = torch.round(w[4] * 64) / 64
    packed = gguf_types.quantize(w, t)  # llama.cpp's reference rounding, byte for byte
    assert np.array_equal(packed["blocks"].numpy().reshape(-1),
                          gguf.quants.quantize(w.numpy(), gguf_types.ggml_type(t)).reshape(-1))
    ref = gguf.quants.dequantize(packed["blocks"].numpy(), gguf_types.ggml_type(t)).reshape(6, 128)
    assert torch.equal(gguf_types.dequantize(packed, t, (6, 128)), torch.from_numpy(ref))
    assert torch.equal(gguf_types.fake_quantize(w, t), torch.from_numpy(ref))  # merge-aware training's forward
    d, m, codes = gguf_types.fields(packed, t, (6, 128))
    assert torch.equal(gguf_types.pack(codes, d, m, t)["blocks"], packed["blocks"])
    # other codes on the same scales: the gguf package decodes them to table[code] * d (+ m)
    tab = gguf_types.table(t)
    other = torch.randint(-127, 128, codes.shape, generator=g) if tab is None else \
        torch.randint(0, len(tab), codes.shape, generator=g)
    repacked = gguf_types.pack(other.to(torch.int16), d, m, t)
    ref = torch.from_numpy(gguf.quants.dequantize(repacked["blocks"].numpy(), gguf_types.ggml_type(t)).reshape(6, 128))
    values = (other.float() if tab is None else tab[other]).view(6, 4, 32) * d[..., None]
    if m is not None:
        values = values + m[..., None]
    assert torch.allclose(ref, values.view(6, 128), rtol=0, atol=1e-7)
    assert packed["blocks"].shape[1] == gguf_types.row_bytes(t, 128) == gguf.quants.quant_shape_to_byte_shape(
        (128,), gguf_types.ggml_type(t))[0]


def test_permutation_is_llama_cpps():
    """Rows of head h: HF's [x0 .. x(d/2-1) | y0 .. y(d/2-1)] become llama.cpp's [x0 y0 x1 y1 ...]."""
    w = torch.arange(2 * 8).view(16, 1).float()  # 2 heads of dim 8
    got = permute_rows(w, 2).view(-1).tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ---- families read back by transformers -------------------------------------------------------------------------

def _family_config(family: str, vocab: int, bos, eos, pad):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        # transformers reads no key_length for qwen3 (llama.cpp does): its default head_dim 128 must hold here
        return Qwen3Config(**common, head_dim=128, tie_word_embeddings=True)
    if family == "gemma2":  # GGUF carries no query_pre_attn_scalar: the reader takes transformers' default 256
        return Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=256, sliding_window=64)
    if family == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=256, sliding_window=64)
    raise KeyError(family)


SENTENCEPIECE = {"mistral", "gemma2", "gemma3_text"}
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """{family: (model folder, adapter folder)}: a tiny random model with its tokenizer and a random r=4 adapter."""
    out = {}
    for i, family in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(f"gguf_{family}")
        tok = (make_sp_tokenizer(folder, prefix_space=not family.startswith("gemma")) if family in SENTENCEPIECE
               else make_tokenizer(folder))
        torch.manual_seed(i)
        cfg = _family_config(family, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # norms away from their init, so a wrong norm convention shows
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(folder)
        q = qk.load_quantized(folder, compute_dtype=torch.float32)
        qk.add_lora(q, r=4, alpha=8, dropout=0.0)
        randomize_b(q, seed=i, std=0.05)
        qk.save_adapter(q, folder / "adapter")
        out[family] = folder, folder / "adapter"
    return out


def read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def rtn_reference(folder: Path, adapter: Path, fmt: str):
    """The export as plain transformers + the gguf package would make it: the trained (nf4-dequantized) weight
    plus s*BA, rounded to nearest by gguf's own quantizer; the embedding in Q8_0 (f16/f32: cast)."""
    from transformers import AutoModelForCausalLM as Auto

    q = qk.load_quantized(folder, compute_dtype=torch.float32)
    qk.load_adapter(q, adapter)
    ref = Auto.from_pretrained(folder, dtype=torch.float32).eval()
    layers = qk.lora_layers(q)

    def rounded(w: torch.Tensor, t: str) -> torch.Tensor:
        if t in ("fp32", "fp16", "bf16"):
            return w.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t]).float()
        gt = gguf_types.ggml_type(t)
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gt), gt)).view(w.shape)

    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.dequantize(torch.float32) + layer.delta_weight().float()
            ref.get_submodule(name).weight.copy_(rounded(w, fmt))
        emb = ref.get_input_embeddings()
        emb.weight.copy_(rounded(emb.weight.detach().clone(), "q8_0" if fmt.startswith("q") else fmt))
        head = ref.get_output_embeddings()
        if head is not None and head.weight is not emb.weight:
            head.weight.copy_(rounded(head.weight.detach().clone(), "q8_0" if fmt.startswith("q") else fmt))
    return ref, q.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_back_in_transformers(family, family_models, text_file, tmp_path):
    """Round to nearest, so an independent reference exists: transformers' reader gives the reference's logits
    (the same weights, fp32 arithmetic), and the tokenizer gives the source tokenizer's ids."""
    folder, adapter = family_models[family]
    fmt = "q4_0" if family in ("llama", "gemma2") else "q8_0" if family in ("qwen2", "gemma3_text") else "q5_1"
    out = tmp_path / f"{family}.gguf"
    report = merge(MergeConfig(model=str(folder), adapter=str(adapter), out=str(out), format=fmt, method="rtn",
                               eval_data=str(text_file), seq_len=32, eval_sequences=4, calib_tokens=256), log=quiet)
    model, tok = read_back(out)
    ref, unmerged = rtn_reference(folder, adapter, fmt)
    ids = torch.randint(3, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, lora = model(ids).logits, ref(ids).logits, unmerged(ids).logits
    assert rel_err(got, want) < 1e-4, family
    assert rel_err(got, lora) < 0.25  # the rounding's own error, for scale
    src_tok = AutoTokenizer.from_pretrained(folder)
    assert tok(PLAIN)["input_ids"] == src_tok(PLAIN)["input_ids"]
    if family not in SENTENCEPIECE:  # byte-level: special tokens and odd spacing too
        odd = "<|im_start|>user\n  café 123<|im_end|>"
        assert tok(odd)["input_ids"] == src_tok(odd)["input_ids"]
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["general.architecture"] == report["gguf"]["architecture"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == fmt.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == ("Q8_0" if fmt.startswith("q") else fmt.upper())


@pytest.mark.parametrize("fmt,tol", [("fp32", 1e-5), ("fp16", 3e-3), ("bf16", 2e-2)])
def test_16bit_gguf_matches_the_unmerged_model(family_models, text_file, tmp_path, fmt, tol):
    folder, adapter = family_models["llama"]
    out = tmp_path / "m.gguf"
    merge(MergeConfig(model=str(folder), adapter=str(adapter), out=str(out), format=fmt, eval_data=str(text_file),
                      seq_len=32, eval_sequences=4, calib_tokens=256), log=quiet)
    model, _ = read_back(out)
    q = qk.load_quantized(folder, compute_dtype=torch.float32)
    qk.load_adapter(q, adapter)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(ids).logits, q.eval()(ids).logits) < tol


def test_report_scores_the_file_transformers_reads(family_models, text_file, tmp_path):
    """The merge's streamed evaluation of the export as stored (GPTQ codes) is what transformers computes from
    the file: the same perplexity on the same rows."""
    folder, adapter = family_models["mistral"]
    out = tmp_path / "m.gguf"
    cfg = MergeConfig(model=str(folder), adapter=str(adapter), out=str(out), format="q4_1", eval_data=str(text_file),
                      seq_len=32, eval_sequences=6, calib_tokens=256)
    report = merge(cfg, log=quiet)
    model, _ = read_back(out)
    rows, _ = _eval_and_calibration(cfg, AutoTokenizer.from_pretrained(folder), quiet)
    nll, n = 0.0, 0
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1]
    labels = rows.labels[:, 1:]
    nll = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                  reduction="sum"))
    n = int((labels != -100).sum())
    assert math.exp(nll / n) == pytest.approx(report["model_metrics"]["ppl_merged"], rel=1e-4)
    assert json.loads(out.with_name("m.merge_report.json").read_text())["format"] == "q4_1"


# ---- update keeping on GGUF grids ----------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["q4_0", "q4_1", "q5_0", "q8_0"])
def test_gptq_on_gguf_grids_keeps_a_small_update_round_to_nearest_loses(t):
    from qlora_kit.config import QuantConfig
    from qlora_kit.rounding import requantize_group, retained

    g = torch.Generator().manual_seed(0)
    # inputs as correlated as a language model's (a few directions dominate), and an update a few % of a step
    x = torch.randn(1024, 8, generator=g) @ torch.randn(8, 256, generator=g) + 0.1 * torch.randn(1024, 256, generator=g)
    h = x.T @ x
    w0 = torch.randn(64, 256, generator=g) * 0.05
    q = QuantConfig(quant=t, compute_dtype=torch.float32)
    base = gguf_types.dequantize(gguf_types.quantize(w0, t), t, (64, 256))  # trained on a GGUF grid already
    delta = 0.03 * (torch.randn(64, 4, generator=g) @ torch.randn(4, 256, generator=g)) * 0.05 / 4
    if t == "q8_0":
        delta = delta / 16  # Q8_0's step is 16x finer
    merged = {"w": base + delta}
    kept = {}
    for method in ("gptq", "rtn"):
        r = requantize_group(merged, {"w": gguf_types.quantize(base, t)}, q, method, h)["w"]
        kept[method] = retained(r.value - base, delta, h)["output_cos"]
        check = gguf.quants.dequantize(r.packed["blocks"].numpy(), gguf_types.ggml_type(t)).reshape(64, 256)
        assert torch.allclose(torch.from_numpy(check), r.value, atol=1e-7)  # what the file decodes to
    assert kept["gptq"] > 0.7 and kept["gptq"] > kept["rtn"] + 0.4, kept


# ---- GGUF LoRA ----------------------------------------------------------------------------------------------------

def _zero_b(adapter: Path, out: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file({k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in tensors.items()},
              out / "adapter_model.safetensors", metadata=meta)
    return out


def test_gguf_lora_is_the_update_the_merge_applies(family_models, text_file, tmp_path):
    """In GGUF's own layout (Q/K rows permuted): merged(adapter) - merged(B = 0) = (alpha / r) * lora_b @ lora_a,
    read raw from the two files."""
    folder, adapter = family_models["llama"]
    cfg = dict(model=str(folder), eval_data=str(text_file), seq_len=32, eval_sequences=2, calib_tokens=128, eval=False,
               format="fp32")
    merge(MergeConfig(adapter=str(adapter), out=str(tmp_path / "with.gguf"), **cfg), log=quiet)
    merge(MergeConfig(adapter=str(_zero_b(adapter, tmp_path / "zero")), out=str(tmp_path / "without.gguf"), **cfg),
          log=quiet)
    summary = export_lora(LoraExportConfig(model=str(folder), adapter=str(adapter), out=str(tmp_path / "lora.gguf")),
                          log=quiet)
    lora = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    fields = {k: f.contents() for k, f in lora.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    factors = {t.name: torch.from_numpy(np.array(t.data)) for t in lora.tensors}
    full = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(str(tmp_path / "with.gguf")).tensors}
    zero = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(str(tmp_path / "without.gguf")).tensors}
    names = [n.removesuffix(".lora_a") for n in factors if n.endswith(".lora_a")]
    assert len(names) == summary["layers"] == 14 and "blk.0.attn_q.weight" in names
    for n in names:
        a, b = factors[f"{n}.lora_a"], factors[f"{n}.lora_b"]
        update = (alpha / a.shape[0]) * b @ a
        assert torch.allclose(full[n] - zero[n], update, atol=2e-6), n


def test_gguf_lora_folds_rslora_into_b(family_models, tmp_path):
    from safetensors.torch import load_file

    folder, adapter = family_models["qwen2"]
    rs = tmp_path / "rs"
    rs.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (rs / "adapter_config.json").write_text(json.dumps(config))
    (rs / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    export_lora(LoraExportConfig(model=str(folder), adapter=str(rs), out=str(tmp_path / "l.gguf")), log=quiet)
    reader = gguf.GGUFReader(str(tmp_path / "l.gguf"))
    alpha = reader.fields["adapter.lora.alpha"].contents()
    b = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}["blk.0.attn_v.weight.lora_b"]
    src = load_file(adapter / "adapter_model.safetensors")
    b0 = next(v for k, v in src.items() if "layers.0.self_attn.v_proj.lora_B" in k)
    r = b0.shape[1]
    # rsLoRA's scale alpha / sqrt(r), written as alpha / r times B scaled by sqrt(r)
    assert torch.allclose((alpha / r) * b, (config["lora_alpha"] / math.sqrt(r)) * b0, atol=1e-6)


# ---- GGUF in, fine-tune, GGUF out -------------------------------------------------------------------------------

def test_round_trip_gguf_in_fine_tune_gguf_out(run_model, text_file, tmp_path):
    """A small model as a GGUF file (written here from the HF folder with a zero adapter), fine-tuned from that
    file, merged back to GGUF Q8_0 (its tokenizer keys copied from the source file) and read by transformers."""
    from qlora_kit.config import TrainConfig
    from qlora_kit.train import train

    q = qk.load_quantized(run_model, compute_dtype=torch.float32)
    qk.add_lora(q, r=4, alpha=8, dropout=0.0)
    qk.save_adapter(q, tmp_path / "zero")
    source = tmp_path / "base.gguf"
    merge(MergeConfig(model=str(run_model), adapter=str(tmp_path / "zero"), out=str(source), format="fp32",
                      eval=False, eval_data=str(text_file), seq_len=32, calib_tokens=128), log=quiet)
    run = tmp_path / "run"
    train(TrainConfig(model=str(source), data=str(text_file), out=str(run), steps=20, seq_len=32, lr=1e-2, rank=8,
                      alpha=16, warmup_steps=2, sample_tokens=0, eval_sequences=8, eval_fraction=0.1, device="cpu",
                      save_every=0, cache_dir=str(tmp_path / "cache")), log=quiet, progress=False)
    out = tmp_path / "tuned.q8_0.gguf"
    report = merge(MergeConfig(model=str(source), adapter=str(run / "adapter"), out=str(out), format="q8_0",
                               eval_data=str(text_file), seq_len=32, eval_sequences=8, calib_tokens=256,
                               cache_dir=str(tmp_path / "cache")), log=quiet)
    m = report["model_metrics"]
    assert m["ppl_unmerged"] < m["ppl_base"] and m["kept_gain"] > 0.9
    model, tok = read_back(out)
    src_fields = gguf.GGUFReader(str(source)).fields
    out_fields = gguf.GGUFReader(str(out)).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert out_fields[key].contents() == src_fields[key].contents()
    assert tok(PLAIN)["input_ids"] == AutoTokenizer.from_pretrained(run_model)(PLAIN)["input_ids"]
    unmerged = qk.load_quantized(source, compute_dtype=torch.float32, cache_dir=str(tmp_path / "cache"))
    qk.load_adapter(unmerged, run / "adapter")
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model(ids).logits, unmerged.eval()(ids).logits) < 0.05


# ---- refusals ---------------------------------------------------------------------------------------------------

def test_refusals_leave_nothing_behind(family_models, model_dirs, text_file, tmp_path):
    folder, adapter = family_models["llama"]
    base = dict(model=str(folder), adapter=str(adapter), eval_data=str(text_file), seq_len=32, eval_sequences=2,
                calib_tokens=128)
    with pytest.raises(ValueError, match="q4_k.*llama-quantize"):
        MergeConfig(out=str(tmp_path / "x.gguf"), format="q4_k", **base)
    with pytest.raises(ValueError, match="bitsandbytes format"):
        MergeConfig(out=str(tmp_path / "x.gguf"), format="nf4", **base)
    with pytest.raises(ValueError, match="ending in .gguf"):
        MergeConfig(out=str(tmp_path / "folder"), format="q4_0", **base)
    existing = tmp_path / "there.gguf"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"):
        merge(MergeConfig(out=str(existing), format="q8_0", **base), log=quiet)
    assert existing.read_bytes() == b"old"
    # an architecture with no GGUF mapping (phi3: fused qkv), refused before any work
    phi = model_dirs["phi3"]
    make_tokenizer(phi)
    q = qk.load_quantized(phi, compute_dtype=torch.float32)
    qk.add_lora(q, r=4, alpha=8, dropout=0.0)
    qk.save_adapter(q, tmp_path / "phi_adapter")
    with pytest.raises(ValueError, match="phi3"):
        merge(MergeConfig(**{**base, "model": str(phi), "adapter": str(tmp_path / "phi_adapter")},
                          out=str(tmp_path / "phi.gguf"), format="q8_0"), log=quiet)
    # a tokenizer GGUF cannot represent (WordPiece)
    wp = tmp_path / "wordpiece"
    wp.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (wp / f.name).write_bytes(f.read_bytes())
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tj["model"] = {"type": "WordPiece", "unk_token": "<|endoftext|>", "continuing_subword_prefix": "##",
                   "max_input_chars_per_word": 100, "vocab": vocab}
    (wp / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="WordPiece"):
        merge(MergeConfig(**{**base, "model": str(wp)}, out=str(tmp_path / "wp.gguf"), format="q8_0"), log=quiet)
    left = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or ".tmp-" in p.name)
    assert left == ["there.gguf"], left


def test_disk_full_leaves_no_partial_gguf(family_models, text_file, tmp_path, monkeypatch):
    import errno
    import os

    folder, adapter = family_models["qwen2"]
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, pos):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="disk full"):
        merge(MergeConfig(model=str(folder), adapter=str(adapter), out=str(tmp_path / "x.gguf"), format="q8_0",
                          eval_data=str(text_file), seq_len=32, eval_sequences=2, calib_tokens=128), log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_type_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qlora_kit", "merge", "--adapter", str(tmp_path), "--out",
                        str(tmp_path / "x.gguf"), "--format", "q4_k"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice: 'q4_k'" in r.stderr.strip().splitlines()[-1]  # after argparse's usage


# ---- merge-aware training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["q4_0", "nf4"])
def test_merge_aware_forward_is_the_rounded_merge_with_lora_gradients(fmt):
    """Forward: x @ Q(W + s*BA).T; backward: A and B get plain LoRA's gradients for the same upstream gradient
    (straight through Q), the input gets Q(W + s*BA)'s."""
    from qlora_kit import formats
    from qlora_kit.config import QuantConfig
    from qlora_kit.layers import QuantLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    layer = QuantLinear.from_dense(w, QuantConfig(quant="nf4", compute_dtype=torch.float32))
    layer.attach_lora(4, 8.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02, generator=g)
    x = torch.randn(3, 5, 128, generator=g, requires_grad=True)
    up = torch.randn(3, 5, 64, generator=g)
    plain = {}
    y = layer(x)
    (y * up).sum().backward()
    plain = {"A": layer.lora_A.grad.clone(), "B": layer.lora_B.grad.clone()}
    layer.lora_A.grad = layer.lora_B.grad = None
    x.grad = None
    layer.merge_aware = QuantConfig(quant=fmt, compute_dtype=torch.float32)
    y = layer(x)
    merged = layer.dequantize(torch.float32) + layer.delta_weight().detach()
    if fmt == "q4_0":
        ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(merged.numpy(), gguf_types.ggml_type(fmt)),
                                                      gguf_types.ggml_type(fmt))).view(64, 128)
    else:
        ref = formats.dequantize(formats.quantize(merged, layer.merge_aware), "nf4", (64, 128), 64, torch.float32)
    assert torch.allclose(y, x.detach() @ ref.t(), atol=1e-5)
    (y * up).sum().backward()
    assert torch.allclose(layer.lora_A.grad, plain["A"], atol=1e-6)
    assert torch.allclose(layer.lora_B.grad, plain["B"], atol=1e-6)
    assert torch.allclose(x.grad, up @ ref, atol=1e-5)


def _fmix32_dither(index: int) -> float:
    """The fixed dither of one flat index, in plain Python integers (an independent statement of its definition:
    murmur3's 32-bit finalizer of index * 0x9E3779B1, the top 10 bits as level k, u = (k + 1/2) / 1024)."""
    m = 0xFFFFFFFF
    h = (index * 0x9E3779B1) & m
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & m
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & m
    h ^= h >> 16
    return ((h >> 22) + 0.5) / 1024


def test_fixed_dither_is_its_integer_definition(monkeypatch):
    from qlora_kit import rounding

    u = rounding.fixed_dither((37, 300)).float()
    for i in [0, 1, 2, 299, 300, 5000, 37 * 300 - 1]:
        assert float(u.view(-1)[i]) == _fmix32_dither(i)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    rounding._DITHERS.clear()
    monkeypatch.setattr(rounding, "DITHER_CHUNK", 1000)  # hashed a chunk at a time: the same values
    assert torch.equal(u, rounding.fixed_dither((37, 300)).float())


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_floor_lookup_is_a_count_of_the_values_below(quant):
    """The dither's table lookup of the grid value at or below x, against counting: at every grid value, one ulp
    either side, and between."""
    from qlora_kit import formats, rounding

    t = rounding._FloorTable(formats.code_table(quant), torch.device("cpu"))
    assert t.count is not None  # the lookup, not the fallback
    v = t.values
    g = torch.Generator().manual_seed(0)
    x = torch.cat([v, torch.nextafter(v, v + 1), torch.nextafter(v, v - 1),
                   torch.rand(200_000, generator=g) * (t.hi - t.lo) + t.lo]).clamp(t.lo, t.hi)
    want = (x[:, None] >= v[None, 1:-1]).sum(1).int()
    assert torch.equal(t.floor_index(x), want)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("in_features", [256, 320])  # 320: bitsandbytes' blocks of 64 span rows at 128
def test_dithered_rounding_keeps_the_base_and_moves_codes_in_proportion(quant, in_features):
    """Against float64: each code is the grid value below x or above it, the upper one exactly when
    u < (x - lo) / (hi - lo); a weight on the grid (the 4-bit base itself) keeps its value; an update of a tenth
    of a step, which round to nearest drops everywhere, comes through on average."""
    from qlora_kit import formats, rounding
    from qlora_kit.config import QuantConfig

    g = torch.Generator().manual_seed(1)
    q = QuantConfig(quant=quant, blocksize=128 if in_features == 320 else 64, compute_dtype=torch.float32)
    shape = (96, in_features)
    base = formats.quantize(torch.randn(shape, generator=g) * 0.02, q)
    w0 = formats.dequantize(base, quant, shape, q.blocksize, torch.float32)
    decode = lambda p: formats.dequantize(p, quant, shape, q.blocksize, torch.float32)  # noqa: E731
    assert torch.equal(decode(rounding.dithered_export(w0, base, q)), w0)

    scales = formats.block_scales(base, quant, shape, q.blocksize).double()
    grid = formats.code_table(quant).double().unique()  # sorted, +0 and -0 as one
    x0 = (w0.double().reshape(-1, q.blocksize) / scales[:, None]).reshape(-1)
    k = (x0[:, None] - grid[None, :]).abs().argmin(1).clamp(1, len(grid) - 2)  # x0's grid point (inner ones)
    step = torch.where(torch.rand(x0.shape, generator=g, dtype=torch.float64) < 0.5, grid[k + 1] - grid[k],
                       grid[k - 1] - grid[k])  # toward a random neighbour
    d = (0.1 * step * scales.repeat_interleave(q.blocksize)).view(shape)
    w = (w0.double() + d).float()
    got = decode(rounding.dithered_export(w, base, q))

    x = (w.double().reshape(-1, q.blocksize) / scales[:, None]).reshape(-1).clamp(float(grid[0]), float(grid[-1]))
    lo_i = (torch.searchsorted(grid, x, right=True) - 1).clamp(0, len(grid) - 2)
    lo, hi = grid[lo_i], grid[lo_i + 1]
    u = rounding.fixed_dither(shape).double().view(-1)
    want = (torch.where(u < (x - lo) / (hi - lo), hi, lo).view(-1, q.blocksize) * scales[:, None]).view(shape)
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-7)
    moved = got.double() - w0.double()
    assert 0.8 < float((moved * d).sum() / (d * d).sum()) < 1.2  # the update, in expectation
    nearest = grid[(x[:, None] - grid[None, :]).abs().argmin(1)]
    assert torch.allclose(nearest, x0, rtol=0, atol=1e-6)  # round to nearest on the same grid: every code snaps back


@pytest.mark.parametrize("fmt,rounding_", [("q4_0", None), ("nf4", None), ("nf4", "nearest")])
def test_merge_aware_training_exports_the_model_it_trained(fmt, rounding_, run_model, text_file, tmp_path):
    """Trained against the export's rounding (after 10 plain steps), the adapter's export (that rounding, chosen
    automatically: round to nearest for q4_0, the fixed dither for nf4 unless asked otherwise) stores exactly the
    weights the training forward computed with, and keeps its gain."""
    from safetensors import safe_open

    from qlora_kit.config import TrainConfig
    from qlora_kit.train import train

    run = tmp_path / "run"
    logs = []
    train(TrainConfig(model=str(run_model), data=str(text_file), out=str(run), steps=20, seq_len=32, lr=1e-2, rank=8,
                      alpha=16, warmup_steps=2, sample_tokens=0, eval_sequences=8, eval_fraction=0.1, device="cpu",
                      save_every=0, merge_aware=fmt, merge_aware_after=10, merge_aware_rounding=rounding_),
          log=logs.append, progress=False)
    assert f"step 11: merge-aware training for {fmt} from here on" in logs  # plain LoRA for the first 10
    want_rounding = rounding_ or ("dither" if fmt == "nf4" else "nearest")
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["merge_aware_format"] == fmt
        assert f.metadata()["merge_aware_rounding"] == want_rounding
    out = tmp_path / ("m.gguf" if fmt == "q4_0" else "m")
    report = merge(MergeConfig(model=str(run_model), adapter=str(run / "adapter"), out=str(out), format=fmt,
                               eval_data=str(text_file), seq_len=32, eval_sequences=8, calib_tokens=256), log=quiet)
    assert report["method"] == ("dither" if want_rounding == "dither" else "rtn") and report["merge_aware"] == fmt
    m = report["model_metrics"]
    assert m["ppl_merged"] < m["ppl_base"] and m["kept_gain"] > 0.97
    model = qk.load_quantized(run_model, compute_dtype=torch.float32)
    qk.load_adapter(model, run / "adapter")
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert layer.merge_aware is not None and layer.merge_aware.quant == fmt  # load_adapter restores the mode
    assert layer.merge_aware_rounding == want_rounding
    if fmt == "q4_0":
        want = gguf_types.quantize(layer.dequantize(torch.float32) + layer.delta_weight().detach().float(), "q4_0")
        stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}["blk.0.attn_v.weight"]
        assert np.array_equal(stored.reshape(-1), want["blocks"].numpy().reshape(-1))
    else:
        want = layer.export_rounding()
        with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
            stored = f.get_tensor("model.layers.0.self_attn.v_proj.weight")
            assert torch.equal(f.get_tensor("model.layers.0.self_attn.v_proj.weight.absmax"), want["absmax"])
        assert torch.equal(stored.view(-1), want["weight"].view(-1))


def test_merge_aware_settings_are_checked():
    from qlora_kit.config import TrainConfig

    with pytest.raises(ValueError, match="merge-aware format"):
        TrainConfig(merge_aware="bf16")
    with pytest.raises(ValueError, match="merge-aware-after"):
        TrainConfig(merge_aware="q4_0", steps=10, merge_aware_after=10)
    with pytest.raises(ValueError, match="'dither' is for nf4 / fp4, not q4_0"):
        TrainConfig(merge_aware="q4_0", merge_aware_rounding="dither")
    with pytest.raises(ValueError, match="merge-aware rounding"):
        TrainConfig(merge_aware="nf4", merge_aware_rounding="stochastic")
    with pytest.raises(ValueError, match="needs --merge-aware"):
        TrainConfig(merge_aware_rounding="dither")
    assert TrainConfig(merge_aware="nf4").merge_aware_rounding == "dither"  # resolved: run.json records it
    assert TrainConfig(merge_aware="q4_0").merge_aware_rounding == "nearest"
    assert TrainConfig().merge_aware_rounding is None


def test_merge_aware_adapter_saved_before_the_rounding_setting_rounds_to_nearest(run_model, text_file, tmp_path):
    """An adapter without `merge_aware_rounding` in its metadata (saved before the setting existed) was trained
    with round to nearest: it loads and merges that way; an unknown value is refused with the file named."""
    from safetensors.torch import load_file, save_file

    from qlora_kit.config import TrainConfig
    from qlora_kit.train import train

    run = tmp_path / "run"
    train(TrainConfig(model=str(run_model), data=str(text_file), out=str(run), steps=2, seq_len=32, rank=4,
                      sample_tokens=0, eval_sequences=0, device="cpu", save_every=0, merge_aware="nf4",
                      merge_aware_rounding="nearest"), log=quiet, progress=False)
    weights = run / "adapter" / "adapter_model.safetensors"
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(weights))
    save_file(tensors, str(weights), metadata={k: v for k, v in meta.items() if k != "merge_aware_rounding"})
    model = qk.load_quantized(run_model, compute_dtype=torch.float32)
    qk.load_adapter(model, run / "adapter")
    assert model.get_submodule("model.layers.0.self_attn.v_proj").merge_aware_rounding == "nearest"
    report = merge(MergeConfig(model=str(run_model), adapter=str(run / "adapter"), out=str(tmp_path / "m"),
                               format="nf4", eval=False, eval_data=str(text_file), calib_tokens=64, seq_len=32),
                   log=quiet)
    assert report["method"] == "rtn"
    save_file(tensors, str(weights), metadata={**meta, "merge_aware_rounding": "sometimes"})
    with pytest.raises(ValueError, match="adapter.*unknown merge_aware_rounding 'sometimes'"):
        qk.load_adapter(qk.load_quantized(run_model, compute_dtype=torch.float32), run / "adapter")


def test_token_list_has_one_entry_per_embedding_row(text_file, tmp_path):
    """llama.cpp takes the vocabulary size from the token list and wants token_embd to match: rows past the
    tokenizer's ids are padding tokens ([PADn], type UNUSED), as llama.cpp's converter writes them."""
    from transformers import LlamaConfig

    folder = tmp_path / "model"
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 5, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    q = qk.load_quantized(folder, compute_dtype=torch.float32)
    qk.add_lora(q, r=4, alpha=8, dropout=0.0)
    qk.save_adapter(q, tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    merge(MergeConfig(model=str(folder), adapter=str(tmp_path / "adapter"), out=str(out), format="q8_0", eval=False,
                      eval_data=str(text_file), seq_len=32, calib_tokens=128), log=quiet)
    reader = gguf.GGUFReader(str(out))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-5:] == [5] * 5
    model, _ = read_back(out)
    assert model.config.vocab_size == cfg.vocab_size


def test_gguf_lora_refuses_alpha_zero(family_models, tmp_path):
    folder, adapter = family_models["llama"]
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 0
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="lora_alpha is 0"):
        export_lora(LoraExportConfig(model=str(folder), adapter=str(bad), out=str(tmp_path / "l.gguf")), log=quiet)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))
