"""Running a causal LM one decoder block at a time, as GPTQ implementations do.

The model's own forward computes what goes into the first block (embeddings, rotary tables, causal masks)
while each block is replaced by a recorder; from there, activations are carried through the blocks one by
one, each block called with the arguments the model gave it; at the end the model's own forward computes
the head (final norm, output layer, soft-capping) from injected hidden states. So only one block's weights
need to be in memory, and nothing model-specific is rewritten.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .layers import QuantLinear
from .patch import set_submodule


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block `i`: keeps its inputs; the last one stops the forward."""

    def __init__(self, i: int, layer: nn.Module, sink: dict, last: bool):
        super().__init__()
        self.i, self.sink, self.last = i, sink, last
        if hasattr(layer, "attention_type"):  # models that pick a mask per block read it (sliding / full)
            self.attention_type = layer.attention_type

    def forward(self, hidden: Tensor, *args, **kwargs):
        if self.i == 0:
            self.sink["hidden"] = hidden
        self.sink.setdefault("args", {})[self.i] = (args, kwargs)
        if self.last:
            raise _Stop
        return hidden


class _Inject(nn.Module):
    """Stands in for block `i` in the final pass: the first returns the carried hidden states."""

    def __init__(self, i: int, layer: nn.Module, value: Tensor, as_tuple: bool):
        super().__init__()
        self.i, self.value, self.as_tuple = i, value, as_tuple
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden: Tensor, *args, **kwargs):
        out = self.value if self.i == 0 else hidden
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def _standing_in(layers: nn.ModuleList, make) -> Iterator[None]:
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = make(i, layer)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@dataclass
class Stream:
    """Activations of a set of rows on their way through the blocks, in minibatches."""

    hidden: list[Tensor] = field(default_factory=list)  # per minibatch: (B, T, D)
    calls: list[dict] = field(default_factory=list)  # per minibatch: block index -> (args, kwargs)
    batches: list[dict] = field(default_factory=list)  # per minibatch: input_ids, attention_mask, labels


@torch.no_grad()
def start(model: nn.Module, layers: nn.ModuleList, batches: list[dict]) -> Stream:
    """The inputs of every block for each minibatch, from the model's own forward (blocks not needed)."""
    stream = Stream()
    for batch in batches:
        sink: dict = {}
        with _standing_in(layers, lambda i, layer, sink=sink: _Recorder(i, layer, sink, i == len(layers) - 1)):
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except _Stop:
                pass
        stream.hidden.append(sink["hidden"].detach().float())
        stream.calls.append(sink["args"])
        stream.batches.append(batch)
    return stream


@torch.no_grad()
def advance(block: nn.Module, i: int, stream: Stream) -> bool:
    """Carry the stream through block `i`, in place; returns whether the block returns a tuple."""
    as_tuple = False
    for b, h in enumerate(stream.hidden):
        args, kwargs = stream.calls[b][i]
        out = block(h, *args, **kwargs)
        as_tuple = isinstance(out, tuple)
        stream.hidden[b] = (out[0] if as_tuple else out).float()
    return as_tuple


@torch.no_grad()
def head(model: nn.Module, layers: nn.ModuleList, hidden: Tensor, batch: dict, as_tuple: bool) -> Tensor:
    """The model's fp32 logits (B, T, V) for one minibatch, from its final hidden states."""
    with _standing_in(layers, lambda i, layer: _Inject(i, layer, hidden, as_tuple)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits.float()


# ---- a block's weights, swapped for a while ----------------------------------------------------------

@contextlib.contextmanager
def twins(block: nn.Module, prefix: str, linears: dict[str, QuantLinear], weights: dict[str, Tensor],
           keep_lora: bool, bias_dtype: torch.dtype = torch.float32) -> Iterator[dict[str, QuantLinear]]:
    """Inside: every quantized linear of the block replaced by a dense fp32 twin holding `weights[name]` (so the
    block's forward decodes nothing), with the layer's LoRA factors (keep_lora) or none; yields the twins."""
    dense = QuantConfig(quant="none", compute_dtype=torch.float32)
    twins = {}
    for n, m in linears.items():
        bias = None if m.bias is None else m.bias.to(bias_dtype).float()
        twin = QuantLinear(m.in_features, m.out_features, {"weight": weights[n]}, dense, bias)
        if keep_lora and m.lora_A is not None:
            twin.lora_A, twin.lora_B = m.lora_A, m.lora_B
            twin.r, twin.lora_alpha, twin.scaling, twin.rslora = m.r, m.lora_alpha, m.scaling, m.rslora
        twins[n] = twin
        set_submodule(block, n[len(prefix):], twin)
    try:
        yield twins
    finally:
        for n, m in linears.items():
            set_submodule(block, n[len(prefix):], m)


@contextlib.contextmanager
def lora_off(layers) -> Iterator[None]:
    layers = list(layers)
    for m in layers:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.lora_enabled = True


def written(root: nn.Module, skip: str | None, store, prefix: str = "") -> dict[nn.Parameter, Tensor]:
    """The fp32 values the export stores for root's floating-point tensors outside its linear layers, for those
    the export changes. `store` is a dtype (the tensors are cast to it), or a function (checkpoint key, tensor)
    -> the fp32 value a reader gets back, or None when that is the tensor itself."""
    if isinstance(store, torch.dtype):
        dtype = store

        def store(key: str, t: Tensor) -> Tensor | None:
            return t.detach().to(dtype).float() if _cast_changes(t, dtype) else None

    out = {}
    quantized = {n for n, m in root.named_modules() if isinstance(m, QuantLinear)}
    for name, p in list(root.named_parameters()) + list(root.named_buffers()):
        owner = name.rpartition(".")[0]
        if p.is_meta or not p.is_floating_point() or owner in quantized or (skip and name.startswith(skip + ".")):
            continue
        value = store(prefix + name, p)
        if value is not None:
            out[p] = value
    return out


def _cast_changes(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether casting to `dtype` changes any value (checked a slice at a time: no whole copy in memory)."""
    return any(not torch.equal(piece.to(dtype).float(), piece) for piece in t.detach().reshape(-1).split(1 << 22))


@contextlib.contextmanager
def swapped(values: dict[Tensor, Tensor]) -> Iterator[None]:
    """Tensors' data replaced by `values` inside."""
    before = {}
    for t, v in values.items():
        before[t] = t.data
        t.data = v
    try:
        yield
    finally:
        for t, d in before.items():
            t.data = d


class _ZeroEmbedding(nn.Module):
    """Stands in for an embedding not read at the end of a pass: the blocks' outputs are injected there, so
    the model's embedding output is never used; zeros of the right shape keep its forward going."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(*ids.shape, self.dim)


@contextlib.contextmanager
def embedding_unread(model: nn.Module, ends: tuple[str, str] | None) -> Iterator[None]:
    if ends is None:
        yield
        return
    embed = model.get_input_embeddings()
    model.set_input_embeddings(_ZeroEmbedding(embed.weight.shape[1]))
    try:
        yield
    finally:
        model.set_input_embeddings(embed)


def batches(seqs, size: int) -> list[dict]:
    """Rows of a data.Sequences in minibatches of `size`."""
    return [seqs.select(slice(i, min(i + size, len(seqs)))) for i in range(0, len(seqs), size)]


def copy(stream: Stream) -> Stream:
    return Stream([h.clone() for h in stream.hidden], stream.calls, stream.batches)
