"""The training loop: data -> batches -> steps -> checkpoints, with exact resume.

A run folder holds:
  run.json                 the settings the run started with (a resume must use the same ones)
  metrics.jsonl            one line per step and per evaluation
  checkpoints/step-NNNNNN  adapter + optimizer + scheduler + RNG states, each written atomically
  adapter/                 the final adapter (PEFT layout)
The data position is a pure function of the step (see data.micro_batch), so a checkpoint restores
everything a resumed run needs to continue bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import allocator, defaults
from . import distributed as dist
from .adapters import write_adapter_files
from .checkpoints import latest_checkpoint, restore_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import load_dataset, micro_batch
from .evaluate import perplexity, sample
from .formats import make_optimizer
from .io import atomic_dir, atomic_write_bytes
from .loading import check_seq_len, load_model_and_tokenizer, resolve_device
from .loss import IGNORE_INDEX
from .patch import (
    add_lora,
    enable_checkpointing,
    lora_layers,
    parameter_report,
    set_merge_aware,
    trainable_parameters,
)
from .step import train_step

# Settings that may differ between a run and its resume without changing the result.
RESUME_FREE = {"resume", "out", "device", "cache_dir", "save_every", "keep_checkpoints", "eval_every",
               "sample_tokens", "dist_timeout"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    adapter: Path
    steps: int
    ppl_before: float | None
    ppl_after: float | None
    sample_before: str | None = None
    sample_after: str | None = None


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True,
          _on_step: Callable[[int, nn.Module], None] | None = None) -> TrainResult:
    """Run (or resume) a training run as described by cfg; under torchrun, one rank of it.

    Raises:
        ValueError, FileNotFoundError: bad settings or input, before any training.
        TrainingDiverged: the loss became NaN/inf; the last good checkpoint stays.
        distributed.RankFailure: under torchrun, another rank died or stopped answering.
    """
    ctx, device = dist.setup(resolve_device(cfg.device), cfg.dist_timeout)
    try:
        run = _Run(cfg, ctx, device, log if ctx.is_main else (lambda _: None), progress and ctx.is_main)
        return run.go(_on_step)
    finally:
        dist.teardown(ctx)


class _Run:
    """One rank of a training run: set up (or restored), trained, evaluated, saved."""

    def __init__(self, cfg: TrainConfig, ctx: dist.Context, device: str, log: Callable[[str], None],
                 progress: bool):
        self.cfg, self.ctx, self.device, self.log, self.progress = cfg, ctx, device, log, progress
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics = self.out / "metrics.jsonl"
        self.append = _append if ctx.is_main else (lambda path, row: None)

    def go(self, on_step: Callable[[int, nn.Module], None] | None) -> TrainResult:
        ckpt = self._checkpoint_to_resume()
        self._build()
        state = self._start(ckpt)
        last = self._loop(int(state.get("step", 0)), on_step, state)
        return self._finish(last, state)

    # ---- before the first step ------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> Path | None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.fsdp and not ctx.enabled:
            raise ValueError("--fsdp shards the model over the ranks of a torchrun launch: run it under "
                             "`torchrun --nproc-per-node N` with N >= 2")
        ckpt = None
        if cfg.resume:
            _check_same_run(self.out, cfg)
            ckpt = latest_checkpoint(self.ckpt_dir)
            if ckpt is None:
                self.log(f"no checkpoint in {self.ckpt_dir} yet: starting the run from the beginning")
        elif self.ckpt_dir.exists() and any(self.ckpt_dir.glob("step-*")):
            raise FileExistsError(f"{self.out}: already holds a run; pass --resume to continue it, or choose "
                                  "another --out")
        dist.check_same(ctx, int(ckpt.name.split("-")[1]) if ckpt else 0, "the checkpoint to resume from")
        return ckpt

    def _build(self) -> None:
        """The quantized model with LoRA, its data, optimizer and schedule."""
        cfg, ctx, device = self.cfg, self.ctx, self.device
        # Under FSDP each rank builds the quantized model in host memory and shards it onto its device.
        model, self.tok = load_model_and_tokenizer(cfg.model, cfg.quant_config(device),
                                                   "cpu" if cfg.fsdp else device, cfg.cache_dir)
        data_path = defaults.resolve_data(cfg.data, cfg.cache_dir)
        check_seq_len(model, cfg.seq_len)
        self.train_set, self.eval_set = load_dataset(data_path, self.tok, cfg.seq_len, cfg.packing,
                                                     cfg.eval_fraction, cfg.eval_data, cfg.seed)
        self.global_batch = cfg.batch_size * ctx.world_size
        if len(self.train_set) < self.global_batch:
            raise ValueError(f"{data_path}: {len(self.train_set)} training sequences of {cfg.seq_len} tokens, "
                             f"fewer than one batch of {cfg.batch_size}"
                             + (f" x {ctx.world_size} ranks" if ctx.enabled else ""))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        add_lora(model, config=cfg.lora_config())
        if cfg.merge_aware and cfg.merge_aware_after == 0:
            set_merge_aware(model, cfg.merge_aware, cfg.merge_aware_rounding)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        if cfg.fsdp:
            model = dist.shard_model(model, ctx, device)
        if cfg.release_memory:
            allocator.release_between_layers(model)  # on the CPU only; the hooks live as long as the model
        if ctx.rank > 0:  # the same LoRA init everywhere, then each rank its own dropout masks
            torch.manual_seed(cfg.seed + 7919 * ctx.rank)
        self.model = model
        self.params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
        self.opt = make_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    def _start(self, ckpt: Path | None) -> dict:
        """Restore the checkpoint, or start the run folder; report; evaluate and sample before training."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        state = {"ppl_before": None, "sample_before": None}
        if ckpt is not None:
            state = restore_checkpoint(ckpt, model, self.opt, self.sched, ctx)
            if ctx.is_main:
                _truncate_metrics(self.metrics, state["step"], final=state["step"] == cfg.steps)
            self.log(f"resumed from {ckpt} at step {state['step']}")
        elif ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out / "run.json", json.dumps(dataclasses.asdict(cfg), indent=2).encode())
            self.metrics.unlink(missing_ok=True)
        self.log(parameter_report(model))
        if ctx.enabled:
            accum = self.global_batch * cfg.grad_accum
            self.log(f"{ctx.world_size} ranks ({'FSDP2-sharded base' if cfg.fsdp else 'data-parallel'}, "
                     f"{torch.distributed.get_backend()}): global batch {cfg.batch_size} per rank x {ctx.world_size} "
                     f"ranks x {cfg.grad_accum} accumulation = {accum} sequences ({accum * cfg.seq_len:,} tokens) "
                     "per step")
        rows = self.eval_set if self.eval_set is not None else self.train_set
        self.prompt = rows.input_ids[0, :24]
        # Evaluation and sampling run on every rank (the same rows, the same result): under FSDP every rank
        # must take part in each forward anyway.
        if ckpt is None and self.eval_set is not None:
            state["ppl_before"] = perplexity(model, self.eval_set, cfg.batch_size, cfg.eval_sequences)
            n = min(len(self.eval_set), cfg.eval_sequences or len(self.eval_set))
            self.log(f"held-out perplexity before training: {state['ppl_before']:.2f} ({n} sequences of "
                     f"{cfg.seq_len} tokens)")
            self.append(self.metrics, {"step": 0, "eval_ppl": state["ppl_before"]})
        if ckpt is None and cfg.sample_tokens:
            state["sample_before"] = self._sample("before")
        return state

    def _sample(self, when: str) -> str:
        text = sample(self.model, self.tok, self.prompt, self.cfg.sample_tokens)
        self.log(f"sample {when} training:\n  prompt: {self.tok.decode(self.prompt)!r}\n  reply:  {text!r}")
        return text

    # ---- steps ----------------------------------------------------------------------------------
    def _loop(self, start: int, on_step: Callable[[int, nn.Module], None] | None, state: dict) -> int:
        cfg = self.cfg
        self.model.train()
        bar = _progress(cfg.steps, start, self.progress)
        step = start
        for step in range(start + 1, cfg.steps + 1):
            if cfg.merge_aware and step > cfg.merge_aware_after and not getattr(self.model, "qlora_merge_aware", None):
                set_merge_aware(self.model, cfg.merge_aware, cfg.merge_aware_rounding)  # plain LoRA until then (also after a resume)
                if step > 1:
                    self.log(f"step {step}: merge-aware training for {cfg.merge_aware} from here on")
            row = self._step(step)
            self.append(self.metrics, row)
            bar(step, row)
            if on_step is not None:
                on_step(step, self.model)
            if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_set is not None and step < cfg.steps:
                ppl = perplexity(self.model, self.eval_set, cfg.batch_size, cfg.eval_sequences)
                self.append(self.metrics, {"step": step, "eval_ppl": ppl})
                self.log(f"step {step}: held-out perplexity {ppl:.2f}")
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(self.ckpt_dir, step, self.model, self.opt, self.sched, state, cfg.keep_checkpoints,
                                self.ctx)
        bar(None, None)
        return step

    def _step(self, step: int) -> dict:
        """One optimizer step of cfg.grad_accum micro-batches; its metrics row."""
        cfg, ctx, params = self.cfg, self.ctx, self.params
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            # the global micro-batch is a function of the step alone; each rank takes its rows of it
            batch = micro_batch(self.train_set, (step - 1) * cfg.grad_accum + micro, self.global_batch, cfg.seed)
            batch = {k: v.to(self.device) for k, v in dist.rank_slice(ctx, batch).items()}

            def stop_on_nan(loss: torch.Tensor, micro: int = micro) -> None:
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss became {loss.item()} at step {step} (micro-batch {micro + 1}); "
                                           f"stopped. Last good checkpoint: {latest_checkpoint(self.ckpt_dir) or 'none'}")

            loss = train_step(self.model, batch, accum=cfg.grad_accum, before_backward=stop_on_nan,
                              reduce=lambda loss, batch=batch: _global_mean(ctx, loss, batch))
            loss_sum += loss.item() / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        dist.average_gradients(ctx, params)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                     else torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)))
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm became {grad_norm.item()} at step {step}; stopped. "
                                   f"Last good checkpoint: {latest_checkpoint(self.ckpt_dir) or 'none'}")
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        return {"step": step, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                "tokens_per_s": round(tokens * ctx.world_size / dt, 1), "step_s": round(dt, 3),
                "mem_mb": round(_memory_mb(self.device), 1)}

    # ---- after the last step --------------------------------------------------------------------
    def _finish(self, step: int, state: dict) -> TrainResult:
        cfg, model = self.cfg, self.model
        result = TrainResult(adapter=self.out / "adapter", steps=step, ppl_before=state.get("ppl_before"),
                             ppl_after=None, sample_before=state.get("sample_before"))
        if self.eval_set is not None:
            result.ppl_after = perplexity(model, self.eval_set, cfg.batch_size, cfg.eval_sequences)
            self.append(self.metrics, {"step": step, "eval_ppl": result.ppl_after})
            before = f"{result.ppl_before:.2f} -> " if result.ppl_before else ""
            self.log(f"held-out perplexity after training: {before}{result.ppl_after:.2f}")
        if cfg.sample_tokens:
            result.sample_after = self._sample("after")
        if self.ctx.is_main:  # the LoRA factors are whole and equal on every rank
            with atomic_dir(result.adapter) as tmp:
                write_adapter_files(model, tmp, defaults.model_name(cfg.model, cfg.cache_dir))
        dist.barrier(self.ctx, "waiting for rank 0 to write the adapter")
        trainable, _ = trainable_parameters(model)
        self.log(f"adapter ({trainable:,} trainable parameters) saved to {result.adapter}")
        return result


