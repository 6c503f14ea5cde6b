"""Merge an adapter into its base and export it: 16-bit, or requantized with the update kept.

The merge streams the model one decoder block at a time, so its memory is about one block, whatever
the model's size. For each block: read its tensors from the checkpoint (quantized as the adapter was
trained), add s*BA, run the calibration activations through it to collect each layer's input statistics
H = X^T X (layers reading the same input share one), round or cast the merged weights, write them into
the output shards and free the block. The calibration and evaluation activations are carried from block
to block. The evaluation rows travel four ways at once (base, adapter unmerged, the export as stored,
the export's format without the update), so the report's perplexities and KL cost no second model
in memory.

Requantization (`method="gptq"`, the default for 4/8-bit) keeps every block's scale from the base or
takes fresh ones, and chooses codes by error feedback on the calibration inputs (see rounding.py), so a
small update survives as a pattern of changed codes instead of being rounded away (`method="rtn"`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from . import allocator, blocks, defaults, export, formats
from .adapters import BASE_QUANT, apply_adapter, read_adapter
from .config import MergeConfig, QuantConfig, parse_dtype
from .data import Sequences, load_dataset
from .experts import expert_stacks
from .io import ShardWriter, atomic_dir
from .layers import QuantLinear
from .loading import CheckpointBlocks, checkpoint_files, load_tokenizer
from .loss import IGNORE_INDEX
from .memory.observed import rss_now, system_available
from .patch import lora_layers, set_submodule
from .rounding import gptq_codes, requantize_group, retained  # noqa: F401  (gptq_codes: public)

SHARD_BYTES = 2 * 2**30
BATCH = 4  # rows per forward of the calibration and evaluation activations
NOISE_Z = 2.0  # a gain smaller than this many standard errors is not measurable


def merge(cfg: MergeConfig, log=print, progress: bool | None = None) -> dict:
    """Merge cfg.adapter into cfg.model and write the export to cfg.out (atomically), a block at a time.

    Args:
        progress: a live progress line on stderr (default: when stderr is a terminal); otherwise one
            log line per block.
    Returns:
        The fidelity report (also written to <out>/merge_report.json); with cfg.dry_run, the plan alone.
    Raises:
        ValueError, FileNotFoundError, FileExistsError: before any work, for bad input (and for a plan that
            does not fit the machine's memory, unless cfg.force). OSError: the disk filled up (nothing is
            left in cfg.out).
    """
    out = Path(cfg.out)
    if out.exists() and not cfg.force and not cfg.dry_run:
        raise FileExistsError(f"{out}: already exists (use --force to replace it)")
    src = defaults.model_folder(cfg.model, cfg.cache_dir)
    adapter_cfg, pairs = read_adapter(cfg.adapter)
    trained = adapter_cfg.get(BASE_QUANT) or {"quant": "nf4", "blocksize": 64, "double_quant": True,
                                              "compute_dtype": "float32"}
    qcfg = QuantConfig(quant=trained["quant"], compute_dtype=torch.float32, double_quant=trained["double_quant"],
                       blocksize=trained["blocksize"])
    trained_dtype = parse_dtype(trained["compute_dtype"])
    parts = CheckpointBlocks(src, qcfg)
    shapes = _checked_shapes(parts, qcfg, Path(cfg.adapter), adapter_cfg, pairs, cfg, src)
    export_q = dataclasses.replace(qcfg, quant=cfg.format if cfg.quantized else qcfg.quant)
    tok = load_tokenizer(src)
    eval_set, calib = _eval_and_calibration(cfg, tok, log)
    method = cfg.resolved_method()
    plan = _plan(parts, shapes, cfg, export_q, calib, eval_set)
    log(format_plan(plan, cfg))
    if cfg.dry_run:
        return {"plan": plan}
    if plan["short_bytes"] > 0 and not cfg.force:
        raise ValueError(f"{out}: the merge needs about {_gib(plan['peak_bytes'])} at its peak, but this machine has "
                         f"{_gib(plan['available_bytes'])} available beyond what the process holds; use --force to try "
                         "anyway, or lower --calib-tokens / --eval-sequences (--no-eval)")
    log(f"merging {len(shapes['lora'])} LoRA layers into {src} -> {cfg.format} ({method}), onto the "
        f"{'dequantized 4/8-bit' if cfg.onto == 'quantized' else 'original'} weights, one block at a time")
    if cfg.quantized and shapes["stacks"]:
        log(f"{shapes['stacks']} expert stacks are exported in {cfg.dtype}: transformers + bitsandbytes quantizes only "
            "nn.Linear layers and cannot hold 3-D expert weights quantized")
    report = {"format": cfg.format, "method": method, "onto": cfg.onto, "model": str(src), "adapter": str(cfg.adapter),
              "calibration": {"tokens": int(calib.attention_mask.sum()), "sequences": len(calib)}, "plan": plan}
    if cfg.quantized and shapes["stacks"]:
        report["experts_exported_dense"] = {"stacks": shapes["stacks"], "dtype": cfg.dtype,
                                            "why": "transformers + bitsandbytes quantizes only nn.Linear layers"}
    with atomic_dir(out) as tmp:
        job = _Streamed(parts, cfg, export_q, trained_dtype, method, Path(cfg.adapter), adapter_cfg, pairs, src)
        report["layers"] = job.run(ShardWriter(tmp, SHARD_BYTES), calib, None if not cfg.eval else eval_set,
                                   _Progress(len(parts.layers), log, progress))
        report["model_metrics"] = job.metrics
        report["peak_rss_bytes"] = job.peak_rss
        if not cfg.eval:
            report["model_metrics"] = {"skipped": "--no-eval: perplexity, kept gain and KL were not measured"}
        export.write_config(src, tmp, cfg, export_q, tok)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(format_report(report))
    return report


# ---- checks and plan ---------------------------------------------------------------------------------

def _checked_shapes(parts: CheckpointBlocks, qcfg: QuantConfig, path: Path, adapter_cfg: dict, pairs: dict,
                    cfg: MergeConfig, src: Path) -> dict:
    """Fit the adapter to the quantized model's shapes (on the meta device, no weights read): the base
    fingerprint, every target's name and shape; and what the plan needs from those shapes."""
    from .memory.models import meta_quantized

    model = meta_quantized(parts.model.config, qcfg, "cpu", [g.target for gs in parts.groups.values() for g in gs])
    apply_adapter(model, path, adapter_cfg, pairs)  # refuses an adapter for another base, before any work
    lora = lora_layers(model)
    stacks = expert_stacks(model)
    experts = {n for n in lora if n.rpartition(".")[0] in stacks}
    if stacks and cfg.onto == "original":
        raise ValueError(f"{src}: --onto original is not supported for models with experts; use --onto quantized")
    if cfg.quantized and any(m.fan_in_fan_out for n, m in lora.items() if n not in experts):
        raise ValueError(f"{src}: {cfg.format} export of transposed Conv1D layers (GPT-2 style) is not supported; "
                         "export bf16/fp16/fp32 instead")
    return {"model": model, "lora": set(lora), "stacks": len(stacks)}


