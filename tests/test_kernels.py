"""The Triton nf4 / fp4 kernels (run by Triton's interpreter on the CPU) against float64 references.

References are independent of the kernels: the same packed weight decoded by tests/reference.py (the format's
definition), rounded to the compute dtype as the kernel's tiles are, then a float64 matmul. Inputs are fresh random
values; kernel outputs go into NaN-filled buffers, so an element the kernel skips fails the test.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from qlora_kit import formats, kernels
from qlora_kit.config import QuantConfig
from qlora_kit.layers import QuantLinear

from . import reference
from .conftest import rel_err, token_batch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from qlora_kit.kernels import fourbit  # noqa: E402  (after the interpreter switch is known)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative (Frobenius) error allowed against the float64 reference: output rounding plus fp32 accumulation
# order. Triton's interpreter casts fp32 to bf16 toward zero (a GPU rounds to nearest), a bias of up to one
# bf16 step on every rounded operand and output, hence the wider bf16 bound there.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2 if INTERPRETING else 8e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# N x K with K * N not a multiple of any tile, and blocks of 64 that straddle rows (K = 80)
N, K = 48, 80


def packed_weight(fmt: str, double_quant: bool, dtype: torch.dtype, seed: int = 0, n: int = N, k: int = K):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    packed = formats.quantize(w, QuantConfig(quant=fmt, double_quant=double_quant, blocksize=64))
    # the reference weight: the format's decode, rounded to the compute dtype like the tile
    w_ref = reference.decode_4bit(packed, fmt, (n, k), 64, dtype).double().to(DEVICE)
    return {key: t.to(DEVICE) for key, t in packed.items()}, w_ref


def rand(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def lora_ref(xa, b, dtype):
    return xa.to(dtype).double() @ b.to(dtype).double().t()


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_with_lora_and_bias_matches_float64(fmt, double_quant, dtype):
    packed, w = packed_weight(fmt, double_quant, dtype)
    M, r, s = 37, 5, 0.75  # M spans three row tiles, r pads to the rank block
    x, xa, b = rand(M, K, dtype=dtype), rand(M, r, seed=2), rand(N, r, seed=3)
    bias = rand(N, dtype=dtype, seed=4)
    y = fourbit.forward(x, packed, N, 64, xa=xa, B=b, scaling=s, bias=bias, decode=False,
                        out=poisoned(M, N, dtype=dtype))
    ref = x.double() @ w.t() + s * lora_ref(xa, b, dtype) + bias.double()
    assert y.dtype == dtype and not y.isnan().any()
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_grad_with_lora_and_dropout_matches_float64(fmt, double_quant, dtype):
    packed, w = packed_weight(fmt, double_quant, dtype)
    M, r, p = 37, 5, 0.25
    dy, ga, a = rand(M, N, dtype=dtype), rand(M, r, seed=2), rand(r, K, seed=3)
    keep = torch.rand(M, K, generator=torch.Generator().manual_seed(5)).to(DEVICE) >= p
    dx = fourbit.input_grad(dy, packed, K, 64, ga=ga, A=a, keep=keep, p=p, out=poisoned(M, K, dtype=dtype))
    ref = dy.double() @ w + (ga.to(dtype).double() @ a.to(dtype).double()) * keep / (1 - p)
    assert dx.dtype == dtype and not dx.isnan().any()
    assert rel_err(dx, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_kernels_without_lora_or_bias(dtype):
    packed, w = packed_weight("nf4", True, dtype)
    x, dy = rand(20, K, dtype=dtype), rand(20, N, dtype=dtype, seed=2)
    y = fourbit.forward(x, packed, N, 64, decode=False, out=poisoned(20, N, dtype=dtype))
    dx = fourbit.input_grad(dy, packed, K, 64, out=poisoned(20, K, dtype=dtype))
    assert rel_err(y, x.double() @ w.t()) < TOL[dtype]
    assert rel_err(dx, dy.double() @ w) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_kernel_matches_float64(fmt, double_quant, dtype, rows):
    n, k = 40, 192  # k / 2 bytes per row: three byte tiles, the last one partial
    packed, w = packed_weight(fmt, double_quant, dtype, n=n, k=k)
    x, xa, b, bias = rand(rows, k, dtype=dtype), rand(rows, 3, seed=2), rand(n, 3, seed=3), rand(n, dtype=dtype)
    y = fourbit.forward(x, packed, n, 64, xa=xa, B=b, scaling=2.0, bias=bias, decode=True,
                        out=poisoned(rows, n, dtype=dtype))
    # the decode kernel multiplies in fp32 with the weight unrounded: compare with the fp32 weight
    w32 = reference.decode_4bit({key: t.cpu() for key, t in packed.items()}, fmt, (n, k), 64).double().to(DEVICE)
    ref = x.double() @ w32.t() + 2.0 * xa.double() @ b.double().t() + bias.double()
    assert not y.isnan().any()
    assert rel_err(y, ref) < TOL[dtype]
    plain = fourbit.forward(x, packed, n, 64, decode=True, out=poisoned(rows, n, dtype=dtype))
    assert rel_err(plain, x.double() @ w32.t()) < TOL[dtype]


@pytest.fixture
def launched(monkeypatch):
    """The kernels fourbit launches, in order (a spy on its launcher)."""
    names, launch = [], fourbit._launch

    def spy(kernel, *args, **kwargs):
        names.append("decode" if kernel is fourbit._decode else "tiled" if kernel is fourbit._forward else "other")
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(fourbit, "_launch", spy)
    return names


def test_odd_width_never_takes_the_decode_kernel(launched):
    """With an odd K rows do not start on a byte boundary: the tiled kernel serves even a single row."""
    n, k = 64, 33
    g = torch.Generator().manual_seed(0)
    packed = formats.quantize(torch.randn(n, k, generator=g), QuantConfig(quant="nf4", blocksize=64))
    w = reference.decode_4bit(packed, "nf4", (n, k), 64).double().to(DEVICE)
    packed = {key: t.to(DEVICE) for key, t in packed.items()}
    x = rand(1, k)
    assert rel_err(fourbit.forward(x, packed, n, 64, decode=True), x.double() @ w.t()) < TOL[torch.float32]
    assert launched == ["tiled"]


def test_decode_is_the_default_for_few_rows_and_agrees_with_the_tiled_kernel(launched):
    packed, w = packed_weight("nf4", True, torch.float32)
    x = rand(fourbit.DECODE_ROWS, K)
    auto = fourbit.forward(x, packed, N, 64)
    tiled = fourbit.forward(x, packed, N, 64, decode=False)
    more = fourbit.forward(rand(fourbit.DECODE_ROWS + 1, K), packed, N, 64)
    assert launched == ["decode", "tiled", "tiled"]  # the default took the decode kernel, and only up to its limit
    assert rel_err(auto, tiled) < 1e-6 and rel_err(auto, x.double() @ w.t()) < TOL[torch.float32]
    assert more.shape == (fourbit.DECODE_ROWS + 1, N)


# ---- the layer: kernels against the reference path ------------------------------------------------

def make_layer(fmt, dtype, r, dropout=0.0, bias=True, seed=0, out_f=N, in_f=K):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    layer = QuantLinear.from_dense(w, QuantConfig(quant=fmt, compute_dtype=dtype, blocksize=64), b).to(DEVICE)
    layer.attach_lora(r, 2.0 * r, dropout)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    return layer.train()


def run(layer, x, grad_out, mode, seed=7):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both paths
    with kernels.kernel_mode(mode):
        y = layer(x)
        y.backward(grad_out)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,dropout,bias", [(4, 0.0, True), (8, 0.1, False), (3, 0.3, True)])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "decoded+addmm"])
def test_layer_through_kernels_equals_reference_path(fmt, dtype, r, dropout, bias, fused, monkeypatch):
    if not fused:  # rows above the fused kernels' limit: a transient decoded weight and addmm
        monkeypatch.setattr(kernels, "FUSED_MAX_ROWS", 4)
    layer = make_layer(fmt, dtype, r, dropout, bias)
    x, grad_out = rand(2, 9, K, dtype=dtype), rand(2, 9, N, dtype=dtype, seed=2)
    got = run(layer, x, grad_out, "triton")
    want = run(layer, x, grad_out, "off")
    # the reference path rounds the LoRA output to the compute dtype before adding it; the kernel adds in fp32
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2 if INTERPRETING else 1.5e-2}[dtype]
    for name, a, b in zip(("y", "grad x", "grad A", "grad B"), got, want, strict=True):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < tol, name
    assert layer.bias is None or layer.bias.grad is None  # the bias is frozen with the base


def uses_kernels(layer, x) -> bool:
    return kernels.use_triton(layer.packed_weight(), layer.bias, layer.compute_dtype, x)


def test_layer_uses_the_kernels_only_where_it_should(monkeypatch):
    nf4, int8 = make_layer("nf4", torch.float32, 4), make_layer("int8", torch.float32, 4)
    x = rand(3, K)
    with kernels.kernel_mode("triton"):
        assert uses_kernels(nf4, x) and not uses_kernels(int8, x)
        assert not uses_kernels(nf4, x.to("meta"))
    with kernels.kernel_mode("auto"):
        assert uses_kernels(nf4, x) == x.is_cuda
    with kernels.kernel_mode("off"):
        assert not uses_kernels(nf4, x)
    with pytest.raises(ValueError, match="kernel mode 'fast'"):
        with kernels.kernel_mode("fast"):
            pass
    monkeypatch.setattr(kernels, "_mode", None)  # as before the first forward: the variable is read then
    monkeypatch.setenv("QLORA_KIT_KERNELS", "fast")
    with pytest.raises(ValueError, match="QLORA_KIT_KERNELS='fast'"):
        uses_kernels(nf4, x)
    monkeypatch.setenv("QLORA_KIT_KERNELS", "off")
    assert not uses_kernels(nf4, x) and kernels.mode() == "off"
    monkeypatch.setenv("QLORA_KIT_KERNELS", "triton")
    assert kernels.mode() == "off"  # read once


def test_frozen_weight_changed_before_backward_is_caught():
    layer = make_layer("nf4", torch.float32, 4)
    with kernels.kernel_mode("triton"):
        y = layer(rand(2, K).requires_grad_(True))
        layer.weight.add_(1)
        with pytest.raises(RuntimeError, match="modified in place"):
            y.sum().backward()


def test_tiny_model_trains_the_same_through_kernels(model_dirs):
    """A whole decoder (nf4 + double quant, LoRA on every linear, dropout) through the kernels and through
    the reference path: same loss and same LoRA gradients."""
    from qlora_kit.loading import load_quantized
    from qlora_kit.patch import add_lora

    model = load_quantized(model_dirs["llama"], "nf4", torch.float32, double_quant=True, blocksize=64)
    add_lora(model, r=4, alpha=8, dropout=0.1)
    model.to(DEVICE).train()
    ids = token_batch().to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)

    def step(mode):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with kernels.kernel_mode(mode):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_k, grads_k = step("triton")
    loss_r, grads_r = step("off")
    assert abs(loss_k - loss_r) < 1e-5 * abs(loss_r)
    assert grads_k.keys() == grads_r.keys() and len(grads_k) == 2 * 7 * 2
    for name in grads_r:
        assert rel_err(grads_k[name], grads_r[name]) < 1e-4, name
