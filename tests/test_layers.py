"""The LoRA layer over a quantized base against a float64 reference built from the dequantized weight."""

import math

import pytest
import torch

from qlora_kit.config import QuantConfig
from qlora_kit.layers import QuantLinear

from .conftest import rel_err


def make_layer(fmt, dtype=torch.float32, out_f=96, in_f=128, r=8, alpha=16.0, bias=True, seed=0, **lora):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    layer = QuantLinear.from_dense(w, QuantConfig(quant=fmt, compute_dtype=dtype), b)
    layer.attach_lora(r, alpha, **lora)
    with torch.no_grad():  # B starts at zero; give it values so the LoRA branch is exercised
        layer.lora_B.normal_(generator=g)
    return layer


def reference(layer, x, grad_out):
    """float64 forward and gradients, with the dequantized weight as the base."""
    w = layer.dequantize(torch.float32).double().requires_grad_(False)
    a = layer.lora_A.detach().double().requires_grad_(True)
    b = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ w.t() + layer.scaling * (x64 @ a.t()) @ b.t()
    if layer.bias is not None:
        y = y + layer.bias.double()
    y.backward(grad_out.double())
    return y.detach(), x64.grad, a.grad, b.grad


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_forward_and_gradients_match_float64(fmt, dtype, tol):
    layer = make_layer(fmt, dtype)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref, gx_ref, ga_ref, gb_ref = reference(layer, x, grad_out)
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, gx_ref) < tol
    assert rel_err(layer.lora_A.grad, ga_ref) < tol
    assert rel_err(layer.lora_B.grad, gb_ref) < tol
    assert layer.lora_A.grad.dtype == torch.float32  # adapter dtype stays fp32
    assert layer.bias is None or layer.bias.grad is None


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_only_lora_factors_train(fmt):
    layer = make_layer(fmt)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    assert "weight" not in dict(layer.named_parameters())  # the packed weight is a buffer: no optimizer sees it


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_backward_keeps_only_the_packed_weight(fmt):
    """No tensor of the dense weight's size is saved for backward (it is dequantized again there)."""
    layer = make_layer(fmt, out_f=256, in_f=256, r=4)
    x = torch.randn(2, 256, requires_grad=True)  # fewer values than the 256 x 256 weight
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved, "the hooks saw nothing: the test would not catch a dense copy"
    assert max(saved) < 256 * 256, saved
    # ...and no node of the graph holds one as an attribute either
    stack, seen = [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            assert not (isinstance(value, torch.Tensor) and value.numel() >= 256 * 256), type(node).__name__
        stack += [n for n, _ in node.next_functions]
    assert len(seen) > 3
    y.sum().backward()
    assert x.grad is not None


def test_modifying_the_packed_weight_before_backward_is_caught():
    layer = make_layer("nf4")
    x = torch.randn(2, 128, requires_grad=True)
    y = layer(x)
    layer.weight_absmax.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_dtype_cast_changes_compute_dtype_not_the_packed_weight(fmt, cast):
    layer = make_layer(fmt)
    before = {k: v.clone() for k, v in layer.packed().items()}
    x = torch.randn(4, 128)
    ref = layer(x).double()
    layer = layer.half() if cast == "half" else layer.to(torch.bfloat16)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    assert layer.compute_dtype == dtype and layer.bias.dtype == dtype
    for k, v in layer.packed().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert layer.lora_A.dtype == torch.float32  # the adapter dtype is kept
    y = layer(x)
    assert y.dtype == dtype
    assert rel_err(y, ref) < 2e-2


def test_b_zero_at_init_gives_the_base_output_exactly():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    layer = QuantLinear.from_dense(w, QuantConfig(compute_dtype=torch.float32))
    x = torch.randn(4, 64)
    base = layer(x)
    layer.attach_lora(8, 16)
    assert torch.equal(layer.lora_B, torch.zeros(64, 8))
    assert layer.lora_A.abs().sum() > 0
    assert torch.equal(layer(x), base)


def test_disable_enable_adapter():
    layer = make_layer("nf4")
    x = torch.randn(4, 128)
    with_lora = layer(x)
    layer.lora_enabled = False
    without = layer(x)
    assert torch.equal(without, layer.base_forward(x))
    assert rel_err(without, with_lora) > 1e-2
    layer.lora_enabled = True
    assert torch.equal(layer(x), with_lora)


def test_scaling_rslora_and_init():
    layer = make_layer("nf4", r=16, alpha=32.0)
    assert layer.scaling == 2.0
    rs = make_layer("nf4", r=16, alpha=32.0, rslora=True)
    assert rs.scaling == pytest.approx(32 / 4)
    # Kaiming-uniform with a=sqrt(5): bound = 1/sqrt(in_features)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(128) + 1e-6
    torch.manual_seed(0)
    gauss = QuantLinear.from_dense(torch.randn(512, 512), QuantConfig())
    gauss.attach_lora(8, 16, init="gaussian")
    assert gauss.lora_A.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_dropout_only_on_the_lora_branch_in_training():
    layer = make_layer("nf4", dropout=0.5)
    x = torch.randn(8, 128)
    layer.eval()
    y_eval, base_eval = layer(x), layer.base_forward(x)
    layer.train()
    torch.manual_seed(3)
    y_train = layer(x)
    assert rel_err(y_train, y_eval) > 1e-3  # the LoRA branch saw dropout
    assert torch.equal(layer.base_forward(x), base_eval)  # the base did not
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), base_eval)


