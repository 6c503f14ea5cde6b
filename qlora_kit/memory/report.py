"""The memory reports as text."""

from __future__ import annotations

from ..config import FOUR_BIT, QuantConfig
from ..formats import bytes_per_weight
from .counting import CATEGORIES, fmt_bytes
from .estimate import MemoryReport
from .plan import FitResult


def format_report(est: MemoryReport, meas: MemoryReport | None = None) -> str:
    """The breakdown as a table: estimate (and measurement) per category, then the total."""
    s, m = est.settings, est.model
    qcfg = QuantConfig(quant=s["quant"], double_quant=s["double_quant"], blocksize=s["blocksize"],
                       compute_dtype=s["compute_dtype"])
    fmt = s["quant"] + (f" (block {s['blocksize']}{', double quant' if s['double_quant'] else ''})"
                        if s["quant"] in FOUR_BIT else "")
    lines = [
        f"model: {m['model_type']}, {m['layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']:,} "
        f"({m['config']})",
        f"training: {fmt} weights, {s['compute_dtype']} compute on {est.device}; LoRA r={s['rank']} on "
        f"{m['lora_layers']} layers ({m['lora_params']:,} parameters); batch {s['batch_size']} x seq {s['seq_len']}"
        + (f" x accum {s['grad_accum']}" if s["grad_accum"] > 1 else "")
        + f"; {s['optimizer']}; checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
        + (f"; one of {s['ranks']} ranks ({'FSDP2' if s.get('fsdp') else 'data-parallel'})"
           if s.get("ranks", 1) > 1 else ""),
        "",
        f"  {'':24}{'estimate':>12}" + (f"{'measured':>12}{'diff':>8}" if meas else ""),
    ]
    explain = {
        "quantized weights": f"{m['quantized_params'] / 1e6:,.1f}M values x {bytes_per_weight(qcfg):.4f} B",
        "unquantized weights": f"{m['unquantized_params'] / 1e6:,.1f}M values: embeddings, norms, head",
        "LoRA parameters": f"{m['lora_params'] / 1e6:,.2f}M x 4 B",
    }
    for cat in CATEGORIES:
        e = est.components.get(cat, 0)
        v = meas.components.get(cat, 0) if meas else 0
        if not e and not v:
            continue
        row = f"  {cat:24}{fmt_bytes(e):>12}"
        if meas:
            row += f"{fmt_bytes(v):>12}{_pct(e, v):>8}"
        if cat in explain:
            row += f"   {explain[cat]}"
        lines.append(row)
    if meas and meas.allocator_peak is not None:
        lines.append(f"  {'other (allocator)':24}{'':>12}{fmt_bytes(meas.allocator_peak - meas.peak):>12}")
    lines.append(f"  {'peak':24}{fmt_bytes(est.total):>12}" + (f"{fmt_bytes(meas.total):>12}{_pct(est.total, meas.total):>8}"
                                                         if meas else ""))
    if meas and meas.allocator_peak is not None:
        lines.append(f"  {'  live tensors at peak':24}{'':>12}{fmt_bytes(meas.peak):>12}")
    if meas and meas.reserved_peak is not None:
        lines.append(f"  {'  reserved (CUDA)':24}{'':>12}{fmt_bytes(meas.reserved_peak):>12}")
    if meas and meas.rss_peak:
        lines.append(f"  {'  process peak RSS':24}{'':>12}{fmt_bytes(meas.rss_peak):>12}"
                     f"   {fmt_bytes(meas.rss_start)} before the model was built")
    lines.append("")
    for k, v in est.sizes.items():
        lines.append(f"  {k}: {fmt_bytes(v)}")
    for note in est.notes + (meas.notes if meas else []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _pct(est: int, meas: int) -> str:
    return f"{100 * (est / meas - 1):+.1f}%" if meas else ""


def format_fit(res: FitResult) -> str:
    what = "sequence length" if res.what == "seq_len" else "batch size"
    room = f"{fmt_bytes(res.budget)} budget, {fmt_bytes(res.reserve)} reserved for the CUDA context and fragmentation" \
        if res.reserve else f"{fmt_bytes(res.budget)} budget"
    if res.best is None:
        lines = [f"nothing fits in {room}: even a {what} of 1 needs more."]
    else:
        cap = ((" (the model's context)" if res.what == "seq_len" else " (the largest tried)")
               if res.best == res.limit else "")
        lines = [f"largest {what} that fits in {room}: {res.best}{cap} (estimated peak {fmt_bytes(res.report.total)})"]
    for alt in res.alternatives:
        cap = " (the model's context)" if res.what == "seq_len" and alt["best"] == res.limit else ""
        lines.append(f"  with {alt['switch']}: up to {alt['best']}{cap} (peak {fmt_bytes(alt['peak'])})")
    if res.best is None and not res.alternatives:
        lines.append("  no switch makes it fit: use a smaller model, a lower rank, or more memory")
    return "\n".join(lines)
