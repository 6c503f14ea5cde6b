"""Checkpoints of a training run: adapter, optimizer, scheduler and RNG states, in a folder that appears
atomically (`step-NNNNNN`), so that a resumed run continues bit for bit on a CPU."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed as dist
from .adapters import load_adapter, write_adapter_files
from .config import one_line
from .io import atomic_dir


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
