"""Mixture-of-Experts weights: 3-D expert stacks stored quantized per expert, with LoRA per expert.

transformers keeps a MoE layer's experts as 3-D parameters, e.g. `experts.gate_up_proj` of shape
(experts, 2 * intermediate, hidden), and computes them in an experts module. Here each such parameter
becomes an `ExpertStack`: one frozen `QuantLinear` per expert, in the same block layout, kernels and
LoRA branch as every other quantized linear. The experts module keeps its class, its routing,
activation and biases; its forward is transformers' own experts interface entry `qlora_kit`
(registered below), which runs only the experts tokens are routed to, one expert at a time, so no
dense copy of the experts is ever made and the backward keeps only packed weights.

Two kinds of experts module are handled:
* modules built with transformers' `use_experts_implementation` (Mixtral, Qwen-MoE, OLMoE, gpt-oss ...):
  the stack replaces the parameter under its own name;
* "parallel experts" modules with one 3-D `weight` and `forward(inputs, expert_size)` (JetMoE): the
  stack replaces the whole module and answers the same call.

LoRA factors live per expert; on disk they use PEFT's layout for 3-D parameters
(`LoraConfig(target_parameters=[...])`): lora_A (r * E, in) with expert e in rows e*r..e*r+r-1,
lora_B (out, r * E) with column j*E + e holding expert e's column j.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .layers import QuantLinear

IMPLEMENTATION = "qlora_kit"  # the name of this package's forward in transformers' experts interface


class ExpertStack(nn.ModuleList):
    """E frozen quantized experts standing for one 3-D parameter (E, out, in), or (E, in, out) when the
    source stores it transposed, as gpt-oss does."""

    def __init__(self, experts: list[QuantLinear], transposed: bool, param_name: str, replaces_module: bool,
                 order: int = 0):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.in_features, self.out_features = experts[0].in_features, experts[0].out_features
        self.transposed = transposed  # the source parameter is (E, in, out)
        self.param_name = param_name  # the parameter's name in its module ('gate_up_proj', or 'weight')
        self.replaces_module = replaces_module  # a parallel-experts module, replaced whole
        self.order = order  # the parameter's place among its module's parameters (PEFT nests by it)

    @classmethod
    def from_dense(cls, stack: Tensor, cfg: QuantConfig, transposed: bool, param_name: str,
                   replaces_module: bool = False, order: int = 0) -> ExpertStack:
        """Quantize a dense (E, out, in) stack ((E, in, out) if transposed) one expert at a time."""
        experts = [QuantLinear.from_dense(stack[e], cfg, fan_in_fan_out=transposed) for e in range(stack.shape[0])]
        return cls(experts, transposed, param_name, replaces_module, order)

    def dense(self, dtype: torch.dtype | None = None, with_lora: bool = False) -> Tensor:
        """The stack as transformers' parameter: (E, out, in), or (E, in, out) when transposed."""
        mats = []
        for layer in self:
            w = layer.dequantize(dtype or layer.compute_dtype)
            if with_lora and layer.lora_A is not None:
                w = w + layer.delta_weight().to(w.dtype)
            mats.append(w.t() if self.transposed else w)
        return torch.stack(mats)

    def forward(self, inputs: Tensor, expert_size: list[int]) -> Tensor:
        """The parallel-experts call: rows of `inputs` sorted by expert, `expert_size[e]` rows each."""
        parts = inputs.split(expert_size, dim=0)
        return torch.cat([self[e](x) for e, x in enumerate(parts)], dim=0)

    # ---- LoRA, in PEFT's stacked layout ------------------------------------------------------
    def peft_factors(self) -> tuple[Tensor, Tensor]:
        """(lora_A (r*E, in), lora_B (out, r*E)) as PEFT stores a 3-D parameter's factors."""
        a = torch.cat([layer.lora_A.detach() for layer in self], dim=0)
        b = torch.stack([layer.lora_B.detach() for layer in self], dim=2)  # (out, r, E)
        return a, b.reshape(self.out_features, -1)

    def split_peft_factors(self, a: Tensor, b: Tensor, r: int) -> list[tuple[Tensor, Tensor]]:
        """Per-expert (A (r, in), B (out, r)) from PEFT's stacked factors; the caller checked the shapes."""
        a = a.reshape(self.num_experts, r, self.in_features)
        b = b.reshape(self.out_features, r, self.num_experts).permute(2, 0, 1)
        return [(a[e], b[e]) for e in range(self.num_experts)]

    def extra_repr(self) -> str:
        first = self[0]
        lora = f", r={first.r}" if first.lora_A is not None else ""
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"quant={first.quant}{lora}")


