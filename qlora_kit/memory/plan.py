"""Planning with the estimate: the largest sequence length or batch that fits a budget, and sweeps."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import re
from collections.abc import Callable
from pathlib import Path

from ..config import TrainConfig, one_line
from ..io import atomic_write_bytes
from ..loading import resolve_device
from .counting import fmt_bytes
from .estimate import MemoryReport, check_measurable, estimate, measure
from .models import read_model_config

SWEEP_KEYS = {"rank": int, "seq-len": int, "batch-size": int, "quant": str, "optimizer": str,
              "gradient-checkpointing": lambda v: _bool(v), "double-quant": lambda v: _bool(v)}

def parse_size(text: str, allow_zero: bool = False) -> int:
    """'24GiB', '24GB', '512MiB', '80G' (G = GiB) or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m or not m.group(1):
        raise ValueError(f"memory size {text!r} is not a size like 24GiB, 24GB or 512MiB")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".find(prefix) + 1 if prefix else 0
    base = 1000 if suffix.upper() == "B" and prefix else 1024  # GB = 10^9, GiB and bare G = 2^30
    value = int(number * base**power)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"memory size {text!r} must be positive")
    return value


@dataclasses.dataclass
class FitResult:
    what: str  # 'seq_len' or 'batch_size'
    budget: int
    reserve: int
    best: int | None  # the largest value that fits with the given settings (None: nothing fits)
    report: MemoryReport | None  # the estimate at `best`
    alternatives: list[dict]  # switches and the largest value that fits with them
    limit: int = 0  # the search's upper end (the model's context for a sequence length)


