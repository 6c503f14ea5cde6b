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
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import defaults
from . import distributed as dist
from .adapters import load_adapter, write_adapter_files
from .config import TrainConfig, one_line
from .data import IGNORE, Sequences, load_dataset, micro_batch, pad_id
from .formats import make_optimizer
from .io import atomic_dir, atomic_write_bytes
from .loading import check_device, load_quantized, resolve_compute_dtype
from .loss import causal_lm_loss
from .patch import add_lora, enable_checkpointing, lora_layers, parameter_report, trainable_parameters

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


def load_model_and_tokenizer(model: str, quant: str = "nf4", compute_dtype: str = "auto", device: str = "cpu",
                             double_quant: bool = True, blocksize: int = 64, cache_dir: str | None = None):
    """Resolve the model (path, .gguf, or the embedded default), then load it quantized with its tokenizer."""
    path = defaults.model_folder(model, cache_dir)
    net = load_quantized(path, quant=quant, compute_dtype=resolve_compute_dtype(compute_dtype, device), double_quant=double_quant, blocksize=blocksize,
                         device=device)
    return net, load_tokenizer(path)


def load_tokenizer(path: Path):
    """The tokenizer saved in a model folder, or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load a tokenizer from the model folder ({one_line(e)})") from None


def check_seq_len(model_or_config, seq_len: int) -> None:
    """Refuse a sequence length beyond the context of a model (or of its transformers config)."""
    config = getattr(model_or_config, "config", model_or_config)
    max_ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
    if max_ctx is not None and seq_len > max_ctx:
        raise ValueError(f"--seq-len {seq_len} is beyond the model's context of {max_ctx} tokens")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(check_device(device))


def perplexity(model: nn.Module, seqs: Sequences, batch_size: int, limit: int = 0) -> float:
    """exp(mean next-token loss) over the labelled tokens of the first `limit` sequences (0: all)."""
    return score(model, seqs, batch_size, limit)[0]


@torch.no_grad()
def score(model: nn.Module, seqs: Sequences, batch_size: int, limit: int = 0,
          keep_logits: bool = False) -> tuple[float, torch.Tensor | None]:
    """Perplexity as above, and with keep_logits the fp32 logits at the scored positions, (tokens, vocab)."""
    was_training = model.training
    model.eval()
    n = len(seqs) if limit <= 0 else min(limit, len(seqs))
    total, count, kept = 0.0, 0, []
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        batch = {k: v.to(device) for k, v in seqs.select(slice(i, min(i + batch_size, n))).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten()
        total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
        if keep_logits:
            kept.append(logits[labels != IGNORE].cpu())
    model.train(was_training)
    return math.exp(total / max(count, 1)), (torch.cat(kept) if keep_logits else None)


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy continuation (uses no randomness, so it never disturbs a run's RNG)."""
    was_training = model.training
    model.eval()
    ids = prompt_ids.to(next(model.parameters()).device)[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id(tokenizer))
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


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
        return _train(cfg, ctx, device, log if ctx.is_main else (lambda _: None), progress and ctx.is_main, _on_step)
    finally:
        dist.teardown(ctx)


