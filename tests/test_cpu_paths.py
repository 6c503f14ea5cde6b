"""The same answers whichever path bitsandbytes picks for this CPU.

bitsandbytes decides by the instruction set: AVX512-BF16 CPUs repack a Linear4bit's weight with bf16 scales
at its first no-grad evaluation (`support_avx512bf16_for_cpu`, read from `has_avx512bf16()`), AVX512 CPUs
take another dequantization kernel (which decodes blocks spanning two rows with the wrong scale) and an exact
int8 matmul, the others a float32 one. Each test here forces bitsandbytes' decision both ways through those
flags, so a machine of either kind runs both paths, and checks the package's answer against the references
of tests/reference.py.
"""

import bitsandbytes as bnb
import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
import pytest
import torch

from qlora_kit import formats
from qlora_kit.config import QuantConfig

from . import reference
from .conftest import rel_err

BOTH = pytest.mark.parametrize("avx512bf16", [False, True], ids=["avx2-path", "avx512bf16-path"])


def bnb_linear(packed: dict, fmt: str, shape, blocksize: int, avx512bf16: bool) -> bnb.nn.Linear4bit:
    """bitsandbytes' own Linear4bit over our packed weight, read back as transformers reads an export."""
    stats = {k.removeprefix("weight."): v for k, v in
             formats.bnb_checkpoint_tensors(packed, fmt, shape, blocksize, torch.float32).items() if k != "weight"}
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.float32, quant_type=fmt)
    layer.weight = bnb.nn.Params4bit.from_prequantized(packed["weight"], stats, device="cpu", module=layer)
    layer.support_avx512bf16_for_cpu = avx512bf16  # what bitsandbytes would have decided on that CPU
    return layer.eval()


@BOTH
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 2048])
def test_bitsandbytes_modules_compute_exactly_under_the_guard(avx512bf16, fmt, double_quant, blocksize):
    shape = (64, 320)  # 320 is no multiple of 128, 256 or 2048: blocks span rows; 64 rows: the repacking's 32
    g = torch.Generator().manual_seed(0)
    packed = formats.quantize(torch.randn(shape, generator=g) * 0.02,
                              QuantConfig(quant=fmt, double_quant=double_quant, blocksize=blocksize))
    w = reference.decode_4bit(packed, fmt, shape, blocksize).double()
    x = torch.randn(5, shape[1], generator=g)
    layer = bnb_linear(packed, fmt, shape, blocksize, avx512bf16)
    with torch.no_grad(), formats.exact_bitsandbytes(layer):
        y = layer(x)
    assert not layer.support_avx512bf16_for_cpu  # the switch stays off
    assert rel_err(y, x.double() @ w.t()) < 1e-6


@pytest.mark.parametrize("has_avx512", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 2048, 4096])
def test_dequantize_ignores_bitsandbytes_cpu_kernel_choice(monkeypatch, has_avx512, blocksize):
    """bitsandbytes' CPU dequantization switches kernels on `_has_avx512` (and falls back above 2048); the
    package's decode is its own and the same either way."""
    monkeypatch.setattr(bnb_cpu_ops, "_has_avx512", has_avx512)
    shape = (256, 80)
    packed = formats.quantize(torch.randn(shape) * 0.02, QuantConfig(quant="nf4", blocksize=blocksize))
    assert torch.equal(formats.dequantize(packed, "nf4", shape, blocksize, torch.float32),
                       reference.decode_4bit(packed, "nf4", shape, blocksize))


def test_int8_matmul_under_the_guard_is_exact_and_the_guard_restores_bitsandbytes():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(100, 128, (2, 3, 3000), generator=g, dtype=torch.int8)
    b = torch.randint(100, 128, (5, 3000), generator=g, dtype=torch.int8)
    with formats.exact_bitsandbytes():
        inside = torch.ops.bitsandbytes.int8_linear_matmul(a, b)
        for op in ("dequantize_4bit", "dequantize_blockwise", "int8_linear_matmul"):
            assert "formats.py" in cpu_kernel(op)
    assert torch.equal(inside.long(), a.long() @ b.long().t())
    for op in ("dequantize_4bit", "dequantize_blockwise", "int8_linear_matmul"):
        assert "formats.py" not in cpu_kernel(op)


def cpu_kernel(op: str) -> str:
    table = torch._C._dispatch_dump_table(f"bitsandbytes::{op}")
    return "\n".join(line for line in table.splitlines() if line.startswith("CPU"))