SWITCHES = (  # what to switch on, in order of what it costs (speed or quality)
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("8-bit optimizer", {"optimizer": "adamw8bit"}),
    ("gradient checkpointing + 8-bit optimizer", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    ("nf4 weights", {"quant": "nf4"}),
    ("nf4 + double quant + checkpointing + 8-bit optimizer",
     {"quant": "nf4", "double_quant": True, "gradient_checkpointing": True, "optimizer": "adamw8bit"}),
)


def fit(cfg: TrainConfig, budget: int, device: str = "cuda", what: str = "seq_len", reserve: int | None = None,
        config=None, ranks: int = 1) -> FitResult:
    """The largest sequence length (or batch size) whose estimated peak fits in `budget` bytes.

    `reserve` is memory the budget does not have for tensors (default on CUDA 1 GiB: the CUDA context
    and allocator fragmentation; 0 on CPU). Sequence lengths are searched in multiples of 64 (below 64:
    any length), batch sizes one by one. Switches that raise the limit are listed too; when nothing fits
    they say what to switch on.
    """
    if what not in ("seq_len", "batch_size"):
        raise ValueError(f"--fit-for {what!r}: use seq-len or batch-size")
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    config = config or read_model_config(cfg.model, cfg.cache_dir)
    reserve = (2**30 if device == "cuda" else 0) if reserve is None else reserve
    if budget <= reserve:
        raise ValueError(f"budget {fmt_bytes(budget)} is not more than the reserve {fmt_bytes(reserve)}")
    max_ctx = getattr(config.get_text_config(), "max_position_embeddings", None) or 2**20
    limit = max_ctx if what == "seq_len" else 2**14

    def largest(c: TrainConfig) -> tuple[int | None, MemoryReport | None]:
        return _largest(c, what, limit, budget - reserve, device, config, ranks)

    best, report = largest(cfg)
    alternatives = []
    for label, change in SWITCHES:
        if all(getattr(cfg, k) == v for k, v in change.items()):
            continue
        if best is not None and label != "gradient checkpointing":  # it fits: only the cheapest lever is shown
            continue
        value, rep = largest(dataclasses.replace(cfg, **change))
        if value is not None and (best is None or value > best):
            alternatives.append({"switch": label, "change": change, "best": value, "peak": rep.total})
    return FitResult(what, budget, reserve, best, report, alternatives, limit)


def _largest(cfg: TrainConfig, what: str, limit: int, room: int, device: str,
             config, ranks: int = 1) -> tuple[int | None, MemoryReport | None]:
    """The largest value of `what` in 1..limit whose estimated peak is at most `room`.

    Candidates are 1..63 and then multiples of 64 for a sequence length, every integer for a batch.
    The peak grows almost linearly in both, so the bracket is narrowed by linear interpolation
    (falling back to bisection), which needs a handful of estimates rather than a dozen.
    """
    grid = 64 if what == "seq_len" else 1
    cache: dict[int, MemoryReport] = {}

    def peak(v: int) -> int:
        if v not in cache:
            cache[v] = estimate(dataclasses.replace(cfg, **{what: v}), device, config, compare=False, ranks=ranks)
        return cache[v].total

    def snap(v: float) -> int:
        v = int(v)
        return v if v < grid else v // grid * grid

    if peak(1) > room:
        return None, None
    lo, hi = 1, snap(limit)
    if peak(hi) <= room:
        return hi, cache[hi]
    for i in itertools.count():  # peak(lo) <= room < peak(hi)
        first = lo + 1 if lo + 1 < grid else (lo // grid + 1) * grid  # candidates strictly inside the bracket
        last = hi - 1 if hi - 1 < grid else (hi - 1) // grid * grid
        if first > last:
            return lo, cache[lo]
        if i < 3:
            guess = lo + (room - peak(lo)) * (hi - lo) / max(peak(hi) - peak(lo), 1)
        else:  # interpolation did not settle it: bisect
            guess = (lo + hi) / 2
        mid = min(max(snap(guess), first), last)
        if peak(mid) <= room:
            lo = mid
        else:
            hi = mid
    raise AssertionError("unreachable")


# ---- sweeps -----------------------------------------------------------------------------------------

def _bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{v!r} is not true/false")


def parse_sweep(items: list[str]) -> dict[str, list]:
    """['rank=8,16', 'seq-len=128,256'] -> {'rank': [8, 16], 'seq_len': [128, 256]}."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or key not in SWEEP_KEYS or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
        name = key.replace("-", "_")
        if name in out:
            raise ValueError(f"--sweep {item!r}: {key} is swept twice; give all its values in one --sweep")
        try:
            out[name] = [SWEEP_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError as e:
            raise ValueError(f"--sweep {item!r}: {one_line(e)}") from None
        if not out[name]:
            raise ValueError(f"--sweep {item!r}: no values")
    return out


def sweep(cfg: TrainConfig, axes: dict[str, list], device: str = "cuda", do_measure: bool = False,
          log: Callable[[str], None] = print, ranks: int = 1) -> list[dict]:
    """Estimate (and measure) every combination of the swept settings; one row per combination."""
    config = read_model_config(cfg.model, cfg.cache_dir)
    rows = []
    keys = list(axes)
    for values in itertools.product(*(axes[k] for k in keys)):
        label = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in zip(keys, values, strict=True))
        try:
            c = dataclasses.replace(cfg, **dict(zip(keys, values, strict=True)))
            est = estimate(c, device if not do_measure else resolve_device(device), config, compare=False, ranks=ranks)
        except ValueError as e:
            raise ValueError(f"--sweep point {label}: {e}") from None
        row = {k: v for k, v in zip(keys, values, strict=True)}
        row.update({f"est_{_key(k)}": v for k, v in est.components.items()}, est_total=est.total)
        if do_measure:
            check_measurable(est)
            mes = measure(c, device, config=config)
            row.update({f"meas_{_key(k)}": v for k, v in mes.components.items()}, meas_total=mes.total,
                       meas_live=mes.peak, meas_rss_peak=mes.rss_peak, error=round(est.total / mes.total - 1, 4))
        rows.append(row)
        log(f"{label}: estimate {fmt_bytes(est.total)}"
            + (f", measured {fmt_bytes(row['meas_total'])} ({100 * row['error']:+.1f}%)" if do_measure else ""))
    return rows


def _key(category: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")


def write_csv(rows: list[dict], path: str | Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def write_plot(rows: list[dict], axes: dict[str, list], path: str | Path) -> None:
    """Estimated (and measured) peak per sweep point, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'qlora-kit[plot]'") from None
    keys = list(axes)
    labels = [", ".join(f"{k}={row[k]}" for k in keys) for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.plot(x, [r["est_total"] / 2**20 for r in rows], "o-", label="estimate")
    if any("meas_total" in r for r in rows):
        ax.plot(x, [r["meas_total"] / 2**20 for r in rows], "s--", label="measured")
    ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("peak training memory (MiB)")
    ax.set_title("qlora-kit memory sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
