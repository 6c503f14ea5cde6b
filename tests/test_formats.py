"""Formats against independent decodes written here from the format definitions."""

import pytest
import torch

from qlora_kit import formats
from qlora_kit.config import QuantConfig


def unpack_4bit(packed: dict, fmt: str, shape, blocksize: int) -> torch.Tensor:
    """Decode nibbles by hand: high nibble first, code table lookup, times the block's absmax."""
    codes = packed["weight"].flatten()
    nibbles = torch.stack([codes >> 4, codes & 0xF], dim=1).flatten().long()  # (out*in,)
    values = formats.code_table(fmt).double()[nibbles]
    if "nested_absmax" in packed:
        a8 = packed["absmax"].long()
        nested = packed["nested_quant_map"].double()[a8]
        scale = packed["nested_absmax"].double().repeat_interleave(formats.NESTED_BLOCKSIZE)[: a8.numel()]
        absmax = nested * scale + packed["offset"].double()
    else:
        absmax = packed["absmax"].double()
    return (values.view(-1, blocksize) * absmax[:, None]).view(shape)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_4bit_dequantize_matches_hand_decode(fmt, double_quant, blocksize):
    torch.manual_seed(0)
    w = torch.randn(96, 320) * 0.02
    cfg = QuantConfig(quant=fmt, compute_dtype=torch.float32, double_quant=double_quant, blocksize=blocksize)
    packed = formats.quantize(w, cfg)
    ours = formats.dequantize(packed, fmt, (96, 320), blocksize, torch.float32)
    ref = unpack_4bit(packed, fmt, (96, 320), blocksize)
    assert torch.allclose(ours.double(), ref, rtol=1e-6, atol=1e-9)
    # 4-bit round-to-nearest on Gaussian weights: about 10% relative error for nf4, more for fp4
    err = ((ours - w).norm() / w.norm()).item()
    assert 0.03 < err < (0.12 if fmt == "nf4" else 0.16)


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
    ref = packed["weight"].double() * packed["scb"].double()[:, None] / 127
    ours = formats.dequantize(packed, "int8", (48, 80), 64, torch.float32)
    assert torch.allclose(ours.double(), ref, rtol=1e-3, atol=1e-6)
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