def _train(cfg: TrainConfig, ctx: dist.Context, device: str, log: Callable[[str], None], progress: bool,
           _on_step: Callable[[int, nn.Module], None] | None) -> TrainResult:
    if cfg.fsdp and not ctx.enabled:
        raise ValueError("--fsdp shards the model over the ranks of a torchrun launch: run it under "
                         "`torchrun --nproc-per-node N` with N >= 2")
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    start_step, ckpt = 0, None
    if cfg.resume:
        _check_same_run(out, cfg)
        ckpt = latest_checkpoint(ckpt_dir)
        if ckpt is None:
            log(f"no checkpoint in {ckpt_dir} yet: starting the run from the beginning")
    elif ckpt_dir.exists() and any(ckpt_dir.glob("step-*")):
        raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it, or choose another --out")
    dist.check_same(ctx, int(ckpt.name.split("-")[1]) if ckpt else 0, "the checkpoint to resume from")

    # Under FSDP each rank builds the quantized model in host memory and shards it onto its device.
    model, tok = load_model_and_tokenizer(cfg.model, cfg.quant, resolve_compute_dtype(cfg.compute_dtype, device),
                                          "cpu" if cfg.fsdp else device, cfg.double_quant, cfg.blocksize,
                                          cfg.cache_dir)
    data_path = defaults.resolve_data(cfg.data, cfg.cache_dir)
    check_seq_len(model, cfg.seq_len)
    train_set, eval_set = load_dataset(data_path, tok, cfg.seq_len, cfg.packing, cfg.eval_fraction,
                                       cfg.eval_data, cfg.seed)
    global_batch = cfg.batch_size * ctx.world_size
    if len(train_set) < global_batch:
        raise ValueError(f"{data_path}: {len(train_set)} training sequences of {cfg.seq_len} tokens, fewer than "
                         f"one batch of {cfg.batch_size}" + (f" x {ctx.world_size} ranks" if ctx.enabled else ""))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    add_lora(model, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.target_spec(), rslora=cfg.rslora)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.fsdp:
        model = dist.shard_model(model, ctx, device)
    if ctx.rank > 0:  # the same LoRA init everywhere, then each rank its own dropout masks
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    state = {"ppl_before": None, "sample_before": None}
    if ckpt is not None:
        state = restore_checkpoint(ckpt, model, opt, sched, ctx)
        start_step = state["step"]
        if ctx.is_main:
            _truncate_metrics(out / "metrics.jsonl", start_step, final=start_step == cfg.steps)
        log(f"resumed from {ckpt} at step {start_step}")
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "run.json", json.dumps(dataclasses.asdict(cfg), indent=2).encode())
        (out / "metrics.jsonl").unlink(missing_ok=True)
    append = _append if ctx.is_main else (lambda path, row: None)

    log(parameter_report(model))
    if ctx.enabled:
        log(f"{ctx.world_size} ranks ({'FSDP2-sharded base' if cfg.fsdp else 'data-parallel'}, "
            f"{torch.distributed.get_backend()}): global batch {cfg.batch_size} per rank x {ctx.world_size} ranks "
            f"x {cfg.grad_accum} accumulation = {global_batch * cfg.grad_accum} sequences "
            f"({global_batch * cfg.grad_accum * cfg.seq_len:,} tokens) per step")
    prompt = eval_set.input_ids[0, :24] if eval_set is not None else train_set.input_ids[0, :24]
    # Evaluation and sampling run on every rank (the same rows, the same result): under FSDP every rank
    # must take part in each forward anyway.
    if ckpt is None and eval_set is not None:
        state["ppl_before"] = perplexity(model, eval_set, cfg.batch_size, cfg.eval_sequences)
        log(f"held-out perplexity before training: {state['ppl_before']:.2f} "
            f"({min(len(eval_set), cfg.eval_sequences or len(eval_set))} sequences of {cfg.seq_len} tokens)")
        append(out / "metrics.jsonl", {"step": 0, "eval_ppl": state["ppl_before"]})
    if ckpt is None and cfg.sample_tokens:
        state["sample_before"] = sample(model, tok, prompt, cfg.sample_tokens)
        log(f"sample before training:\n  prompt: {tok.decode(prompt)!r}\n  reply:  {state['sample_before']!r}")

    model.train()
    use_autocast = device.startswith("cuda") and next(
        iter(lora_layers(model).values())).compute_dtype == torch.bfloat16
    bar = _progress(cfg.steps, start_step, progress)
    step = start_step
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            # the global micro-batch is a function of the step alone; each rank takes its rows of it
            batch = micro_batch(train_set, (step - 1) * cfg.grad_accum + micro, global_batch, cfg.seed)
            batch = {k: v.to(device) for k, v in dist.rank_slice(ctx, batch).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                loss = causal_lm_loss(model, batch)
            loss, weight = _global_mean(ctx, loss, batch)
            if not torch.isfinite(loss):
                last = latest_checkpoint(ckpt_dir)
                raise TrainingDiverged(f"loss became {loss.item()} at step {step} (micro-batch {micro + 1}); "
                                       f"stopped. Last good checkpoint: {last or 'none'}")
            (weight / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        dist.average_gradients(ctx, params)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                     else torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)))
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm became {grad_norm.item()} at step {step}; stopped. "
                                   f"Last good checkpoint: {latest_checkpoint(ckpt_dir) or 'none'}")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
               "tokens_per_s": round(tokens * ctx.world_size / dt, 1), "step_s": round(dt, 3),
               "mem_mb": round(_memory_mb(device), 1)}
        append(out / "metrics.jsonl", row)
        bar(step, row)
        if _on_step is not None:
            _on_step(step, model)
        if cfg.eval_every and step % cfg.eval_every == 0 and eval_set is not None and step < cfg.steps:
            ppl = perplexity(model, eval_set, cfg.batch_size, cfg.eval_sequences)
            append(out / "metrics.jsonl", {"step": step, "eval_ppl": ppl})
            log(f"step {step}: held-out perplexity {ppl:.2f}")
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(ckpt_dir, step, model, opt, sched, state, cfg.keep_checkpoints, ctx)
    bar(None, None)

    result = TrainResult(adapter=out / "adapter", steps=step, ppl_before=state.get("ppl_before"),
                         ppl_after=None, sample_before=state.get("sample_before"))
    if eval_set is not None:
        result.ppl_after = perplexity(model, eval_set, cfg.batch_size, cfg.eval_sequences)
        append(out / "metrics.jsonl", {"step": step, "eval_ppl": result.ppl_after})
        before = f"{result.ppl_before:.2f} -> " if result.ppl_before else ""
        log(f"held-out perplexity after training: {before}{result.ppl_after:.2f}")
    if cfg.sample_tokens:
        result.sample_after = sample(model, tok, prompt, cfg.sample_tokens)
        log(f"sample after training:\n  prompt: {tok.decode(prompt)!r}\n  reply:  {result.sample_after!r}")
    if ctx.is_main:  # the LoRA factors are whole and equal on every rank
        with atomic_dir(result.adapter) as tmp:
            write_adapter_files(model, tmp, str(defaults.model_folder(cfg.model, cfg.cache_dir)))
    dist.barrier(ctx, "waiting for rank 0 to write the adapter")
    trainable, total = trainable_parameters(model)
    log(f"adapter ({trainable:,} trainable parameters) saved to {result.adapter}")
    return result


