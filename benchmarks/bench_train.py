"""Time QLoRA training steps of qlora-kit against PEFT + bitsandbytes + transformers on the same model and data.

Run from the repository root:

    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_train.py --rounds 2 --json bench_train.json
    python benchmarks/bench_train.py --device cuda --model /path/to/hf-folder --seq-len 1024 --batch-size 8

Both sides train the same thing: the same model folder (default: the embedded SmolLM2-135M, converted once
from its GGUF file with qlora_kit.gguf.gguf_to_hf_dir), the same micro-batches (default data: the embedded
Shakespeare, tokenized once in the parent with the model's tokenizer by qlora_kit.data.load_dataset and
cut with qlora_kit.data.micro_batch), LoRA on every linear layer but the output head ("all-linear"), the
same rank, alpha, no dropout, AdamW with the same lr, the same base format (nf4 / fp4 with double
quantization, block 64, or int8) and compute dtype (default fp32 on CPU, bf16 on CUDA, where both sides
also run under the same bf16 autocast):

  qlora-kit  qlora_kit.load_quantized(folder, quant, compute_dtype, device) + qlora_kit.add_lora(...)
  peft       AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
             load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype=dtype), device_map=device, dtype=dtype) (load_in_8bit for --quant int8,
             with llm_int8_threshold=0 to match qlora-kit's default of no outlier split) +
             peft.get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout=0.0,
             target_modules="all-linear", task_type="CAUSAL_LM"))

The loss is what each stack trains with: qlora-kit's qlora_kit.loss.causal_lm_loss (head and cross-entropy
fused in chunks), PEFT's model(**batch).loss (transformers' logits + cross-entropy); the numbers are the same.

peft.prepare_model_for_kbit_training is NOT called by default: it upcasts every non-quantized weight
(embeddings, norms, the output head) to fp32, which on a GPU makes the PEFT side do different (slower,
bigger) arithmetic than qlora-kit; pass --prepare-kbit to call it anyway. On the CPU the qlora-kit side
hands freed memory back to the system at every decoder layer, as `qlora-kit train` does (--release-memory,
qlora_kit.allocator); --no-release-memory turns that off. Both sides get
model.enable_input_require_grads() (qlora-kit's add_lora always calls it), and with
--gradient-checkpointing both use transformers' non-reentrant checkpointing.

Fairness: each side runs in its own fresh subprocess (this script with --side ... --worker), the sides
alternating (qlora-kit, peft, qlora-kit, peft for --rounds 2). A worker loads its model, does --warmup
untimed steps, then --steps timed steps (zero_grad, forward, backward, AdamW step), and reports the
median step time, tokens/s, the peak memory, and the loss of its first and last step. The first-step
loss is taken before any update, with LoRA B = 0, so it is the quantized base model's loss: the two
sides quantize the same weights with the same bitsandbytes functions and should agree to ~1e-3 relative.

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the peak RSS of the whole worker process
(resource.getrusage ru_maxrss: interpreter, libraries, loading and training). "train peak" is the same
measured from the end of loading on (CUDA: reset_peak_memory_stats; CPU: Linux /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, model_folder

from qlora_kit.config import parse_dtype

SIDES = ("qlora-kit", "peft")
DEFAULTS = {  # per device type: a default run takes ~4 minutes on 2 CPU cores
    "cpu": dict(dtype="fp32", warmup=2, steps=6, rounds=1),
    "cuda": dict(dtype="bf16", warmup=5, steps=20, rounds=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def default(key: str) -> str:
        return f"default {DEFAULTS['cuda'][key]} on cuda, {DEFAULTS['cpu'][key]} on cpu"

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="a Hugging Face model folder or .gguf file; default the embedded SmolLM2-135M")
    p.add_argument("--data", default="shakespeare",
                   help="a .txt / .jsonl file, 'random' (uniform random tokens, full sequences), or the embedded "
                        "Shakespeare (default; 'random' is used anyway for a model without a tokenizer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help=f"compute dtype bf16 / fp16 / fp32 ({default('dtype')})")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"], help="base format (default nf4)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (no weight decay)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, on both sides")
    p.add_argument("--no-release-memory", action="store_true",
                   help="qlora-kit side: keep freed memory in malloc's heaps (train --no-release-memory)")
    p.add_argument("--prepare-kbit", action="store_true",
                   help="also call peft.prepare_model_for_kbit_training on the PEFT side (upcasts to fp32)")
    p.add_argument("--warmup", type=int, help=f"untimed steps per worker ({default('warmup')})")
    p.add_argument("--steps", type=int, help=f"timed steps per worker; the median is reported ({default('steps')})")
    p.add_argument("--rounds", type=int, help=f"workers per side, alternating the sides ({default('rounds')})")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides to run (default both)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--seed", type=int, default=0)
    # internal: how the parent starts a worker
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    args.dtype = short[parse_dtype(args.dtype)]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for s in args.sides:
        if s not in SIDES:
            p.error(f"--sides: unknown side {s!r}; use {', '.join(SIDES)}")
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup must be >= 0, --steps and --rounds >= 1")
    return args


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    import qlora_kit

    return {"qlora_kit": qlora_kit.__version__, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


# ---- worker: one side, one fresh process -----------------------------------------------------------

def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak(device: torch.device) -> bool:
    """Restart the peak-memory count from now; False where this platform cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    from qlora_kit.memory.observed import reset_rss_peak

    return reset_rss_peak()


