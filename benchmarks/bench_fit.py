"""`qlora-kit memory --fit` against the real boundary: the largest sequence length that fits, found by running.

Run from the repository root:

    python benchmarks/bench_fit.py --device cuda --model examples/configs/llama-3.2-1b.json --budget 12GiB
    .venv/bin/python benchmarks/bench_fit.py --device cpu --budget 1GiB     # the allocator's view, see below

The prediction is `qlora_kit.memory.fit` (the estimate, from config.json alone) for the budget. The boundary
is found by running real training steps (`qlora_kit.memory.measure`: random weights, one warm-up and one
measured optimizer step), each sequence length in its own fresh process, bisecting over multiples of 64:

  * CUDA: the budget is a GPU of that size. The CUDA context takes what it takes (measured in each probe
    as total minus free memory right after CUDA starts), and torch's allocator may use the rest
    (torch.cuda.set_per_process_memory_fraction), so a run that does not fit ends in
    torch.OutOfMemoryError, fragmentation and workspaces included: the real boundary. The prediction is
    `qlora-kit memory --fit BUDGET` as a user would run it (1 GiB reserved for context and fragmentation).
  * CPU: nothing stops a process at a budget, so "fits" is the allocator's measured peak (torch's CPU
    allocator, qlora_kit.memory.observed) being at most the budget, with no reserve.

Printed: the predicted and the real largest sequence length, each probe's outcome and peak, and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
from _common import machine, mib, run_worker, serve_worker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a config.json or model folder (weights are random)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", default="12GiB", help="memory for the run, e.g. 12GiB")
    p.add_argument("--reserve", default=None, help="--fit's reserve (default: 1GiB on CUDA, 0 on CPU)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(job: dict) -> dict:
    """One probe: does a training step at this sequence length fit?"""
    from qlora_kit import memory
    from qlora_kit.config import TrainConfig

    cfg = TrainConfig(**job["cfg"])
    context = None
    if job["device"].startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        context = total - free
        torch.cuda.set_per_process_memory_fraction(max(job["budget"] - context, 0) / total)
    try:
        rep = memory.measure(cfg, job["device"])
    except (torch.OutOfMemoryError, ValueError) as e:  # measure wraps RuntimeErrors in a ValueError
        if isinstance(e, ValueError) and "out of memory" not in str(e).lower():
            raise
        return {"side": job["side"], "fits": False, "peak": None, "reserved": None, "context": context,
                "error": str(e).splitlines()[0][:200]}
    fits = job["device"].startswith("cuda") or rep.total <= job["budget"]
    return {"side": job["side"], "fits": fits, "peak": rep.total, "reserved": rep.reserved_peak, "context": context}


def main() -> None:
    args = parse_args()
    if args.worker:
        serve_worker(args.worker, worker)
        return

    from qlora_kit import memory
    from qlora_kit.config import TrainConfig
    from qlora_kit.defaults import model_folder as resolve

    budget = memory.parse_size(args.budget)
    model = str(resolve(args.model)) if args.model == "smollm2-135m" else args.model
    cfg = TrainConfig(model=model, batch_size=args.batch_size, rank=args.rank, quant=args.quant,
                      gradient_checkpointing=args.gradient_checkpointing)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    reserve = memory.parse_size(args.reserve) if args.reserve else None
    host = machine(torch.device(args.device))
    print(f"machine: {host}")
    pred = memory.fit(cfg, budget, device, reserve=reserve)
    print(f"predicted (--fit {args.budget}, {mib(pred.reserve)} MiB of it reserved): "
          f"seq {pred.best}, estimated peak {mib(pred.report.total) if pred.report else '-'} MiB")
    limit = pred.limit
    probes = {}
    with tempfile.TemporaryDirectory(prefix="bench_fit-") as tmp:
        def fits(seq: int) -> bool:
            if seq not in probes:
                job = {"side": f"seq-{seq}", "cfg": {**dataclasses.asdict(cfg), "seq_len": seq}, "device": args.device,
                       "budget": budget}
                probes[seq] = run_worker(__file__, job, Path(tmp))
                r = probes[seq]
                print(f"  seq {seq}: {'fits' if r['fits'] else 'does not fit'}"
                      + (f", allocator peak {mib(r['peak'])} MiB" if r["peak"] else f" ({r.get('error', '')})")
                      + (f", reserved {mib(r['reserved'])} MiB" if r.get("reserved") else "")
                      + (f", CUDA context {mib(r['context'])} MiB" if r.get("context") else ""), flush=True)
            return probes[seq]["fits"]

        # bracket around the prediction, then bisect over multiples of 64
        start = max(64, (pred.best or 64) // 64 * 64)
        lo, hi = (start, None) if fits(start) else (None, start)
        step = 64
        while lo is None:  # shrink until something fits
            cand = max(64, hi - step)
            if cand == hi:
                break
            lo, hi = (cand, hi) if fits(cand) else (None, cand)
            step *= 2
        while hi is None:  # grow until something does not
            cand = min(limit, lo + step)
            if cand == lo:
                break
            lo, hi = (cand, None) if fits(cand) else (lo, cand)
            step *= 2
        while lo is not None and hi is not None and hi - lo > 64:
            mid = (lo + hi) // 2 // 64 * 64
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    real = lo
    print(f"\nreal largest seq (multiples of 64): {real}; predicted: {pred.best}"
          + (f" ({pred.best / real:.2f}x the real one)" if real and pred.best else ""))
    if args.json:
        from qlora_kit.io import atomic_write_bytes

        out = {"machine": host, "args": {k: v for k, v in vars(args).items() if k != "worker"},
               "budget": budget, "predicted": pred.best, "predicted_peak": pred.report.total if pred.report else None,
               "real": real, "probes": probes}
        atomic_write_bytes(Path(args.json), json.dumps(out, indent=2).encode())
    if real is None:
        sys.exit("nothing fits in the budget, even at seq 64")


if __name__ == "__main__":
    main()