def expert_parameters(model: nn.Module) -> dict[str, tuple[bool, bool, int]]:
    """The model's 3-D expert parameters: {'<module>.<param>': (transposed, replaces_module, order)}.

    A parameter is an expert stack when it is 3-D, its first size is the module's expert count, and
    the module is one this package can compute: built with transformers' experts interface, or a
    parallel-experts module (one 3-D `weight`, `forward(inputs, expert_size)`).
    """
    out = {}
    for name, module in model.named_modules():
        count = getattr(module, "num_experts", None)
        for order, (leaf, p) in enumerate(module.named_parameters(recurse=False)):
            if p.ndim != 3 or p.shape[0] != count:
                continue
            path = f"{name}.{leaf}" if name else leaf
            if _uses_interface(module):
                out[path] = (bool(getattr(module, "is_transposed", False)), False, order)
            elif leaf == "weight" and _parallel_experts(module):
                out[path] = (False, True, order)
    return out


def _uses_interface(module: nn.Module) -> bool:
    """Built with transformers' `use_experts_implementation` (which sets these attributes; early 5.x releases
    set only `has_bias` and `is_transposed`)."""
    return all(hasattr(module, a) for a in ("has_bias", "is_transposed", "config"))


def _parallel_experts(module: nn.Module) -> bool:
    params = list(inspect.signature(type(module).forward).parameters)
    return params[1:] == ["inputs", "expert_size"] and len(list(module.parameters(recurse=False))) == 1


def router_linears(model: nn.Module) -> set[str]:
    """Linear layers that route tokens to experts: in the block that holds an experts module, outside it,
    reading what the experts read (hidden size in) and giving one output per expert. They stay in the
    compute dtype and take no LoRA."""
    out = set()
    for name, module in model.named_modules():
        width = _experts_input(module)
        if width is None:
            continue
        count = module.num_experts
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_modules():
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if child_name and path != name and not path.startswith(name + ".") \
                    and isinstance(child, (nn.Linear, QuantLinear)) \
                    and (child.out_features, child.in_features) == (count, width):
                out.add(path)
    return out


