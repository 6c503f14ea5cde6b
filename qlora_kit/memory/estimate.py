"""The estimate (a meta-device run from config.json) and the measurement (real steps), as MemoryReports."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ..config import QuantConfig, TrainConfig, one_line
from ..layers import QuantLinear
from ..loading import check_seq_len, resolve_device
from ..loss import decoder_layers
from ..step import autocast_enabled
from .counting import LiveTensors, fmt_bytes
from .emulation import TargetKernels, no_data_dependent_masks
from .formulas import CUBLAS_WORKSPACE, optimizer_state_bytes
from .models import meta_model, random_model, read_model_config
from .observed import ObservedPeak
from .run import run_steps, saved_at_head

# The training settings that change memory (the `qlora-kit memory` flags shared with `train`).
MEMORY_FIELDS = ("quant", "double_quant", "blocksize", "compute_dtype", "rank", "dropout", "targets", "seq_len",
                 "batch_size", "grad_accum", "optimizer", "gradient_checkpointing", "release_memory", "fsdp",
                 "cache_dir")

@dataclasses.dataclass
class MemoryReport:
    """Peak training memory and what it is made of, in bytes."""

    device: str
    settings: dict
    model: dict
    components: dict[str, int]  # alive at the moment of the peak, by category (they add up to `peak`)
    peak: int
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # whole sizes (grads, optimizer, saved acts)
    method: str = "estimate"
    allocator_peak: int | None = None  # measured: the allocator's own peak (observed.ObservedPeak)
    reserved_peak: int | None = None  # measured on CUDA: torch.cuda.max_memory_reserved
    rss_start: int | None = None  # measured: the process's resident set before the model was built ...
    rss_peak: int | None = None  # ... and its peak over the measured steps
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.allocator_peak if self.allocator_peak is not None else self.peak

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["total"] = self.total
        return out


def _settings(cfg: TrainConfig, device: str, qcfg: QuantConfig) -> dict:
    s = {f: getattr(cfg, f) for f in MEMORY_FIELDS if f != "cache_dir"}
    s["compute_dtype"] = str(qcfg.compute_dtype).removeprefix("torch.")
    s["device"] = device
    return s


def _model_info(config, model: nn.Module) -> dict:
    from ..patch import lora_layers

    text = config.get_text_config()
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    lora = lora_layers(model)
    return {
        "config": getattr(config, "qlora_config_path", None), "model_type": config.model_type,
        "layers": text.num_hidden_layers, "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
        "quantized_params": quantized,
        "unquantized_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "lora_layers": len(lora), "lora_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in lora.values()),
    }


def _sizes(model: nn.Module, cfg: TrainConfig, saved: int) -> dict[str, int]:
    from ..patch import lora_layers

    numels = [p.numel() for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    return {"LoRA gradients": 4 * sum(numels), "optimizer state": optimizer_state_bytes(numels, cfg.optimizer),
            "activations saved by the forward": saved}


def _simulate(config, cfg: TrainConfig, device: str) -> tuple[nn.Module, LiveTensors, int]:
    model = meta_model(config, cfg, device)
    autocast = autocast_enabled(device, model.qlora_quant_config.compute_dtype)  # the target's, emulated
    tracker = LiveTensors()
    saved = {}
    head_hook = saved_at_head(model, tracker, saved)
    try:
        with no_data_dependent_masks(), TargetKernels(device, autocast):
            run_steps(model, cfg, tracker, device, steps=1, meta=True,
                      recompute_context=lambda: TargetKernels(device, autocast))
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        where = getattr(config, "qlora_config_path", "config")
        if "meta" in str(e):  # e.g. mixture-of-experts routing looks at values
            raise ValueError(f"{where}: {config.model_type} cannot be estimated from its config: its forward "
                             f"depends on tensor values (such as mixture-of-experts routing) ({one_line(e)}); "
                             "use --measure on a machine that fits it") from None
        raise ValueError(f"{where}: the model cannot run with these sizes ({one_line(e)})") from None
    finally:
        head_hook.remove()
    return model, tracker, saved.get("activations", 0)


def estimate(cfg: TrainConfig, device: str = "cuda", config=None, compare: bool = True,
             ranks: int = 1) -> MemoryReport:
    """Peak memory of training with `cfg` on `device` ('cuda' or 'cpu'), from the model's config alone.

    With `compare`, the same is also simulated with checkpointing switched the other way, for `sizes`.
    With `ranks` > 1 the figure is one rank's of a torchrun launch (batch_size is per rank): the same as one
    process for data-parallel training; with cfg.fsdp the weights are each rank's share plus what FSDP2
    gathers (see `_fsdp_weights`).
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"--ranks {ranks!r} must be an integer >= 1")
    if cfg.fsdp and ranks < 2:
        raise ValueError("--fsdp shards the model over ranks: give --ranks N with N >= 2")
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    config = config or read_model_config(cfg.model, cfg.cache_dir)
    check_seq_len(config, cfg.seq_len)
    model, tracker, saved = _simulate(config, cfg, device)
    components = dict(tracker.at_peak)
    notes = []
    if device == "cuda":
        components["CUDA workspace"] = 2 * CUBLAS_WORKSPACE  # one cuBLAS handle for the forward's thread, one
        notes.append("CUDA: add the CUDA context (~0.5 GiB, outside torch's allocator) and allocator "  # backward's
                     "fragmentation (typically 5-10%) when comparing with a GPU's total memory")
    if cfg.optimizer == "paged_adamw8bit" and device == "cuda":
        paged = components.pop("optimizer state")
        components["optimizer state"] = 0
        notes.append(f"paged optimizer state ({fmt_bytes(paged)}) lives in CUDA managed memory, outside torch's "
                     "allocator and this total; it moves to CPU memory under pressure")
    fsdp_change = 0  # what sharding changes in the peak, also for the comparison run below
    if cfg.fsdp:
        shared, gathered = _fsdp_weights(model, ranks)
        weights = components.get("quantized weights", 0) + components.get("unquantized weights", 0)
        for cat in ("quantized weights", "unquantized weights"):
            components[cat] = -(-components.get(cat, 0) // ranks)
        components["FSDP gathered weights"] = gathered
        fsdp_change = components["quantized weights"] + components["unquantized weights"] + gathered - weights
        notes.append(f"FSDP2 over {ranks} ranks: each holds 1/{ranks} of the {fmt_bytes(weights)} of weights, and "
                     f"at the peak the gathered root (head, final norm{', tied embedding' if shared else ''}) and "
                     "two decoder layers plus one layer's all-gather buffer; LoRA factors, gradients and optimizer "
                     "state are whole on every rank")
    elif ranks > 1:
        notes.append(f"data-parallel over {ranks} ranks: every rank holds the whole model and trains its own "
                     f"batch of {cfg.batch_size}; after backward a flat fp32 copy of the LoRA gradients "
                     "is all-reduced (outside the peak)")
    sizes = _sizes(model, cfg, saved)
    if compare:
        other = dataclasses.replace(cfg, gradient_checkpointing=not cfg.gradient_checkpointing)
        _, other_tracker, other_saved = _simulate(config, other, device)
        sizes["activations saved by the forward " + ("without" if cfg.gradient_checkpointing else "with")
              + " checkpointing"] = other_saved
        sizes["peak " + ("without" if cfg.gradient_checkpointing else "with") + " checkpointing"] = (
            other_tracker.peak + components.get("CUDA workspace", 0) + fsdp_change)
    settings = _settings(cfg, device, model.qlora_quant_config)
    settings["ranks"] = ranks
    return MemoryReport(device=device, settings=settings, model=_model_info(config, model), components=components,
                        peak=sum(components.values()), sizes=sizes, notes=notes)


def _fsdp_weights(model: nn.Module, ranks: int) -> tuple[bool, int]:
    """(whether the head is tied to the embedding, the bytes FSDP2 holds gathered at the peak).

    qlora_kit.distributed.shard_model makes each decoder layer, the input embedding (unless tied) and the
    root (head, final norm) FSDP2 units. The root is gathered from the start of the forward to the end of
    the backward; decoder layers are gathered one at a time with the next one prefetched, and a gather
    briefly holds the all-gather buffer next to the unsharded tensors: two layers plus one buffer.
    """
    def nbytes(module: nn.Module) -> int:
        seen, total = set(), 0
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if "lora_" not in name and id(t) not in seen and not name.endswith("inv_freq"):
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    layers = decoder_layers(model) or []
    layer = max((nbytes(m) for m in layers), default=0)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embed is not None and embed.weight is head.weight
    root = nbytes(model) - sum(nbytes(m) for m in layers) - (0 if tied or embed is None else nbytes(embed))
    return tied, root + 3 * layer


def measure(cfg: TrainConfig, device: str = "auto", steps: int = 1, config=None, seed: int = 0) -> MemoryReport:
    """Run one warm-up step and `steps` measured training steps (random weights and tokens); report the
    measured steps' peak, counted per category by LiveTensors, beside what the machine saw (observed.py):
    the allocator's peak (the report's total) and the process's peak RSS."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--measure-steps {steps!r} must be an integer >= 1 (steps measured after one warm-up step)")
    device = resolve_device(device)
    config = config or read_model_config(cfg.model, cfg.cache_dir)
    check_seq_len(config, cfg.seq_len)
    torch.manual_seed(seed)
    is_cuda = device.startswith("cuda")
    tracker = LiveTensors()
    saved = {}
    observed = ObservedPeak(device).start()
    try:
        model = random_model(config, cfg, device, seed)
        head_hook = saved_at_head(model, tracker, saved)
        try:
            run_steps(model, cfg, tracker, device, steps=steps, warmup=True, on_warm=observed.reset_peak)
        finally:
            head_hook.remove()
        observed.stop()
    except (RuntimeError, IndexError, TypeError) as e:
        observed.abort()
        raise ValueError(f"{getattr(config, 'qlora_config_path', 'config')}: measuring failed ({one_line(e)})") from None
    except BaseException:
        observed.abort()
        raise
    report = MemoryReport(device="cuda" if is_cuda else "cpu",
                          settings=_settings(cfg, device, model.qlora_quant_config),
                          model=_model_info(config, model), components=dict(tracker.at_peak), peak=tracker.peak,
                          sizes=_sizes(model, cfg, saved.get("activations", 0)), method="measured",
                          allocator_peak=observed.allocated_peak, reserved_peak=observed.reserved_peak,
                          rss_start=observed.rss_start, rss_peak=observed.rss_peak)
    if is_cuda:
        report.notes.append("total = torch.cuda.max_memory_allocated over the measured steps; the categories count "
                            "live tensors, 'other (allocator)' is workspace and rounding; the CUDA allocator "
                            "reserved up to the 'reserved' figure")
    elif report.allocator_peak is None:
        report.notes.append(f"total = peak of live tensor bytes: {observed.unavailable}")
    else:
        report.notes.append("total = the peak of torch's CPU allocator over the measured steps (profiler memory "
                            "events); the categories count live tensors, 'other (allocator)' is buffers allocated "
                            "inside operators (attention, matmul packing) that no tensor count sees")
    if not is_cuda and report.rss_peak:
        report.notes.append(
            f"process peak RSS {fmt_bytes(report.rss_peak)}: {fmt_bytes(report.rss_start)} of interpreter and "
            "libraries before the model was built; the rest is the allocator's peak plus freed memory malloc "
            + ("kept between layers (handed back at each layer: --release-memory)" if cfg.release_memory
               else "kept (--no-release-memory; --release-memory hands it back at each layer)"))
    return report


def check_measurable(est: MemoryReport) -> None:
    """Refuse a CPU measurement that would need more than half of this machine's memory."""
    if est.device != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if est.total > total / 2:
        raise ValueError(f"--measure on the CPU would need about {fmt_bytes(est.total)} of this machine's "
                         f"{fmt_bytes(total)}; measure on a GPU, or with a smaller --seq-len / --batch-size")
