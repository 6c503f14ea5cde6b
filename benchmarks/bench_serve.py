"""Many adapters on one base: tokens/s of a batch of concurrent requests spread over 1, 4 and 16 adapters, beside
the base alone and PEFT's `adapter_names` on the same batches, measured side by side in one run; and what each
resident adapter costs in process memory (RSS) against its own bytes.

Every side generates the same B prompts (different lengths, cut from the embedded text) to exactly N new tokens
each, greedily; tokens/s = B * N / wall time of the whole batch, prefill included, the median of rounds that run
every batch of both sides once each, interleaved. qlora-kit runs its serving
engine (`qlora_kit.engine.Engine`, the one `qlora-kit serve` drives); PEFT runs transformers' generate with
`adapter_names=` on a PeftModel holding the same adapters (on CPU over bitsandbytes' nf4 base for --quant nf4,
over the same dense base for --quant none).

    .venv/bin/python benchmarks/bench_serve.py                          # SmolLM2-135M nf4, B=16, N=32, r=16
    .venv/bin/python benchmarks/bench_serve.py --quant none             # both on the dense fp32 base
    .venv/bin/python benchmarks/bench_serve.py --device cuda --batch 64 # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine, model_folder  # noqa: E402
from qlora_kit.memory.observed import rss_now  # noqa: E402


def make_adapters(folder: Path, out: Path, n: int, rank: int, dtype: torch.dtype) -> list[Path]:
    """n random all-linear LoRA adapters (A as initialised, B ~ N(0, 0.02)), each its own PEFT folder."""
    import qlora_kit as qk

    model = qk.load_quantized(folder, quant="none", compute_dtype=dtype)
    qk.add_lora(model, r=rank, alpha=2 * rank, dropout=0.0)
    paths = []
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        with torch.no_grad():
            for layer in qk.lora_layers(model).values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.in_features ** 0.5)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        paths.append(qk.save_adapter(model, out / f"adapter{i}"))
    return paths


def prompts(tok, batch: int, length: int) -> list[list[int]]:
    """batch prompts of length/2 .. 3*length/2 tokens, from different places in the embedded text."""
    from qlora_kit import defaults

    ids = tok(Path(defaults.resolve_data("shakespeare")).read_text()[:200_000]).input_ids
    sizes = [max(1, length // 2 + (length * i) // max(batch - 1, 1)) for i in range(batch)]
    return [ids[1000 * i: 1000 * i + n] for i, n in enumerate(sizes)]


def mixes(batch: int, names: list[str]) -> dict[str, list[str | None]]:
    return {"base alone": [None] * batch, "1 adapter": [names[0]] * batch,
            "4 adapters": [names[i % 4] for i in range(batch)], "16 adapters": [names[i % 16] for i in range(batch)]}


def ours(folder, tok, paths, batches, args, device, dtype) -> tuple[dict, dict, callable]:
    """qlora-kit's runners, {label: run(n_tokens)}, what its adapters cost in memory, and the server's stop."""
    import qlora_kit as qk
    from qlora_kit import allocator
    from qlora_kit.engine import Engine, SamplingParams

    base = qk.load_quantized(folder, quant=args.quant, compute_dtype=dtype, device=device)
    gc.collect()
    engine = Engine(base, tok, max_batch=args.batch, adapter_dtype=dtype)
    allocator.trim()  # what loading the base freed is not counted as the adapters' saving
    before = rss_now()
    for i, p in enumerate(paths):
        engine.load_adapter(f"adapter{i}", p)
    gc.collect()
    memory = {"rss_growth": rss_now() - before, "bank_bytes": sum(
        t.numel() * t.element_size() for layer in engine.bank.layers.values() for ab in layer.factors.values()
        for t in ab),
              "adapter_bytes": sum(a.nbytes for a in engine.adapters()),
              "file_bytes": sum((p / "adapter_model.safetensors").stat().st_size for p in paths)}
    ps = prompts(tok, args.batch, args.prompt_tokens)
    runs = {label: (lambda n, rows=rows: engine.generate(ps, rows, SamplingParams(max_tokens=n, ignore_eos=True)))
            for label, rows in batches.items()}
    runs["16 adapters, over HTTP"], stop = over_http(engine, ps, batches["16 adapters"])
    return runs, memory, stop


def over_http(engine, ps, rows):
    """The same mixed batch as B concurrent clients of a live server on 127.0.0.1: they arrive one by one and
    join the running batch (continuous batching), each answered through /v1/completions."""
    import socket
    import threading

    import httpx
    import uvicorn

    from qlora_kit.server import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "base"), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def batch(n):
        def ask(p, r):
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600, json={
                "model": r or "base", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True})
            reply.raise_for_status()
        clients = [threading.Thread(target=ask, args=(p, r)) for p, r in zip(ps, rows, strict=True)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()

    def stop():
        server.should_exit = True
        thread.join()

    return batch, stop


def peft_side(folder, tok, paths, batches, args, device, dtype) -> dict:
    """PEFT's runners, {label: run(n_tokens)}: transformers' generate with adapter_names on a PeftModel."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if args.quant != "none":
        kwargs = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=args.quant in ("nf4", "fp4"), load_in_8bit=args.quant == "int8",
            bnb_4bit_quant_type=args.quant if args.quant != "int8" else "nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype), device_map=str(device))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if not kwargs:
        model.to(device)
    pm = peft.PeftModel.from_pretrained(model, paths[0], adapter_name="adapter0")
    for i, p in enumerate(paths[1:], start=1):
        pm.load_adapter(p, adapter_name=f"adapter{i}")
    pm.eval()
    ps = prompts(tok, args.batch, args.prompt_tokens)
    width = max(len(p) for p in ps)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps], device=device)  # left padding, as generate wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)

    def run(n, names):
        with torch.no_grad():
            pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=pad)

    return {label: (lambda n, names=[r or "__base__" for r in rows]: run(n, names)) for label, rows in batches.items()}


