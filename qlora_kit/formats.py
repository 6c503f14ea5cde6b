"""Weight formats: quantize, dequantize and multiply for nf4, fp4 and int8.

This is the only module of the package that talks to bitsandbytes. A quantized weight
travels through the rest of the package as a plain dict of tensors (its "packed" form),
so that a layer can register them as buffers and `.to(device)` / `state_dict()` just work:

  nf4 / fp4:  weight (uint8, two codes per byte, shape (out*in/2, 1)), absmax, quant_map (16
              code values); with double quantization absmax is uint8 and nested_absmax,
              nested_quant_map and offset hold its second level (blocks of 256).
  int8:       weight (int8, (out, in)), scb (float32 row absmax, (out,)).
  none:       weight (compute dtype, (out, in)).
"""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import torch
from torch import Tensor

from .config import QuantConfig

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the second level of double quantization


def quantize(w: Tensor, cfg: QuantConfig) -> dict[str, Tensor]:
    """Quantize a dense (out, in) weight.

    Args:
        w: the weight in any float dtype, on the device the packed form should live on.
        cfg: format, block size, double quantization.
    Returns:
        The packed tensors (see the module docstring).
    Raises:
        ValueError: when the weight is not 2-D or its size does not split into blocks.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if cfg.quant == "none":
        return {"weight": w.detach().to(cfg.compute_dtype).contiguous()}
    if cfg.quant == "int8":
        cb, scb, _ = bnbF.int8_vectorwise_quant(w.detach().to(torch.float16).contiguous())
        return {"weight": cb, "scb": scb.float()}
    if w.numel() % cfg.blocksize:
        raise ValueError(
            f"weight of shape {tuple(w.shape)} ({w.numel()} values) does not divide into blocks of {cfg.blocksize}"
        )
    src = w.detach().contiguous()
    if src.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        src = src.float()
    packed, state = bnbF.quantize_4bit(
        src, blocksize=cfg.blocksize, quant_type=cfg.quant, compress_statistics=cfg.double_quant
    )
    out = {"weight": packed, "absmax": state.absmax, "quant_map": state.code}
    if state.nested:
        out.update(
            nested_absmax=state.state2.absmax,
            nested_quant_map=state.state2.code,
            offset=state.offset.reshape(1).float(),
        )
    return out


def _quant_state(packed: dict[str, Tensor], fmt: str, shape: tuple[int, int], blocksize: int,
                 dtype: torch.dtype) -> bnbF.QuantState:
    state2 = None
    if "nested_absmax" in packed:
        state2 = bnbF.QuantState(absmax=packed["nested_absmax"], code=packed["nested_quant_map"],
                                 blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return bnbF.QuantState(
        absmax=packed["absmax"], shape=torch.Size(shape), code=packed["quant_map"], blocksize=blocksize,
        quant_type=fmt, dtype=dtype, offset=packed["offset"][0] if state2 is not None else None, state2=state2,
    )


def dequantize(packed: dict[str, Tensor], fmt: str, shape: tuple[int, int], blocksize: int,
               dtype: torch.dtype) -> Tensor:
    """The dense (out, in) weight in `dtype` that the packed form stands for."""
    if fmt == "none":
        return packed["weight"].to(dtype)
    if fmt == "int8":
        return bnbF.int8_vectorwise_dequant(packed["weight"], packed["scb"]).to(dtype)
    return bnbF.dequantize_4bit(packed["weight"], _quant_state(packed, fmt, shape, blocksize, dtype))


def int8_mixed_matmul(x: Tensor, packed: dict[str, Tensor], threshold: float, dtype: torch.dtype) -> Tensor:
    """LLM.int8 forward: x @ W.T with outlier activation columns kept in 16-bit.

    Columns of x holding any |value| >= threshold are multiplied with the matching dequantized
    weight columns in `dtype`; the rest are quantized row-wise to int8 and go through an
    int8 x int8 -> int32 matmul.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    cx, sx, outliers = bnbF.int8_vectorwise_quant(x2.to(torch.float16).contiguous(), threshold=threshold)
    acc = bnbF.int8_linear_matmul(cx, packed["weight"])  # (N, out) int32
    y = bnbF.int8_mm_dequant(acc, sx, packed["scb"]).to(dtype)
    if outliers is not None and outliers.numel():
        w_cols = packed["weight"][:, outliers].to(dtype) * (packed["scb"].to(dtype)[:, None] / 127)
        y = y + x2[:, outliers].to(dtype) @ w_cols.t()
    return y.reshape(*x.shape[:-1], y.shape[-1])


def packed_nbytes(packed: dict[str, Tensor]) -> int:
    """Bytes held by the packed form (codes plus every scale)."""
    return sum(t.numel() * t.element_size() for t in packed.values())


def code_table(fmt: str) -> Tensor:
    """The 16 values a 4-bit code stands for (before scaling by the block's absmax)."""
    return bnbF.get_4bit_type(fmt, device="cpu")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """'adamw' (torch), or bitsandbytes' 'adamw8bit' / 'paged_adamw8bit' (8-bit blockwise moments).

    Paged optimizers page their state to host memory under GPU memory pressure; on a CPU they
    behave as the plain 8-bit one.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes.optim as bnb_optim

    classes = {"adamw8bit": bnb_optim.AdamW8bit, "paged_adamw8bit": bnb_optim.PagedAdamW8bit}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}: use adamw, adamw8bit or paged_adamw8bit")
    return classes[name](params, lr=lr, weight_decay=weight_decay)


def block_scales(packed: dict[str, Tensor], fmt: str, shape: tuple[int, int], blocksize: int) -> Tensor:
    """The float32 scale of every 4-bit block (the double-quantized absmax decoded), or int8's row scale / 127."""
    if fmt == "int8":
        return packed["scb"].float() / 127
    if "nested_absmax" not in packed:
        return packed["absmax"].float()
    state2 = bnbF.QuantState(absmax=packed["nested_absmax"], code=packed["nested_quant_map"],
                             blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return bnbF.dequantize_blockwise(packed["absmax"], state2).float() + packed["offset"][0]


def pack_4bit_codes(codes: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed form with the given (out, in) 4-bit codes and the scales of `like` (two codes a byte, high nibble first)."""
    flat = codes.flatten().to(torch.uint8)
    out = dict(like)
    out["weight"] = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
    return out


def pack_int8_codes(codes: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed int8 form with the given (out, in) codes in [-127, 127] and the row scales of `like`."""
    return {"weight": codes.to(torch.int8).contiguous(), "scb": like["scb"]}


def bnb_checkpoint_tensors(packed: dict[str, Tensor], fmt: str, shape: tuple[int, int], blocksize: int,
                           dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors bitsandbytes' transformers integration stores for one linear layer, keyed relative to
    the layer ("weight", "weight.absmax", ... / "weight", "SCB", "weight_format")."""
    if fmt == "int8":
        return {"weight": packed["weight"], "SCB": packed["scb"].float(),
                "weight_format": torch.tensor(0, dtype=torch.uint8)}  # 0: row-major, the only format left
    state = _quant_state(packed, fmt, shape, blocksize, dtype)
    out = {"weight": packed["weight"]}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out
