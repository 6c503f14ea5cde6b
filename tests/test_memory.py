"""Memory: the arithmetic of the static parts against real tensors, the estimate against measured steps,
fitting a budget, sweeps, and bad configs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora_kit as qk
from qlora_kit import allocator, memory
from qlora_kit.cli import main
from qlora_kit.config import QuantConfig, TrainConfig
from qlora_kit.formats import bytes_per_weight, make_optimizer, packed_layout, quantize
from qlora_kit.layers import QuantLinear
from qlora_kit.memory.observed import ObservedPeak
from qlora_kit.patch import enable_checkpointing

from .conftest import make_model, tiny_config
from .families import small_config

LLAMA3_8B = Path(__file__).parent.parent / "examples" / "configs" / "llama-3-8b.json"


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared or tied tensor counts once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    """config.json-only folders of small models (no weights: the estimate needs none)."""
    out = {}
    for arch in ("llama", "gpt2", "phi3", "qwen2", "mistral"):
        d = tmp_path_factory.mktemp(f"cfg-{arch}")
        sizes = {} if arch == "gpt2" else dict(hidden_size=128, intermediate_size=256)
        if arch == "mistral":  # a sliding window: transformers builds an explicit attention mask
            sizes["sliding_window"] = 96
        tiny_config(arch, vocab_size=1000, max_position_embeddings=512, **sizes).save_pretrained(d)
        out[arch] = d
    d = tmp_path_factory.mktemp("cfg-qwen3_moe")  # experts: packed per expert, activations by routed tokens
    moe = small_config("qwen3_moe")
    moe.vocab_size, moe.hidden_size, moe.moe_intermediate_size, moe.max_position_embeddings = 1000, 128, 64, 512
    moe.num_experts, moe.num_experts_per_tok = 8, 2
    moe.save_pretrained(d)
    out["qwen3_moe"] = d
    return out


# ---- the counter itself ---------------------------------------------------------------------------

def test_live_tensor_count_follows_allocations_views_and_frees():
    tr = memory.LiveTensors()
    with tr:
        a = torch.ones(1000)  # 4000 B
        v = a[10:20].view(2, 5)  # a view: no new storage
        b = torch.zeros(500, dtype=torch.float64)  # 4000 B
        assert tr.current == 8000
        del a  # the view keeps a's storage alive
        assert tr.current == 8000
        del v
        assert tr.current == 4000
        c = b * 2  # a new 4000 B tensor
        tr.phase = "logits & loss"
        d = torch.empty(250, dtype=torch.int8)  # 250 B in another category
        assert tr.by_category == {**dict.fromkeys(memory.CATEGORIES, 0), "activations": 8000, "logits & loss": 250}
        del b, c, d
    assert tr.current == 0 and tr.peak == 8250
    assert tr.at_peak["activations"] == 8000 and tr.at_peak["logits & loss"] == 250
    w = torch.ones(10)
    tr.add(w, "LoRA parameters")
    tr.add(w, "LoRA gradients")  # counted once, re-filed
    assert tr.by_category["LoRA gradients"] == 40 and tr.by_category["LoRA parameters"] == 0 and tr.current == 40


def test_live_count_of_one_layer_step_is_the_hand_arithmetic():
    """A reference for the counter that does not come from it: one LoRA layer (nf4, double quant, fp32, dropout)
    trained one step; what is alive after the forward and after the backward, summed by hand from the shapes."""
    T, n_in, n_out, r = 64, 128, 96, 8
    cfg = QuantConfig(quant="nf4", double_quant=True, blocksize=64, compute_dtype=torch.float32)
    layer = QuantLinear.from_dense(torch.randn(n_out, n_in), cfg)
    layer.attach_lora(r, 16.0, dropout=0.1)
    layer.train()
    x, g = torch.randn(T, n_in, requires_grad=True), torch.randn(T, n_out)
    blocks = n_out * n_in // 64
    packed = n_out * n_in // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)  # codes, scales, tables
    lora = 4 * r * (n_in + n_out)
    inputs = 4 * T * (n_in + n_out)  # x and the output gradient
    tr = memory.LiveTensors()
    for t in [*layer.packed().values(), layer.lora_A, layer.lora_B, x, g]:
        tr.add(t, "LoRA parameters" if t.requires_grad else "quantized weights")
    assert tr.current == packed + lora + inputs
    with tr:
        y = layer(x)
        # the output, the (tokens, r) product and a 1-byte dropout mask; nothing dense of the weight
        assert tr.current == packed + lora + inputs + 4 * T * n_out + 4 * T * r + T * n_in
        y.backward(g)
        # saved tensors gone; the gradients of x, A and B
        assert tr.current == packed + lora + inputs + 4 * T * n_out + 4 * T * n_in + lora
    # during the backward the weight was dequantized (fp32) beside the input gradient
    assert tr.peak >= packed + lora + inputs + 4 * T * n_out + 4 * n_out * n_in + 4 * T * n_in


# ---- the arithmetic of the static parts -----------------------------------------------------------

@pytest.mark.parametrize("quant,double_quant,blocksize", [
    ("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128), ("nf4", True, 4096), ("int8", True, 64),
    ("none", True, 64)])
@pytest.mark.parametrize("shape", [(256, 128), (96, 160), (4096, 64)])
def test_packed_layout_is_what_quantize_makes(quant, double_quant, blocksize, shape):
    cfg = QuantConfig(quant=quant, double_quant=double_quant, blocksize=blocksize, compute_dtype=torch.bfloat16)
    if quant in ("nf4", "fp4") and shape[0] * shape[1] % blocksize:
        pytest.skip("does not split into blocks")
    packed = quantize(torch.randn(shape), cfg)
    layout = packed_layout(*shape, cfg)
    assert {k: (tuple(t.shape), t.dtype) for k, t in packed.items()} == layout


def test_bytes_per_weight_is_the_qlora_arithmetic():
    nf4 = QuantConfig(quant="nf4", double_quant=True, blocksize=64)
    assert bytes_per_weight(nf4) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))  # 0.5159
    assert bytes_per_weight(QuantConfig(quant="nf4", double_quant=False)) == pytest.approx(0.5625)
    w = torch.randn(1024, 1024)
    tables = 4 * (16 + 256 + 1)  # code table, level-2 code table, offset: per layer, whatever its size
    assert storage_bytes(quantize(w, nf4).values()) == bytes_per_weight(nf4) * w.numel() + tables


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "qwen2"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_static_components_match_a_loaded_model(model_dirs, arch, quant):
    """Quantized weights, unquantized weights and LoRA parameters of the estimate equal the exact byte
    counts of the model load_quantized + add_lora build from the same folder."""
    cfg = TrainConfig(model=str(model_dirs[arch]), quant=quant, rank=8, seq_len=16, batch_size=1)
    est = memory.estimate(cfg, "cpu", compare=False)
    model = qk.load_quantized(model_dirs[arch], quant=quant, compute_dtype=torch.float32)
    qk.add_lora(model, r=8)
    packed = [t for m in model.modules() if isinstance(m, QuantLinear) for t in m.packed().values()]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    packed_ids = {t.untyped_storage()._cdata for t in packed}
    other = [t for n, t in [*model.named_parameters(), *model.named_buffers()]
             if "lora_" not in n and t.untyped_storage()._cdata not in packed_ids]
    assert est.components["quantized weights"] == storage_bytes(packed)
    assert est.components["LoRA parameters"] == storage_bytes(lora)
    assert est.components["unquantized weights"] == storage_bytes(other)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_optimizer_state_formula_matches_the_optimizers(name):
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(16, 300), (64, 16), (4096, 8), (8, 8), (1, 4096)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_optimizer(name, params, 1e-3)
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert storage_bytes(state) == memory.optimizer_state_bytes([p.numel() for p in params], name)


def test_llama3_8b_weights_are_the_arithmetic():
    """nf4 + double quant: ~0.516 bytes per quantized value, plus 16-bit embeddings and head."""
    cfg = TrainConfig(model=str(LLAMA3_8B), seq_len=64, batch_size=1)
    est = memory.estimate(cfg, "cuda", compare=False)
    h, inter, layers, vocab, kv = 4096, 14336, 32, 128256, 1024
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # q k v o gate up down
    quantized = layers * sum(o * i for o, i in per_layer)
    assert est.model["quantized_params"] == quantized == 6_979_321_856
    per_weight = est.components["quantized weights"] / quantized
    assert 0.515 < per_weight < 0.517
    blocks = [o * i // 64 for o, i in per_layer]
    exact = layers * sum(o * i // 2 + b + 4 * math.ceil(b / 256) + 4 * (16 + 256 + 1)
                         for (o, i), b in zip(per_layer, blocks, strict=True))
    assert est.components["quantized weights"] == exact
    embed_and_head = 2 * vocab * h * 2  # untied, bf16
    norms = (2 * layers + 1) * h * 2
    rotary = 64 * 4  # inv_freq (head_dim / 2, fp32), and transformers keeps a copy as original_inv_freq
    assert est.components["unquantized weights"] in (embed_and_head + norms + rotary, embed_and_head + norms + 2 * rotary)
    lora = layers * 16 * sum(o + i for o, i in per_layer)
    assert est.components["LoRA parameters"] == 4 * lora
    assert est.components["optimizer state"] == 8 * lora + 4 * 7 * layers * 2


# ---- the ground truth: the allocator's own count, and the process ------------------------------------

def test_cpu_allocator_peak_counts_the_blocks_of_the_window():
    """Exact bytes: what was live when the window opened plus the largest rise in it; blocks allocated before
    recording are not in it, and their frees do not count against it."""
    before = torch.empty(2**20)
    obs = ObservedPeak("cpu").start()
    kept = torch.empty(2**20)  # 4 MiB live when the window opens
    del before
    obs.reset_peak()
    a, b = torch.empty(2**21), torch.empty(2**21)  # 8 + 8
    del a
    c = torch.empty(2**22)  # 4 + 8 + 16 = 28 MiB, the peak
    del b, c
    obs.stop()
    assert obs.allocated_peak == 28 * 2**20 and kept.numel() == 2**20
    assert obs.rss_peak >= obs.rss_start > 0


def test_cpu_allocator_peak_is_not_fooled_by_an_earlier_recording():
    """c10 remembers the sizes of blocks recorded before: their frees in a later recording must not count."""
    first = ObservedPeak("cpu").start()
    x = torch.empty(2**18)  # 1 MiB, recorded
    first.reset_peak()
    first.stop()
    del x
    y = torch.empty(2**16)  # 256 KiB, not recorded (often at the address x had)
    second = ObservedPeak("cpu").start()
    del y
    second.reset_peak()
    a = torch.empty(3 * 2**20)
    del a
    second.stop()
    assert second.allocated_peak == 12 * 2**20


def test_cpu_allocator_sees_buffers_inside_operators_that_no_tensor_count_sees():
    q = torch.randn(2, 4, 256, 64)
    obs = ObservedPeak("cpu").start()
    obs.reset_peak()
    live = memory.LiveTensors()
    with live:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    obs.stop()
    assert out.nbytes <= live.peak < obs.allocated_peak  # the flash kernel's per-thread score blocks


def test_the_profilers_own_lines_stay_out_of_the_terminal(capfd):
    obs = ObservedPeak("cpu").start()
    gone = torch.empty(2**20)
    del gone
    print("a line of the run's own", file=sys.stderr)
    obs.reset_peak()
    obs.stop()
    err = capfd.readouterr().err
    assert err == "a line of the run's own\n", err


def test_measure_under_the_users_own_profiler_counts_live_tensors_and_says_so(small_dirs):
    cfg = TrainConfig(model=str(small_dirs["llama"]), seq_len=32, batch_size=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rep = memory.measure(cfg, "cpu")
    assert rep.allocator_peak is None and rep.total == rep.peak > 0
    assert "another one is running" in rep.notes[0]
    assert len(prof.events()) > 0  # the user's profile is intact


def test_release_between_layers_trims_at_every_layer_both_ways(monkeypatch):
    model = make_model("llama")
    calls = []
    monkeypatch.setattr(allocator, "trim", lambda: calls.append(1))
    handle = allocator.release_between_layers(model)
    calls.clear()  # the one trim of installing
    layers = len(model.model.layers)
    assert len(handle.handles) == layers
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2 * layers  # after each forward, and as backward reaches each layer's output
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 2 * layers  # evaluation and generation are left alone
    handle.remove()
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert calls == []
    model.train()
    enable_checkpointing(model)  # the recomputation runs inside backward, after the layer's trim
    handle = allocator.release_between_layers(model)
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2 * layers
    handle.remove()
    assert allocator.release_between_layers(model.to("meta")).handles == []  # not on the CPU: nothing


@pytest.mark.slow
def test_process_peak_rss_follows_the_allocator_peak(tmp_path):
    """The two views of the machine agree: over the measured steps the process grows by about the allocator's
    peak once freed memory is handed back between layers (the default). Without that, the same run grew
    1.6x the allocator peak here."""
    out = subprocess.run([sys.executable, "-m", "qlora_kit", "memory", "--measure", "--json", "--device", "cpu",
                          "--seq-len", "128", "--batch-size", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    meas = json.loads(out.stdout)["measured"]
    grown, allocated = meas["rss_peak"] - meas["rss_start"], meas["allocator_peak"]
    assert meas["total"] == allocated > meas["peak"] * 0.99
    assert 0.85 * allocated < grown < 1.2 * allocated + 128 * 2**20, (grown, allocated)


# ---- estimate against measurement ------------------------------------------------------------------

SWEEP = {
    "llama": {"rank": [8, 64], "seq_len": [32, 256], "gradient_checkpointing": [False, True]},
    "gpt2": {"seq_len": [64, 256], "quant": ["nf4", "int8"], "optimizer": ["adamw", "adamw8bit"]},
    "phi3": {"batch_size": [1, 4], "quant": ["fp4", "none"], "gradient_checkpointing": [False, True]},
    "qwen2": {"rank": [4, 32], "seq_len": [16, 128], "optimizer": ["paged_adamw8bit"], "double_quant": [True, False]},
    "mistral": {"seq_len": [64, 384], "gradient_checkpointing": [False, True], "batch_size": [1, 2]},
    # tiny batches and big ranks: the optimizer step is the peak
    "llama-opt": {"rank": [64, 128], "seq_len": [4, 32], "optimizer": ["adamw", "adamw8bit"]},
    "qwen3_moe": {"seq_len": [32, 256], "gradient_checkpointing": [False, True], "quant": ["nf4", "int8"]},
}


@pytest.mark.parametrize("arch", list(SWEEP))
def test_estimate_is_within_15_percent_of_the_allocators_peak_across_a_sweep(small_dirs, arch, tmp_path):
    """The measured total is the allocator's own peak (observed.py), which shares no code with the estimate's
    live-tensor count."""
    cfg = TrainConfig(model=str(small_dirs[arch.split("-")[0]]), batch_size=2 if arch != "llama-opt" else 1,
                      seq_len=64)
    rows = memory.sweep(cfg, SWEEP[arch], "cpu", do_measure=True, log=lambda _: None)
    assert len(rows) == math.prod(len(v) for v in SWEEP[arch].values())
    for row in rows:
        assert abs(row["error"]) < 0.15, row
    memory.write_csv(rows, tmp_path / "sweep.csv")
    with open(tmp_path / "sweep.csv") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows) and int(back[0]["est_total"]) == rows[0]["est_total"]


def test_measurement_separates_the_components(small_dirs):
    """Measured static parts equal the estimate's; checkpointing shrinks what the forward keeps."""
    plain = TrainConfig(model=str(small_dirs["llama"]), seq_len=128, batch_size=2)
    ckpt = TrainConfig(model=str(small_dirs["llama"]), seq_len=128, batch_size=2, gradient_checkpointing=True)
    est, meas = memory.estimate(plain, "cpu"), memory.measure(plain, "cpu")
    for cat in (*memory.STATIC, "optimizer state"):
        assert meas.components[cat] == est.components[cat] > 0, cat
    assert meas.sizes["activations saved by the forward"] > 5 * memory.measure(ckpt, "cpu").sizes[
        "activations saved by the forward"]
    assert est.sizes["activations saved by the forward with checkpointing"] < est.sizes[
        "activations saved by the forward"]
    assert meas.components["logits & loss"] >= 2 * 128 * 1000 * 4  # at least the logits and their log-softmax
    text = memory.format_report(est, meas)
    assert "quantized weights" in text and "measured" in text and "peak" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_measurement_within_10_percent(small_dirs):
    for gc in (False, True):
        cfg = TrainConfig(model=str(small_dirs["llama"]), seq_len=512, batch_size=4, gradient_checkpointing=gc)
        est, meas = memory.estimate(cfg, "cuda", compare=False), memory.measure(cfg, "cuda")
        assert abs(est.total / meas.total - 1) < 0.10, (est.total, meas.total)