def test_int8_threshold_mixed_decomposition_trains():
    layer = make_layer("int8")
    layer.int8_threshold = 6.0
    x = torch.randn(4, 128, requires_grad=True)
    with torch.no_grad():
        x[:, 3] = 12.0
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref, gx_ref, _, _ = reference(layer, x, grad_out)
    assert rel_err(y, y_ref) < 2e-2  # int8 activations in the forward
    assert rel_err(x.grad, gx_ref) < 1e-5  # backward through the dequantized weight



def test_lora_branch_gradients_with_dropout_float64(monkeypatch):
    """The fused LoRA branch's backward (mask rebuilt from x) against finite differences, dropout on; its
    output against the definition, with the mask the branch drew."""
    from qlora_kit import kernels
    from qlora_kit.layers import _LoRABranch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    drawn, draw = [], kernels.dropout_mask
    monkeypatch.setattr(kernels, "dropout_mask", lambda x, p: drawn.append(draw(x, p)) or drawn[-1])

    def branch(x, a, b):
        torch.manual_seed(1)  # the same dropout mask on every call
        return _LoRABranch.apply(x, a, b, 0.75, 0.3, torch.float64)

    assert torch.autograd.gradcheck(branch, (x, a, b))
    y = branch(x, a, b)
    keep, scale = drawn[-1]
    assert keep.shape == x.shape and keep.element_size() == 1 and scale == 1 / 0.7
    expected = 0.75 * ((x * keep.double() / 0.7) @ a.t()) @ b.t()
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert 0.5 < keep.double().mean() < 0.9


def test_lora_branch_keeps_a_byte_mask_not_fp32_copies():
    """For backward the branch keeps x itself (shared with the other layers that read it), a 1-byte mask
    and the (tokens, r) product; no fp32 copy of x, no fp32 noise."""
    layers = [make_layer("nf4", dropout=0.1, seed=s) for s in range(3)]  # like q, k, v on one input
    x = torch.randn(64, 128, requires_grad=True)
    params = {t.untyped_storage()._cdata for m in layers for t in [*m.parameters(), *m.buffers()]}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key != x.untyped_storage()._cdata:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = [m(x) for m in layers]
    assert sum(saved.values()) == 3 * (64 * 128 * 1 + 64 * 8 * 4), saved  # mask bytes + (tokens, r) fp32
    sum(y.sum() for y in ys).backward()
    assert x.grad is not None and all(m.lora_A.grad is not None for m in layers)