def test_a_weight_already_repacked_is_refused():
    """A Linear4bit that already ran on the repacked path (as it does on AVX512-BF16 CPUs) holds bf16 block
    scales, which cannot be undone: the guard says so in one line. The repacking is plain torch, so it is
    forced here on any CPU."""
    shape, blocksize = (64, 128), 64
    packed = formats.quantize(torch.randn(shape) * 0.02, QuantConfig(quant="nf4", blocksize=blocksize))
    model = torch.nn.Sequential(bnb_linear(packed, "nf4", shape, blocksize, avx512bf16=False))
    weight = model[0].weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with pytest.raises(ValueError, match=r"^0: bitsandbytes has already repacked") as e:
        with formats.exact_bitsandbytes(model):
            pass
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def run_at_128(run_model, text_file, tmp_path_factory):
    """An adapter trained on a base quantized in blocks of 128: the tiny model's rows are 64 wide, so every
    block spans two rows."""
    import qlora_kit as qk
    from qlora_kit.train import train

    out = tmp_path_factory.mktemp("run128") / "run"
    train(qk.config.TrainConfig(model=str(run_model), data=str(text_file), out=str(out), steps=4, seq_len=32,
                                lr=1e-2, rank=4, blocksize=128, sample_tokens=0, eval_sequences=4,
                                eval_fraction=0.1, device="cpu", save_every=0),
          log=lambda s: None, progress=False)
    return out / "adapter"


class DecodedLinear(torch.nn.Module):
    """A linear layer computing as bitsandbytes' Linear4bit does: input and weight in the compute dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def decoded_export(folder):
    """Plain transformers with every bitsandbytes weight of an export decoded by tests/reference.py into the
    export's compute dtype, and the other tensors in the export's dtype: what transformers builds when it loads
    the export (it keeps a bitsandbytes checkpoint's unquantized tensors in the checkpoint's dtype)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    compute = getattr(torch, config.quantization_config["bnb_4bit_compute_dtype"])
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype).eval()
    tensors = load_file(str(folder / "model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            blob = tensors.get(f"{key}.quant_state.bitsandbytes__nf4")
            if key in params and blob is None:
                params[key].copy_(t)
            elif key in params:
                meta = json.loads(bytes(blob.tolist()))
                packed = {"weight": t, "absmax": tensors[f"{key}.absmax"]}
                if f"{key}.nested_absmax" in tensors:
                    packed.update(nested_absmax=tensors[f"{key}.nested_absmax"],
                                  nested_quant_map=tensors[f"{key}.nested_quant_map"],
                                  offset=torch.tensor([meta["nested_offset"]]))
                w = reference.decode_4bit(packed, "nf4", tuple(meta["shape"]), meta["blocksize"], compute)
                parent, name = key.removesuffix(".weight").rsplit(".", 1)
                setattr(model.get_submodule(parent), name, DecodedLinear(w))
    return model


@BOTH
def test_merge_scores_its_export_the_same_on_either_path(monkeypatch, run_model, text_file, run_at_128, tmp_path,
                                                         avx512bf16):
    """The merge report's perplexity of the export (streamed through the stored values) equals the perplexity of
    the export's tensors decoded independently, whatever bitsandbytes believes about this CPU."""
    import bitsandbytes.nn.modules as bnb_modules
    from transformers import AutoTokenizer

    from qlora_kit.evaluate import score
    from qlora_kit.merge import MergeConfig, _eval_and_calibration, merge

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512bf16)  # read by every new Linear4bit
    cfg = MergeConfig(model=str(run_model), adapter=str(run_at_128), out=str(tmp_path / "out"), format="nf4",
                      eval_data=str(text_file), seq_len=32, eval_sequences=8, calib_tokens=256)
    report = merge(cfg, log=lambda s: None)
    assert json_blocksize(tmp_path / "out") == 128
    seqs, _ = _eval_and_calibration(cfg, AutoTokenizer.from_pretrained(run_model), log=lambda s: None)
    with torch.no_grad():
        ppl, _ = score(decoded_export(tmp_path / "out"), seqs, 4)
    # streamed one sequence at a time through dense twins: another summation order than the batched reference
    assert report["model_metrics"]["ppl_merged"] == pytest.approx(ppl, rel=2e-4)


def json_blocksize(folder) -> int:
    import json

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4"))
        return json.loads(bytes(f.get_tensor(key).tolist()))["blocksize"]
