"""Many LoRA adapters resident beside one frozen quantized base, each row of a batch naming its own.

    y[b] = base(x[b]) + B_{a(b)} A_{a(b)} x[b]          a(b): the adapter row b names (none: the base alone)

Every target layer is wrapped in a `MultiLoraLinear` that keeps, per rank, one stack of the adapters' factors
with the adapter's scale folded into B: A (slots, r, in) and s*B (slots, out, r), slot 0 all zeros for rows
that name no adapter (or an adapter that leaves this layer alone). A mixed batch costs one gathered batched
matmul pair per layer and rank (as BGMV kernels do), never a forward per adapter, and no merged weight.
Loading an adapter appends its own factors to the stacks; the base is never copied.

The `AdapterBank` owns the names and the current batch's per-row adapter ids (`with bank.rows(...)`).
Changes to the bank (load, unload) must not overlap a forward: the serving engine makes them between steps.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import FINGERPRINT, read_adapter
from .config import QuantConfig, pattern_lookup
from .layers import QuantLinear
from .patch import fingerprint, linear_names, lora_layers, set_submodule, to_quant_linear


@dataclass
class _RankStack:
    """The factors of every adapter of one rank on one layer; slot 0 is zeros."""

    A: Tensor  # (slots, r, in)
    B: Tensor  # (slots, out, r), scale folded in
    slot_of: Tensor  # (adapter ids,) long: each adapter id's slot, 0 where it has none here


class MultiLoraLinear(nn.Module):
    """A frozen QuantLinear plus every resident adapter's LoRA factors for it, selected per batch row."""

    def __init__(self, base: QuantLinear, bank: AdapterBank):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        object.__setattr__(self, "bank", bank)  # shared, not a submodule
        self.stacks: dict[int, _RankStack] = {}  # by rank; usually one

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out): the base's own path (Triton kernels on a GPU)
        ids = self.bank.current
        if ids is None or not self.stacks:
            return y
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in): the batch dimension comes first
        if flat.shape[0] != ids.shape[0]:
            raise RuntimeError(f"a layer saw {flat.shape[0]} rows in a batch of {ids.shape[0]}; per-row adapters "
                               "need the batch dimension first")
        out = None
        for stack in self.stacks.values():
            slot = stack.slot_of[ids]  # (B,)
            a = torch.bmm(flat.to(stack.A.dtype), stack.A[slot].transpose(1, 2))  # (B, T, r)
            d = torch.bmm(a, stack.B[slot].transpose(1, 2))  # (B, T, out)
            out = d if out is None else out + d
        return y + out.reshape(y.shape).to(y.dtype)

    def add(self, adapter_id: int, A: Tensor, B: Tensor, n_ids: int) -> None:
        """Append one adapter's A (r, in) and scaled B (out, r) to the stack of its rank."""
        r = A.shape[0]
        stack = self.stacks.get(r)
        if stack is None:
            zeros = torch.zeros((1, r, self.in_features), dtype=A.dtype, device=A.device)
            stack = _RankStack(zeros, torch.zeros((1, self.out_features, r), dtype=B.dtype, device=B.device),
                               torch.zeros(0, dtype=torch.long, device=A.device))
        slots = stack.A.shape[0]
        stack.A = torch.cat([stack.A, A[None]])
        stack.B = torch.cat([stack.B, B[None]])
        stack.slot_of = _grow(stack.slot_of, n_ids)
        stack.slot_of[adapter_id] = slots
        self.stacks[r] = stack

    def remove(self, adapter_id: int) -> None:
        """Drop one adapter's factors; the other adapters' slots close up."""
        for r, stack in list(self.stacks.items()):
            if adapter_id >= len(stack.slot_of) or not stack.slot_of[adapter_id]:
                continue
            s = int(stack.slot_of[adapter_id])
            if stack.A.shape[0] == 2:  # only the zero slot would remain
                del self.stacks[r]
                continue
            stack.A = torch.cat([stack.A[:s], stack.A[s + 1:]])
            stack.B = torch.cat([stack.B[:s], stack.B[s + 1:]])
            stack.slot_of[adapter_id] = 0
            stack.slot_of[stack.slot_of > s] -= 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.stacks.values() for t in (s.A, s.B))

    def extra_repr(self) -> str:
        n = sum(s.A.shape[0] - 1 for s in self.stacks.values())
        return f"adapters={n}, ranks={sorted(self.stacks)}"


def _grow(t: Tensor, n: int) -> Tensor:
    if len(t) >= n:
        return t
    return torch.cat([t, torch.zeros(n - len(t), dtype=t.dtype, device=t.device)])


@dataclass
class AdapterInfo:
    """One resident adapter."""

    name: str
    id: int
    path: str | None
    rank: int  # the most common rank of its layers
    layers: int
    nbytes: int  # its factors as stored here
    base: str | None = None  # the base it names (base_model_name_or_path)
    targets: list[str] = field(default_factory=list)