def _plan(parts: CheckpointBlocks, shapes: dict, cfg: MergeConfig, export_q: QuantConfig, calib: Sequences,
          eval_set: Sequences) -> dict:
    """Planned peak memory and output size, from the shapes alone.

    peak = the process now + the largest of: the tensors outside the blocks (fp32) with the activations and
    one minibatch of logits (at the start and the end); one block read as trained, its dense fp32 weights
    and the export's (two blocks' worth), its input statistics and the rounding's working set, with the
    activations.
    """
    model = shapes["model"]
    name = parts.layers_name
    text = model.config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size
    seq = cfg.seq_len
    rows = len(calib) + (0 if not cfg.eval else 4 * len(eval_set))
    acts = rows * seq * hidden * 4
    logits = seq * vocab * 4 * (4 if cfg.eval else 0)  # one sequence: unmerged, export, their log-softmaxes
    outside, seen = 0, set()
    for n, p in model.named_parameters():
        if not n.startswith(name + ".") and id(p) not in seen:
            seen.add(id(p))
            outside += p.numel() * 4
    ends = parts.untied_ends()
    if ends:  # an untied embedding and head are never in memory together
        outside -= min(model.get_parameter(n).numel() for n in ends) * 4
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
            stats += in_f * in_f * 4
            rows_stacked = 2 * max(m.out_features for m in ms) * min(len(ms), 3)  # a q/k/v or gate/up group, 2 grids
            work = max(work, in_f * in_f * 12 + rows_stacked * in_f * 4 * 3)  # H^-1 (fp64 + fp32), W, codes, errors
        block_peak = max(block_peak, packed + 2 * dense + stats + work)
    phase_peak = max(outside + logits, block_peak) + acts + 2 * BATCH * seq * max(hidden, 4 * hidden) * 4
    now = rss_now()
    available = system_available()
    out_bytes = export.output_bytes(model, cfg, export_q)
    return {"peak_bytes": now + phase_peak, "process_now_bytes": now, "outside_blocks_bytes": outside,
            "block_bytes": block_peak, "activations_bytes": acts, "output_bytes": out_bytes,
            "available_bytes": available,
            "short_bytes": (phase_peak - available) if available is not None else 0,
            "blocks": len(parts.layers)}


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def format_plan(plan: dict, cfg: MergeConfig) -> str:
    return (f"plan: {plan['blocks']} blocks; peak memory about {_gib(plan['peak_bytes'])} (the process now "
            f"{_gib(plan['process_now_bytes'])} + one block {_gib(plan['block_bytes'])} or the tensors outside the "
            f"blocks {_gib(plan['outside_blocks_bytes'])}, + activations {_gib(plan['activations_bytes'])}); "
            f"available {_gib(plan['available_bytes'])}; output {_gib(plan['output_bytes'])} of {cfg.format}")


