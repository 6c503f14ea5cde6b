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

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from . import allocator, blocks, defaults, export, formats, io, merge_report
from .adapters import BASE_QUANT, MERGE_AWARE, MERGE_AWARE_ROUNDING, apply_adapter, read_adapter
from .config import GGUF_QUANTS, MergeConfig, QuantConfig, parse_dtype
from .data import Sequences, load_dataset
from .experts import expert_stacks
from .gguf_export import Target as GGUFTarget
from .io import ShardWriter, atomic_dir, atomic_file, atomic_write_bytes
from .layers import QuantLinear
from .loading import CheckpointBlocks, checkpoint_files, load_tokenizer
from .loss import IGNORE_INDEX
from .memory.observed import rss_now
from .merge_report import format_report  # noqa: F401  (public: the printed report)
from .patch import lora_layers
from .rounding import InputStats, requantize_groups, retained

SHARD_BYTES = 2 * 2**30
# Blocks from these sizes get their own mappings, handed back when freed; smaller ones are reused from malloc's
# heaps (trimmed between phases). The forwards' and the report's temporaries (4-64 MB) come from the heaps: a
# mapping each faulted in 38 GB of fresh pages in a 135M merge (a quarter of its time). The rounding, where the
# peak is, keeps its large blocks in their own mappings: from the heaps they would raise the peak by fragmenting.
MMAP_BYTES = 64 * 2**20
ROUNDING_MMAP_BYTES = 4 * 2**20
# A trim hands the heaps' free pages back, and the next phase faults them in again (about 2.6 us per 4 KiB page
# here). Between a block's phases (forwards, each group's rounding, the export's forwards) that pays only when
# its LoRA layers are large: a block below this size in fp32 is not trimmed between its phases, and such blocks
# are trimmed once per this many bytes of them written. (A 135M merge: 210 trims cost 7-8 s of system time, a
# tenth of the run, and lowered its peak by nothing; one per block still cost 1.1 s of 78.)
TRIM_PHASES_BYTES = 64 * 2**20
FORWARD_TOKENS = 1024  # tokens per forward of the calibration and evaluation activations (whole rows, at least one)


