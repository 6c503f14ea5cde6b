"""Merge and export: W' = W + s*BA exactly for 16-bit, plain-transformers loading, update-keeping requantization."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora_kit as qk
from qlora_kit.merge import MergeConfig, merge
from qlora_kit.rounding import Grid, energy_correction, gptq_codes
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
    # as the README says a user loads it: the dtype the export's config names (bf16). (Forcing dtype=float32 on a
    # bitsandbytes checkpoint made transformers cast the norms but not the tied bf16 head in some test orders.)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
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


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_gptq_with_identity_hessian_is_round_to_nearest_and_otherwise_beats_it(quant):
    torch.manual_seed(0)
    out_f, in_f, bs = 16, 128, 64
    table = qk.formats.code_table(quant).float()
    scales = torch.rand(out_f * in_f // bs) + 0.5
    grid = Grid.four_bit(table, scales, (out_f, in_f), bs)
    w = torch.randn(out_f, in_f) * 0.5
    # round to nearest, independently: the table entry nearest to w / scale, element by element
    per_elem = scales[(torch.arange(out_f)[:, None] * in_f + torch.arange(in_f)[None]) // bs]  # (out, in)
    rtn = (w[..., None] / per_elem[..., None] - table).abs().argmin(-1)
    # (fp4 holds 0 twice: compare the values the codes stand for)
    assert torch.equal(table[gptq_codes(w, torch.eye(in_f), grid, damp=0.0).long()], table[rtn])
    x = torch.randn(512, in_f) @ torch.randn(in_f, in_f) * 0.2  # correlated inputs
    codes = gptq_codes(w, x.t() @ x, grid).long()
    err_gptq = (x @ (table[codes] * per_elem - w).t()).norm()
    err_rtn = (x @ (table[rtn] * per_elem - w).t()).norm()
    assert err_gptq < 0.8 * err_rtn


def _gptq_reference(w, h, nearest, damp=0.01):
    """The GPTQ paper's algorithm, written out plainly in float64: inverse Cholesky factor of the damped H, then
    column by column the nearest grid value, the error over the factor's diagonal pushed onto every later column."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.long)
    for j in range(w.shape[1]):
        codes[:, j], v = nearest(w[:, j], j)
        err = (w[:, j] - v) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None]
    return codes


def test_inverse_factor_and_retained_against_float64():
    """H^-1's upper factor (the triangular inverse by halves, recursing below `leaf`) and the output-space
    measures of `retained` (with dW H given from the LoRA factors) against plain float64 arithmetic."""
    from qlora_kit import rounding
    torch.manual_seed(2)
    n = 1100  # retained's A H A^T in two parts (blocks on and above the diagonal)
    x = torch.randn(1300, n) @ (torch.eye(n) + 0.2 * torch.randn(n, n) / n ** 0.5)
    h = x.t() @ x
    low = torch.linalg.cholesky(h)
    inv = rounding._invert_lower_(low.clone(), leaf=200)  # 1100 -> 550 -> 275 -> 137/138: three levels of halves
    ref = torch.linalg.inv(low.double())
    assert rel_err(inv.double(), ref) < 1e-5
    u = rounding._inverse_factor(h, 0.01, torch.float32).double()
    hd = h.double()
    damped = hd + 0.01 * hd.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    assert torch.equal(u, u.triu())
    assert rel_err(u.t() @ u, torch.linalg.inv(damped)) < 1e-4

    out_f, r = 40, 4
    a_lora, b_lora = torch.randn(r, n), torch.randn(out_f, r)
    delta = 0.5 * b_lora @ a_lora
    actual = delta + 0.3 * torch.randn(out_f, n) * delta.std()
    got = rounding.retained(actual, delta, h, 0.5 * b_lora @ (a_lora @ h))
    for k, v in rounding.retained(actual, delta, h).items():  # dW H as a full product: the same measures
        assert abs(got[k] - v) <= 2e-4, (k, got[k], v)
    ad, dd = actual.double(), delta.double()
    ip = {k: float(torch.trace(p @ hd @ q.t())) for k, (p, q) in
          {"ab": (ad, dd), "aa": (ad, ad), "bb": (dd, dd)}.items()}
    assert abs(got["output_cos"] - ip["ab"] / (ip["aa"] * ip["bb"]) ** 0.5) < 2e-4
    assert abs(got["output_norm_ratio"] - (ip["aa"] / ip["bb"]) ** 0.5) < 2e-4
    assert abs(got["update_cos"] - float((ad * dd).sum() / (ad.norm() * dd.norm()))) < 2e-4


