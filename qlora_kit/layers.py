"""The frozen quantized linear and the LoRA branch on top of it.

    y = base(x) + scaling * B(A(dropout(x)))          scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

`QuantLinear` replaces an `nn.Linear` (or transformers' transposed `Conv1D`) in place. Its packed
weight is registered as buffers named after the weight (`weight`, `weight_absmax`, ...), so the
module path and the weight key stay what they were. LoRA factors are absent until `attach_lora`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import formats, kernels
from .config import QuantConfig


class _FrozenBaseMatmul(torch.autograd.Function):
    """x @ dequant(W).T whose backward keeps only the packed weight, never a dense copy.

    The base weight is frozen, so backward computes only the input gradient, dequantizing the
    weight again for that one matmul. int8 with a threshold runs LLM.int8's mixed decomposition
    in the forward and, as bitsandbytes does, the dequantized weight in the backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: formats.PackedWeight, compute_dtype: torch.dtype, int8_threshold: float,
                versions: tuple[int, ...] | None) -> Tensor:
        ctx.weight, ctx.versions = weight, versions  # the packed tensors (the layer's own), nothing dense
        if weight.quant == "int8" and int8_threshold > 0 and not weight.is_meta:
            return formats.int8_mixed_matmul(x, weight.tensors, int8_threshold, compute_dtype)
        return x @ weight.dequantize(compute_dtype).t()  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        ctx.weight.check_unchanged(ctx.versions)
        return grad_out @ ctx.weight.dequantize(grad_out.dtype), None, None, None, None  # (out, in)