# ---- the streamed merge --------------------------------------------------------------------------------

class _Streamed:
    """One pass over the blocks: merge, write, and carry the calibration and evaluation activations."""

    def __init__(self, parts: CheckpointBlocks, cfg: MergeConfig, export_q: QuantConfig, trained_dtype: torch.dtype,
                 method: str, adapter: Path, adapter_cfg: dict, pairs: dict, src: Path):
        self.parts, self.cfg, self.export_q, self.trained_dtype = parts, cfg, export_q, trained_dtype
        self.method, self.adapter, self.adapter_cfg, self.pairs = method, adapter, adapter_cfg, pairs
        self.original = _SourceTensors(src) if cfg.onto == "original" else None
        self.dense = export.dense_dtype(cfg)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # where the rounding runs
        self.metrics: dict = {}
        self.peak_rss = 0

    def run(self, writer: ShardWriter, calib: Sequences, eval_set: Sequences | None, progress: _Progress) -> list:
        parts, model, layers = self.parts, self.parts.model, self.parts.layers
        ends = parts.untied_ends()  # an untied head is read only at the end, the embedding only at the start
        parts.load(None, skip=ends[1:] if ends else ())
        cal = blocks.start(model, layers, _batches(calib))
        streams = {}
        if eval_set is not None:
            streams["base"] = blocks.start(model, layers, _batches(eval_set))
            streams["unmerged"] = _copy(streams["base"])
            with _swapped(_written(model, parts.layers_name, self.dense)):
                streams["export"] = blocks.start(model, layers, _batches(eval_set))
            streams["export_base"] = _copy(streams["export"])
        self._write_outside(writer)
        parts.drop(None)
        allocator.trim()
        rows, as_tuple = [], False
        for i in range(len(layers)):
            rows += self._block(i, writer, cal, streams)
            as_tuple = self.as_tuple
            parts.drop(i)
            allocator.trim()
            self.peak_rss = max(self.peak_rss, rss_now())
            progress.step(i + 1)
        progress.done()
        parts.load(None, skip=ends[:1] if ends else ())
        self._write_outside(writer)  # what the start left out (an untied head)
        writer.close()
        if eval_set is not None:
            with _embedding_unread(model, ends):
                self.metrics = self._metrics(streams, as_tuple)
        parts.drop(None)
        return rows

    def _write_outside(self, writer: ShardWriter) -> None:
        """The tensors outside the blocks that are in memory and not yet written."""
        # ties are found by identity within one call (both names alive at once); across calls, by key
        for key, t in export.module_tensors(self.parts.model, "", {}, self.cfg, self.export_q, self.trained_dtype,
                                            set(), skip=self.parts.layers_name):
            if key not in writer.keys and not t.is_meta:
                writer.add(key, t)

    def _block(self, i: int, writer: ShardWriter, cal: blocks.Stream, streams: dict) -> list:
        parts, cfg = self.parts, self.cfg
        prefix = f"{parts.layers_name}.{i}."
        block = parts.load(i)
        apply_adapter(parts.model, self.adapter, self.adapter_cfg, self.pairs, check_base=False, under=prefix)
        linears = {f"{prefix}{n}": m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        lora = {n: m for n, m in linears.items() if m.lora_A is not None}
        stacks = {f"{prefix}{n}" for n in expert_stacks(block)}
        experts = {n for n in linears if n.rpartition(".")[0] in stacks}
        base = {n: m.dequantize(torch.float32) for n, m in linears.items()}  # the weights the adapter trained on
        stats = _InputStats({n: n.rpartition(".")[0] for n in experts})
        with _twins(block, prefix, linears, base, keep_lora=True) as twins:
            with_lora = {n: t for n, t in twins.items() if t.lora_A is not None}
            with stats.collecting(with_lora):
                self.as_tuple = blocks.advance(block, i, cal)
            if streams:
                with _lora_off(with_lora.values()):
                    blocks.advance(block, i, streams["base"])
                blocks.advance(block, i, streams["unmerged"])
        values, olds, rows = self._merged(lora, linears, base, stats, experts)
        for key, t in export.module_tensors(block, prefix, values, cfg, self.export_q, self.trained_dtype, set()):
            writer.add(key, t)
        if streams:  # the export as a reader computes it: stored values, in fp32
            stored = {n: export.stored_value(values[n] if n in values else export.export_value(m, cfg, self.export_q),
                                             m, cfg, self.export_q) for n, m in linears.items()}
            del base
            with _swapped(_written(block, None, self.dense)):
                with _twins(block, prefix, linears, stored, keep_lora=False, bias_dtype=self.dense):
                    blocks.advance(block, i, streams["export"])
                # and the export's format without the update: how far rounding alone moves perplexity
                with _twins(block, prefix, linears, {**stored, **olds}, keep_lora=False, bias_dtype=self.dense):
                    blocks.advance(block, i, streams["export_base"])
        return rows

    def _merged(self, lora: dict[str, QuantLinear], linears: dict, base: dict[str, Tensor], stats: _InputStats,
                experts: set[str]) -> tuple[dict, dict, list]:
        """Each LoRA layer's export value (packed or dense), the fp32 value the export would hold without the
        update, and its report row; layers sharing an input are rounded together."""
        cfg, q = self.cfg, self.export_q
        values, olds, rows = {}, {}, []
        groups: dict[str, list[str]] = {}
        for n in lora:
            groups.setdefault(stats.key.get(n, n), []).append(n)
        for key, names in groups.items():
            h = stats.h.get(key)
            if h is None:
                h = torch.zeros(lora[names[0]].in_features, lora[names[0]].in_features)
            src = {n: self.original.weight(n, lora[n]) if self.original else base[n] for n in names}
            deltas = {n: lora[n].delta_weight().detach().float() for n in names}
            merged = {n: src[n] + deltas[n] for n in names}
            requant = [n for n in names if cfg.quantized and n not in experts]
            rounded = requantize_group({n: merged[n] for n in requant},
                                       {n: lora[n].packed() if lora[n].quant == q.quant else None for n in requant},
                                       q, self.method, h, self.device) if requant else {}
            for n in names:
                layer = lora[n]
                row = {"layer": n, "update_rel": _ratio(deltas[n], src[n]), "shape": [layer.out_features,
                                                                                      layer.in_features]}
                if self.original:
                    row["quant_err_rel"] = _ratio(base[n] - src[n], src[n])
                if n in rounded:
                    r = rounded[n]
                    # what the export would hold without the update: the trained weights, in the export's format
                    old = base[n] if cfg.format == layer.quant and not self.original else export.stored_value(
                        formats.quantize(src[n], q), layer, cfg, q)
                    row["scales"] = r.scales
                    row.update(retained(r.value - old, deltas[n], h))
                    row["codes_changed"] = round(float((r.value != old).float().mean()), 5)
                    values[n] = r.packed
                else:
                    out = parse_dtype(cfg.format if not cfg.quantized else cfg.dtype)
                    old = src[n].to(out).float()
                    row.update(retained(merged[n].to(out).float() - old, deltas[n], h))
                    values[n] = merged[n].to(out)
                olds[n] = old  # what the export would hold without the update
                rows.append(row)
        return values, olds, rows

    @torch.no_grad()
    def _metrics(self, streams: dict, as_tuple: bool) -> dict:
        """Perplexity of base, unmerged and export, the kept gain with its noise, KL and logits error."""
        model, layers = self.parts.model, self.parts.layers
        written = _written(model, self.parts.layers_name, self.dense)
        nll = {k: [] for k in streams}
        kl, diff2, ref2, tokens = 0.0, 0.0, 0.0, 0
        rows = [(b, r) for b, batch in enumerate(streams["base"].batches) for r in range(len(batch["input_ids"]))]
        for b, r in rows:  # one sequence at a time: three (T, vocab) logits, not three minibatches of them
            batch = {key: v[r:r + 1] for key, v in streams["base"].batches[b].items()}
            logits = {}
            for k in ("base", "unmerged", "export", "export_base"):
                with _swapped(written if k.startswith("export") else {}):
                    full = blocks.head(model, layers, streams[k].hidden[b][r:r + 1], batch, as_tuple)
                lg, labels = full[:, :-1], batch["labels"][:, 1:]
                loss = F.cross_entropy(lg.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="none").view(labels.shape)
                nll[k].append((float(loss.sum(dtype=torch.float64)), int((labels != IGNORE_INDEX).sum())))
                if k in ("unmerged", "export"):
                    logits[k] = lg[labels != IGNORE_INDEX]
            ref, got = logits["unmerged"], logits["export"]
            kl += float(F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"))
            diff2 += float((got - ref).pow(2).sum(dtype=torch.float64))
            ref2 += float(ref.pow(2).sum(dtype=torch.float64))
            tokens += ref.shape[0]
        ppl = {k: math.exp(sum(s for s, _ in v) / max(sum(c for _, c in v), 1)) for k, v in nll.items()}
        out = {"ppl_base": ppl["base"], "ppl_unmerged": ppl["unmerged"], "ppl_merged": ppl["export"],
               "kl_merged_vs_unmerged": kl / max(tokens, 1), "logits_rel_err": round(math.sqrt(diff2 / max(ref2, 1e-30)), 6),
               "eval_sequences": len(nll["base"]), "eval_tokens": tokens}
        out.update(_gain(nll["base"], nll["unmerged"], nll["export_base"], ppl))
        return out


def _gain(base: list[tuple[float, int]], unmerged: list[tuple[float, int]], export_base: list[tuple[float, int]],
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


# ---- pieces ---------------------------------------------------------------------------------------------

class _InputStats:
    """H = sum of x x^T over the calibration tokens of each LoRA layer's input (adapter on). Layers that read
    the same input tensor (q/k/v, gate/up) are found by identity and share one matrix, as do the experts of
    one stack (their routed inputs together)."""

    def __init__(self, stack_of: dict[str, str]):
        self.stack_of = stack_of
        self.h: dict[str, Tensor] = {}
        self.key: dict[str, str] = dict(stack_of)
        self.live: dict[tuple, tuple[Tensor, str]] = {}  # inputs of one call, held so their memory is not reused

    def _hook(self, name: str):
        def fn(module, args, output):
            x = args[0]
            if name not in self.key:
                sig = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
                self.key[name] = self.live.setdefault(sig, (x, name))[1]
            key = self.key[name]
            if key != name and name not in self.stack_of:
                return  # its group's first layer has added this input already
            x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if key not in self.h:
                self.h[key] = torch.zeros(x.shape[1], x.shape[1])
            self.h[key].addmm_(x.t(), x)
        return fn

    @contextlib.contextmanager
    def collecting(self, layers: dict[str, nn.Module]) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.live.clear()


@contextlib.contextmanager
def _twins(block: nn.Module, prefix: str, linears: dict[str, QuantLinear], weights: dict[str, Tensor],
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
def _lora_off(layers) -> Iterator[None]:
    layers = list(layers)
    for m in layers:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.lora_enabled = True


def _written(root: nn.Module, skip: str | None, dtype: torch.dtype) -> dict[nn.Parameter, Tensor]:
    """The fp32 values the export stores for root's floating-point tensors outside its linear layers (cast to
    the export's dtype), for those the cast changes."""
    out = {}
    quantized = {n for n, m in root.named_modules() if isinstance(m, QuantLinear)}
    for name, p in list(root.named_parameters()) + list(root.named_buffers()):
        owner = name.rpartition(".")[0]
        if p.is_meta or not p.is_floating_point() or owner in quantized or (skip and name.startswith(skip + ".")):
            continue
        cast = p.detach().to(dtype).float()
        if not torch.equal(cast, p):
            out[p] = cast
    return out


@contextlib.contextmanager
def _swapped(values: dict[Tensor, Tensor]) -> Iterator[None]:
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
def _embedding_unread(model: nn.Module, ends: tuple[str, str] | None) -> Iterator[None]:
    if ends is None:
        yield
        return
    embed = model.get_input_embeddings()
    model.set_input_embeddings(_ZeroEmbedding(embed.weight.shape[1]))
    try:
        yield
    finally:
        model.set_input_embeddings(embed)


def _batches(seqs: Sequences) -> list[dict]:
    return [seqs.select(slice(i, min(i + BATCH, len(seqs)))) for i in range(0, len(seqs), BATCH)]


def _copy(stream: blocks.Stream) -> blocks.Stream:
    return blocks.Stream([h.clone() for h in stream.hidden], stream.calls, stream.batches)


def _ratio(a: Tensor, b: Tensor) -> float:
    return round(float(a.norm() / b.norm().clamp_min(1e-30)), 6)


class _SourceTensors:
    """Original (unquantized) weights, read one tensor at a time from the source checkpoint."""

    def __init__(self, src: Path):
        self.where: dict[str, Path] = {}
        for f in checkpoint_files(src):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.where[k] = f

    def weight(self, name: str, layer: QuantLinear) -> Tensor:
        for key in (f"{name}.weight", f"{name.partition('.')[2]}.weight"):
            if key in self.where:
                with safe_open(str(self.where[key]), framework="pt") as h:
                    w = h.get_tensor(key).float()
                return w.t() if layer.fan_in_fan_out else w
        raise ValueError(f"{name}.weight is not in the source checkpoint")


class _Progress:
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
        line = (f"merge: block {k}/{self.total} [{bar}] {_clock(elapsed)} elapsed, ETA {_clock(eta)}, "
                f"RSS {rss_now() / 2**30:.2f} GiB")
        if self.live:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            self.log(line)

    def done(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


# ---- data and report --------------------------------------------------------------------------------------

def _eval_and_calibration(cfg: MergeConfig, tok, log) -> tuple[Sequences, Sequences]:
    """Evaluation rows (the start of the held-out slice) and calibration rows that never overlap them:
    --calib-data, else the held-out rows after the evaluation rows, else the end of the training split.

    Raises:
        ValueError: the calibration text holds fewer tokens than --calib-tokens asks for.
    """
    path = defaults.resolve_data(cfg.eval_data, cfg.cache_dir)
    train_rows, held = load_dataset(path, tok, cfg.seq_len)
    if held is None:
        raise ValueError(f"{path}: no held-out text to evaluate on")
    n_eval = min(cfg.eval_sequences, len(held)) if cfg.eval_sequences else len(held)
    n_cal = math.ceil(cfg.calib_tokens / cfg.seq_len)
    source = cfg.calib_data or path
    if cfg.calib_data:
        calib, _ = load_dataset(cfg.calib_data, tok, cfg.seq_len, eval_fraction=0.0)
        calib = calib.rows(slice(0, n_cal))
    elif len(held) - n_eval >= n_cal:
        calib = held.rows(slice(n_eval, n_eval + n_cal))
    else:
        calib = train_rows.rows(slice(max(0, len(train_rows) - n_cal), len(train_rows)))
        log(f"calibration: the held-out slice has too few rows beyond the {n_eval} evaluation rows; "
            f"using the last {len(calib)} training rows")
    if len(calib) * cfg.seq_len < cfg.calib_tokens:
        raise ValueError(f"{source}: calibration text gives {len(calib) * cfg.seq_len} tokens in rows of {cfg.seq_len}, "
                         f"fewer than --calib-tokens {cfg.calib_tokens}; give more text (--calib-data) or lower "
                         "--calib-tokens")
    ev, calib = held.rows(slice(0, n_eval)), calib
    ev, calib = (Sequences(**{k: v.clone() for k, v in x.select(slice(None)).items()}) for x in (ev, calib))
    del train_rows, held
    allocator.trim()  # tokenizing the text left a few hundred MB of freed heap the merge should not keep
    return ev, calib


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