def load_side(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """The model with its trainable LoRA factors, and the parameters to optimize."""
    torch.manual_seed(args.seed)
    gc_kwargs = {"use_reentrant": False}
    if args.side == "qlora-kit":
        import qlora_kit

        model = qlora_kit.load_quantized(args.folder, quant=args.quant, compute_dtype=dtype, device=device)
        qlora_kit.add_lora(model, r=args.rank, alpha=args.alpha, dropout=0.0, targets="all-linear")
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.config.use_cache = False
        if not args.no_release_memory:
            qlora_kit.allocator.release_between_layers(model)  # as train() does (on the CPU)
        params = [p for layer in qlora_kit.lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
        return model, params

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if args.quant == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    else:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.folder, quantization_config=qcfg, device_map=str(device),
                                                 dtype=dtype, local_files_only=True)
    if args.prepare_kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if args.gradient_checkpointing:
        model.config.use_cache = False
    model.enable_input_require_grads()  # as qlora-kit's add_lora does
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from qlora_kit.loss import causal_lm_loss

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    stacked = load_file(args.batches)
    n = stacked["input_ids"].shape[0]
    batches = [{k: v[i].to(device) for k, v in stacked.items()} for i in range(n)]

    t0 = time.perf_counter()
    model, params = load_side(args, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    load_peak = peak_bytes(device)
    train_peak_ok = reset_peak(device)

    model.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    autocast = device.type == "cuda" and dtype != torch.float32
    losses, times, tokens = [], [], []
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = causal_lm_loss(model, batch) if args.side == "qlora-kit" else model(**batch).loss
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(dt)
            tokens.append(int(batch["attention_mask"].sum()))
    step_s = statistics.median(times)
    train_peak = peak_bytes(device)
    result = dict(side=args.side, load_s=load_s, step_s=step_s, step_s_all=times,
                  tokens_per_step=statistics.median(tokens), tokens_per_s=statistics.median(tokens) / step_s,
                  peak_bytes=max(load_peak, train_peak), train_peak_bytes=train_peak if train_peak_ok else None,
                  first_loss=losses[0], final_loss=losses[-1], losses=losses,
                  trainable=sum(p.numel() for p in params))
    Path(args.result).write_text(json.dumps(result))


# ---- parent: data once, workers alternating, the table ---------------------------------------------

def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, str]:
    """Resolve the model folder and write the micro-batches every worker will consume."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qlora_kit.data import load_dataset, micro_batch
    from qlora_kit.defaults import resolve_data

    folder, source = model_folder(args.model, parse_dtype(args.dtype), tmp)
    n = args.warmup + args.steps
    if args.data == "random" or source == "random weights":
        from qlora_kit.memory import read_model_config

        vocab = read_model_config(str(folder)).vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (n, args.batch_size, args.seq_len), generator=gen)
        stacked = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        data = f"random tokens ({source} model)"
    else:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        train, _ = load_dataset(resolve_data(args.data), tok, args.seq_len, seed=args.seed)
        batches = [micro_batch(train, i, args.batch_size, args.seed) for i in range(n)]
        stacked = {k: torch.stack([b[k] for b in batches]).contiguous() for k in batches[0]}
        data = f"{args.data} ({len(train):,} training sequences)"
    path = tmp / "batches.safetensors"
    save_file(stacked, str(path))
    return folder, path, data


def run_worker(args: argparse.Namespace, side: str, folder: Path, batches: Path, result: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--side", side, "--folder", str(folder),
           "--batches", str(batches), "--result", str(result), "--device", args.device, "--dtype", args.dtype,
           "--quant", args.quant, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--lr", str(args.lr),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--rounds", "1", "--seed", str(args.seed)]
    cmd += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--prepare-kbit"] * args.prepare_kbit
    cmd += ["--no-release-memory"] * args.no_release_memory
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.is_file():
        sys.exit(f"the {side} worker failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(result.read_text())


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    device = torch.device(args.device)
    host, vers, t_start = machine(device), versions(), time.perf_counter()
    print(f"machine: {host}")
    print(", ".join(f"{k} {v}" for k, v in vers.items()))

    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        folder, batches, data = prepare(args, Path(tmp))
        print(f"model {args.model} ({folder}), data {data}")
        print(f"device {device}, compute dtype {args.dtype}, base {args.quant}"
              + (" (double quant, block 64)" if args.quant != "int8" else " (threshold 0)")
              + f", LoRA all-linear r={args.rank} alpha={args.alpha:g} dropout 0, AdamW lr {args.lr:g}, "
              f"batch {args.batch_size} x {args.seq_len} tokens, gradient checkpointing "
              f"{'on' if args.gradient_checkpointing else 'off'}"
              + (", PEFT side with prepare_model_for_kbit_training" if args.prepare_kbit else ""))
        print(f"each worker: {args.warmup} warm-up + {args.steps} timed steps (median); "
              f"{args.rounds} round(s), sides alternating in fresh processes")
        print()
        results = []
        for rnd in range(args.rounds):
            for side in args.sides:
                r = run_worker(args, side, folder, batches, Path(tmp) / f"{side}-{rnd}.json")
                r["round"] = rnd + 1
                results.append(r)
                print(f"  round {rnd + 1} {side}: {r['step_s']:.3f} s/step, loss {r['first_loss']:.4f} -> "
                      f"{r['final_loss']:.4f}", flush=True)
    print()

    mem_name = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    header = ["side", "round", "load s", "step s", "tokens/s", mem_name, "train peak MiB", "trainable",
              "loss step 1", "loss last"]
    rows = [[r["side"], str(r["round"]), f"{r['load_s']:.1f}", f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
             mib(r["peak_bytes"]), mib(r["train_peak_bytes"]), f"{r['trainable']:,}", f"{r['first_loss']:.5f}",
             f"{r['final_loss']:.5f}"] for r in results]
    print_table(header, rows)
    if device.type == "cpu":
        print(f"({mem_name}: whole worker process, from ru_maxrss; train peak: from the end of loading on)")

    summary = {}
    for side in args.sides:
        mine = [r for r in results if r["side"] == side]
        summary[side] = dict(tokens_per_s=statistics.median(r["tokens_per_s"] for r in mine),
                             peak_bytes=statistics.median(r["peak_bytes"] for r in mine),
                             train_peak_bytes=(statistics.median(r["train_peak_bytes"] for r in mine)
                                               if all(r["train_peak_bytes"] for r in mine) else None),
                             first_loss=mine[0]["first_loss"])
    ratios = {}
    if set(SIDES) <= set(summary):
        q, p = summary["qlora-kit"], summary["peft"]
        ratios = dict(tokens_per_s=q["tokens_per_s"] / p["tokens_per_s"], peak_bytes=q["peak_bytes"] / p["peak_bytes"],
                      train_peak_bytes=(q["train_peak_bytes"] / p["train_peak_bytes"]
                                        if q["train_peak_bytes"] and p["train_peak_bytes"] else None),
                      first_loss_rel_diff=abs(q["first_loss"] - p["first_loss"]) / abs(p["first_loss"]))
        print()
        print(f"qlora-kit tokens/s / PEFT tokens/s:        {ratios['tokens_per_s']:.2f}x  (above 1: qlora-kit faster)")
        print(f"qlora-kit peak memory / PEFT peak memory:  {ratios['peak_bytes']:.2f}x  (below 1: qlora-kit smaller)")
        if ratios["train_peak_bytes"] is not None:
            print(f"  same, training phase only:               {ratios['train_peak_bytes']:.2f}x")
        print(f"loss at step 1 (before any update), relative difference: {ratios['first_loss_rel_diff']:.1e}")

    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    if args.json:
        meta = dict(machine=host, versions=vers, model=args.model, folder=str(folder), data=args.data,
                    device=str(device), dtype=args.dtype, quant=args.quant, seq_len=args.seq_len,
                    batch_size=args.batch_size, rank=args.rank, alpha=args.alpha, lr=args.lr,
                    gradient_checkpointing=args.gradient_checkpointing, prepare_kbit=args.prepare_kbit,
                    warmup=args.warmup, steps=args.steps, rounds=args.rounds, seed=args.seed)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results, summary=summary, ratios=ratios), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