def test_gptq_output_error_gives_retained_its_output_measures():
    """The rounding's own output error ||X (Q - W)^T||^2 (Rounded.error_energy, from GPTQ's errors after the
    damping is taken back out) against float64 trace((Q - W) H (Q - W)^T), and `retained` with it (no A H A^T
    product) against the plain float64 measures, for an nf4 base plus a small LoRA update rounded onto the
    base's grid."""
    from qlora_kit import formats, rounding
    from qlora_kit.config import QuantConfig

    torch.manual_seed(4)
    out_f, n, r = 96, 320, 4
    q = QuantConfig(quant="nf4", blocksize=64, compute_dtype=torch.float32)
    x = torch.randn(700, n) @ (torch.eye(n) + 0.3 * torch.randn(n, n) / n ** 0.5)
    h = x.t() @ x
    base_packed = formats.quantize(torch.randn(out_f, n) * 0.02, q)
    base = formats.dequantize(base_packed, "nf4", (out_f, n), 64, torch.float32)
    a_lora, b_lora = torch.randn(r, n) * 0.01, torch.randn(out_f, r) * 0.01
    delta = 2.0 * b_lora @ a_lora
    merged = base + delta
    got = rounding.requantize_group({"w": merged}, {"w": base_packed}, q, "gptq", h)["w"]
    e = (got.value - merged).double()
    hd = h.double()
    assert abs(got.error_energy - float(torch.trace(e @ hd @ e.t()))) <= 1e-4 * float(torch.trace(e @ hd @ e.t()))
    measures = rounding.retained(got.value - base, delta, h, 2.0 * b_lora @ (a_lora @ h), miss_energy=got.error_energy)
    ad, dd = (got.value - base).double(), delta.double()
    ip = {k: float(torch.trace(p @ hd @ q_.t())) for k, (p, q_) in
          {"ab": (ad, dd), "aa": (ad, ad), "bb": (dd, dd)}.items()}
    assert 0.05 < measures["output_cos"] < 0.99  # a real test: some of the update kept, not all
    assert abs(measures["output_cos"] - ip["ab"] / (ip["aa"] * ip["bb"]) ** 0.5) < 2e-4
    assert abs(measures["output_norm_ratio"] - (ip["aa"] / ip["bb"]) ** 0.5) < 2e-4


def test_gptq_trial_rows_choose_the_grid_and_the_winner_rounds_the_rest(monkeypatch):
    """Every 4th row rounded on both candidate grids chooses one; the winner's codes for all rows (trial rows and
    the rest, assembled) are what rounding the whole layer on that grid gives, and the choice is the one the
    whole layers' output errors make: base scales for a small update, fresh ones where the update outgrows the
    base's blocks."""
    from qlora_kit import formats, rounding
    from qlora_kit.config import QuantConfig

    monkeypatch.setattr(rounding, "TRIAL_MIN_ROWS", 8)
    torch.manual_seed(5)
    out_f, n = 128, 256
    q = QuantConfig(quant="nf4", blocksize=64, compute_dtype=torch.float32)
    x = torch.randn(600, n) @ (torch.eye(n) + 0.3 * torch.randn(n, n) / n ** 0.5)
    h = x.t() @ x
    packed = {k: formats.quantize(torch.randn(out_f, n) * 0.02, q) for k in ("small", "grows")}
    base = {k: formats.dequantize(p, "nf4", (out_f, n), 64, torch.float32) for k, p in packed.items()}
    merged = {"small": base["small"] + 0.001 * torch.randn(out_f, n),
              "grows": base["grows"] * 2.5 + 0.001 * torch.randn(out_f, n)}  # every block's range outgrown
    got = rounding.requantize_group(merged, packed, q, "gptq", h)
    factor = rounding.gptq_factor(h)
    for k, want_scales in (("small", "base"), ("grows", "fresh")):
        whole = {}
        for label, like in (("base", packed[k]), ("fresh", formats.quantize(merged[k], q, codes=False))):
            codes, e = rounding.gptq_codes(merged[k], h, rounding._grid(like, (out_f, n), q), return_energy=True,
                                           factor=factor)
            whole[label] = (float(e.sum()), rounding._dequantize(rounding._pack(codes, like, "nf4", (out_f, n)),
                                                                 (out_f, n), q))
        assert min(whole, key=lambda label: whole[label][0]) == want_scales == got[k].scales
        same = (got[k].value == whole[want_scales][1]).float().mean()
        assert same > 0.999, (k, float(same))  # (a matmul of another row count may round an ulp apart)