def _experts_input(module: nn.Module) -> int | None:
    """The input width of an experts module (its 3-D parameters, or stacks once loaded), else None."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int):
        return None
    if isinstance(module, ExpertStack):
        return module.in_features if module.replaces_module else None
    stacks = [c for c in module.children() if isinstance(c, ExpertStack)]
    if stacks:
        return min(stacks, key=lambda st: st.order).in_features
    for p in module.parameters(recurse=False):  # the first 3-D one: the up projection
        if p.ndim == 3 and p.shape[0] == count:
            return p.shape[1] if getattr(module, "is_transposed", False) else p.shape[2]
    return None


def expert_stacks(model: nn.Module) -> dict[str, ExpertStack]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertStack)}


def place_stack(model: nn.Module, path: str, stack: ExpertStack) -> None:
    """Put a stack where its 3-D parameter (or parallel-experts module) was."""
    owner_name, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if stack.replaces_module:
        parent_name, _, child = owner_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, stack)
        return
    del owner._parameters[leaf]
    owner.add_module(leaf, stack)
    config = getattr(owner, "config", None)
    if config is not None:
        config._experts_implementation = IMPLEMENTATION


def peft_key(model: nn.Module, stack_name: str, targeted: set[str]) -> tuple[str, str]:
    """(module key, target_parameters entry) PEFT uses for a stack's LoRA factors.

    PEFT wraps each targeted parameter of a module in its own wrapper, nested in the module's
    parameter order (the first parameter innermost), so a stack's factors sit under its owner's path
    plus one `.base_layer` per targeted stack of the same owner that comes after it.
    """
    stack = model.get_submodule(stack_name)
    if stack.replaces_module:
        return stack_name, peft_target(stack_name, stack)
    owner_name = stack_name.rpartition(".")[0]
    owner = model.get_submodule(owner_name)
    later = [n for n, m in owner.named_children()
             if isinstance(m, ExpertStack) and m.order > stack.order and f"{owner_name}.{n}" in targeted]
    return owner_name + ".base_layer" * len(later), stack_name


def peft_target(stack_name: str, stack: ExpertStack) -> str:
    """The stack's entry in PEFT's `target_parameters`: the 3-D parameter's path."""
    return f"{stack_name}.weight" if stack.replaces_module else stack_name


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts call over ExpertStacks: tokens grouped by expert, only routed experts run.

    hidden_states (T, H); top_k_index, top_k_weights (T, k). Follows the flags transformers' experts
    decorator sets on the module (gate, bias, post-expert norm) and its `_apply_gate`.
    """
    gated = getattr(self, "has_gate", True)
    up = self.gate_up_proj if gated else self.up_proj
    up_bias = (self.gate_up_proj_bias if gated else self.up_proj_bias) if self.has_bias else None
    down = self.down_proj
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)  # sums in fp32
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    if flat.is_meta:
        return _meta_experts(self, hidden_states, top_k_weights, up, up_bias, down, out)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=up.num_experts).tolist()  # one host sync per layer
    weights = top_k_weights.reshape(-1)[order]
    tokens = order // k
    start = 0
    for e, n in enumerate(counts):
        if n == 0 or e >= up.num_experts:  # ids past the last expert are expert-parallel sentinels
            start += n
            continue
        idx, w = tokens[start:start + n], weights[start:start + n]
        start += n
        _run_expert(self, e, hidden_states, idx, w, up, up_bias, down, out)
    return out.to(hidden_states.dtype)


def _run_expert(self: nn.Module, e: int, hidden_states: Tensor, idx: Tensor, w: Tensor, up: ExpertStack,
                up_bias: Tensor | None, down: ExpertStack, out: Tensor) -> None:
    h = up[e](hidden_states[idx])  # (n, out of the up projection)
    if up_bias is not None:
        h = h + up_bias[e]
    if not getattr(self, "has_gate", True):
        h = self.act_fn(h)
    elif hasattr(self, "_apply_gate"):  # the class's own gating (gpt-oss: interleaved, clamped)
        h = self._apply_gate(h)
    else:
        gate, lin = h.chunk(2, dim=-1)
        h = self.act_fn(gate) * lin
    y = down[e](h)  # (n, H)
    if self.has_bias:
        y = y + self.down_proj_bias[e]
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    out.index_add_(0, idx, (y * w[:, None]).to(out.dtype))


def _meta_experts(self: nn.Module, hidden_states: Tensor, top_k_weights: Tensor, up: ExpertStack,
                  up_bias: Tensor | None, down: ExpertStack, out: Tensor) -> Tensor:
    """A memory estimate (meta tensors, no routing values): every routed (token, expert) pair runs through
    one expert. What the forward keeps is the same in sum as over the real routed groups (the same token
    count, one decoded weight at a time), at 1/E of the Python work; every other expert's LoRA factors
    then get their gradients in backward, as the routed pairs give them."""
    n = top_k_weights.numel()
    idx = torch.empty(n, dtype=torch.long, device="meta")
    _run_expert(self, 0, hidden_states, idx, top_k_weights.reshape(-1), up, up_bias, down, out)
    others = [p for stack in (up, down) for layer in list(stack)[1:] for p in (layer.lora_A, layer.lora_B)
              if p is not None and p.requires_grad]
    out = out.to(hidden_states.dtype)
    return _GradsFor.apply(out, *others) if others else out


class _GradsFor(torch.autograd.Function):
    """Identity on `x` that gives `params` a (zero) gradient in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, *params: Tensor) -> Tensor:
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)


_register()
