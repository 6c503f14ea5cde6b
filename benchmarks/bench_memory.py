"""Peak training memory of qlora-kit against PEFT + bitsandbytes + transformers, next to qlora-kit's estimate.

Run from the repository root:

    .venv/bin/python benchmarks/bench_memory.py                                   # quickstart model, CPU
    .venv/bin/python benchmarks/bench_memory.py --sweep seq-len=128,512 --json bench_memory.json
    python benchmarks/bench_memory.py --device cuda --model examples/configs/llama-3.2-1b.json \\
        --sweep seq-len=1024,2048,4096 --sweep gradient-checkpointing=false,true

Both sides train the same thing at every sweep point: the same model folder (default: the embedded
SmolLM2-135M; a config.json gets random weights written once, values do not change memory), LoRA on every
linear layer but the output head, the same rank, alpha and dropout, the same optimizer (qlora_kit.formats.
make_optimizer: torch AdamW or bitsandbytes' 8-bit AdamW), the same base format (nf4/fp4 with double
quantization, block 64; or int8) and compute dtype, random token batches of the same shape, the same
transformers checkpointing, bf16 autocast on CUDA. Each side trains as it would on its own:

  qlora-kit  qlora_kit.load_quantized + qlora_kit.add_lora; loss: qlora_kit.loss.causal_lm_loss (head and
             cross-entropy fused in chunks, as train() does)
  peft       AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(...)) +
             peft.get_peft_model(LoraConfig(target_modules="all-linear", ...)); loss: model(**batch).loss

Each side runs in its own fresh process (qlora-kit first, then PEFT, at each point), takes one warm-up
optimizer step (it creates the optimizer state) and --steps measured ones. Memory is measured the same way
on both sides, three ways (qlora_kit.memory.observed for the first and last, which share no code with
the count in the middle):

  * allocator peak, the figure compared (ground truth): on CUDA torch.cuda.max_memory_allocated (and
    max_memory_reserved); on CPU the peak of bytes torch's CPU allocator had handed out, from the profiler's
    memory events (recording starts before the model is loaded, so weights are in it; it also sees buffers
    allocated inside operators);
  * live tensors: the peak of qlora_kit.memory.LiveTensors (every tensor an operator returns, until its
    storage is freed), split into weights / LoRA / optimizer / activations / logits & loss / backward
    temporaries the same way for both sides; allocator minus live = buffers inside operators;
  * process peak RSS over the measured steps (VmHWM reset after the warm-up step), and the RSS before the
    model was loaded (interpreter and libraries).

--malloc sets glibc's allocator for both sides: "default" (as installed) and "pinned"
(MALLOC_MMAP_THRESHOLD_=65536: every block of 64 KiB or more is its own mapping, so freed memory goes
straight back to the system). The qlora-kit side trains as `qlora-kit train` does, which on the CPU hands
freed memory back at every decoder layer (--release-memory, qlora_kit.allocator); pass --no-release-memory
to measure it without.

The estimate column is `qlora-kit memory` for the same settings (from config.json alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch
from _common import machine, mib, model_folder, run_worker, serve_worker

SIDES = ("qlora-kit", "peft")
MALLOC = {"default": {}, "pinned": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="a model folder, a config.json (random weights), or the embedded 'smollm2-135m' (default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="compute dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "paged_adamw8bit"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="as `qlora-kit memory --sweep` (default: seq-len=128,512 and gradient-checkpointing=false,true)")
    p.add_argument("--malloc", default="default,pinned",
                   help="glibc allocator settings to measure, comma-separated: default, pinned (default: both)")
    p.add_argument("--no-release-memory", action="store_true",
                   help="qlora-kit side: keep freed memory in malloc's heaps (train --no-release-memory)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps measured per worker, after one warm-up step")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON job for one side
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if not args.sweep:
        args.sweep = ["seq-len=128,512", "gradient-checkpointing=false,true"]
    args.malloc = [m.strip() for m in args.malloc.split(",") if m.strip()]
    if not args.malloc or set(args.malloc) - set(MALLOC):
        p.error(f"--malloc {','.join(args.malloc)!r}: choose from {', '.join(MALLOC)}")
    return args


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    import qlora_kit

    return {"qlora_kit": qlora_kit.__version__, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}


# ---- worker: one side, one point, one fresh process --------------------------------------------------

def _peft_quant_states(model, tracker) -> None:
    """File what bitsandbytes keeps outside parameters and buffers as quantized weights: the quant states of
    its packed weights and int8 row scales (run_steps files parameters and buffers itself)."""
    import bitsandbytes as bnb

    for t in model.parameters():
        state = getattr(t, "quant_state", None) if isinstance(t, bnb.nn.Params4bit) else None
        if state is not None:
            for x in [state.absmax, state.code, state.offset] + (
                    [state.state2.absmax, state.state2.code] if state.nested else []):
                if isinstance(x, torch.Tensor):
                    tracker.add(x, "quantized weights")
    for module in model.modules():  # int8 row scales live on the module
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            tracker.add(scb, "quantized weights")


def worker(job: dict) -> dict:
    from qlora_kit import memory
    from qlora_kit.config import TrainConfig, parse_dtype
    from qlora_kit.memory.observed import ObservedPeak
    from qlora_kit.patch import enable_checkpointing

    cfg = TrainConfig(**job["cfg"])
    device, dtype = job["device"], parse_dtype(job["dtype"])
    torch.manual_seed(job["seed"])
    observed = ObservedPeak(device).start()
    if job["side"] == "qlora-kit":
        import qlora_kit

        model = qlora_kit.load_quantized(job["folder"], quant=cfg.quant, compute_dtype=dtype, device=device,
                                         double_quant=cfg.double_quant, blocksize=cfg.blocksize)
        qlora_kit.add_lora(model, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets="all-linear")
        kw = {}
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if cfg.quant == "int8":
            qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        else:
            if cfg.blocksize != 64:
                raise SystemExit("the PEFT side quantizes with bitsandbytes' fixed block size of 64")
            qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant,
                                      bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(job["folder"], quantization_config=qcfg, device_map=device,
                                                     dtype=dtype, local_files_only=True)
        model.enable_input_require_grads()  # as qlora-kit's add_lora does
        model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        cfg = dataclasses.replace(cfg, release_memory=False)  # PEFT's stack has no such thing
        if cfg.gradient_checkpointing:
            enable_checkpointing(model.get_base_model())
            cfg = dataclasses.replace(cfg, gradient_checkpointing=False)  # done here, on the wrapped model
        kw = dict(loss_fn=lambda m, batch: m(**batch).loss)  # transformers' own loss
    tracker = memory.LiveTensors()
    if job["side"] != "qlora-kit":
        _peft_quant_states(model, tracker)
    memory.run_steps(model, cfg, tracker, device, steps=job["steps"], warmup=True, on_warm=observed.reset_peak, **kw)
    observed.stop()
    return {"side": job["side"], "live_peak": tracker.peak, "components": tracker.at_peak,
            "allocator_peak": observed.allocated_peak, "reserved_peak": observed.reserved_peak,
            "rss_start": observed.rss_start, "rss_peak": observed.rss_peak,
            "rss_max": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "total": observed.allocated_peak if observed.allocated_peak is not None else tracker.peak}


# ---- parent ------------------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    if args.worker:
        serve_worker(args.worker, worker)
        return

    from qlora_kit import memory
    from qlora_kit.config import TrainConfig, parse_dtype

    device = torch.device(args.device)
    host, vers = machine(device), versions()
    print(f"machine: {host}")
    print(", ".join(f"{k} {v}" for k, v in vers.items()))
    base = TrainConfig(model=args.model, quant=args.quant, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                       seq_len=args.seq_len, batch_size=args.batch_size, optimizer=args.optimizer,
                       gradient_checkpointing=args.gradient_checkpointing, compute_dtype=args.dtype,
                       release_memory=not args.no_release_memory)
    axes = memory.parse_sweep(args.sweep)
    if "none" in axes.get("quant", []):
        sys.exit("--sweep quant: 'none' has no PEFT + bitsandbytes counterpart; use nf4, fp4 or int8")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        folder, source = model_folder(args.model, parse_dtype(args.dtype), Path(tmp))
        print(f"model {args.model} ({source}: {folder}); {args.quant}, {args.dtype} compute on {device}, LoRA "
              f"all-linear r={args.rank} dropout {args.dropout}, {args.optimizer}, {args.steps} steps per worker; "
              f"qlora-kit release-memory {'off' if args.no_release_memory else 'on'}")
        print()
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values, strict=True))
            cfg = dataclasses.replace(base, **point)
            est = memory.estimate(dataclasses.replace(cfg, model=str(folder)), args.device, compare=False)
            for malloc in args.malloc if device.type == "cpu" else ["default"]:
                row = {"point": point, "malloc": malloc, "estimate": est.total, "estimate_components": est.components}
                for side in SIDES:
                    job = {"side": side, "cfg": dataclasses.asdict(cfg), "folder": str(folder),
                           "device": args.device, "dtype": args.dtype, "steps": args.steps, "seed": args.seed}
                    row[side] = run_worker(__file__, job, Path(tmp), env=MALLOC[malloc])
                row["ratio"] = row["qlora-kit"]["total"] / row["peft"]["total"]
                row["rss_ratio"] = row["qlora-kit"]["rss_peak"] / row["peft"]["rss_peak"] \
                    if row["peft"]["rss_peak"] and row["qlora-kit"]["rss_peak"] else None
                results.append(row)
                label = ", ".join(f"{k}={v}" for k, v in point.items()) + f", malloc {malloc}"
                q, pe = row["qlora-kit"], row["peft"]
                print(f"{label}: allocator peak qlora-kit {mib(q['total'])} MiB, PEFT {mib(pe['total'])} MiB "
                      f"({row['ratio']:.2f}x); process peak RSS {mib(q['rss_peak'])} vs {mib(pe['rss_peak'])} MiB"
                      + (f" ({row['rss_ratio']:.2f}x)" if row["rss_ratio"] else "")
                      + f"; estimate {mib(est.total)} MiB ({100 * (est.total / q['total'] - 1):+.1f}% of qlora-kit's "
                      "allocator peak)", flush=True)

    what = "peak allocated (torch.cuda.max_memory_allocated)" if device.type == "cuda" else \
        "allocator peak (torch's CPU allocator, profiler memory events)"
    print(f"\nMiB. total: {what}; live: peak of live tensors (LiveTensors), split into the categories at its peak; "
          "RSS: process peak RSS over the measured steps [RSS before loading]")
    cats = [c for c in memory.CATEGORIES if any(r[s]["components"].get(c) for r in results for s in SIDES)]
    header = ["point", "malloc", "side", "total", "live", "RSS", *cats]
    lines = [header]
    for r in results:
        label = ",".join(f"{k}={v}" for k, v in r["point"].items())
        for side in SIDES:
            s = r[side]
            lines.append([label, r["malloc"], side, mib(s["total"]), mib(s["live_peak"]),
                          f"{mib(s['rss_peak'])} [{mib(s['rss_start'])}]",
                          *(mib(s["components"].get(c, 0)) for c in cats)])
        lines.append([label, "", "estimate", mib(r["estimate"]), "", "",
                      *(mib(r["estimate_components"].get(c, 0)) for c in cats)])
    widths = [max(len(str(x[i])) for x in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(str(c).ljust(w) if j < 3 else str(c).rjust(w) for j, (c, w) in enumerate(zip(line, widths,
                                                                                                       strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    ratios = [r["ratio"] for r in results]
    print(f"\nqlora-kit / PEFT allocator peak: {min(ratios):.2f}x .. {max(ratios):.2f}x (below 1: qlora-kit smaller)")
    rss = [r["rss_ratio"] for r in results if r["rss_ratio"]]
    if rss:
        print(f"qlora-kit / PEFT process peak RSS: {min(rss):.2f}x .. {max(rss):.2f}x (qlora-kit "
              f"{'keeping freed memory' if args.no_release_memory else 'handing freed memory back between layers'},"
              " as train does; PEFT as it is)")
    if args.json:
        meta = dict(machine=host, versions=vers, args={k: v for k, v in vars(args).items() if k != "worker"})
        from qlora_kit.io import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(dict(meta=meta, results=results), indent=2).encode())
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
