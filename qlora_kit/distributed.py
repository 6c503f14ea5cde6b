"""Training on several processes with torch.distributed, as launched by `torchrun`.

Nothing here launches processes or invents communication: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR, and `setup` joins the process group (nccl on GPUs, gloo on CPUs) with a timeout on every
collective, so a rank that dies or hangs takes the job down instead of stalling it.

Two ways to spread a run:
  data-parallel (default)  every rank holds the whole quantized model; each step every rank takes its own
                           slice of the global batch, and only the LoRA gradients are all-reduced (one flat
                           buffer per optimizer step, after the accumulation micro-steps).
  --fsdp                   the frozen base is sharded with FSDP2 (`fully_shard`): each rank stores 1/N of
                           the packed weights, embeddings and head, and each decoder layer is gathered
                           just before it runs. The LoRA factors (about 1% of a model), their gradients and
                           the optimizer state stay replicated and are all-reduced as above, so the adapter
                           every rank holds is already whole and rank 0 saves it as it is.
Either way rank 0 alone writes logs and checkpoints, and the loss is the mean over the labelled tokens of
the whole global batch: a run on N ranks with batch b computes what one process computes with batch N*b.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import types

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import QuantLinear


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands: rank `rank` of `world_size` (1 and 0 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's collectives put their tensors (nccl needs them on the GPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or disagreed."""


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets WORLD_SIZE) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, timeout_s: float) -> tuple[Context, str]:
    """Join the process group torchrun describes; returns the context and this rank's device.

    Args:
        device: 'cuda', 'cuda:N' or 'cpu' as resolved for a single process; under torchrun a CUDA rank
            uses cuda:LOCAL_RANK.
        timeout_s: how long any collective may wait for the other ranks.
    """
    if not launched():
        return SINGLE, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device(device) if cuda else None)
    return Context(rank, world, local, device), device


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:  # DistBackendError, timeouts, a peer's closed connection
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankFailure(f"rank {dist.get_rank()}: {what} failed: another rank died, hung past the timeout, "
                          f"or disagreed ({first})") from None


def all_reduce_sum(ctx: Context, values: Tensor, what: str) -> Tensor:
    """Sum `values` over the ranks in place (no-op on one process)."""
    if ctx.enabled:
        _collective(what, dist.all_reduce, values, op=dist.ReduceOp.SUM)
    return values


def average_gradients(ctx: Context, params: list[nn.Parameter]) -> None:
    """Average the LoRA gradients over the ranks: one all-reduce of one flat buffer.

    A parameter may have no gradient on some ranks (an expert no token of this rank's rows was routed
    to): it counts as zero there, and it stays without a gradient only where no rank gave it one, as in
    one process over the whole batch.
    """
    if not ctx.enabled:
        return
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([had.to(grads[0].device)] + [g.reshape(-1).float() for g in grads]) if grads else had
    all_reduce_sum(ctx, flat, "the gradient all-reduce")
    offset = len(params)
    for p, g, count in zip(params, grads, flat[:len(params)].tolist(), strict=True):
        if count > 0:
            g.copy_(flat[offset:offset + g.numel()].view_as(g) / ctx.world_size)
            p.grad = g
        else:
            p.grad = None
        offset += g.numel()


def check_same(ctx: Context, value: float, what: str) -> None:
    """Raise on every rank when the ranks disagree on `value` (e.g. the step a resume starts from)."""
    if not ctx.enabled:
        return
    t = torch.tensor([value, -value], dtype=torch.float64, device=ctx.device)
    _collective(f"comparing {what}", dist.all_reduce, t, op=dist.ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        raise RankFailure(f"rank {ctx.rank}: the ranks disagree on {what} ({value} here, from {-t[1].item()} "
                          f"to {t[0].item()} across ranks)")


def barrier(ctx: Context, what: str) -> None:
    if ctx.enabled:
        _collective(what, dist.barrier)


def gather_objects(ctx: Context, obj) -> list:
    """[object of rank 0, object of rank 1, ...] on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    _collective("gathering per-rank state", dist.all_gather_object, out, obj)
    return out


def rank_slice(ctx: Context, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's rows of a global micro-batch (rows r, r + N, r + 2N, ... would also do; contiguous is
    simpler to read in a log)."""
    rows = next(iter(batch.values())).shape[0]
    per = rows // ctx.world_size
    return {k: v[ctx.rank * per:(ctx.rank + 1) * per] for k, v in batch.items()}


# ---- FSDP2 over the quantized base ---------------------------------------------------------------

def shard_model(model: nn.Module, ctx: Context, device: str) -> nn.Module:
    """Shard the frozen base with FSDP2: each decoder layer, the input embedding, then the root.

    The packed tensors of every QuantLinear become frozen parameters (FSDP2 shards parameters, not
    buffers), except the tiny per-layer code tables. FSDP2 gathers frozen parameters of mixed dtypes
    byte-wise, so the uint8 codes and fp32 scales need no repacking. The LoRA factors are left out
    (`ignored_params`): they stay whole on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from .loss import decoder_layers, fused_causal_lm_loss

    lora = {p for m in model.modules() if isinstance(m, QuantLinear) and m.lora_A is not None
            for p in (m.lora_A, m.lora_B)}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.make_packed_parameters()
    for p in lora:  # fully_shard moves what it manages (shard by shard) and the buffers, not ignored params
        p.data = p.data.to(device)
    mesh = init_device_mesh(torch.device(device).type, (ctx.world_size,))
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"--fsdp: cannot find the decoder layers of {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=lora)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or embed.weight is not head.weight):  # tied: both stay with the root
        fully_shard(embed, mesh=mesh, ignored_params=lora)
    fully_shard(model, mesh=mesh, ignored_params=lora)
    # The fused loss calls the decoder and reads the head's weight directly; as a registered forward
    # method it runs inside the root's unshard / reshard hooks like model.forward does.
    model.qlora_fused_loss = types.MethodType(fused_causal_lm_loss, model)
    register_fsdp_forward_method(model, "qlora_fused_loss")
    return model