# ---- fit -------------------------------------------------------------------------------------------

def test_fit_finds_the_largest_sequence_length(small_dirs):
    cfg = TrainConfig(model=str(small_dirs["llama"]), batch_size=2)
    budget = memory.estimate(TrainConfig(model=cfg.model, batch_size=2, seq_len=300), "cpu", compare=False).total
    res = memory.fit(cfg, budget, "cpu")
    assert res.best == 256  # multiples of 64: 300 fits, 320 does not
    assert res.report.total <= budget
    nxt = memory.estimate(TrainConfig(model=cfg.model, batch_size=2, seq_len=320), "cpu", compare=False).total
    assert nxt > budget
    assert res.alternatives and res.alternatives[0]["switch"] == "gradient checkpointing"
    assert res.alternatives[0]["best"] > 256
    assert "largest sequence length" in memory.format_fit(res)


def test_fit_batch_size_and_what_to_switch_on_when_nothing_fits(small_dirs):
    cfg = TrainConfig(model=str(small_dirs["llama"]), seq_len=256)
    one = memory.estimate(TrainConfig(model=cfg.model, seq_len=256, batch_size=3), "cpu", compare=False).total
    assert memory.fit(cfg, one, "cpu", what="batch_size").best == 3
    ckpt = memory.estimate(TrainConfig(model=cfg.model, seq_len=512, batch_size=1, gradient_checkpointing=True),
                           "cpu", compare=False).total
    plain = memory.estimate(TrainConfig(model=cfg.model, seq_len=512, batch_size=1), "cpu", compare=False).total
    assert ckpt < plain
    res = memory.fit(TrainConfig(model=cfg.model, seq_len=512), (ckpt + plain) // 2, "cpu", what="batch_size")
    assert res.best is None
    switches = [a["switch"] for a in res.alternatives]
    assert "gradient checkpointing" in switches
    assert "nothing fits" in memory.format_fit(res) and "with gradient checkpointing" in memory.format_fit(res)


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("512MiB", 2**29),
                                        ("80G", 80 * 2**30), ("1000", 1000), ("1.5GiB", 3 * 2**29)])
