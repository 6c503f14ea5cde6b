"""Counting memory: the bytes of every tensor storage alive, by category, and their peak."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = (
    "quantized weights", "unquantized weights", "FSDP gathered weights", "LoRA parameters", "LoRA gradients",
    "optimizer state", "activations", "logits & loss", "backward temporaries", "optimizer temporaries",
    "CUDA workspace",
)
STATIC = ("quantized weights", "unquantized weights", "LoRA parameters")

_BACKEND_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA, "meta": torch._C.DispatchKey.Meta}


class LiveTensors(TorchDispatchMode):
    """Bytes of every tensor storage alive, by category, and their peak.

    Tensors that exist before the mode is entered are counted once `add`ed; every tensor an operator
    returns while the mode is active is counted under the current `phase`, and stops counting the moment
    its storage is freed. Views share their base's storage and count once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = "activations"
        self.current = 0
        self.peak = 0
        self.by_category: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.at_peak: dict[str, int] = dict(self.by_category)
        self._live: dict[int, list] = {}  # storage address -> [nbytes, category, weakref]

    def add(self, t: Tensor, category: str | None = None) -> None:
        """Count t's storage under `category` (default: the current phase); a counted one is re-filed."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, ...)
            return
        key = st._cdata
        entry = self._live.get(key)
        if entry is not None:
            n = st.nbytes()
            if n != entry[0]:  # resized in place
                self._move(entry[1], n - entry[0])
                entry[0] = n
            if category is not None and category != entry[1]:
                self.by_category[entry[1]] -= entry[0]
                self.by_category[category] += entry[0]
                entry[1] = category
            return
        category = category or self.phase
        n = st.nbytes()
        self._live[key] = [n, category, weakref.ref(st, self._freed(key))]
        self._move(category, n)

    def _freed(self, key: int) -> Callable:
        def callback(_ref) -> None:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._move(entry[1], -entry[0])
        return callback

    def _move(self, category: str, n: int) -> None:
        self.by_category[category] += n
        self.current += n
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.by_category)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.at_peak = dict(self.by_category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func.namespace not in ("aten", "prim", "prims"):
            # A custom op (bitsandbytes' kernels) may be Python that allocates its own temporaries: run it
            # with this mode active so those are counted too (aten ops' internal buffers stay invisible).
            key = _BACKEND_KEYS.get(next((t.device.type for t in tree_leaves((args, kwargs))
                                          if isinstance(t, Tensor)), "cpu"))
            if key is not None:
                try:
                    with self:
                        out = func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
                except (RuntimeError, NotImplementedError):
                    out = None
        if out is None:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self.add(t)
        return out


def fmt_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
