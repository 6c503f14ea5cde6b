"""What a merge will cost and what it kept: the plan before any work, the adapter's gain against its noise,
the per-block progress line and the printed report."""

from __future__ import annotations

import math
import sys
import time

from torch import nn

from . import export
from .config import MergeConfig, QuantConfig
from .layers import QuantLinear
from .memory.observed import rss_now, system_available
from .rounding import CHUNK_BYTES

NOISE_Z = 2.0  # a gain smaller than this many times its noise is not measurable


def plan(model: nn.Module, layers_name: str, untied_ends: tuple[str, str] | None, cfg: MergeConfig,
         export_q: QuantConfig, calib_rows: int, eval_rows: int, batch: int, outside_copied: bool = True) -> dict:
    """Planned peak memory and output size, from the shapes of the (meta) quantized model alone.

    peak = the process now + the largest of: the tensors outside the blocks in fp32 (an untied embedding and
    head one at a time), twice when the export changes them (`outside_copied`: their stored values are held
    beside them for the export's evaluation, at the start and at the end), with one sequence's logits; one
    block read as trained, its dense fp32 weights and the export's (two blocks' worth), its input statistics
    (one per group of layers sharing an input) and the rounding's working set for its widest group; plus the
    carried activations.
    """
    name = layers_name
    text = model.config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size
    seq = cfg.seq_len
    rows = calib_rows + (4 * eval_rows if cfg.eval else 0)
    acts = rows * seq * hidden * 4
    # one sequence's (T, vocab) tensors: seven alive at once at most (the unmerged model's scored logits and
    # log-softmax, kept until the export's are compared; the logits of the export and its floor, from one matmul;
    # the export's scored rows and log-softmax; the KL's temporary), and about as many again freed but still held
    # by the heap they come from (measured on the quickstart: the report's phase peaks at the tensors outside the
    # blocks + 14-16 of them)
    logits = seq * vocab * 4 * (16 if cfg.eval else 0)
    outside, seen = 0, set()
    for n, p in model.named_parameters():
        if not n.startswith(name + ".") and id(p) not in seen:
            seen.add(id(p))
            outside += p.numel() * 4
    if untied_ends:  # an untied embedding and head are never in memory together
        outside -= min(model.get_parameter(n).numel() for n in untied_ends) * 4
    block_peak = 0
    for block in model.get_submodule(name):
        packed = sum(b.numel() * b.element_size() for b in block.buffers()) + sum(
            p.numel() * p.element_size() for p in block.parameters())
        dense, stats, work = 0, 0, 0
        inputs: dict[int, list[QuantLinear]] = {}
        for m in block.modules():
            if isinstance(m, QuantLinear):
                dense += m.out_features * m.in_features * 4
                inputs.setdefault(m.in_features, []).append(m)
        for in_f, ms in inputs.items():
            stats += in_f * in_f * 4 * math.ceil(len(ms) / 2)  # e.g. q/k/v, o, gate/up on the hidden size: 3 groups
            outs = sorted((m.out_features for m in ms), reverse=True)
            # the widest group rounded together (gate/up): both candidate grids, and the floor's rows (the base
            # rounded alone) when the export's format is not the one trained on
            floor = cfg.quantized and (cfg.format != export_q_trained(model) or cfg.onto == "original")
            rows_stacked = (3 if floor else 2) * sum(outs[:2])
            # H copied and factored in fp32 (three n x n at a time, H kept); the stacked W^T (fp32, in chunks of at
            # most CHUNK_BYTES unless one layer is larger) and its int16 codes; two decoded candidates at a time
            if cfg.resolved_method() == "gptq":
                chunk = min(rows_stacked * in_f * 4, max(CHUNK_BYTES, outs[0] * in_f * 4))
                work = max(work, in_f * in_f * 12 + chunk * 3 // 2 + 2 * outs[0] * in_f * 4)
        block_peak = max(block_peak, packed + 2 * dense + stats + work)
    outside *= 2 if outside_copied and cfg.eval else 1  # (the stored copies serve the evaluation alone)
    phase_peak = max(outside + logits, block_peak) + acts + 2 * batch * seq * max(hidden, 4 * hidden) * 4
    now = rss_now()
    available = system_available()
    out_bytes = export.output_bytes(model, cfg, export_q)
    return {"peak_bytes": now + phase_peak, "process_now_bytes": now, "outside_blocks_bytes": outside,
            "block_bytes": block_peak, "activations_bytes": acts, "output_bytes": out_bytes,
            "available_bytes": available,
            "short_bytes": (phase_peak - available) if available is not None else 0,
            "blocks": len(model.get_submodule(name))}


def export_q_trained(model: nn.Module) -> str | None:
    """The format the (meta) model's linear layers were quantized in, as the adapter was trained on them."""
    return next((m.quant for m in model.modules() if isinstance(m, QuantLinear)), None)


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def format_plan(plan: dict, cfg: MergeConfig) -> str:
    return (f"plan: {plan['blocks']} blocks; peak memory about {gib(plan['peak_bytes'])} (the process now "
            f"{gib(plan['process_now_bytes'])} + one block {gib(plan['block_bytes'])} or the tensors outside the "
            f"blocks {gib(plan['outside_blocks_bytes'])}, + activations {gib(plan['activations_bytes'])}); "
            f"available {gib(plan['available_bytes'])}; output {gib(plan['output_bytes'])} of {cfg.format}")


def gain(base: list[tuple[float, int]], unmerged: list[tuple[float, int]], export_base: list[tuple[float, int]],
          ppl: dict) -> dict:
    """The adapter's gain in nats/token, and the kept gain when the gain stands out of two noises: its standard
    error (paired over sequences) and the export's rounding floor (how far the export's format moves the
    base's loss with no update at all)."""
    n = len(base)
    count = sum(c for _, c in base)
    d = [(sb - su) for (sb, _), (su, _) in zip(base, unmerged, strict=True)]  # per sequence, nats
    gain = sum(d) / max(count, 1)
    se = math.nan
    if n >= 2 and count:
        mean_c = count / n
        var = sum((dj - gain * c) ** 2 for dj, (_, c) in zip(d, base, strict=True)) / (n - 1)
        se = math.sqrt(var / n) / mean_c
    floor = abs(sum(s for s, _ in export_base) - sum(s for s, _ in base)) / max(count, 1)
    noise = max(se, floor) if se == se else math.nan
    measurable = noise == noise and abs(gain) > NOISE_Z * noise and abs(ppl["base"] - ppl["unmerged"]) > 1e-9
    out = {"gain_nats_per_token": gain, "gain_standard_error": se, "rounding_floor_nats_per_token": floor}
    if measurable:
        out["kept_gain"] = (ppl["base"] - ppl["export"]) / (ppl["base"] - ppl["unmerged"])
    else:
        out["kept_gain"] = None
        why = (f"within {NOISE_Z:g} standard errors ({se:.4f}) on {n} sequences" if se >= floor else
               f"within {NOISE_Z:g}x the export's rounding floor ({floor:.4f}: the format alone moves the base's "
               "loss that much)")
        out["kept_gain_note"] = f"not measurable: base and unmerged differ by {gain:+.4f} nats/token, {why}"
    return out


class Progress:
    """Per block: a live line on a terminal's stderr, otherwise a log line; elapsed, ETA and resident memory."""

    def __init__(self, total: int, log, live: bool | None = None):
        self.total, self.log = total, log
        self.live = sys.stderr.isatty() if live is None else live
        self.t0 = time.monotonic()

    def step(self, k: int) -> None:
        elapsed = time.monotonic() - self.t0
        eta = elapsed / k * (self.total - k)
        width = 20
        bar = "#" * (width * k // self.total) + "." * (width - width * k // self.total)
        line = (f"merge: block {k}/{self.total} [{bar}] {clock(elapsed)} elapsed, ETA {clock(eta)}, "
                f"RSS {rss_now() / 2**30:.2f} GiB")
        if self.live:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            self.log(line)

    def done(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def format_report(report: dict) -> str:
    """The printed table: per layer, then the model."""
    cal = report.get("calibration", {})
    lines = [f"{'layer':<44} {'|dW|/|W|':>9} {'codes chg':>9} {'w cos':>6} {'w norm':>7} {'out cos':>7} "
             f"{'out norm':>8}"]
    lost = 0
    for r in report["layers"]:
        flag = ""
        if r["output_cos"] < 0.5:
            lost += 1
            flag = "  update lost"
        lines.append(f"{r['layer'][-44:]:<44} {r['update_rel']:>9.2e} {r.get('codes_changed', float('nan')):>9.4f} "
                     f"{r['update_cos']:>6.3f} {r['update_norm_ratio']:>7.3f} {r['output_cos']:>7.3f} "
                     f"{r['output_norm_ratio']:>8.3f}{flag}")
    n = len(report["layers"])
    lines.append(f"out cos / out norm: on the {cal.get('tokens', '?')} calibration tokens "
                 f"({cal.get('sequences', '?')} sequences) the rounding was chosen on")
    lines.append(f"{lost} of {n} layers kept less than half of their update's effect on the outputs (out cos < 0.5)"
                 if lost else f"all {n} layers kept their update's effect on the outputs (out cos >= 0.5)")
    m = report.get("model_metrics", {})
    if "skipped" in m:
        lines.append(f"model metrics: {m['skipped']}")
    elif m:
        kept = f"{100 * m['kept_gain']:.1f}%" if m["kept_gain"] is not None else "not measurable"
        lines.append(f"held-out perplexity ({m['eval_sequences']} sequences): base {m['ppl_base']:.2f}, adapter "
                     f"unmerged {m['ppl_unmerged']:.2f}, merged {report['format']} export {m['ppl_merged']:.2f} -> "
                     f"kept {kept} of the adapter's gain")
        lines.append(f"adapter's gain: {m['gain_nats_per_token']:+.4f} nats/token, standard error "
                     f"{m['gain_standard_error']:.4f}, the export format's own rounding floor "
                     f"{m['rounding_floor_nats_per_token']:.4f}" +
                     (f" ({m['kept_gain_note']})" if m.get("kept_gain_note") else ""))
        lines.append(f"merged vs unmerged logits: KL {m['kl_merged_vs_unmerged']:.4g} nats/token, "
                     f"relative error {m['logits_rel_err']:.3g}")
    if report.get("peak_rss_bytes"):
        lines.append(f"peak resident memory seen between blocks: {report['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"(planned {report['plan']['peak_bytes'] / 2**30:.2f} GiB)")
    return "\n".join(lines)