def test_parse_size(text, value):
    assert memory.parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "24XB", "-1GiB", "0", ""])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_size(text)


def test_parse_size_zero_for_a_reserve():
    assert memory.parse_size("0", allow_zero=True) == 0 and memory.parse_size("0GiB", allow_zero=True) == 0


# ---- the command -----------------------------------------------------------------------------------

def test_cli_estimate_measure_json(small_dirs, capsys):
    config = small_dirs["llama"] / "config.json"
    assert main(["memory", "--model", str(config), "--seq-len", "64", "--batch-size", "2", "--device", "cpu",
                 "--measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est, meas = out["estimate"], out["measured"]
    assert est["method"] == "estimate" and meas["method"] == "measured" and meas["device"] == "cpu"
    assert meas["total"] == meas["allocator_peak"] >= 0.99 * meas["peak"]  # the allocator's view, not the count
    assert meas["rss_peak"] > meas["rss_start"] > 0 and meas["reserved_peak"] is None
    assert abs(est["total"] / meas["total"] - 1) < 0.15
    assert set(est["components"]) == set(memory.CATEGORIES)


def test_cli_fit_and_sweep(small_dirs, tmp_path, capsys):
    d = str(small_dirs["gpt2"])
    assert main(["memory", "--model", d, "--device", "cpu", "--fit", "40MiB", "--batch-size", "2"]) == 0
    assert "largest sequence length that fits in 40.00 MiB" in capsys.readouterr().out
    assert main(["memory", "--model", d, "--fit", "2GiB", "--reserve", "0", "--fit-for", "batch-size"]) == 0
    out = capsys.readouterr().out
    assert "largest batch size that fits in 2.00 GiB budget:" in out and "reserved" not in out
    csv_path, png = tmp_path / "s.csv", tmp_path / "s.png"
    assert main(["memory", "--model", d, "--device", "cpu", "--sweep", "rank=4,8", "--sweep", "seq-len=32,64",
                 "--measure", "--csv", str(csv_path), "--plot", str(png)]) == 0
    assert "4 rows written" in capsys.readouterr().out
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["rank"], r["seq_len"]) for r in rows] == [("4", "32"), ("4", "64"), ("8", "32"), ("8", "64")]
    assert all(abs(float(r["error"])) < 0.15 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write(tmp_path, obj) -> Path:
    p = tmp_path / "config.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


GOOD = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("change,match", [
    ({"model_type": None}, "no 'model_type' field"),
    ({"model_type": "llamaish"}, "unknown architecture model_type 'llamaish'"),
    ({"model_type": "vit"}, "not a causal language model"),
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"num_hidden_layers": None}, "missing field 'num_hidden_layers'"),
    ({"hidden_size": 0}, "field 'hidden_size' is 0"),
    ({"num_attention_heads": -4}, "field 'num_attention_heads' is -4"),
    ({"vocab_size": 0}, "field 'vocab_size' is 0"),
    ({"hidden_size": 65}, "not a multiple of the number of attention heads"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 8, "intermediate_size": 4}, "does not divide into blocks of 64"),
])
def test_bad_configs_give_one_line_errors(tmp_path, capsys, change, match):
    cfg = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = _write(tmp_path, cfg)
    assert main(["memory", "--model", str(path), "--device", "cpu", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("qlora-kit memory: error:")
    assert match in err, err


def test_gpt2_names_and_more_bad_inputs(tmp_path, capsys):
    path = _write(tmp_path, {"model_type": "gpt2", "vocab_size": 100, "n_embd": 64, "n_layer": 2})
    assert main(["memory", "--model", str(path), "--device", "cpu"]) == 2
    assert "missing field 'num_attention_heads' (or 'n_head')" in capsys.readouterr().err
    assert main(["memory", "--model", str(_write(tmp_path, "{not json")), "--device", "cpu"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["memory", "--model", str(tmp_path / "nope.json")]) == 2
    assert "no such config file" in capsys.readouterr().err
    good = _write(tmp_path, GOOD)
    for argv, match in [(["--seq-len", "0"], "seq-len 0 must be an integer >= 1"),
                        (["--rank", "-2"], "must be an integer >= 1"),
                        (["--seq-len", "100000"], "beyond the model's context"),
                        (["--fit", "lots"], "memory size 'lots'"),
                        (["--sweep", "colour=red"], "expected KEY=V1,V2"),
                        (["--sweep", "rank=,"], "no values"),
                        (["--sweep", "rank=4", "--sweep", "rank=8"], "swept twice"),
                        (["--sweep", "quant=nf5"], "--sweep point quant=nf5: unknown quantization format"),
                        (["--sweep", "rank=4", "--csv", str(tmp_path / "no" / "s.csv")], "does not exist"),
                        (["--fit", "1GiB", "--measure"], "--fit answers from the estimate alone"),
                        (["--measure", "--measure-steps", "0"], "--measure-steps 0 must be an integer >= 1"),
                        (["--sweep", "rank=a,b"], "--sweep 'rank=a,b'"),
                        (["--device", "tpu"], "--device 'tpu'")]:
        assert main(["memory", "--model", str(good), "--device", "cpu", *argv]) == 2, argv  # the last --device wins
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, (argv, err)


def test_cli_reads_a_training_yaml(small_dirs, tmp_path, capsys):
    """A run's YAML gives the model and settings; flags override it; settings memory ignores are accepted."""
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"model: {small_dirs['llama']}\nseq-len: 96\nbatch-size: 3\nsteps: 500\nlr: 0.0002\n")
    assert main(["memory", "--config", str(yaml), "--device", "cpu", "--rank", "4", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)["estimate"]
    assert est["settings"]["seq_len"] == 96 and est["settings"]["batch_size"] == 3 and est["settings"]["rank"] == 4
    assert est["model"]["config"] == str(small_dirs["llama"] / "config.json")


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_experts_count_by_their_packed_bytes(small_dirs, quant):
    """An MoE estimate's static parts equal the bytes of the model built for real: every expert packed."""
    from qlora_kit.experts import expert_stacks
    from qlora_kit.memory.models import random_model

    cfg = TrainConfig(model=str(small_dirs["qwen3_moe"]), quant=quant, rank=4, seq_len=16, batch_size=1)
    est = memory.estimate(cfg, "cpu", compare=False)
    model = random_model(memory.read_model_config(cfg.model), cfg, "cpu")
    stacks = expert_stacks(model)
    assert len(stacks) == 2 * 2 and all(len(s) == 8 for s in stacks.values())
    packed = [t for m in model.modules() if isinstance(m, QuantLinear) for t in m.packed().values()]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert est.components["quantized weights"] == storage_bytes(packed)
    assert est.components["LoRA parameters"] == storage_bytes(lora)
    assert est.model["quantized_params"] == sum(m.in_features * m.out_features for m in model.modules()
                                                if isinstance(m, QuantLinear))
