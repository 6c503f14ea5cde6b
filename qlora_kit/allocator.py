"""Handing memory that a CPU process freed back to the system, so that its resident set follows what is alive.

torch's CPU allocator takes every tensor from malloc and gives it back when the tensor dies. glibc keeps what
it gets back for reuse: once a large block has been freed, blocks up to 32 MiB come from its heaps instead of
their own mappings, and those heaps fragment. Over a training step of many tensor sizes the process ends up
holding about as much free memory as live (SmolLM2-135M, nf4, 4 x 512: 3.0 GiB allocated at the peak, 7.1 GiB
resident). malloc_trim(0) returns every free page of every heap.

Three uses: the merge gives large blocks their own mappings (`own_mappings_from`); the streaming loader calls `trim` every 64 MiB of checkpoint read (loading._FreedMemory), and
training on the CPU calls it at every decoder layer boundary, forward and backward (`release_between_layers`),
which keeps the peak resident set near the allocator's peak at some cost in speed (the released pages are
faulted in again when reused). Where there is no glibc these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def available() -> bool:
    """Whether this process's C library can hand free heap memory back (glibc)."""
    return _malloc_trim() is not None


def trim() -> None:
    """Hand every free page of malloc's heaps back to the system (glibc malloc_trim(0)); elsewhere nothing."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def own_mappings_from(nbytes: int) -> bool:
    """Give every block of at least `nbytes` its own mapping, returned to the system when freed (glibc's
    M_MMAP_THRESHOLD, fixed: glibc otherwise raises it up to 32 MiB as large blocks are freed, and then serves
    them from heaps that fragment). For a job of few, large tensors (the merge) the resident set then follows
    what is alive; many small ones would pay a page fault per allocation. Returns whether it took effect."""
    fn = _mallopt()
    return bool(fn is not None and fn(M_MMAP_THRESHOLD, nbytes))


class _Released:
    """The hooks `release_between_layers` installed; `remove()` takes them out."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _trim_on_grad(grad: Tensor) -> None:
    trim()


def _after_layer(_module: nn.Module, _args, output) -> None:
    if not torch.is_grad_enabled():  # evaluation and generation: nothing is kept between layers anyway
        return
    trim()
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(out, Tensor) and out.requires_grad:
        out.register_hook(_trim_on_grad)  # runs when backward reaches this layer's output


def release_between_layers(model: nn.Module) -> _Released:
    """Trim malloc's heaps after every decoder layer's forward and before its backward, on the CPU, in
    training (forwards under torch.no_grad, evaluation and generation, are left alone).

    A no-op (nothing installed) where the model is not on the CPU, where there is no glibc, or where the model
    has no decoder layers. Installing trims once (what building the model freed). Under transformers' gradient
    checkpointing the hooks stay outside the checkpointed
    forward: a layer's recomputation runs after the trim that its output's gradient hook makes.
    Returns a handle whose `remove()` takes the hooks out.
    """
    from .loss import decoder_layers

    layers = decoder_layers(model)
    param = next(model.parameters(), None)
    if layers is None or param is None or param.device.type != "cpu" or not available():
        return _Released([])
    trim()  # what building the model freed
    return _Released([layer.register_forward_hook(_after_layer) for layer in layers])
