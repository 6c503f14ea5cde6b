"""Many LoRA adapters resident beside one frozen quantized base, each row of a batch naming its own.

    y[b] = base(x[b]) + B_{a(b)} A_{a(b)} x[b]          a(b): the adapter row b names (none: the base alone)

Every target layer is wrapped in a `MultiLoraLinear` that keeps all resident adapters' factors side by side along
the rank, each adapter's scale folded into its B: A_all (R, in) and B_all (out, R). Within each layer's forward the
rows of a mixed batch are grouped by adapter:
  * decoding (one token a row) with several adapters that hold most of the layer's ranks: every row times A_all in
    one matmul, each row keeping only its own adapter's ranks (a mask), then one matmul with B_all: every factor
    read once, in two kernels;
  * otherwise, on a CPU, each run of rows naming one adapter takes two matmuls on its own factors, added in place
    (the engine keeps rows sorted by adapter, so runs are long); on a GPU each row's factors are stacked and
    multiplied in one bmm pair per rank (as BGMV kernels gather them).
Rows that name no adapter, or one that leaves this layer alone, get nothing added. Never a forward per adapter, and
no merged weight. Loading an adapter adds its own factors and nothing else (the storage is made again at its new
size, the old freed; the base is never copied); unloading drops them.

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

from . import allocator
from .adapters import check_fingerprint, in_out, read_adapter
from .config import QuantConfig, pattern_lookup
from .layers import QuantLinear
from .patch import fingerprint, linear_names, lora_layers, set_submodule, to_quant_linear


def _add_product(out: Tensor, a: Tensor, B: Tensor) -> None:
    """out += a @ B.T, in place (out is a slice of the layer's output)."""
    if a.dtype == out.dtype:
        out.addmm_(a, B.t())
    else:
        out.add_((a @ B.t()).to(out.dtype))


class MultiLoraLinear(nn.Module):
    """A frozen QuantLinear plus every resident adapter's LoRA factors for it, selected per batch row.

    The factors of all resident adapters sit side by side along the rank: A_all (R, in) and B_all (out, R), adapter
    i owning columns spans[i] = (offset, r), its scale folded into its B.
    """

    def __init__(self, base: QuantLinear, bank: AdapterBank):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        object.__setattr__(self, "bank", bank)  # shared, not a submodule
        self.A_all: Tensor | None = None  # (R, in)
        self.B_all: Tensor | None = None  # (out, R)
        self.owner: Tensor | None = None  # (R,) the adapter id of each rank column
        self.spans: dict[int, tuple[int, int]] = {}  # adapter id -> (first column, rank)

    @property
    def factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """{adapter id: (A (r, in), scale * B (out, r))}, views of the shared storage."""
        return {i: self.factor(i) for i in self.spans}

    def factor(self, i: int) -> tuple[Tensor, Tensor]:
        off, r = self.spans[i]
        return self.A_all[off:off + r], self.B_all[:, off:off + r]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out): the base's own path (Triton kernels on a GPU)
        ids = self.bank.current
        if ids is None or not self.spans:
            return y
        n = len(ids)
        x2 = x.reshape(-1, self.in_features)  # (B*T, in): row b's tokens are rows b*T .. (b+1)*T - 1
        # batch-first (B, ..., in), or flattened batch-first (B*T, in) as some MoE blocks hand their shared expert
        if (x.shape[0] != n and x.dim() > 2) or x2.shape[0] % n:
            raise RuntimeError(f"a layer saw input {tuple(x.shape)} in a batch of {n} rows; per-row adapters need "
                               "the batch dimension first")
        y = y.contiguous()
        out = y.view(-1, self.out_features)  # (B*T, out), a view of y: the products are added in place
        t = x2.shape[0] // n
        runs = [(i, start, stop) for i, start, stop in self.bank.runs if i in self.spans]
        if t == 1 and self._all_at_once(runs):
            # one token a row, most of what is resident in use: every row times every adapter's A in one matmul,
            # each row keeping only its own adapter's ranks, then one matmul with B_all. Each factor is read
            # once, in two kernels, instead of two small matmuls per run
            a = x2.to(self.A_all.dtype) @ self.A_all.t()  # (B, R)
            a.mul_(self.bank.current_tensor[:, None] == self.owner[None, :])
            _add_product(out, a, self.B_all)
        elif self.bank.gathered:
            self._gathered(x2, out, ids, t)
        else:
            for i, start, stop in runs:  # rows start..stop-1 all name adapter i
                A, B = self.factor(i)
                a = x2[start * t: stop * t].to(A.dtype) @ A.t()  # (tokens, r)
                _add_product(out[start * t: stop * t], a, B)
        return y

    def _all_at_once(self, runs: list[tuple[int, int, int]]) -> bool:
        """Whether the whole storage in two matmuls beats a pair of matmuls per run: when there are several runs
        and the batch's adapters hold at least half of this layer's ranks (it reads all of them)."""
        if len(runs) < 3:
            return False
        used = sum(self.spans[i][1] for i in {i for i, _, _ in runs})
        return 2 * used >= self.A_all.shape[0]

    def _gathered(self, x2: Tensor, out: Tensor, ids: list[int], t: int) -> None:
        """Each row's factors stacked and multiplied in one bmm pair per rank: few, large kernels (a GPU's way)."""
        groups: dict[int, list[int]] = {}  # rank -> rows whose adapter has factors here
        for row, i in enumerate(ids):
            if i in self.spans:
                groups.setdefault(self.spans[i][1], []).append(row)
        xs = x2.view(len(ids), t, self.in_features)
        for rows in groups.values():
            A = torch.stack([self.factor(ids[row])[0] for row in rows])  # (n, r, in)
            B = torch.stack([self.factor(ids[row])[1] for row in rows])  # (n, out, r)
            sel = xs if len(rows) == len(ids) else xs[rows]
            d = torch.bmm(torch.bmm(sel.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2)).to(out.dtype)
            if len(rows) == len(ids):
                out.add_(d.view(-1, self.out_features))
            else:
                out.view(len(ids), t, self.out_features).index_add_(0, torch.tensor(rows, device=out.device), d)

    def add(self, adapter_id: int, A: Tensor, B: Tensor) -> None:
        """Append one adapter's A (r, in) and scaled B (out, r) to the storage (a new, exactly sized copy)."""
        r = A.shape[0]
        owner = torch.full((r,), adapter_id, dtype=torch.long, device=A.device)
        if self.A_all is None:
            self.A_all, self.B_all, self.owner = A.contiguous(), B.contiguous(), owner
            self.spans[adapter_id] = (0, r)
            return
        self.spans[adapter_id] = (self.A_all.shape[0], r)
        self.A_all = torch.cat([self.A_all, A])
        self.B_all = torch.cat([self.B_all, B], dim=1)
        self.owner = torch.cat([self.owner, owner])

    def remove(self, adapter_id: int) -> None:
        """Drop one adapter's columns; the ones after it move up."""
        if adapter_id not in self.spans:
            return
        off, r = self.spans.pop(adapter_id)
        if not self.spans:
            self.A_all = self.B_all = self.owner = None
            return
        self.A_all = torch.cat([self.A_all[:off], self.A_all[off + r:]])
        self.B_all = torch.cat([self.B_all[:, :off], self.B_all[:, off + r:]], dim=1)
        self.owner = torch.cat([self.owner[:off], self.owner[off + r:]])
        self.spans = {i: (o - r if o > off else o, k) for i, (o, k) in self.spans.items()}

    def nbytes(self) -> int:
        return 0 if self.A_all is None else sum(t.numel() * t.element_size() for t in (self.A_all, self.B_all))

    def extra_repr(self) -> str:
        return f"adapters={len(self.spans)}, rank={0 if self.A_all is None else self.A_all.shape[0]}"


