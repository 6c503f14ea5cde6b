"""The training steps a memory estimate simulates and a measurement runs, counted by LiveTensors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .. import allocator
from ..config import TrainConfig
from ..formats import make_optimizer
from ..layers import QuantLinear
from ..loss import decoder_of
from ..patch import enable_checkpointing
from ..step import LossFn, train_step
from .counting import LiveTensors
from .formulas import PlannedOptimizer


def register_static(model: nn.Module, tracker: LiveTensors) -> None:
    """File the model's tensors: trainable ones as LoRA parameters, packed ones (this package's layers, and
    integer parameters such as bitsandbytes' packed weights) as quantized weights, the rest as unquantized.
    Tensors a module keeps outside its parameters and buffers (bitsandbytes' quant states) are the caller's
    to add before the steps."""
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        quantized = isinstance(t, nn.Parameter) and not t.is_floating_point()
        tracker.add(t, "LoRA parameters" if t.requires_grad else "quantized weights" if quantized
                    else "unquantized weights")
    for module in model.modules():  # packed buffers (or, under FSDP, parameters): re-filed
        if isinstance(module, QuantLinear) and module.quant != "none":
            for t in module.packed().values():
                tracker.add(t, "quantized weights")


def saved_at_head(model: nn.Module, tracker: LiveTensors, saved: dict):
    """Record the activations alive when the decoder hands its output to the head: what the forward keeps."""
    def hook(*_):
        saved["activations"] = tracker.by_category["activations"]
    return (decoder_of(model) or model).register_forward_hook(hook)


def run_steps(model: nn.Module, cfg: TrainConfig, tracker: LiveTensors, device: str, steps: int = 2,
              meta: bool = False, recompute_context: Callable | None = None, warmup: bool = False,
              on_warm: Callable | None = None, loss_fn: LossFn | None = None) -> None:
    """`steps` optimizer steps of `cfg.grad_accum` micro-batches each, as train() takes them, counted.

    On the CPU, cfg.release_memory trims malloc's heaps between decoder layers, as train() does.
    The trainable parameters are the model's parameters that require grad; each micro-batch is one
    `step.train_step` (its loss: `loss_fn`, default causal_lm_loss, what train() uses).
    warmup: take one step more first and restart the peak after it, so that the peak is a steady-state
    step's (optimizers create their state lazily inside their first step).
    recompute_context: a context (factory) the recomputation of checkpointed layers runs in; torch
    function modes are not active inside backward, so a meta run re-enters its kernels there.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    register_static(model, tracker)
    if cfg.gradient_checkpointing:
        extra = {"context_fn": lambda: (contextlib.nullcontext(), recompute_context())} if recompute_context else {}
        enable_checkpointing(model, **extra)
    model.train()
    decoder = decoder_of(model) or model
    hooks = [decoder.register_forward_pre_hook(lambda *_: setattr(tracker, "phase", "activations")),
             decoder.register_forward_hook(lambda *_: setattr(tracker, "phase", "logits & loss"))]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.add(p.grad, "LoRA gradients")) for p in params]

    def backward_phase(_loss: Tensor) -> None:
        tracker.phase = "backward temporaries"

    try:
        vocab = model.config.get_text_config().vocab_size
        if cfg.release_memory and not meta:
            hooks += allocator.release_between_layers(model).handles
        with tracker:
            tracker.phase = "optimizer state"
            if meta:
                opt = PlannedOptimizer(params, cfg.optimizer, "cuda" if device.startswith("cuda") else "cpu")
            else:
                opt = make_optimizer(cfg.optimizer, params, 1e-4, 0.0)
            for step in range(steps + warmup):
                if warmup and step == 1:
                    tracker.reset_peak()
                    if on_warm is not None:
                        on_warm()
                for _ in range(cfg.grad_accum):
                    tracker.phase = "activations"
                    shape = (cfg.batch_size, cfg.seq_len)
                    ids = (torch.empty(shape, dtype=torch.long, device="meta") if meta
                           else torch.randint(0, vocab, shape, device=device))
                    batch = {"input_ids": ids, "labels": ids}
                    if not meta:  # the packed batches of training: all ones (a meta run cannot look inside)
                        batch["attention_mask"] = torch.ones_like(ids)
                    train_step(model, batch, accum=cfg.grad_accum, loss_fn=loss_fn, before_backward=backward_phase)
                    del batch, ids
                tracker.phase = "optimizer temporaries"
                if not meta:  # in place on real tensors; meta's decomposition would copy every gradient
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                for t in tree_leaves(opt.state if meta else list(opt.state.values())):
                    if isinstance(t, Tensor):
                        tracker.add(t, "optimizer state")
                opt.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
