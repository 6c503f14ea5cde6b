"""Time one forward+backward of a LoRA layer over a frozen quantized base (nf4, fp4, int8) against dense.

Run from the repository root:

    .venv/bin/python benchmarks/bench_layer.py
    .venv/bin/python benchmarks/bench_layer.py --decode --json bench_layer.json      # also 1-token decode
    python benchmarks/bench_layer.py --device cuda --shapes 4096x4096,4096x14336,14336x4096 --tokens 8192

For every shape (OUT x IN, as the weight is stored) it builds, from one random weight:

  dense        a frozen plain nn.Linear, no LoRA: the floor, what the matmul alone costs;
  dense+lora   QuantLinear with quant="none" plus LoRA: the baseline every ratio is taken against;
  nf4/fp4/int8 QuantLinear.from_dense(...) plus the same LoRA (dequantize-on-the-fly matmul: on CUDA the
               Triton kernels of qlora_kit.kernels for nf4 / fp4, elsewhere the package's dequantize + matmul);
  nf4-bnb      the nf4 layer with QLORA_KIT_KERNELS=off: bitsandbytes dequantizes the whole weight to a
               16-bit temporary for every matmul, as the common stack does (default on CUDA only).

One step is `y = layer(x); y.backward(grad_out)` on fresh random x (tokens x IN, requires_grad, so the
input gradient is computed as it is inside a network) and a fresh random grad_out; the LoRA factors get
their gradients, the frozen base none. After `--warmup` steps the median of `--repeats` timed steps is
reported. With `--decode` a no-grad forward of a single token through the base alone (LoRA switched off, as
a merged or frozen layer decodes) is timed too, and compared with `dense`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import bitsandbytes
import torch
from _common import machine
from torch import Tensor, nn

from qlora_kit.config import QuantConfig, parse_dtype
from qlora_kit.formats import packed_nbytes
from qlora_kit.kernels import kernel_mode
from qlora_kit.layers import QuantLinear

BASELINES = ("dense", "dense+lora")  # always run; ratios are taken against "dense+lora"
DEFAULTS = {  # per device type: what runs in seconds on 2 CPU cores, and Llama-3-8B-sized layers on a GPU
    "cpu": dict(dtype="fp32", shapes="1024x1024,2816x1024,1024x2816", tokens=512, repeats=10, warmup=2,
                formats="nf4,fp4,int8"),
    "cuda": dict(dtype="bf16", shapes="4096x4096,4096x14336,14336x4096", tokens=8192, repeats=20, warmup=5,
                 formats="nf4,fp4,int8,nf4-bnb"),
}


def parse_args() -> argparse.Namespace:
    def default(key: str) -> str:
        return f"default {DEFAULTS['cuda'][key]} on cuda, {DEFAULTS['cpu'][key]} on cpu"

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help=f"compute dtype bf16 / fp16 / fp32 ({default('dtype')})")
    p.add_argument("--shapes", help=f"comma-separated OUTxIN weight shapes ({default('shapes')})")
    p.add_argument("--tokens", type=int, help=f"rows of x ({default('tokens')})")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r, no dropout)")
    p.add_argument("--repeats", type=int, help=f"timed steps; the median is reported ({default('repeats')})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first ({default('warmup')})")
    p.add_argument("--formats", help=f"quantized kinds to compare with dense ({default('formats')})")
    p.add_argument("--decode", action="store_true", help="also time a 1-token forward without grad")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = parse_dtype(args.dtype)
    args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in args.formats:
        QuantConfig(quant=fmt.removesuffix("-bnb"))  # raises on an unknown format
    return args


def build(kind: str, weight: Tensor, dtype: torch.dtype, rank: int) -> nn.Module:
    """A frozen base of the given kind; every kind but "dense" gets the same LoRA branch."""
    if kind == "dense":
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=dtype)
        layer.weight.data.copy_(weight)
        layer.weight.requires_grad_(False)
        return layer
    fmt = "none" if kind == "dense+lora" else kind.removesuffix("-bnb")
    layer = QuantLinear.from_dense(weight, QuantConfig(quant=fmt, compute_dtype=dtype))
    layer.attach_lora(rank, 2 * rank, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)  # B starts at zero; give the backward real numbers to move
    return layer


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def base_nbytes(layer: nn.Module) -> int:
    if isinstance(layer, QuantLinear):
        return packed_nbytes(layer.packed())
    return layer.weight.numel() * layer.weight.element_size()


def median_ms(step: Callable[..., None], make_inputs: Callable[[], tuple], device: torch.device,
              warmup: int, repeats: int) -> float:
    """Median wall time of step(*make_inputs()) in ms; the inputs are made outside the timed region."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(*make_inputs())
    times = []
    for _ in range(repeats):
        inputs = make_inputs()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            step(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(kind: str, layer: nn.Module, shape: tuple[int, int], args: argparse.Namespace,
              device: torch.device) -> tuple[float, float | None]:
    with kernel_mode("off" if kind.endswith("-bnb") else "auto"):
        return _bench_one(layer, shape, args, device)


def _bench_one(layer: nn.Module, shape: tuple[int, int], args: argparse.Namespace,
               device: torch.device) -> tuple[float, float | None]:
    out_f, in_f = shape

    def train_inputs() -> tuple[Tensor, Tensor]:
        layer.zero_grad(set_to_none=True)  # as optimizer.zero_grad() would, so grads never accumulate
        x = torch.randn(args.tokens, in_f, device=device, dtype=args.dtype, requires_grad=True)
        return x, torch.randn(args.tokens, out_f, device=device, dtype=args.dtype)

    def train_step(x: Tensor, grad_out: Tensor) -> None:
        layer(x).backward(grad_out)

    fwd_bwd = median_ms(train_step, train_inputs, device, args.warmup, args.repeats)
    if not args.decode:
        return fwd_bwd, None

    if isinstance(layer, QuantLinear):
        layer.lora_enabled = False  # the base alone, as `dense` is

    def decode_step(x: Tensor) -> None:
        with torch.no_grad():
            layer(x)

    decode = median_ms(decode_step, lambda: (torch.randn(1, in_f, device=device, dtype=args.dtype),),
                       device, args.warmup, 3 * args.repeats)
    return fwd_bwd, decode


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dtype_name = str(args.dtype).removeprefix("torch.")
    host, t_start = machine(device), time.perf_counter()
    print(f"machine: {host}")
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, triton {triton_version()}, "
          f"python {platform.python_version()}")
    print(f"device {device}, compute dtype {dtype_name}, LoRA r={args.rank} (fp32 factors), "
          f"warmup {args.warmup}, median of {args.repeats}"
          + (f" (decode: median of {3 * args.repeats})" if args.decode else ""))
    print()

    header = ["format", "shape (out x in)", "tokens", "dtype", "fwd+bwd ms", "vs dense+lora",
              "base bytes", "vs dense bytes"]
    if args.decode:
        header += ["decode ms", "decode vs dense"]
    rows = []
    for shape in args.shapes:
        weight = torch.randn(*shape, device=device) * 0.02
        results = {}
        for kind in (*BASELINES, *args.formats):
            layer = build(kind, weight, args.dtype, args.rank)
            fwd_bwd, decode = bench_one(kind, layer, shape, args, device)
            results[kind] = dict(format=kind, out_features=shape[0], in_features=shape[1], tokens=args.tokens,
                                 dtype=dtype_name, fwd_bwd_ms=fwd_bwd, base_nbytes=base_nbytes(layer),
                                 decode_ms=decode)
            del layer
        ref, dense_bytes = results["dense+lora"], results["dense"]["base_nbytes"]
        for r in results.values():
            r["fwd_bwd_vs_dense_lora"] = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"]
            r["base_nbytes_vs_dense"] = r["base_nbytes"] / dense_bytes
            r["decode_vs_dense"] = r["decode_ms"] / results["dense"]["decode_ms"] if args.decode else None
            rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = [header]
    for r in rows:
        line = [r["format"], f"{r['out_features']} x {r['in_features']}", str(r["tokens"]), r["dtype"],
                f"{r['fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_vs_dense_lora']:.2f}x", f"{r['base_nbytes']:,}",
                f"{r['base_nbytes_vs_dense']:.3f}x"]
        if args.decode:
            line += [f"{r['decode_ms']:.3f}", f"{r['decode_vs_dense']:.2f}x"]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):  # text columns left-aligned, numbers right-aligned
        cells = zip(row, widths, strict=True)
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(cells)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    print(f"\ntotal {time.perf_counter() - t_start:.1f} s (after imports)")
    if args.json:
        meta = dict(machine=host, torch=torch.__version__, bitsandbytes=bitsandbytes.__version__,
                    triton=triton_version(),
                    device=str(device), dtype=dtype_name, rank=args.rank, warmup=args.warmup,
                    repeats=args.repeats, decode_repeats=3 * args.repeats if args.decode else None)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
