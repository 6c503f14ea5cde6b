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

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


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