@pytest.mark.parametrize("width", [300, 1300])
def test_input_statistics_are_x_transpose_x(width):
    """Layers reading one input share one H = X^T X over all calls, accumulated (for wide inputs) a block at a
    time on and above the diagonal and mirrored when taken: against float64."""
    from qlora_kit.rounding import InputStats
    torch.manual_seed(3)
    q, k = torch.nn.Linear(width, 8), torch.nn.Linear(width, 4)
    stats = InputStats({})
    xs = [torch.randn(2, 37, width) for _ in range(3)]
    with stats.collecting({"q": q, "k": k}), torch.no_grad():
        for x in xs:
            q(x), k(x)
    assert stats.key == {"q": "q", "k": "q"}
    h = stats.pop("q")
    x = torch.cat([x.reshape(-1, width) for x in xs]).double()
    assert rel_err(h.double(), x.t() @ x) < 1e-6 and torch.equal(h, h.t())
    assert stats.pop("q") is None


@pytest.mark.parametrize("kind", ["nf4", "int8", "q4_1"])
def test_gptq_matches_an_independent_float64_reference(kind):
    """The fast loop (float32, lazy batches, stacked layout) chooses the codes the plain algorithm does."""
    from qlora_kit import gguf_types
    torch.manual_seed(1)
    out_f, in_f = 24, 192
    w = torch.randn(out_f, in_f) * 0.3
    x = torch.randn(256, in_f) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f))
    h = x.t() @ x
    if kind == "nf4":  # value = table[code] * absmax, per 64 consecutive values
        table = qk.formats.code_table("nf4").double()
        scales = torch.rand(out_f * in_f // 64) + 0.5
        grid = Grid.four_bit(table.float(), scales, (out_f, in_f), 64)
        s = scales.double().view(out_f, in_f // 64)
        m = torch.zeros_like(s)
        group = 64
    elif kind == "int8":  # value = code * scale, per row, codes -127..127
        table = torch.arange(-127, 128).double()
        s = (w.abs().amax(1, keepdim=True) / 127).double()
        grid = Grid(s.float(), in_f)
        m, group = torch.zeros_like(s), in_f
    else:  # GGUF q4_1: value = code * d + m, codes 0..15, per 32 columns
        table = gguf_types.table("q4_1").double()
        d, mins = torch.rand(out_f, in_f // 32) * 0.05 + 0.02, -torch.rand(out_f, in_f // 32) * 0.4
        grid = Grid(d, 32, table.float(), mins)
        s, m, group = d.double(), mins.double(), 32

    def decode(c, j):
        return table[c] * s[:, j // group] + m[:, j // group]

    def nearest(col, j):
        c = ((col[:, None] - m[:, j // group, None]) / s[:, j // group, None] - table).abs().argmin(-1)
        return c, decode(c, j)

    ref = _gptq_reference(w, h, nearest)
    got = gptq_codes(w, h, grid).long()
    if kind == "int8":
        got = got + 127  # codes are the integers themselves; the reference's are indices into -127..127
    agree = (got == ref).float().mean().item()
    assert agree > 0.99, agree  # float32 against float64: a rare near-tie may round the other way
    d = {k: torch.stack([decode(c[:, j], j) for j in range(in_f)], 1) - w.double() for k, c in (("got", got),
                                                                                             ("ref", ref))}
    err = {k: (x.double() @ v.t()).square().sum(0) for k, v in d.items()}  # per row: ||X (Q - W)^T||^2
    assert err["got"].sum() < 1.01 * err["ref"].sum(), err
    # the output error the loop reports at no extra cost, less the damping it rounded with
    _, energy = gptq_codes(w, h, grid, return_energy=True)
    energy = energy.double() - energy_correction(d["got"].float(), h).double()
    torch.testing.assert_close(energy, err["got"], rtol=1e-4, atol=0)  # fp32 loop against float64: 2.4e-5 seen


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", "q4_0", "q4_1"])
def test_gptq_many_rounds_each_problem_as_alone(quant):
    """Weights with their own H, stacked into one column loop with padding rows (different row counts), get the
    codes each gets alone, and the same output error; inputs 224 wide: a partial last block of columns, and nf4 /
    fp4 blocks of 64 running across rows."""
    from qlora_kit import formats, gguf_types, rounding
    from qlora_kit.config import QuantConfig

    torch.manual_seed(7)
    n = 224 if quant not in gguf_types.TYPES else 256  # GGUF blocks of 32 along each row
    q = QuantConfig(quant=quant, compute_dtype=torch.float32, blocksize=64)
    problems, alone = [], []
    for rows in (40, 18, 32):
        w = torch.randn(rows, n)
        x = torch.randn(300, n) * torch.linspace(0.2, 2, n)[torch.randperm(n)]
        h = x.t() @ x
        like = gguf_types.quantize(w, quant) if quant in gguf_types.TYPES else formats.quantize(w, q, codes=False)
        grid = rounding._grid(like, (rows, n), q)
        alone.append(gptq_codes(w, h, grid, return_energy=True))
        problems.append((w.t().contiguous(), rounding.gptq_factor(h), grid))
    got = rounding.gptq_many(problems)
    for (codes, energy), (ref_codes, ref_energy) in zip(got, alone, strict=True):
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(energy, ref_energy, rtol=1e-5, atol=0)  # batched matmuls: 2e-6 seen


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


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(run_model, text_file, trained, tmp_path, monkeypatch,
                                                            capsys):
    import errno

    import qlora_kit.io as qio
    from qlora_kit.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qio.shutil, "copyfileobj", full)  # the shard's body is copied after its header
    with pytest.raises(OSError, match="disk full while writing model-00001.safetensors"):
        merge(mcfg(run_model, text_file, trained, tmp_path / "out", format="bf16"), log=lambda s: None)
    assert [p.name for p in Path(tmp_path).iterdir()] == []
    args = ["merge", "--model", str(run_model), "--adapter", str(trained), "--out", str(tmp_path / "cli"),
            "--format", "nf4", "--eval-data", str(text_file), "--seq-len", "32", "--calib-tokens", "256"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk full while writing" in err and "MiB free" in err
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


def test_streamed_evaluation_matches_plain_transformers_on_the_export(run_model, text_file, trained, tmp_path):
    """The export's perplexity comes from activations carried block by block through the stored values; a
    plain transformers load of the written folder, scored whole, is the independent reference."""
    from qlora_kit.evaluate import score
    from qlora_kit.merge import _eval_and_calibration

    for fmt, tol in (("fp32", 1e-4), ("nf4", 2e-2)):
        cfg = mcfg(run_model, text_file, trained, tmp_path / fmt, format=fmt)
        m = merge(cfg, log=lambda s: None)["model_metrics"]
        kwargs = {"device_map": "cpu"} if fmt == "nf4" else {}
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / fmt, dtype=torch.float32, **kwargs).eval()
        ev, _ = _eval_and_calibration(cfg, AutoTokenizer.from_pretrained(run_model), log=lambda s: None)
        with qk.formats.exact_bitsandbytes(exported):
            ppl, _ = score(exported, ev, 4)
        assert abs(m["ppl_merged"] / ppl - 1) < tol, (fmt, m["ppl_merged"], ppl)
        ref = unmerged(run_model, trained)
        ppl_ref, _ = score(ref, ev, 4)
        assert abs(m["ppl_unmerged"] / ppl_ref - 1) < 1e-4
        with qk.adapter_disabled(ref):
            assert abs(m["ppl_base"] / score(ref, ev, 4)[0] - 1) < 1e-4
        # KL(unmerged || export) per scored token and the logits' relative error, from whole-model logits
        rows = ev.select(slice(None))
        keep = rows["labels"][:, 1:] != -100
        with torch.no_grad(), qk.formats.exact_bitsandbytes(exported):
            got, want = (mdl(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1][keep]
                         .double() for mdl in (exported, ref))
        kl = float((want.softmax(-1) * (want.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean())
        assert m["kl_merged_vs_unmerged"] == pytest.approx(kl, rel=tol, abs=1e-6), (fmt, m, kl)
        assert m["logits_rel_err"] == pytest.approx(float((got - want).norm() / want.norm()), rel=tol, abs=1e-5)


def test_merge_holds_about_one_block_not_the_model(text_file, tmp_path):
    """Allocator peak of the merge on 8 blocks against 2: the 6 extra blocks (4x the weights) must add
    well under two blocks' worth. The checkpoints are saved in small shards: an open safetensors file
    counts in torch's allocator at its full size (a mapped view, not resident memory)."""
    from qlora_kit.memory.observed import ObservedPeak

    from .conftest import make_tokenizer

    peaks = {}
    for n in (2, 8):
        folder = tmp_path / f"m{n}"
        tok = make_tokenizer(folder)
        torch.manual_seed(0)
        from transformers import LlamaConfig
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=n, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None))
        model.save_pretrained(folder, max_shard_size="1MB")
        q = qk.load_quantized(folder)
        qk.add_lora(q, r=4, alpha=8, dropout=0.0)
        for layer in qk.lora_layers(q).values():
            torch.nn.init.normal_(layer.lora_B, std=0.01)
        qk.save_adapter(q, tmp_path / f"ad{n}")
        del q, model
        obs = ObservedPeak("cpu").start()
        obs.reset_peak()
        merge(MergeConfig(model=str(folder), adapter=str(tmp_path / f"ad{n}"), out=str(tmp_path / f"o{n}"),
                          format="bf16", eval_data=str(text_file), seq_len=32, eval_sequences=4, calib_tokens=128),
              log=lambda s: None)
        peaks[n] = obs.stop().allocated_peak
    block = (4 * 256 * 256 + 3 * 256 * 512) * 4  # one block's weights in fp32
    assert peaks[8] - peaks[2] < 2 * block, (peaks, block)
    # the untied head, read only at the end, is written and scored like the rest
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "o8", dtype=torch.float32)
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "m8", dtype=torch.float32)
    assert torch.equal(exported.lm_head.weight, source.lm_head.weight.to(torch.bfloat16).float())
    assert torch.equal(exported.model.embed_tokens.weight, source.model.embed_tokens.weight.to(torch.bfloat16).float())
    report = json.loads((tmp_path / "o8" / "merge_report.json").read_text())
    assert report["model_metrics"]["ppl_merged"] == pytest.approx(report["model_metrics"]["ppl_unmerged"], rel=0.02)


def test_plan_dry_run_and_refusal(run_model, text_file, trained, tmp_path, monkeypatch, capsys):
    import qlora_kit.merge_report as mr
    from qlora_kit.cli import main

    lines = []
    plan = merge(mcfg(run_model, text_file, trained, tmp_path / "dry", format="nf4", dry_run=True),
                 log=lines.append)["plan"]
    assert not (tmp_path / "dry").exists() and any(x.startswith("plan: 2 blocks; peak memory about") for x in lines)
    merge(mcfg(run_model, text_file, trained, tmp_path / "real", format="nf4", eval=False), log=lambda s: None)
    written = sum(f.stat().st_size for f in (tmp_path / "real").glob("*.safetensors"))
    assert 0.8 < plan["output_bytes"] / written <= 1  # headers and quant-state blobs: 12% of this tiny export
    report = json.loads((tmp_path / "real" / "merge_report.json").read_text())
    assert "no-eval" in report["model_metrics"]["skipped"]
    monkeypatch.setattr(mr, "system_available", lambda: 2**20)  # a machine with 1 MiB free
    with pytest.raises(ValueError, match="needs about .* at its peak, but this machine has 0.00 GiB available"):
        merge(mcfg(run_model, text_file, trained, tmp_path / "small"), log=lambda s: None)
    assert not (tmp_path / "small").exists()
    args = ["merge", "--model", str(run_model), "--adapter", str(trained), "--out", str(tmp_path / "small"),
            "--eval-data", str(text_file), "--seq-len", "32", "--calib-tokens", "256"]
    assert main(args) == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(args + ["--force", "--no-eval"]) == 0 and (tmp_path / "small" / "model.safetensors").is_file()


def test_short_calibration_text_is_refused(run_model, text_file, trained, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only. " * 20)
    with pytest.raises(ValueError, match="short.txt: calibration text gives .* fewer than --calib-tokens 4096"):
        merge(mcfg(run_model, text_file, trained, tmp_path / "o", calib_data=str(short), calib_tokens=4096),
              log=lambda s: None)
    assert not (tmp_path / "o").exists()


def scaled_adapter(trained, folder, scale):
    from safetensors import safe_open
    from safetensors.torch import save_file
    folder.mkdir()
    with safe_open(str(trained / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) * (scale if "lora_B" in k else 1) for k in f.keys()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=meta)
    (folder / "adapter_config.json").write_text((trained / "adapter_config.json").read_text())
    return folder


def test_a_gain_inside_the_noise_is_not_measurable(run_model, text_file, trained, tmp_path):
    """An adapter that changes nothing, and one whose update is far below bf16's rounding: kept gain reads
    'not measurable', not a ratio of noise."""
    from qlora_kit.merge_report import format_report, gain

    report = merge(mcfg(run_model, text_file, scaled_adapter(trained, tmp_path / "zero", 0), tmp_path / "o",
                        format="bf16"), log=lambda s: None)
    m = report["model_metrics"]
    assert m["kept_gain"] is None and m["kept_gain_note"].startswith("not measurable")
    assert "not measurable" in format_report(report)
    tiny = merge(mcfg(run_model, text_file, scaled_adapter(trained, tmp_path / "tiny", 1e-4), tmp_path / "t",
                      format="bf16"), log=lambda s: None)["model_metrics"]
    assert tiny["kept_gain"] is None and "rounding floor" in tiny["kept_gain_note"]
    assert tiny["rounding_floor_nats_per_token"] > abs(tiny["gain_nats_per_token"]) / 2
    real = merge(mcfg(run_model, text_file, trained, tmp_path / "r", format="bf16"), log=lambda s: None)
    assert real["model_metrics"]["kept_gain"] is not None  # the trained adapter's gain stands out of the noise
    # the rule itself: per-sequence (nll sum, tokens); gains of mixed sign around zero are noise
    base = [(100.0, 50)] * 6
    noisy = [(100.0 + d, 50) for d in (3, -2, 4, -3, 2, -3.5)]
    ppl = {"base": 7.0, "unmerged": 6.99, "export": 6.995}
    assert gain(base, noisy, base, ppl)["kept_gain"] is None
    steady = [(100.0 - d, 50) for d in (3, 2.5, 3.5, 3, 2.8, 3.1)]
    assert abs(gain(base, steady, base, ppl)["kept_gain"] - 0.5) < 1e-9
    rounded = [(100.0 + 2.0, 50)] * 6  # the export's format alone costs more than the gain
    assert "rounding floor" in gain(base, steady, rounded, ppl)["kept_gain_note"]