class _LoRABranch(torch.autograd.Function):
    """scaling * dropout(x) @ A.T @ B.T, keeping for backward only x itself, a 1-byte dropout mask and
    the (tokens, r) product.

    The usual graph keeps an fp32 copy of x, the fp32 dropout noise and the dropped input, for every
    target layer, even when q, k and v read the same x. Here x is kept as it came (one storage shared
    by all layers that read it) and the dropped input is rebuilt in backward from x and the mask. The
    scalings (1 / (1 - p) and alpha / r) go on the rank-r products, so no (tokens, in) or (tokens, out)
    tensor is made just to scale it.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float, out_dtype: torch.dtype) -> Tensor:
        keep, inv_keep = kernels.dropout_mask(x, p)
        a = kernels.masked(x, A.dtype, keep) @ A.t()  # (..., r)
        if keep is not None:
            a.mul_(inv_keep)
        ctx.save_for_backward(x, keep, a, A, B)
        ctx.scaling, ctx.inv_keep = scaling, inv_keep
        return ((a * scaling) @ B.t()).to(out_dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor):
        x, keep, a, A, B = ctx.saved_tensors
        g = grad.to(A.dtype)  # (..., out); no copy when the dtypes agree
        grad_B = (g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1]).to(A.dtype)).mul_(ctx.scaling)
        ga = (g @ B.to(g.dtype)).mul_(ctx.scaling * ctx.inv_keep)  # (..., r): the gradient at dropout(x) @ A.T
        del g
        xd = kernels.masked(x, A.dtype, keep)
        grad_A = ga.reshape(-1, ga.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])  # (r, in)
        del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ga @ A.to(ga.dtype)
            if keep is not None:
                grad_x.mul_(keep)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A.to(A.dtype), grad_B.to(B.dtype), None, None, None


class _MergedExportMatmul(torch.autograd.Function):
    """x @ Q(W + s*BA).T: the layer as its 4/8-bit export will compute it (merge-aware training).

    Q is the export's round to nearest. Only its compact form (codes and scales: 0.5-1 byte a weight) is kept for
    the backward, which decodes it again for the input gradient; no dense copy outlives the forward. A and B get
    no gradient here: the straight-through estimator passes theirs through the LoRA branch (QuantLinear.forward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.rounded = layer.export_rounding()
        ctx.layer = layer
        return x @ layer.decode_export(ctx.rounded, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.decode_export(ctx.rounded, grad_out.dtype)
        ctx.rounded = None
        return grad_out @ w, None


class QuantLinear(nn.Module):
    """A frozen linear layer stored in nf4 / fp4 / int8 (or unquantized), with optional LoRA."""

    def __init__(self, in_features: int, out_features: int, packed: dict[str, Tensor], cfg: QuantConfig,
                 bias: Tensor | None = None, fan_in_fan_out: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant, self.blocksize = cfg.quant, cfg.blocksize
        self.compute_dtype = cfg.compute_dtype
        self.int8_threshold = cfg.int8_threshold
        self.fan_in_fan_out = fan_in_fan_out  # the source stored the weight as (in, out), like GPT-2's Conv1D
        self._packed_names = []
        for key, t in packed.items():
            name = "weight" if key == "weight" else f"weight_{key}"
            self.register_buffer(name, t)
            self._packed_names.append((key, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(cfg.compute_dtype), requires_grad=False)
        self.lora_A: nn.Parameter | None = None  # (r, in)
        self.lora_B: nn.Parameter | None = None  # (out, r)
        self.dropout = 0.0  # on the LoRA branch's input, in training
        self.r, self.lora_alpha, self.scaling, self.rslora = 0, 0.0, 0.0, False
        self.lora_enabled = True
        self.merge_aware: QuantConfig | None = None  # the export format the forward rounds W + s*BA to
        self.merge_aware_rounding = "nearest"  # how: "nearest", or "dither" (rounding.dithered_codes; nf4, fp4)
        self.packed_as_parameters = False  # see make_packed_parameters

    @classmethod
    def from_dense(cls, weight: Tensor, cfg: QuantConfig, bias: Tensor | None = None,
                   fan_in_fan_out: bool = False) -> QuantLinear:
        """Quantize a dense weight. With fan_in_fan_out the weight is (in, out) and is transposed first."""
        w = weight.t() if fan_in_fan_out else weight
        out_features, in_features = w.shape
        return cls(in_features, out_features, formats.quantize(w, cfg), cfg, bias, fan_in_fan_out)

    # ---- the frozen base -------------------------------------------------------------------
    def packed(self) -> dict[str, Tensor]:
        return {key: getattr(self, name) for key, name in self._packed_names}

    def packed_weight(self) -> formats.PackedWeight:
        """The base weight as one value: format, (out, in) shape, block size and this layer's packed tensors."""
        return formats.PackedWeight(self.quant, (self.out_features, self.in_features), self.blocksize, self.packed())

    def versions_to_check(self, weight: formats.PackedWeight) -> tuple[int, ...] | None:
        """The packed tensors' versions, to compare in backward; None under FSDP2, which refills the gathered
        tensors for every use."""
        return None if self.packed_as_parameters else weight.version()

    SHARDED = ("weight", "weight_absmax", "weight_scb")  # the packed tensors that grow with the layer

    def make_packed_parameters(self) -> None:
        """Turn the large packed buffers (codes and per-block scales) into frozen parameters, so that FSDP2
        can shard them; names, values and state-dict keys stay the same."""
        for name in self.SHARDED:
            if name in self._buffers:
                t = self._buffers.pop(name)
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        self.packed_as_parameters = True

    def _apply(self, fn, recurse: bool = True):
        # `.to(device)` moves everything; a dtype cast (`.half()`, `.to(torch.bfloat16)`) must not
        # touch the packed codes and their fp32 scales (it would corrupt them), nor the LoRA factors
        # (their dtype is the adapter dtype). It changes the compute dtype instead.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        packed = {} if self.quant == "none" else {
            n: self._buffers.pop(n) if n in self._buffers else self._parameters.pop(n) for _, n in self._packed_names}
        lora = {n: self._parameters.pop(n) for n in ("lora_A", "lora_B") if self._parameters.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in packed.items():
                if isinstance(t, nn.Parameter):
                    self._parameters[name] = nn.Parameter(t.data.to(probe.device), requires_grad=False)
                else:
                    self._buffers[name] = t.to(probe.device)
            for name, p in lora.items():
                p.data = p.data.to(probe.device)  # same Parameter object: optimizers keep their reference
                self._parameters[name] = p
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense (out, in) base weight this layer computes with."""
        return self.packed_weight().dequantize(dtype or self.compute_dtype)

    def base_forward(self, x: Tensor) -> Tensor:
        weight = self.packed_weight()
        y = _FrozenBaseMatmul.apply(x.to(self.compute_dtype), weight, self.compute_dtype, self.int8_threshold,
                                    self.versions_to_check(weight))
        return y if self.bias is None else y + self.bias

    # ---- LoRA ------------------------------------------------------------------------------
    def attach_lora(self, r: int, alpha: float, dropout: float = 0.0, *, rslora: bool = False,
                    init: str = "kaiming", dtype: torch.dtype = torch.float32) -> None:
        """Add trainable factors A (r, in) and B (out, r); B starts at zero so the output is unchanged."""
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = float(dropout)
        self.r = r
        self.set_scale(alpha, rslora)

    def set_scale(self, alpha: float, rslora: bool = False) -> None:
        """scaling = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        self.lora_alpha, self.rslora = float(alpha), bool(rslora)
        self.scaling = alpha / math.sqrt(self.r) if rslora else alpha / self.r

    def delta_weight(self) -> Tensor:
        """scaling * B @ A, the (out, in) update the adapter adds to the base weight."""
        if self.lora_A is None:
            raise RuntimeError("this layer has no LoRA adapter")
        return self.scaling * (self.lora_B @ self.lora_A)

    def export_rounding(self):
        """W + s*BA rounded as the merge-aware export will round it (fp32 arithmetic, as the merge does), in compact
        form: GGUF (d, m, codes) or bitsandbytes' packed tensors. Round to nearest, or for nf4 / fp4 the fixed
        dither on the base's own grid (rounding.dithered_export)."""
        from . import gguf_types, rounding

        with torch.no_grad():
            w = self.dequantize(torch.float32) + self.delta_weight().float()
            q = self.merge_aware
            if q.quant in gguf_types.TYPES:
                d, m, codes = gguf_types.nearest(w, q.quant)
                return d, m, codes.to(torch.int8)  # every type's codes fit in a byte
            if self.merge_aware_rounding == "dither":
                return rounding.dithered_export(w, self.packed() if self.quant == q.quant else None, q)
            return formats.quantize(w, q)

    def decode_export(self, rounded, dtype: torch.dtype) -> Tensor:
        """The dense (out, in) weight a compact export rounding stands for, in dtype."""
        from . import gguf_types

        q = self.merge_aware
        shape = (self.out_features, self.in_features)
        if q.quant in gguf_types.TYPES:
            return gguf_types.decode(*rounded, q.quant, shape).to(dtype)
        return formats.dequantize(rounded, q.quant, shape, q.blocksize, dtype)

    def export_weight(self, dtype: torch.dtype) -> Tensor:
        """Q(W + s*BA) as the merge-aware forward computes with it, in dtype."""
        return self.decode_export(self.export_rounding(), dtype)

    def forward(self, x: Tensor) -> Tensor:
        lora = self.lora_A is not None and self.lora_enabled
        p = self.dropout if lora and self.training else 0.0
        if lora and self.merge_aware is not None:
            # forward: the rounded merged weight; backward: A and B get LoRA's own gradients (straight through
            # the rounding), the input gets the rounded weight's
            y = _MergedExportMatmul.apply(x.to(self.compute_dtype), self)
            if self.bias is not None:
                y = y + self.bias
            branch = _LoRABranch.apply(x.detach(), self.lora_A, self.lora_B, self.scaling, p, y.dtype)
            return y + (branch - branch.detach())
        weight = self.packed_weight()
        if kernels.use_triton(weight, self.bias, self.compute_dtype, x):  # nf4 / fp4 on a GPU
            return kernels.quant_lora_linear(x, weight, self.bias, self.compute_dtype,
                                             self.lora_A if lora else None, self.lora_B if lora else None,
                                             self.scaling if lora else 0.0, p, self.versions_to_check(weight))
        y = self.base_forward(x)  # (..., out) in the compute dtype
        if not lora:
            return y
        return y + _LoRABranch.apply(x, self.lora_A, self.lora_B, self.scaling, p, y.dtype)

    def extra_repr(self) -> str:
        lora = f", r={self.r}, alpha={self.lora_alpha:g}" if self.lora_A is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}, "
                f"bias={self.bias is not None}{lora}")