def measure(sides: dict[str, dict], repeats: int, n: int) -> dict[str, dict[str, float]]:
    """Median wall time of every (side, label) run: each warmed up with a 2-token run, then `repeats` rounds that
    each run everything once, one after the other, so that a machine getting slower or faster over the minutes
    touches every figure alike."""
    for runs in sides.values():
        for run in runs.values():
            run(2)
    times = {side: {label: [] for label in runs} for side, runs in sides.items()}
    for round_ in range(repeats):
        for label in dict.fromkeys(label for runs in sides.values() for label in runs):
            for side, runs in sides.items():
                if label in runs:
                    gc.collect()
                    t = time.perf_counter()
                    runs[label](n)
                    times[side][label].append(time.perf_counter() - t)
        print(f"  round {round_ + 1} of {repeats} done", flush=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    p.add_argument("--batch", type=int, default=16, help="concurrent requests")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32, help="mean prompt length (they range over 0.5x..1.5x)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every batch of both sides once")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--json", default=None, help="also write every round's times here")
    args = p.parse_args()
    from qlora_kit.cli import quiet_third_parties
    from qlora_kit.loading import load_tokenizer, resolve_device

    quiet_third_parties()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes inside generate
    logging.getLogger("qlora_kit.serve").setLevel(logging.WARNING)  # the engine's line per request
    device = torch.device(resolve_device(args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    folder, source = model_folder(args.model, dtype, tmp)
    tok = load_tokenizer(folder)
    print(f"{args.model} ({source}), {args.quant} base, {dtype}, B={args.batch} requests x {args.new_tokens} new "
          f"tokens, r={args.rank} all-linear adapters; {machine(device)}", flush=True)
    paths = make_adapters(folder, tmp, 16, args.rank, torch.float32)
    batches = mixes(args.batch, [f"adapter{i}" for i in range(16)])
    mine, memory, stop = ours(folder, tok, paths, batches, args, device, dtype)
    sides = {"qlora-kit": mine}
    if not args.no_peft:
        sides["PEFT"] = peft_side(folder, tok, paths, batches, args, device, dtype)
    try:
        times = measure(sides, args.repeats, args.new_tokens)
    finally:
        stop()
    mine, theirs = times["qlora-kit"], times.get("PEFT", {})
    n = args.batch * args.new_tokens

    def ratio(a: list[float], b: list[float]) -> str:  # median over rounds of b/a, each round's pair run minutes apart
        return f"{statistics.median(y / x for x, y in zip(a, b, strict=True)):.2f}x"

    print("\ntokens/s: the median over rounds; ratios: the median of each round's ratio (its two runs were made close "
          "in time)")
    print("\n| batch | qlora-kit tokens/s | vs its 1 adapter | PEFT adapter_names tokens/s | qlora-kit / PEFT |")
    print("|---|---|---|---|---|")
    for label, ts in mine.items():
        t = theirs.get(label)
        print(f"| {label} | {n / statistics.median(ts):.1f} | {ratio(ts, mine['1 adapter'])} | "
              f"{'-' if t is None else f'{n / statistics.median(t):.1f}'} | {'-' if t is None else ratio(ts, t)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": times, "memory": memory}, indent=1))
    per = memory["adapter_bytes"] / 16
    print(f"\n16 adapters resident: RSS grew {memory['rss_growth'] / 2**20:.1f} MiB; their factors "
          f"{memory['adapter_bytes'] / 2**20:.1f} MiB ({per / 2**20:.2f} MiB each; held by the layers "
          f"{memory['bank_bytes'] / 2**20:.1f} MiB); the adapter files {memory['file_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