def _global_mean(ctx: dist.Context, loss: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss over the labelled tokens of the global micro-batch, what this rank back-propagates).

    Each rank's loss is its own token mean; weighting it by its share of the global token count makes the
    averaged gradients those of the mean over every token of every rank, whatever each rank holds.
    """
    if not ctx.enabled:
        return loss, loss
    n = (batch["labels"][:, 1:] != IGNORE).sum().to(torch.float64)
    mine = loss.detach().to(torch.float64) * n if n > 0 else torch.zeros((), dtype=torch.float64, device=n.device)
    total, count = dist.all_reduce_sum(ctx, torch.stack([mine, n]), "the loss all-reduce")
    if n == 0:  # this rank (or every rank) has no labelled token: it contributes nothing
        weight = loss.nan_to_num(0.0) * 0
    else:
        weight = loss * (n * ctx.world_size / count).to(loss.dtype)
    return (total / count).to(torch.float32) if count > 0 else torch.zeros((), device=loss.device), weight


# ---- checkpoints ---------------------------------------------------------------------------------

def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint. A folder only gets its step-* name once it is complete."""
    done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir()) if ckpt_dir.exists() else []
    return done[-1] if done else None


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, opt, sched, state: dict, keep: int,
                    ctx: dist.Context = dist.SINGLE) -> Path:
    """Adapter, optimizer, scheduler and RNG states in one folder that appears atomically.

    Under torchrun rank 0 writes it (adapter and optimizer are the same on every rank) with every rank's
    RNG state, and the others wait until it is complete.
    """
    path = ckpt_dir / f"step-{step:06d}"
    rng = dist.gather_objects(ctx, torch.get_rng_state())
    if not ctx.is_main:
        dist.barrier(ctx, f"waiting for rank 0 to write {path}")
        return path
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".step-*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tensors: dict[str, torch.Tensor] = {"rng/torch": rng[0]}
    tensors.update({f"rng/torch.rank{r}": t for r, t in enumerate(rng) if r > 0})
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    meta = {
        "step": step,
        "world_size": ctx.world_size,
        "optimizer": _flatten(opt.state_dict(), "opt", tensors),
        "scheduler": sched.state_dict(),
        "python_rng": _jsonable(random.getstate()),
        "ppl_before": state.get("ppl_before"),
        "sample_before": state.get("sample_before"),
    }
    with atomic_dir(path) as tmp:
        write_adapter_files(model, tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainer_state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(meta))
    for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier(ctx, f"writing {path}")
    return path


def restore_checkpoint(path: Path, model: nn.Module, opt, sched, ctx: dist.Context = dist.SINGLE) -> dict:
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "trainer_state.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: checkpoint cannot be read ({one_line(e)})") from None
    saved_world = meta.get("world_size", 1)
    if saved_world != ctx.world_size:
        raise ValueError(f"{path}: written by a run on {saved_world} rank(s), resumed on {ctx.world_size}; "
                         f"resume with the same number of processes")
    load_adapter(model, path)
    opt.load_state_dict(_unflatten(meta["optimizer"], tensors))
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch" if ctx.rank == 0 else f"rng/torch.rank{ctx.rank}"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tuples(meta["python_rng"]))
    return meta


def _flatten(obj, prefix: str, tensors: dict):
    """JSON skeleton of a nested state dict; tensors go to `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_jsonable(k), _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _jsonable(obj):
    return [_jsonable(v) for v in obj] if isinstance(obj, tuple | list) else obj


def _tuples(obj):
    return tuple(_tuples(v) for v in obj) if isinstance(obj, list) else obj


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    saved = out / "run.json"
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
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