class AdapterBank:
    """Adapters by name on one base model, and the per-row adapter ids of the batch being computed.

    Args:
        model: a model from `load_quantized` without LoRA layers (the shared, frozen base).
        dtype: the dtype the factors are kept and multiplied in (default float32; bf16 halves their memory).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        if lora_layers(model):
            raise ValueError("the base model already has LoRA layers; serve a model without them and load "
                             "adapters by name")
        self.model, self.dtype = model, dtype
        self.base_fingerprint = fingerprint(model)  # before any layer is wrapped
        self.shapes = {n: _in_out(model.get_submodule(n)) for n in linear_names(model)}  # targetable: (in, out)
        self.adapters: dict[str, AdapterInfo] = {}
        self.layers: dict[str, MultiLoraLinear] = {}
        self.current: Tensor | None = None  # (B,) adapter ids of the batch being computed; 0 = none
        self._next_id = 1

    @property
    def device(self) -> torch.device:
        return next(t.device for t in [*self.model.parameters(), *self.model.buffers()])

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def id_of(self, name: str | None) -> int:
        """The id rows use for an adapter name (0 for None: the base alone). Raises KeyError for an unknown one."""
        if name is None:
            return 0
        if name not in self.adapters:
            raise KeyError(name)
        return self.adapters[name].id

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None] | list[int] | Tensor) -> Iterator[None]:
        """Compute the forwards inside the block with row b using adapter adapters[b] (a name, an id, or None)."""
        if not isinstance(adapters, Tensor):
            adapters = torch.tensor([a if isinstance(a, int) else self.id_of(a) for a in adapters], dtype=torch.long)
        before, self.current = self.current, adapters.to(self.device)
        try:
            yield
        finally:
            self.current = before

    def load(self, name: str, path: str | os.PathLike, check_base: bool = True) -> AdapterInfo:
        """Read a PEFT adapter folder and make it resident under `name`.

        Raises:
            ValueError: a taken or empty name, an unreadable adapter, or one made for another base (its recorded
                fingerprint, or a target or shape this base has not); nothing changes then.
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        path = Path(path)
        config, pairs = read_adapter(path)
        recorded = config.get(FINGERPRINT)
        if check_base and recorded and recorded != self.base_fingerprint:
            raise ValueError(f"{path}: adapter was trained on a different base model (fingerprint {recorded}, this "
                             f"base's is {self.base_fingerprint}; its base was "
                             f"{config.get('base_model_name_or_path')!r})")
        if config.get("target_parameters"):
            raise ValueError(f"{path}: adapter has expert (MoE) factors, which serving does not support yet")
        for module, (a, b) in pairs.items():  # check everything before changing anything
            if module not in self.shapes:
                raise ValueError(f"{path}: adapter targets {module!r}, which this base has not as a linear layer "
                                 f"(an adapter for another base? its base was {config.get('base_model_name_or_path')!r})")
            in_f, out_f = self.shapes[module]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise ValueError(f"{path}: adapter for {module!r} has A {tuple(a.shape)}, B {tuple(b.shape)}, but the "
                                 f"base's layer is {in_f} -> {out_f} (an adapter for another base?)")
        alphas, rslora = config.get("alpha_pattern") or {}, bool(config.get("use_rslora", False))
        adapter_id, device = self._next_id, self.device
        self._next_id += 1
        nbytes, ranks = 0, []
        for module, (a, b) in pairs.items():
            r = a.shape[0]
            alpha = float(pattern_lookup(alphas, module, config.get("lora_alpha", 8)))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            A = a.to(device, self.dtype).contiguous()
            B = (b.to(device, torch.float32) * scale).to(self.dtype).contiguous()
            self._layer(module).add(adapter_id, A, B, self._next_id)
            nbytes += A.numel() * A.element_size() + B.numel() * B.element_size()
            ranks.append(r)
        for layer in self.layers.values():  # every layer's id table covers the new id
            for stack in layer.stacks.values():
                stack.slot_of = _grow(stack.slot_of, self._next_id)
        info = AdapterInfo(name, adapter_id, str(path), max(set(ranks), key=ranks.count), len(pairs), nbytes,
                           config.get("base_model_name_or_path"), sorted(pairs))
        self.adapters[name] = info
        return info

    def unload(self, name: str) -> AdapterInfo:
        """Forget an adapter's name and free its factors. Raises KeyError for an unknown name."""
        info = self.detach(name)
        self.free(info)
        return info

    def detach(self, name: str) -> AdapterInfo:
        """Forget an adapter's name, keeping its factors for rows that still use its id (see `free`)."""
        return self.adapters.pop(name)

    def free(self, info: AdapterInfo) -> None:
        """Free the factors of a detached adapter."""
        for layer in self.layers.values():
            layer.remove(info.id)

    def nbytes(self) -> int:
        """Bytes of every resident adapter's factors, the zero slots included."""
        return sum(layer.nbytes() for layer in self.layers.values())

    def _layer(self, name: str) -> MultiLoraLinear:
        """The wrapped layer at `name`, wrapping it on first use."""
        if name not in self.layers:
            module = self.model.get_submodule(name)
            if not isinstance(module, QuantLinear):  # a layer kept dense (quant 'none')
                module = to_quant_linear(module, QuantConfig(quant="none", compute_dtype=module.weight.dtype)).to(
                    module.weight.device)
            self.layers[name] = MultiLoraLinear(module, self)
            set_submodule(self.model, name, self.layers[name])
        return self.layers[name]


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, QuantLinear):
        return module.in_features, module.out_features
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else (w.shape[0], w.shape[1])