@dataclass
class PreparedAdapter:
    """An adapter read, checked and made on the device, not yet resident (AdapterBank.prepare)."""

    name: str
    path: str
    base: str | None
    factors: dict[str, tuple[Tensor, Tensor]]  # module -> A (r, in), scale * B (out, r)


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
        self.device = next(t.device for t in [*model.parameters(), *model.buffers()])  # where the base computes
        self.base_fingerprint = fingerprint(model)  # before any layer is wrapped
        self.shapes = {n: in_out(model.get_submodule(n)) for n in linear_names(model)}  # targetable: (in, out)
        self.adapters: dict[str, AdapterInfo] = {}
        self.layers: dict[str, MultiLoraLinear] = {}
        self.current: list[int] | None = None  # adapter id of each row of the batch being computed; 0 = none
        self.runs: list[tuple[int, int, int]] = []  # (adapter id, first row, row after the last) of each run
        self.current_tensor: Tensor | None = None  # `current` on the device
        # A layer's way through a mixed batch when not all at once: a run of rows naming one adapter costs two
        # matmuls, which read each adapter's factors once and copy nothing: fastest on a CPU, where the per-op cost
        # is small, when rows are grouped by adapter (the engine keeps them so). On a GPU, stacking each row's
        # factors for one bmm pair per rank costs a copy but few kernel launches.
        self.gathered = self.device.type == "cuda"
        self._next_id = 1
        self._bytes = 0

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
    def rows(self, adapters: list[str | int | None]) -> Iterator[None]:
        """Compute the forwards inside the block with row b using adapter adapters[b] (a name, an id, or None)."""
        ids = [a if isinstance(a, int) else self.id_of(a) for a in adapters]
        runs, start = [], 0
        for row in range(1, len(ids) + 1):
            if row == len(ids) or ids[row] != ids[start]:
                if ids[start]:
                    runs.append((ids[start], start, row))
                start = row
        before = self.current, self.runs, self.current_tensor
        self.current, self.runs = ids, runs
        self.current_tensor = torch.tensor(ids, device=self.device)
        try:
            yield
        finally:
            self.current, self.runs, self.current_tensor = before

    def load(self, name: str, path: str | os.PathLike, check_base: bool = True) -> AdapterInfo:
        """Read a PEFT adapter folder and make it resident under `name` (`prepare`, then `install`).

        Raises:
            ValueError: a taken or empty name, an unreadable adapter, or one made for another base (its recorded
                fingerprint, or a target or shape this base has not); nothing changes then.
        """
        return self.install(self.prepare(name, path, check_base))

    def prepare(self, name: str, path: str | os.PathLike, check_base: bool = True) -> PreparedAdapter:
        """Read and check an adapter and make its factors on the base's device, changing nothing in the bank (a
        server does this while generation goes on). Raises ValueError as `load`."""
        self._check_name(name)
        path = Path(path)
        config, pairs = read_adapter(path)
        if check_base:
            check_fingerprint(path, config, self.base_fingerprint)
        if config.get("target_parameters"):
            raise ValueError(f"{path}: adapter has expert (MoE) factors, which serving does not support yet")
        for module, (a, b) in pairs.items():  # check everything before making anything
            if module not in self.shapes:
                raise ValueError(f"{path}: adapter targets {module!r}, which this base has not as a linear layer "
                                 f"(an adapter for another base? its base was {config.get('base_model_name_or_path')!r})")
            in_f, out_f = self.shapes[module]
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise ValueError(f"{path}: adapter for {module!r} has A {tuple(a.shape)}, B {tuple(b.shape)}, but the "
                                 f"base's layer is {in_f} -> {out_f} (an adapter for another base?)")
        alphas, rslora = config.get("alpha_pattern") or {}, bool(config.get("use_rslora", False))
        device, factors = self.device, {}
        for module in list(pairs):
            a, b = pairs.pop(module)
            r = a.shape[0]
            alpha = float(pattern_lookup(alphas, module, config.get("lora_alpha", 8)))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            A = a.to(device, self.dtype).contiguous()
            if b.dtype == torch.float32 and self.dtype == torch.float32 and b.device == device:
                B = b.mul_(scale).contiguous()  # in place: no second copy for malloc to keep
            else:
                B = (b.to(device, torch.float32) * scale).to(self.dtype).contiguous()
            factors[module] = A, B
        allocator.trim()  # what reading the file freed goes back to the system: the process grows by the factors
        return PreparedAdapter(name, str(path), config.get("base_model_name_or_path"), factors)

    def install(self, prepared: PreparedAdapter) -> AdapterInfo:
        """Make a prepared adapter resident (must not overlap a forward). Raises ValueError for a taken name."""
        self._check_name(prepared.name)
        adapter_id = self._next_id
        self._next_id += 1
        ranks = [A.shape[0] for A, _ in prepared.factors.values()]
        nbytes = sum(t.numel() * t.element_size() for ab in prepared.factors.values() for t in ab)
        for module, (A, B) in prepared.factors.items():
            self._layer(module).add(adapter_id, A, B)
        info = AdapterInfo(prepared.name, adapter_id, prepared.path, max(set(ranks), key=ranks.count),
                           len(ranks), nbytes, prepared.base, sorted(prepared.factors))
        prepared.factors = {}  # copied into the layers' storage (or become it): nothing else holds them
        self.adapters[prepared.name] = info
        self._bytes += nbytes
        allocator.trim()  # the storage each layer had before it grew, and the prepared copies, go back to the system
        return info

    def _check_name(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")

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
        self._bytes -= info.nbytes
        allocator.trim()

    def nbytes(self) -> int:
        """Bytes of every resident adapter's factors (unloaded ones still in use included); safe to read from
        any thread."""
        return self._bytes

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

