"""Formats against independent decodes written from the format definitions (tests/reference.py).

Dequantization must equal the reference exactly (torch.equal, float32 and after rounding to 16 bits) for
every block size, on widths that are not multiples of the block, so that blocks span two rows."""

import bitsandbytes.functional as bnbF
import pytest
import torch

from qlora_kit import formats
from qlora_kit.config import QuantConfig

from . import reference

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# (out, in): 80 and 320 are multiples of none of the block sizes they meet here, and out * in is a multiple
# of every block size that meets it; blocks of up to 4096 values span up to 52 rows of 80
SHAPES = [(256, 80), (96, 320)]


def weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[-1, -1] = 0.3  # an outlier: one block with a large absmax
    return w


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [(s, b) for s in SHAPES for b in BLOCKSIZES if s[0] * s[1] % b == 0],
                         ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
def test_4bit_dequantize_equals_the_reference_decode_exactly(fmt, double_quant, blocksize, shape):
    w = weight(shape)
    packed = formats.quantize(w, QuantConfig(quant=fmt, double_quant=double_quant, blocksize=blocksize))
    ref = reference.decode_4bit(packed, fmt, shape, blocksize)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = formats.dequantize(packed, fmt, shape, blocksize, dtype)
        assert ours.dtype == dtype and torch.equal(ours, ref.to(dtype)), dtype
    # and each code is the nearest one to the weight over its block's absmax (before any double quantization)
    scaled = (w.reshape(-1, blocksize) / w.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)).flatten()
    table = reference.TABLES[fmt].double()
    chosen = (table[reference.unpack_nibbles(packed["weight"])] - scaled.double()).abs()
    best = (scaled.double()[:, None] - table[None]).abs().amin(dim=1)
    assert (chosen <= best + 1e-6).all()