def rows_per_forward(seq_len: int) -> int:
    """Rows per forward: a few thousand tokens keep the matmuls efficient and a block's temporaries small."""
    return max(1, FORWARD_TOKENS // seq_len)


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
    target = (GGUFTarget(cfg, shapes["model"], parts.model.config, src, tok, shapes["stacks"], parts.untied_ends())
              if cfg.gguf else None)  # refuses an unmappable model first
    eval_set, calib = _eval_and_calibration(cfg, tok, log)
    method = cfg.resolved_method()
    aware = adapter_cfg.get(MERGE_AWARE)
    if aware == cfg.format and cfg.method == "auto" and cfg.onto == "quantized":
        # trained against this format's rounding: that rounding is the model it learned
        method = "dither" if adapter_cfg.get(MERGE_AWARE_ROUNDING) == "dither" else "rtn"
        log(f"the adapter was trained merge-aware for {aware}: exporting with its rounding "
            f"({'the fixed dither' if method == 'dither' else 'round to nearest'})")
    plan = merge_report.plan(shapes["model"], parts.layers_name, parts.untied_ends(), cfg, export_q, len(calib),
                             len(eval_set), rows_per_forward(cfg.seq_len),
                             outside_copied=target is not None or _outside_cast(parts, cfg))
    log(merge_report.format_plan(plan, cfg))
    if cfg.dry_run:
        return {"plan": plan}
    if plan["short_bytes"] > 0 and not cfg.force:
        need, have = merge_report.gib(plan["peak_bytes"]), merge_report.gib(plan["available_bytes"])
        raise ValueError(f"{out}: the merge needs about {need} at its peak, but this machine has {have} available "
                         "beyond what the process holds; use --force to try anyway, or lower --calib-tokens / "
                         "--eval-sequences (--no-eval)")
    log(f"merging {len(shapes['lora'])} LoRA layers into {src} -> {cfg.format} ({method}), onto the "
        f"{'dequantized 4/8-bit' if cfg.onto == 'quantized' else 'original'} weights, one block at a time")
    if cfg.quantized and shapes["stacks"]:
        log(f"{shapes['stacks']} expert stacks are exported in {cfg.dtype}: transformers + bitsandbytes quantizes only "
            "nn.Linear layers and cannot hold 3-D expert weights quantized")
    report = {"format": cfg.format, "method": method, "onto": cfg.onto, "model": str(src), "adapter": str(cfg.adapter),
              "merge_aware": aware,
              "calibration": {"tokens": int(calib.attention_mask.sum()), "sequences": len(calib)}, "plan": plan}
    if cfg.quantized and shapes["stacks"]:
        report["experts_exported_dense"] = {"stacks": shapes["stacks"], "dtype": cfg.dtype,
                                            "why": "transformers + bitsandbytes quantizes only nn.Linear layers"}
    allocator.own_mappings_from(MMAP_BYTES)
    job = _Streamed(parts, cfg, export_q, trained_dtype, method, Path(cfg.adapter), adapter_cfg, pairs, src, target)
    progress_bar = merge_report.Progress(len(parts.layers), log, progress)
    if target is not None:
        report["gguf"] = target.summary()
        with atomic_file(out) as tmp:
            writer = target.writer(tmp)
            try:
                _run(job, writer, calib, eval_set, progress_bar, report, cfg)
            finally:
                writer.abort()  # closed already when complete; on failure its space goes with the temporary name
            atomic_write_bytes(report_path(cfg), (json.dumps(report, indent=2) + "\n").encode())
    else:
        with atomic_dir(out) as tmp:
            _run(job, ShardWriter(tmp, SHARD_BYTES), calib, eval_set, progress_bar, report, cfg)
            export.write_config(src, tmp, cfg, export_q, tok)
            (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(merge_report.format_report(report))
    return report


def report_path(cfg: MergeConfig) -> Path:
    """Where the fidelity report goes: inside the export's folder, or beside a .gguf file."""
    out = Path(cfg.out)
    return out.with_name(out.name.removesuffix(".gguf") + ".merge_report.json") if cfg.gguf else out / "merge_report.json"


def _run(job: _Streamed, writer, calib: Sequences, eval_set: Sequences, progress, report: dict, cfg: MergeConfig) -> None:
    report["layers"] = job.run(writer, calib, None if not cfg.eval else eval_set, progress)
    report["model_metrics"] = job.metrics
    report["peak_rss_bytes"] = job.peak_rss
    if not cfg.eval:
        report["model_metrics"] = {"skipped": "--no-eval: perplexity, kept gain and KL were not measured"}


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


def _outside_cast(parts: CheckpointBlocks, cfg: MergeConfig) -> bool:
    """Whether the export stores any floating-point tensor outside the blocks (those the merge loads) in another
    dtype than the checkpoint's, from the files' headers (nothing is read)."""
    dtypes = {name: t for t, name in io.SAFETENSORS_DTYPES.items() if t.is_floating_point and t.itemsize >= 2}
    stored = export.dense_dtype(cfg)
    by_file: dict[Path, list[str]] = {}
    for group in parts.groups.get(None, []):
        for f, key in group.sources:
            by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for key in keys:
                dtype = dtypes.get(h.get_slice(key).get_dtype())
                if dtype is not None and export.cast_changes_values(dtype, stored):
                    return True
    return False


# ---- the streamed merge --------------------------------------------------------------------------------

class _Streamed:
    """One pass over the blocks: merge, write, and carry the calibration and evaluation activations."""

    def __init__(self, parts: CheckpointBlocks, cfg: MergeConfig, export_q: QuantConfig, trained_dtype: torch.dtype,
                 method: str, adapter: Path, adapter_cfg: dict, pairs: dict, src: Path,
                 target: GGUFTarget | None = None):
        self.parts, self.cfg, self.export_q, self.trained_dtype = parts, cfg, export_q, trained_dtype
        self.method, self.adapter, self.adapter_cfg, self.pairs = method, adapter, adapter_cfg, pairs
        self.original = _SourceTensors(src) if cfg.onto == "original" else None
        self.dense = export.dense_dtype(cfg)
        # what a reader gets back for the tensors outside the linear layers, and the dtype of stored biases
        self.store = target.stored if target is not None else self.dense
        self.bias_dtype = torch.float32 if target is not None else self.dense
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # where the rounding runs
        self.metrics: dict = {}
        self.peak_rss = 0
        self.as_tuple = False  # whether the model's blocks return tuples (seen on the first block)
        # whether the export's format changes the base's linear weights (otherwise it stores the base's own codes)
        self.floor_everywhere = not (cfg.quantized and self._base_is_floor(parts.cfg.quant))

    def run(self, writer: ShardWriter, calib: Sequences, eval_set: Sequences | None,
            progress: merge_report.Progress) -> list:
        parts, model, layers = self.parts, self.parts.model, self.parts.layers
        ends = parts.untied_ends()  # an untied head is read only at the end, the embedding only at the start
        parts.load(None, skip=ends[1:] if ends else ())
        batch = rows_per_forward(self.cfg.seq_len)
        cal = blocks.start(model, layers, blocks.batches(calib, batch))
        streams = {}
        if eval_set is not None:
            streams["base"] = blocks.start(model, layers, blocks.batches(eval_set, batch))
            streams["unmerged"] = blocks.copy(streams["base"])
            cast = blocks.written(model, parts.layers_name, self.store)
            with blocks.swapped(cast):
                streams["export"] = blocks.start(model, layers, blocks.batches(eval_set, batch))
            if cast or self.floor_everywhere:
                streams["export_base"] = blocks.copy(streams["export"])
            del cast  # the stored embedding's values: made again for the head at the end, not held meanwhile
            # else the export's format holds the base's own values so far: that stream is forked from the base's
            # at the first block where it does not (if any), and until then the rounding floor is exactly 0
        self._write_outside(writer)
        parts.drop(None)
        allocator.trim()
        rows, untrimmed = [], 0
        for i in range(len(layers)):
            p = self._enter(i, cal, streams)
            values, block_rows = self._round(p)
            rows += block_rows
            self._leave(p, values, writer, streams)
            untrimmed += p.bytes
            del p, values
            parts.drop(i)
            if untrimmed >= TRIM_PHASES_BYTES or i == len(layers) - 1:  # small blocks: a trim per 64 MB of them
                allocator.trim()
                untrimmed = 0
            self.peak_rss = max(self.peak_rss, rss_now())
            progress.step(i + 1)
        progress.done()
        parts.load(None, skip=ends[:1] if ends else ())
        self._write_outside(writer)  # what the start left out (an untied head)
        writer.close()
        if eval_set is not None:
            with blocks.embedding_unread(model, ends):
                self.metrics = self._metrics(streams, self.as_tuple)
        parts.drop(None)
        return rows

    def _write_outside(self, writer: ShardWriter) -> None:
        """The tensors outside the blocks that are in memory and not yet written."""
        # ties are found by identity within one call (both names alive at once); across calls, by key
        for key, t, dtype in export.module_tensors(self.parts.model, "", {}, self.cfg, self.export_q,
                                                   self.trained_dtype, set(), skip=self.parts.layers_name):
            if key not in writer.keys and not t.is_meta:
                writer.add(key, t, dtype)

    def _enter(self, i: int, cal: blocks.Stream, streams: dict) -> _Pending:
        """Block i read, its adapter applied, and the activations that do not depend on the export carried
        through it (calibration, collecting the input statistics; the base and the unmerged model)."""
        parts = self.parts
        prefix = f"{parts.layers_name}.{i}."
        block = parts.load(i)
        apply_adapter(parts.model, self.adapter, self.adapter_cfg, self.pairs, check_base=False, under=prefix)
        linears = {f"{prefix}{n}": m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        lora = {n: m for n, m in linears.items() if m.lora_A is not None}
        stacks = {f"{prefix}{n}" for n in expert_stacks(block)}
        experts = {n for n in linears if n.rpartition(".")[0] in stacks}
        base = {n: m.dequantize(torch.float32) for n, m in linears.items()}  # the weights the adapter trained on
        stats = InputStats({n: n.rpartition(".")[0] for n in experts})
        cast = blocks.written(block, None, self.store, prefix)
        if streams and "export_base" not in streams and (cast or self.floor_everywhere or experts):
            streams["export_base"] = blocks.copy(streams["base"])  # the two part here, before this block
        with blocks.twins(block, prefix, linears, base, keep_lora=True) as twins:
            with_lora = {n: t for n, t in twins.items() if t.lora_A is not None}
            with stats.collecting(with_lora):
                self.as_tuple = blocks.advance(block, i, cal)
            if streams:
                with blocks.lora_off(with_lora.values()):
                    blocks.advance(block, i, streams["base"])
                blocks.advance(block, i, streams["unmerged"])
        big = sum(m.out_features * m.in_features * 4 for m in lora.values()) >= TRIM_PHASES_BYTES
        # a large block's dense weights are decoded again a group at a time, not all held through the rounding
        kept = None if big else {n: base[n] for n in lora}  # (the others' dense copies go now)
        del base
        return _Pending(i, block, prefix, linears, lora, stacks, experts, kept, stats, cast, big,
                        sum(m.out_features * m.in_features * 4 for m in linears.values()))

    def _leave(self, p: _Pending, values: dict, writer: ShardWriter, streams: dict) -> None:
        """Block p written, and the export's activations (and the floor's) carried through it."""
        cfg, block, prefix, linears = self.cfg, p.block, p.prefix, p.linears
        for key, t, dtype in export.module_tensors(block, prefix, values, cfg, self.export_q, self.trained_dtype,
                                                   set()):
            writer.add(key, t, dtype)
        if streams:  # the export as a reader computes it: stored values, in fp32; one set of them at a time
            stored = {n: export.stored_value(values[n] if n in values else export.export_value(m, cfg, self.export_q),
                                             m, cfg, self.export_q) for n, m in linears.items()}
            del values
            with blocks.swapped(p.cast), blocks.twins(block, prefix, linears, stored, keep_lora=False,
                                                      bias_dtype=self.bias_dtype):
                blocks.advance(block, p.i, streams["export"])
            if "export_base" in streams:  # the export's format without the update: what rounding alone does
                for n in p.lora:
                    stored[n] = self._without_update(p, n, None if p.base is None else p.base[n])
                with blocks.swapped(p.cast), blocks.twins(block, prefix, linears, stored, keep_lora=False,
                                                          bias_dtype=self.bias_dtype):
                    blocks.advance(block, p.i, streams["export_base"])

    def _src(self, n: str, layer: QuantLinear, base: Tensor) -> Tensor:
        """The weight the update is added to: the trained (dequantized) one, or the checkpoint's original."""
        return self.original.weight(n, layer) if self.original else base

    def _without_update(self, p: _Pending, n: str, base: Tensor | None = None) -> Tensor:
        """The fp32 weight the export would hold for layer n of block p without the update: the trained (or
        original) weights in the export's format, rounded by the same method (kept from the rounding pass).
        `base`: the layer's decoded weight when at hand (decoded here only if needed)."""
        cfg, q = self.cfg, self.export_q
        layer = p.lora[n]
        if n in p.floor:
            return p.floor[n]
        if base is None:
            base = layer.dequantize(torch.float32)
        src = self.original.weight(n, layer) if self.original else base
        if not cfg.quantized or n.rpartition(".")[0] in p.stacks:
            return src.to(self.dense).float()
        if self._base_is_floor(layer.quant):
            return base
        return export.stored_value(formats.quantize(src, q), layer, cfg, q)

    def _base_is_floor(self, quant: str) -> bool:
        """Whether the export stores the trained codes themselves when there is no update (same format)."""
        return self.cfg.format == quant and not self.original

    def _base_grid(self, n: str, layer: QuantLinear, base: Tensor) -> dict[str, Tensor] | None:
        """The packed base whose scales are the second candidate grid: the trained layer's own (same format),
        the base rounded to the export's GGUF type, or none."""
        if layer.quant == self.export_q.quant:
            return layer.packed()
        if self.export_q.quant in GGUF_QUANTS:
            return formats.quantize(self._src(n, layer, base), self.export_q)
        return None

    def _round(self, p: _Pending) -> tuple[dict, list]:
        """Each LoRA layer's export value (packed or dense) and its report row. Layers sharing an input are rounded
        together; a small block's groups all at once (one column loop for those of the same input width), a large
        block's one at a time, each handed back (and trimmed) before the next."""
        if p.big:
            allocator.trim()  # the forwards' small freed temporaries, before the rounding's working set
        allocator.own_mappings_from(ROUNDING_MMAP_BYTES)
        values, rows = {}, []
        work = list(p.groups().items())
        for part in ([[w] for w in work] if p.big else [work]):
            groups = [self._group(p, key, names) for key, names in part]
            rounded = iter(requantize_groups([g.spec for g in groups if g.spec is not None], self.export_q,
                                             self.method, self.device))
            for g in groups:
                self._rows(p, g, next(rounded) if g.spec is not None else {}, values, rows)
            del groups, rounded  # the group's weights: all handed back before the next
            if p.big:
                allocator.trim()  # with the small ones malloc keeps (without it the 780M case peaks 90 MiB higher)
        p.stats = None  # not needed past the rounding (a small block's decoded weights are: the floor's stream)
        allocator.own_mappings_from(MMAP_BYTES)
        if p.big:
            allocator.trim()  # the rounding's working set, handed back before the export's streams
        return values, rows

    def _group(self, p: _Pending, key: str, names: list[str]) -> _Group:
        """One group's inputs to the rounding: its statistics (handed over by p.stats), weights and updates."""
        lora, cfg = p.lora, self.cfg
        h = p.stats.pop(key)
        if h is None:
            h = torch.zeros(lora[names[0]].in_features, lora[names[0]].in_features)
        # the weights the adapter trained on
        base = {n: p.base[n] if p.base is not None else lora[n].dequantize(torch.float32) for n in names}
        deltas = {n: lora[n].delta_weight().detach().float() for n in names}
        requant = [n for n in names if cfg.quantized and n not in p.experts]
        spec = None
        if requant:  # the layers rounded together are merged together; the others one at a time
            merged = {n: self._src(n, lora[n], base[n]) + deltas[n] for n in requant}
            # the floor: the same rounding of the weights without the update, in the same pass
            without = {n: self._src(n, lora[n], base[n]) for n in requant if not self._base_is_floor(lora[n].quant)}
            spec = (merged, {n: self._base_grid(n, lora[n], base[n]) for n in requant}, h, without)
        return _Group(names, h, base, deltas, spec)

    def _rows(self, p: _Pending, g: _Group, rounded: dict, values: dict, rows: list) -> None:
        """A group's export values and report rows, once it is rounded."""
        g.spec = None  # the merged weights: not needed past the rounding
        p.floor.update({n: r.without for n, r in rounded.items() if r.without is not None})
        h = g.h
        for n in g.names:
            layer = p.lora[n]
            src = self._src(n, layer, g.base[n])
            delta = g.deltas[n]
            row = {"layer": n, "update_rel": _ratio(delta, src), "shape": [layer.out_features, layer.in_features]}
            if self.original:
                row["quant_err_rel"] = _ratio(g.base[n] - src, src)
            old = self._without_update(p, n, g.base[n])
            delta_h = layer.scaling * (layer.lora_B.detach().float() @ (layer.lora_A.detach().float() @ h))
            if n in rounded:  # (dW H from the factors: r x in^2 where the product costs out x in^2)
                r = rounded[n]
                row["scales"] = r.scales
                # the weight rounded onto is the source itself: GPTQ's own output error gives A H A^T
                miss = r.error_energy if self._base_is_floor(layer.quant) else None
                row.update(retained(r.value - old, delta, h, delta_h, miss_energy=miss))
                row["codes_changed"] = round(float((r.value != old).float().mean()), 5)
                values[n] = r.packed
            else:
                values[n] = (src + delta).to(self.dense)
                row.update(retained(values[n].float() - old, delta, h, delta_h))
            del delta_h
            rows.append(row)
        g.h = g.base = g.deltas = None

    @torch.no_grad()
    def _metrics(self, streams: dict, as_tuple: bool) -> dict:
        """Perplexity of base, unmerged and export (and the export's format without the update), the kept gain
        with its noise, KL and logits error of export against unmerged."""
        model, layers = self.parts.model, self.parts.layers
        written = blocks.written(model, self.parts.layers_name, self.store)
        nll = {k: [] for k in ("base", "unmerged", "export", "export_base")}
        kl, diff2, ref2, tokens = 0.0, 0.0, 0.0, 0
        rows = [(b, r) for b, batch in enumerate(streams["base"].batches) for r in range(len(batch["input_ids"]))]
        for b, r in rows:  # one sequence at a time: (T, vocab) logits of one row (of two streams), not of a minibatch
            batch = {key: v[r:r + 1] for key, v in streams["base"].batches[b].items()}
            labels = batch["labels"][0, 1:]
            keep = labels != IGNORE_INDEX
            all_scored = bool(keep.all())
            target = labels[keep][:, None]
            ref = ref_lp = None  # the unmerged model's scored logits and log-softmax, until the export's are compared
            # two streams with the same head (the trained one; the stored one) in one matmul: the head's weight is
            # read from memory once for both rows (a (T, vocab) product is bound by that read: 1.5x faster)
            for pair in (("base", "unmerged"), ("export", "export_base")):
                present = [k for k in pair if k in streams]
                with blocks.swapped(written if pair[0] == "export" else {}):
                    both = blocks.head(model, layers, torch.cat([streams[k].hidden[b][r:r + 1] for k in present]),
                                       {key: v.expand(len(present), *v.shape[1:]) for key, v in batch.items()},
                                       as_tuple)[:, :-1]
                for k in pair:
                    if k not in streams:  # the export's format never changed the base: its loss is the base's
                        nll[k].append(nll["base"][-1])
                        continue
                    full = both[present.index(k)]
                    lg = full if all_scored else full[keep]  # (scored tokens, vocab)
                    if k == "unmerged" and all_scored:
                        lg = lg.clone()  # (not a view holding the pair's logits)
                    lp = lg.log_softmax(-1)
                    nll[k].append((-float(lp.gather(1, target).sum(dtype=torch.float64)), len(target)))
                    if k == "unmerged":
                        ref, ref_lp = lg, lp
                    elif k == "export":
                        kl += float(F.kl_div(lp, ref_lp, log_target=True, reduction="sum"))
                        diff2 += float(torch.dist(lg, ref)) ** 2
                        ref2 += float(ref.norm()) ** 2
                        tokens += ref.shape[0]
                        ref = ref_lp = None
                    del full, lg, lp
                del both  # one pair's (T, vocab) tensors at a time, besides the unmerged model's two
        ppl = {k: math.exp(sum(s for s, _ in v) / max(sum(c for _, c in v), 1)) for k, v in nll.items()}
        out = {"ppl_base": ppl["base"], "ppl_unmerged": ppl["unmerged"], "ppl_merged": ppl["export"],
               "kl_merged_vs_unmerged": kl / max(tokens, 1),
               "logits_rel_err": round(math.sqrt(diff2 / max(ref2, 1e-30)), 6),
               "eval_sequences": len(nll["base"]), "eval_tokens": tokens}
        out.update(merge_report.gain(nll["base"], nll["unmerged"], nll["export_base"], ppl))
        return out


@dataclasses.dataclass
class _Pending:
    """A block between its first forwards and its rounding: what the rounding and the export's forwards need."""

    i: int
    block: torch.nn.Module
    prefix: str
    linears: dict[str, QuantLinear]
    lora: dict[str, QuantLinear]
    stacks: set[str]  # the block's expert stacks
    experts: set[str]  # layers inside them
    base: dict[str, Tensor] | None  # the LoRA layers' decoded weights as trained (kept for small blocks)
    stats: InputStats | None
    cast: dict  # what the export stores for the block's other tensors
    big: bool  # whether its LoRA layers are TRIM_PHASES_BYTES or more in fp32
    bytes: int  # its linear layers in fp32
    floor: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # layers rounded without their update

    def groups(self) -> dict[str, list[str]]:
        """The LoRA layers by the input they read."""
        out: dict[str, list[str]] = {}
        for n in self.lora:
            out.setdefault(self.stats.key.get(n, n), []).append(n)
        return out


@dataclasses.dataclass
class _Group:
    names: list[str]
    h: Tensor | None
    base: dict[str, Tensor] | None
    deltas: dict[str, Tensor] | None
    spec: tuple | None  # requantize_groups' input: (merged, base grids, H, without), when any layer is rounded


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


