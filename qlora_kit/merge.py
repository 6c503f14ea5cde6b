"""Merge an adapter into its base and export: 16-bit, or requantized with the update kept.

A LoRA update is usually far smaller than one 4-bit quantization step, so re-rounding the merged
weight to the nearest code (round-to-nearest, `method="rtn"`) leaves most codes where they were
and throws most of the update away. The default for 4-bit (`method="gptq"`) keeps every block's
scale from the base and chooses the codes column by column with error feedback, minimising the
layer's output error ||X (W' - Q)^T|| on calibration activations X (as GPTQ does), so small updates
survive as a pattern of changed codes. Every export comes with a fidelity report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import defaults, formats
from .adapters import BASE_QUANT, load_adapter, read_adapter
from .config import MergeConfig, QuantConfig, parse_dtype
from .data import Sequences, load_dataset
from .evaluate import score
from .experts import ExpertStack, expert_stacks
from .io import atomic_dir
from .layers import QuantLinear
from .loading import checkpoint_files, load_quantized, load_tokenizer
from .patch import adapter_disabled, lora_layers

SHARD_BYTES = 2 * 2**30
EVAL_BATCH = 4


def merge(cfg: MergeConfig, log=print) -> dict:
    """Merge cfg.adapter into cfg.model and write the export to cfg.out (atomically).

    Returns:
        The fidelity report (also written to <out>/merge_report.json).
    Raises:
        ValueError, FileNotFoundError, FileExistsError: before any work, for bad input.
    """
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise FileExistsError(f"{out}: already exists (use --force to replace it)")
    src = defaults.model_folder(cfg.model, cfg.cache_dir)
    adapter_cfg, _ = read_adapter(cfg.adapter)
    trained = adapter_cfg.get(BASE_QUANT) or {"quant": "nf4", "blocksize": 64, "double_quant": True,
                                              "compute_dtype": "float32"}
    qcfg = QuantConfig(quant=trained["quant"], compute_dtype=parse_dtype(trained["compute_dtype"]),
                       double_quant=trained["double_quant"], blocksize=trained["blocksize"])
    model = load_quantized(src, quant=qcfg.quant, compute_dtype=torch.float32, double_quant=qcfg.double_quant,
                           blocksize=qcfg.blocksize)
    load_adapter(model, cfg.adapter)  # refuses an adapter that does not fit, before any work
    layers = lora_layers(model)
    stacks = expert_stacks(model)
    experts = {n for n in layers if n.rpartition(".")[0] in stacks}  # one expert of a 3-D stack
    if stacks and cfg.onto == "original":
        raise ValueError(f"{src}: --onto original is not supported for models with experts; use --onto quantized")
    if cfg.quantized and any(m.fan_in_fan_out for n, m in layers.items() if n not in experts):
        raise ValueError(f"{src}: {cfg.format} export of transposed Conv1D layers (GPT-2 style) is not supported; "
                         "export bf16/fp16/fp32 instead")
    tok = load_tokenizer(src)
    eval_set, calib = _eval_and_calibration(cfg, tok, log)
    method = cfg.resolved_method()
    log(f"merging {len(layers)} LoRA layers into {src} -> {cfg.format} ({method}), onto the "
        f"{'dequantized 4/8-bit' if cfg.onto == 'quantized' else 'original'} weights")

    # the experts of a stack share one statistics matrix (their routed inputs together): one in x in matrix
    # per stack, not per expert
    hkey = {n: n.rpartition(".")[0] if n in experts else n for n in layers}
    hessians = _input_hessians(model, layers, calib, hkey)
    # The export's quantization: the trained one's block size and double quantization, in cfg.format.
    export_q = dataclasses.replace(qcfg, quant=cfg.format if cfg.quantized else qcfg.quant,
                                   compute_dtype=torch.float32)
    if cfg.quantized and stacks:
        log(f"{len(stacks)} expert stacks are exported in {cfg.dtype}: transformers + bitsandbytes quantizes only "
            "nn.Linear layers and cannot hold 3-D expert weights quantized")
    rows, new_packed = [], {}
    original = _SourceTensors(src, model) if cfg.onto == "original" else None
    for name, layer in layers.items():
        w_q = layer.dequantize(torch.float32)  # (out, in): the weight the adapter was trained on
        delta = layer.delta_weight().detach().float()
        base = original.weight(name, layer) if original else w_q
        merged = base + delta
        row = {"layer": name, "update_rel": _ratio(delta, base), "shape": [layer.out_features, layer.in_features]}
        if original:
            row["quant_err_rel"] = _ratio(w_q - base, base)
        if cfg.quantized and name not in experts:
            packed, new_w, row["scales"] = _requantize(layer, merged, export_q, method, hessians[hkey[name]])
            # What the export would hold without the update: the trained weights, in the export's format.
            old_w = w_q if cfg.format == qcfg.quant else _dequantize(formats.quantize(base, export_q), layer,
                                                                     export_q)
            row.update(_retained(new_w - old_w, delta, hessians.pop(hkey[name])))
            row["codes_changed"] = _values_changed(new_w, old_w)
            new_packed[name] = packed
        else:
            out_dtype = parse_dtype(cfg.format if not cfg.quantized else cfg.dtype)
            h = hessians[hkey[name]] if name in experts else hessians.pop(name)
            row.update(_retained(merged.to(out_dtype).float() - base.to(out_dtype).float(), delta, h))
            new_packed[name] = merged.to(out_dtype)
        rows.append(row)

    report = {"format": cfg.format, "method": method, "onto": cfg.onto, "model": str(src), "adapter": str(cfg.adapter),
              "layers": rows}
    if cfg.quantized and stacks:
        report["experts_exported_dense"] = {"stacks": len(stacks), "dtype": cfg.dtype,
                                            "why": "transformers + bitsandbytes quantizes only nn.Linear layers"}
    with atomic_dir(out) as tmp:
        _write_export(model, src, tmp, cfg, export_q, qcfg.compute_dtype, new_packed, tok)
        log(f"wrote the {cfg.format} export; evaluating it")
        report["model_metrics"] = _evaluate(model, tmp, cfg, eval_set)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(format_report(report))
    return report


# ---- requantization ------------------------------------------------------------------------------

def _dequantize(packed: dict[str, torch.Tensor], layer: QuantLinear, q: QuantConfig) -> torch.Tensor:
    return formats.dequantize(packed, q.quant, (layer.out_features, layer.in_features), q.blocksize, torch.float32)


def _requantize(layer: QuantLinear, merged: torch.Tensor, q: QuantConfig, method: str,
                hessian: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """The packed export of one merged weight, its dequantized value, and which scales it uses."""
    shape = (layer.out_features, layer.in_features)
    fresh = formats.quantize(merged, q)
    if method == "rtn":
        return fresh, _dequantize(fresh, layer, q), "fresh"
    # Two candidate grids: the base's own scales (a small update then moves only the codes it must)
    # and fresh scales from the merged weight (needed when the update is large enough to change a
    # block's range). Codes are chosen by error feedback on each; the lower output error wins.
    candidates = [("fresh", fresh)] + ([("base", layer.packed())] if q.quant == layer.quant else [])
    best = None
    for label, like in candidates:
        scales = formats.block_scales(like, q.quant, shape, q.blocksize)
        if q.quant == "int8":
            codes = gptq_codes(merged, hessian, _Int8Grid(scales))
            packed = formats.pack_int8_codes(codes, like)
        else:
            grid = _FourBitGrid(formats.code_table(q.quant).float(), scales, shape[1], q.blocksize)
            packed = formats.pack_4bit_codes(gptq_codes(merged, hessian, grid), like)
        value = _dequantize(packed, layer, q)
        diff = value.double() - merged.double()
        err = float(((diff @ hessian.double()) * diff).sum())  # ||X (Q - W')^T||^2 on the calibration inputs
        if best is None or err < best[0]:
            best = (err, packed, value, label)
    return best[1:]


class _FourBitGrid:
    """Nearest 4-bit code for one column, with each element's block scale held fixed."""

    def __init__(self, table: torch.Tensor, scales: torch.Tensor, in_features: int, blocksize: int):
        self.table, self.scales, self.in_f, self.bs = table, scales, in_features, blocksize

    def __call__(self, w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(w.shape[0])
        scale = self.scales[(rows * self.in_f + col) // self.bs]  # (out,)
        codes = (w[:, None] / scale.clamp_min(1e-12)[:, None] - self.table[None]).abs().argmin(dim=1)
        return self.table[codes] * scale, codes


class _Int8Grid:
    def __init__(self, row_scales: torch.Tensor):
        self.s = row_scales.clamp_min(1e-12)

    def __call__(self, w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes = (w / self.s).round().clamp(-127, 127)
        return codes * self.s, codes


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, grid, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Codes for W (out, in) on a fixed grid, rounding one input column at a time and pushing each
    column's rounding error onto the columns not yet rounded, weighted by the inverse of H = X^T X.
    """
    w = w.clone().double()
    n = w.shape[1]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.long)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q, c = grid(w1[:, i].float(), i1 + i)
            codes[:, i1 + i] = c
            err = (w1[:, i] - q.double()) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


@torch.no_grad()
def _input_hessians(model: nn.Module, layers: dict[str, QuantLinear], calib: Sequences,
                    key: dict[str, str]) -> dict[str, torch.Tensor]:
    """H = sum of x x^T over the calibration tokens, for each LoRA layer's input (adapter on); layers with
    the same `key` add into one matrix."""
    hs = {key[name]: torch.zeros(m.in_features, m.in_features) for name, m in layers.items()}

    def hook(name):
        def fn(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            hs[key[name]].addmm_(x.t(), x)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for i in range(len(calib)):
            model(**{k: v for k, v in calib.select(slice(i, i + 1)).items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return hs


def _retained(actual: torch.Tensor, intended: torch.Tensor, hessian: torch.Tensor) -> dict:
    """How much of the intended update dW the export really applies (actual = its weight change).

    Weight space: cosine and norm ratio of the two (out, in) matrices. Output space, what the model
    feels: the same on the calibration activations, <A, B>_H = trace(A H B^T) with H = X^T X.
    """
    a, b = actual.double(), intended.double()
    h = hessian.double()
    ah, bh = a @ h, b @ h

    def cos_ratio(ab: float, aa: float, bb: float) -> tuple[float, float]:
        if aa <= 0 or bb <= 0:
            return 0.0, 0.0
        return round(ab / math.sqrt(aa * bb), 4), round(math.sqrt(aa / bb), 4)

    w_cos, w_ratio = cos_ratio(float((a * b).sum()), float((a * a).sum()), float((b * b).sum()))
    o_cos, o_ratio = cos_ratio(float((ah * b).sum()), float((ah * a).sum()), float((bh * b).sum()))
    return {"update_cos": w_cos, "update_norm_ratio": w_ratio, "output_cos": o_cos, "output_norm_ratio": o_ratio}


def _values_changed(new: torch.Tensor, old: torch.Tensor) -> float:
    """Share of weights whose stored (dequantized) value moved; fp4's two zero codes count as one value."""
    return round(float((new != old).float().mean()), 5)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(a.norm() / b.norm().clamp_min(1e-30)), 6)


# ---- writing ---------------------------------------------------------------------------------------

class _SourceTensors:
    """Original (unquantized) weights, read one tensor at a time from the source checkpoint."""

    def __init__(self, src: Path, model: nn.Module):
        self.where: dict[str, Path] = {}
        for f in checkpoint_files(src):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.where[k] = f
        self.prefix = getattr(model, "base_model_prefix", "")

    def weight(self, name: str, layer: QuantLinear) -> torch.Tensor:
        for key in (f"{name}.weight", f"{name.removeprefix(self.prefix + '.')}.weight"):
            if key in self.where:
                with safe_open(str(self.where[key]), framework="pt") as h:
                    w = h.get_tensor(key).float()
                return w.t() if layer.fan_in_fan_out else w
        raise ValueError(f"{name}.weight is not in the source checkpoint")


def _write_export(model: nn.Module, src: Path, folder: Path, cfg: MergeConfig, export_q: QuantConfig,
                  trained_dtype: torch.dtype, merged: dict[str, object], tok) -> None:
    """config.json (+ quantization_config), tokenizer files and safetensors shards with an index."""
    dense_dtype = parse_dtype(cfg.format) if not cfg.quantized else parse_dtype(cfg.dtype)
    shards, current, size = [], {}, 0

    def add(key: str, t: torch.Tensor) -> None:
        nonlocal current, size
        current[key] = t.detach().cpu().contiguous()
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    seen: set[int] = set()
    stacks = expert_stacks(model)
    for name, module in model.named_modules():
        if name.rpartition(".")[0] in stacks:
            continue  # an expert: written with its stack
        if isinstance(module, ExpertStack):  # transformers' 3-D parameter, in the dense dtype
            mats = []
            for e, expert in enumerate(module):
                value = merged.get(f"{name}.{e}")
                value = expert.dequantize(torch.float32).to(dense_dtype) if value is None else value.to(dense_dtype)
                mats.append(value.t() if module.transposed else value)
            add(f"{name}.weight" if module.replaces_module else name, torch.stack(mats))
            continue
        if isinstance(module, QuantLinear):
            value = merged.get(name)
            if value is None and not cfg.quantized:  # a layer the adapter did not touch
                value = module.dequantize(torch.float32).to(dense_dtype)
            elif value is None:
                value = module.packed() if module.quant == cfg.format else formats.quantize(
                    module.dequantize(torch.float32), export_q)
            if isinstance(value, dict):
                for k, t in formats.bnb_checkpoint_tensors(value, cfg.format,
                                                           (module.out_features, module.in_features),
                                                           export_q.blocksize, trained_dtype).items():
                    add(f"{name}.{k}", t)
            else:
                add(f"{name}.weight", value.t() if module.fan_in_fan_out else value)
            if module.bias is not None:
                add(f"{name}.bias", module.bias.to(dense_dtype))
            continue
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            if id(p) in seen or pname in getattr(module, "_non_persistent_buffers_set", set()):
                continue  # tied weights are written once, under their first name
            seen.add(id(p))
            add(key, p.to(dense_dtype) if p.is_floating_point() else p)
    flush()
    if len(shards) == 1:
        (folder / shards[0][0]).rename(folder / "model.safetensors")
    else:
        index = {"metadata": {}, "weight_map": {k: n for n, keys in shards for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = str(dense_dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    if cfg.quantized:
        from transformers import BitsAndBytesConfig

        four = cfg.format != "int8"
        config["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=four, load_in_8bit=not four, bnb_4bit_quant_type=cfg.format if four else "nf4",
            bnb_4bit_use_double_quant=export_q.double_quant, bnb_4bit_compute_dtype=dense_dtype,
            llm_int8_threshold=0.0 if not four else 6.0).to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(folder)  # the tokenizer and generation settings travel with the weights
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", folder / "generation_config.json")


# ---- evaluation ------------------------------------------------------------------------------------

def _eval_and_calibration(cfg: MergeConfig, tok, log) -> tuple[Sequences, Sequences]:
    """Evaluation rows (the start of the held-out slice) and calibration rows that never overlap them:
    --calib-data, else the held-out rows after the evaluation rows, else the end of the training split."""
    path = defaults.resolve_data(cfg.eval_data, cfg.cache_dir)
    train_rows, held = load_dataset(path, tok, cfg.seq_len)
    if held is None:
        raise ValueError(f"{path}: no held-out text to evaluate on")
    n_eval = min(cfg.eval_sequences, len(held)) if cfg.eval_sequences else len(held)
    n_cal = math.ceil(cfg.calib_tokens / cfg.seq_len)
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
        log(f"calibration: only {len(calib) * cfg.seq_len} tokens available (asked for {cfg.calib_tokens})")
    return held.rows(slice(0, n_eval)), calib


@torch.no_grad()
def _evaluate(model: nn.Module, export: Path, cfg: MergeConfig, seqs: Sequences) -> dict:
    """Perplexity of base, unmerged adapter and the export as plain transformers loads it; KL to unmerged."""
    from transformers import AutoModelForCausalLM

    with adapter_disabled(model):
        ppl_base, _ = score(model, seqs, EVAL_BATCH)
    ppl_unmerged, logits_ref = score(model, seqs, EVAL_BATCH, keep_logits=True)  # at the scored positions
    kwargs = {"device_map": "cpu"} if cfg.quantized else {}
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, **kwargs).eval()
    with formats.exact_bitsandbytes(exported):  # the same score on every CPU
        ppl_merged, logits = score(exported, seqs, EVAL_BATCH, keep_logits=True)
    del exported
    kl = F.kl_div(logits.log_softmax(-1), logits_ref.log_softmax(-1), log_target=True, reduction="batchmean")
    gain = ppl_base - ppl_unmerged
    return {"ppl_base": ppl_base, "ppl_unmerged": ppl_unmerged, "ppl_merged": ppl_merged,
            "kept_gain": (ppl_base - ppl_merged) / gain if abs(gain) > 1e-9 else None,
            "kl_merged_vs_unmerged": float(kl), "logits_rel_err": _ratio(logits - logits_ref, logits_ref)}


def format_report(report: dict) -> str:
    """The printed table: per layer, then the model."""
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
    m = report.get("model_metrics", {})
    n = len(report["layers"])
    lines.append(f"{lost} of {n} layers kept less than half of their update's effect on the outputs (out cos < 0.5)"
                 if lost else f"all {n} layers kept their update's effect on the outputs (out cos >= 0.5)")
    if m:
        kept = f"{100 * m['kept_gain']:.1f}%" if m["kept_gain"] is not None else "n/a"
        lines.append(f"held-out perplexity: base {m['ppl_base']:.2f}, adapter unmerged {m['ppl_unmerged']:.2f}, "
                     f"merged {report['format']} export {m['ppl_merged']:.2f} -> kept {kept} of the adapter's gain")
        lines.append(f"merged vs unmerged logits: KL {m['kl_merged_vs_unmerged']:.4g} nats/token, "
                     f"relative error {m['logits_rel_err']:.3g}")
    return "\n".join(lines)