@pytest.mark.parametrize("shape", [(7, 4096), (300, 64), (1, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_second_level_is_the_nearest_dynamic_map_value(shape):
    """Double quantization: absmax - mean, in blocks of 256, to the nearest value of the dynamic map
    (bitsandbytes' CPU 8-bit quantizer picks the farther of two nearly equidistant values for about 0.1%
    of inputs, so it is not used)."""
    w = weight(shape, seed=3)
    packed = formats.quantize(w, QuantConfig(quant="nf4", double_quant=True, blocksize=64))
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    assert torch.equal(packed["nested_quant_map"], reference.dynamic_map())
    assert packed["offset"].item() == pytest.approx(absmax.mean().item(), rel=1e-6)
    centered = (absmax - packed["offset"]).double()
    nested = packed["nested_absmax"].double().repeat_interleave(reference.NESTED)[: absmax.numel()]
    dmap = reference.dynamic_map().double()
    target = torch.where(nested > 0, centered / nested, 0.0)  # one block alone: nothing left after the mean
    chosen = (dmap[packed["absmax"].long()] - target).abs()
    best = (target[:, None] - dmap[None]).abs().amin(dim=1)
    assert packed["absmax"].dtype == torch.uint8 and (chosen <= best + 1e-6).all()


def test_4bit_codes_keep_bitsandbytes_layout():
    """The packed codes are bitsandbytes' own (its exports and PEFT read them): same bytes and absmax as
    bitsandbytes' quantizer without double quantization."""
    w = weight((96, 320))
    for fmt in ("nf4", "fp4"):
        packed = formats.quantize(w, QuantConfig(quant=fmt, double_quant=False, blocksize=128))
        codes, state = bnbF.quantize_4bit(w, blocksize=128, quant_type=fmt, compress_statistics=False)
        assert torch.equal(packed["weight"], codes) and torch.equal(packed["absmax"], state.absmax)


def test_4bit_round_trip_error_is_what_4_bits_give():
    w = torch.randn(96, 320)
    for fmt, hi in (("nf4", 0.12), ("fp4", 0.16)):
        for blocksize in (64, 128, 256):
            packed = formats.quantize(w, QuantConfig(quant=fmt, blocksize=blocksize))
            err = ((formats.dequantize(packed, fmt, (96, 320), blocksize, torch.float32) - w).norm() / w.norm()).item()
            assert 0.03 < err < hi, (fmt, blocksize, err)  # 4-bit round-to-nearest on Gaussian weights


def test_double_quant_saves_memory_as_in_qlora():
    w = torch.randn(1024, 1024)
    single = formats.packed_nbytes(formats.quantize(w, QuantConfig(double_quant=False)))
    double = formats.packed_nbytes(formats.quantize(w, QuantConfig(double_quant=True)))
    # 4 bits + 32/64 bits of fp32 absmax = 4.5 bits; double quant: 4 + 8/64 + 32/(64*256) ~ 4.127 bits
    assert single / w.numel() * 8 == pytest.approx(4.5, abs=0.01)
    assert double / w.numel() * 8 == pytest.approx(4.127, abs=0.01)


def test_int8_rowwise_absmax():
    torch.manual_seed(1)
    w = torch.randn(48, 80)
    packed = formats.quantize(w, QuantConfig(quant="int8", compute_dtype=torch.float32))
    assert packed["weight"].dtype == torch.int8 and packed["scb"].shape == (48,)
    row_absmax = w.abs().amax(dim=1)
    assert torch.allclose(packed["scb"], row_absmax.half().float(), rtol=1e-3)
    ours = formats.dequantize(packed, "int8", (48, 80), 64, torch.float32)
    assert torch.equal(ours, reference.decode_int8(packed))
    assert torch.equal(formats.dequantize(packed, "int8", (48, 80), 64, torch.bfloat16),
                       reference.decode_int8(packed, torch.bfloat16))
    assert ((ours - w).abs() <= row_absmax[:, None] / 127 * 0.51 + 1e-3).all()


def test_int8_mixed_matmul_keeps_outlier_columns_in_16bit():
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    packed = formats.quantize(w, QuantConfig(quant="int8", compute_dtype=torch.float32))
    x = torch.randn(5, 64)
    x[:, 7] = 20.0  # an outlier feature
    wd = formats.dequantize(packed, "int8", (32, 64), 64, torch.float32).double()
    ref = x.double() @ wd.t()
    mixed = formats.int8_mixed_matmul(x, packed, threshold=6.0, dtype=torch.float32)
    err = ((mixed.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2  # int8 activations cost about 1%; the outlier column would cost far more
    x_no = x.clone()
    x_no[:, 7] = 0
    ref_no = x_no.double() @ wd.t()
    assert ((ref - ref_no).norm() / ref.norm()).item() > 0.5  # the outlier column does matter here


@pytest.mark.parametrize("bad", [dict(quant="nf5"), dict(blocksize=48), dict(blocksize=0),
                                 dict(compute_dtype="fp8"), dict(int8_threshold=-1.0)])
def test_bad_quant_config(bad):
    with pytest.raises(ValueError) as e:
        QuantConfig(**bad)
    assert "\n" not in str(e.value)


def test_blocksize_must_divide_the_weight():
    with pytest.raises(ValueError, match="does not divide into blocks of 64"):
        formats.quantize(torch.randn(3, 7), QuantConfig())


def test_int8_matmul_is_exact_at_any_depth():
    """int8 x int8 -> int32 for K well past the 2**24 limit of a float32 accumulator (bitsandbytes' CPU
    fallback without AVX512 rounds there)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randint(100, 128, (3, 5000), generator=g, dtype=torch.int8)  # large same-sign products
    b = torch.randint(100, 128, (4, 5000), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long().t()
    assert exact.min() > 2**25
    assert torch.equal(formats._int8_matmul(a, b).long(), exact)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_4bit_quantizer_is_bitsandbytes_byte_for_byte(quant, dtype):
    """The CPU quantizer counts boundaries instead of bitsandbytes' bucketize: the same codes and absmax, ties,
    zero blocks and clamped outliers included."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[0, :64] = 0
    w[1, 3] = 5.0
    w[2] = torch.linspace(-1, 1, 256)  # values on the code boundaries' neighbourhood
    for bs in (64, 128):
        want, state = bnbF.quantize_4bit(w.to(dtype), blocksize=bs, quant_type=quant, compress_statistics=False)
        got = formats.quantize(w.to(dtype), QuantConfig(quant=quant, blocksize=bs, double_quant=False))
        assert torch.equal(got["weight"], want) and torch.equal(got["absmax"], state.absmax)
        scales = formats.quantize(w.to(dtype), QuantConfig(quant=quant, blocksize=bs, double_quant=False), codes=False)
        assert "weight" not in scales and torch.equal(scales["absmax"], state.absmax)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_code_tables_are_bitsandbytes_bit_for_bit(quant):
    """The tables made here from the formats' definitions (so that a CPU job need not import bitsandbytes)
    against bitsandbytes' own: the 4-bit values, the quantizer's midpoints and order, the 8-bit dynamic map."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    def bits(t):
        return t.float().contiguous().view(torch.int32)  # +0.0 and -0.0 differ here

    assert torch.equal(bits(formats.code_table(quant)), bits(bnbF.get_4bit_type(quant, device="cpu")))
    mids, order = formats._quantize_bounds(quant, torch.device("cpu"))
    want_mids, want_order = _get_4bit_quantize_bounds(quant, torch.device("cpu"))
    assert torch.equal(bits(mids), bits(want_mids)) and torch.equal(order, want_order)
    assert torch.equal(bits(formats.dynamic_map()), bits(bnbF.create_dynamic_map()))


def test_a_cpu_4bit_job_does_not_import_bitsandbytes():
    """Quantizing, decoding, the layer's forward and the export's tensors in nf4 on a CPU: bitsandbytes stays
    unimported (2-3 s)."""
    import subprocess
    import sys
    code = """
import sys, torch
from qlora_kit import formats
from qlora_kit.config import QuantConfig
from qlora_kit.layers import QuantLinear
q = QuantConfig(quant="nf4", compute_dtype=torch.float32)
layer = QuantLinear.from_dense(torch.randn(64, 128), q)
layer(torch.randn(2, 128))
formats.dequantize(formats.quantize(torch.randn(64, 128), q), "nf4", (64, 128), 64, torch.float32)
formats.bnb_checkpoint_tensors(formats.quantize(torch.randn(64, 128), q), "nf4", (64, 128), 64, torch.bfloat16)
print("bitsandbytes" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_checkpoint_tensors_are_bitsandbytes_serialization(quant, double_quant, dtype):
    """The stored QuantState (written here without bitsandbytes) against bitsandbytes' own
    QuantState.as_dict(packed=True): same keys in the same order, same bytes."""
    shape, bs = (48, 320), 64
    packed = formats.quantize(torch.randn(shape) * 0.02, QuantConfig(quant=quant, blocksize=bs, double_quant=double_quant))
    got = formats.bnb_checkpoint_tensors(packed, quant, shape, bs, dtype)
    state2 = None
    if double_quant:
        state2 = bnbF.QuantState(absmax=packed["nested_absmax"], code=packed["nested_quant_map"],
                                 blocksize=formats.NESTED_BLOCKSIZE, dtype=torch.float32)
    state = bnbF.QuantState(absmax=packed["absmax"], shape=torch.Size(shape), code=packed["quant_map"], blocksize=bs,
                            quant_type=quant, dtype=dtype, offset=packed["offset"][0] if double_quant else None,
                            state2=state2)
    want = {"weight": packed["weight"], **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