def _global_mean(ctx: dist.Context, loss: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss over the labelled tokens of the global micro-batch, what this rank back-propagates).

    Each rank's loss is its own token mean; weighting it by its share of the global token count makes the
    averaged gradients those of the mean over every token of every rank, whatever each rank holds.
    """
    if not ctx.enabled:
        return loss, loss
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float64)
    mine = loss.detach().to(torch.float64) * n if n > 0 else torch.zeros((), dtype=torch.float64, device=n.device)
    total, count = dist.all_reduce_sum(ctx, torch.stack([mine, n]), "the loss all-reduce")
    if n == 0:  # this rank (or every rank) has no labelled token: it contributes nothing
        weight = loss.nan_to_num(0.0) * 0
    else:
        weight = loss * (n * ctx.world_size / count).to(loss.dtype)
    return (total / count).to(torch.float32) if count > 0 else torch.zeros((), device=loss.device), weight


# ---- the run folder --------------------------------------------------------------------------------

def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    saved = out / "run.json"
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    if before.get("merge_aware") and "merge_aware_rounding" not in before:
        before["merge_aware_rounding"] = "nearest"  # a run started before the setting existed rounded to nearest
    now = dataclasses.asdict(cfg)
    changed = [k for k in now if k not in RESUME_FREE and before.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ValueError(f"{saved}: --resume with different settings ({k}: {before.get(k)!r} then, {now[k]!r} now); "
                         "resume with the run's own settings")


# ---- logging -------------------------------------------------------------------------------------

def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    writer = _tensorboard(path.parent)
    if writer is not None:
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                writer.add_scalar(key, value, row["step"])
        writer.flush()


_writers: dict[Path, object] = {}


def _tensorboard(run_dir: Path):
    """A TensorBoard writer for the run folder when tensorboard is installed, else None."""
    if run_dir not in _writers:
        try:
            from torch.utils.tensorboard import SummaryWriter
            _writers[run_dir] = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            _writers[run_dir] = None
    return _writers[run_dir]


def _truncate_metrics(path: Path, step: int, final: bool = False) -> None:
    """Drop lines a killed run logged after its last checkpoint, so a resumed log equals an uninterrupted one.

    With `final` (the checkpoint is the run's last), the closing evaluation is dropped too: it is redone.
    """
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            if row["step"] < step or (row["step"] == step and not (final and "eval_ppl" in row)):
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def _memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # resident set size of this process
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _progress(total: int, start: int, enabled: bool):
    """A tqdm bar with loss, lr, tokens/s and memory; a no-op when disabled."""
    if not enabled:
        return lambda step, row: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(step, row):
        if step is None:
            bar.close()
            return
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                        mem=f"{row['mem_mb']:.0f}MB", refresh=False)
        bar.update(step - bar.n)
    return update
