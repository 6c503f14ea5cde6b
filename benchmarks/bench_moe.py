"""One Qwen3-MoE layer: qlora-kit's quantized expert stacks against PEFT + bitsandbytes (CPU, or a CUDA GPU).

Run from the repository root:

    .venv/bin/python benchmarks/bench_moe.py              # E=128, T=256, fp32, and the check (~3 min on 2 cores)
    .venv/bin/python benchmarks/bench_moe.py --experts 32 --dtype bf16 --json bench_moe.json
    python benchmarks/bench_moe.py --device cuda --dtype bf16 --tokens 4096   # on a GPU: + the allocator's peaks

The layer is transformers' `Qwen3MoeSparseMoeBlock` with Qwen3-30B-A3B's per-expert shapes (hidden 2048,
expert intermediate 768, top-8 routing, normalised top-k weights) and its 128 experts (2.4 GB of dense fp32
expert weights; `--experts 32` for a quicker run). Both sides get the same random weights and the same
random LoRA factors (r=16, alpha=32, B nonzero so the branch does real work), drawn from `--seed` in the
same order in each worker. Each side runs in its own fresh process, so peak RSS is per side:

  qlora-kit  the block built on the meta device; the router materialised dense; each 3-D expert parameter
             (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)) drawn dense, one at a time,
             and replaced by `ExpertStack.from_dense` (nf4, double quant, block 64: one QuantLinear per
             expert) via `place_stack`, as qlora_kit.loading does; `add_lora(targets=["experts"])`.
  peft       what transformers + bitsandbytes + PEFT do with this layer: `replace_with_bnb_linear` (the step
             `from_pretrained(quantization_config=BitsAndBytesConfig(nf4))` takes) swaps nn.Linear modules
             only, and this block has none (the router is a bare parameter, the experts 3-D parameters),
             so the experts stay dense in the compute dtype; then `get_peft_model(LoraConfig(
             target_parameters=["experts.gate_up_proj", "experts.down_proj"], lora_dropout=0))`. Its experts
             forward is transformers' `grouped_mm` (what `from_pretrained` picks for Qwen3-MoE on a CPU;
             `--peft-experts eager` for the per-expert loop).

What PEFT can and cannot do here (peft/tuners/lora/layer.py, ParamWrapper; checked against the installed
version printed below):
  * it adapts a 3-D parameter only as a whole: each forward registers a parametrization that computes
    W' = W + (alpha/r) * B @ A for *every* expert (one baddbmm over the stack, `_LoraFactorsProxy`), whether
    or not a token is routed to it, and the experts forward then reads W'. That is a second dense copy of
    the stack per forward, and in backward a dense gradient of W' of the same size, before it is reduced
    to the factors' gradients;
  * the base it adds to must be a dense tensor: bitsandbytes quantizes no 3-D parameter, so QLoRA's 4-bit
    base does not exist for the experts (only the attention/dense-MLP linears of a full model are nf4);
  * lora_dropout must be 0 (a ValueError otherwise: x cannot be factored out of B(A(dropout(x))) once the
    delta is folded into W), as must fan_in_fan_out, lora_bias and DoRA; one parameter per ParamWrapper,
    nested when a module has two; no mixed-adapter batches; its LoRA factors take the parameter's dtype
    (bf16 factors under `--dtype bf16`; qlora-kit keeps them fp32).
qlora-kit runs only the experts tokens are routed to, one QuantLinear (dequantized on the fly, packed
weight saved for backward) plus its own rank-r branch at a time; no dense copy of the stack is made.

Measured per side: stored bytes of the expert weights (qlora-kit: the QuantLinears' buffers, packed weight
and quantization state; PEFT: the two dense parameters), the RSS growth over the build (current RSS from
/proc/self/statm, before and after), the process's peak RSS (getrusage ru_maxrss, whole process, imports
and build included) and the peak RSS above the post-build RSS while stepping (VmHWM reset through
/proc/self/clear_refs), forward time (graph built, as in training) and forward+backward time (loss =
output.float().pow(2).mean(); input (1, T, H) requires grad), median of --repeats after --warmup (the
range is printed too). On a machine other processes also use, time with `--threads 1`: with one torch
thread per core, every parallel op waits for a thread the scheduler may have taken away, and qlora-kit's
decode (many cache-sized ops per expert) suffers most (seen on 2 shared cores: its forward 1.2 s in one
run, 47 s in the next; PEFT's 10 s with 2 threads, 5 s with 1).

The check (skip with --no-check) runs a small case (--check-experts, default 16: top-8 of 16, so routing
matters) in fp32: the qlora-kit worker writes its *dequantized* expert weights, the router, the LoRA factors
in PEFT's layout, the input, its output and gradients to a temporary safetensors file; the PEFT worker
loads those weights as its dense base and computes the same step; both are compared with a float64
reference: transformers' eager experts loop (neither side's experts code) over W + (alpha/r) * B @ A
merged in float64, gradients by autograd. Tolerance: max |a - b| / max |b| <= 1e-4 for the output, the
input gradient and the LoRA factors' gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, mib, run_worker, serve_worker

SIDES = ("qlora-kit", "peft")
TARGETS = ("gate_up_proj", "down_proj")  # the experts module's 3-D parameters, in its parameter order
CHECK_TOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=128, help="number of experts E (Qwen3-30B-A3B has 128)")
    p.add_argument("--tokens", type=int, default=256, help="tokens T in the input (1, T, H)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768, help="per-expert intermediate size")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the layer runs (built on the host, then moved); cuda adds the allocator's peaks")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--peft-experts", default="grouped_mm", choices=["grouped_mm", "eager", "batched_mm"],
                   help="transformers' experts implementation on the PEFT side")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in each worker (default 0: torch's default, one per core)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    p.add_argument("--check-experts", type=int, default=16)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON job for one side
    return p.parse_args(argv)


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    import qlora_kit

    return {"qlora_kit": qlora_kit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "cpu flags unknown"
    return f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, amx_bf16 {'yes' if 'amx_bf16' in flags else 'no'}"


# ---- worker: one side in one fresh process --------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Weights:
    """The layer's random values, drawn from one generator in a fixed order, so both workers get the same:
    router (E, H), gate_up_proj (E, 2I, H), down_proj (E, H, I), then per target (A (r*E, in), B (out, r*E))
    in PEFT's stacked layout. Callers take them in this order."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def dense(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """N(0, 0.02) values, drawn a slice of the first dimension at a time into the result, so that the
        drawing adds no stack-sized temporary to either side's peak RSS."""
        out = torch.empty(shape, dtype=dtype)
        for i in range(shape[0]):
            out[i] = torch.randn(shape[1:], generator=self.gen).mul_(0.02)
        return out

    def lora(self, experts: int, r: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(r * experts, fan_in, generator=self.gen) / fan_in**0.5
        b = torch.randn(fan_out, r * experts, generator=self.gen) * 0.02  # nonzero: the branch does real work
        return a, b


def make_config(job: dict):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=job["hidden"], moe_intermediate_size=job["intermediate"],
                          num_experts=job["experts"], num_experts_per_tok=job["top_k"], norm_topk_prob=True,
                          num_hidden_layers=1, hidden_act="silu")


def target_shapes(job: dict) -> dict[str, tuple[int, int, int]]:
    """(E, out, in) of each 3-D expert parameter (Qwen3-MoE stores them not transposed)."""
    e, h, i = job["experts"], job["hidden"], job["intermediate"]
    return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}


def build_qlora_kit(job: dict, dtype: torch.dtype, weights: Weights, saved: dict | None):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    import qlora_kit
    from qlora_kit.config import QuantConfig
    from qlora_kit.experts import ExpertStack, place_stack

    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(make_config(job))
    block.gate.weight = torch.nn.Parameter(weights.dense(block.gate.weight.shape, dtype))  # the router: dense
    qcfg = QuantConfig(quant="nf4", compute_dtype=dtype, double_quant=True, blocksize=64)
    for order, name in enumerate(TARGETS):  # one dense stack alive at a time, as qlora_kit.loading does
        dense = weights.dense(target_shapes(job)[name], dtype)
        stack = ExpertStack.from_dense(dense, qcfg, transposed=False, param_name=name, order=order)
        del dense
        place_stack(block, f"experts.{name}", stack)
    qlora_kit.add_lora(block, r=job["rank"], alpha=job["alpha"], dropout=0.0, targets=["experts"])
    stacks = {name: getattr(block.experts, name) for name in TARGETS}
    for name, stack in stacks.items():
        a, b = weights.lora(stack.num_experts, job["rank"], stack.in_features, stack.out_features)
        if saved is not None:
            saved[f"{name}.weight"] = stack.dense(torch.float32)  # what the base computes with, exactly
            saved[f"{name}.lora_A"], saved[f"{name}.lora_B"] = a, b
        with torch.no_grad():
            for layer, (a_e, b_e) in zip(stack, stack.split_peft_factors(a, b, job["rank"]), strict=True):
                layer.lora_A.copy_(a_e)
                layer.lora_B.copy_(b_e)
    if saved is not None:
        saved["router"] = block.gate.weight.detach().float()
    stored = sum(buf.nbytes for s in stacks.values() for buf in s.buffers())
    return block, stored


def lora_grads_qlora_kit(block) -> dict[str, torch.Tensor]:
    """The LoRA factors' gradients in PEFT's stacked layout (see qlora_kit.experts)."""
    out = {}
    for name in TARGETS:
        stack = getattr(block.experts, name)
        out[f"{name}.lora_A.grad"] = torch.cat([layer.lora_A.grad for layer in stack], dim=0)
        out[f"{name}.lora_B.grad"] = torch.stack([layer.lora_B.grad for layer in stack], dim=2).reshape(
            stack.out_features, -1)
    return out


def build_peft(job: dict, dtype: torch.dtype, weights: Weights, loaded: dict | None):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from transformers.utils import logging

    config = make_config(job)
    config._experts_implementation = job["peft_experts"]
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(config)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its "no linear modules were found" warning: counted below instead
    replace_with_bnb_linear(block, quantization_config=qcfg)
    logging.set_verbosity(level)
    import bitsandbytes as bnb

    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in block.modules())
    router = weights.dense(block.gate.weight.shape, dtype)
    block.gate.weight = torch.nn.Parameter(loaded["router"].to(dtype) if loaded else router)
    for name in TARGETS:
        dense = weights.dense(target_shapes(job)[name], dtype)
        if loaded:
            dense = loaded[f"{name}.weight"].to(dtype)
        setattr(block.experts, name, torch.nn.Parameter(dense, requires_grad=False))
    lcfg = LoraConfig(r=job["rank"], lora_alpha=job["alpha"], lora_dropout=0.0, target_modules=[],
                      target_parameters=[f"experts.{name}" for name in TARGETS])
    model = get_peft_model(block, lcfg)
    factors = {}
    for name in TARGETS:
        shape = target_shapes(job)[name]
        a, b = weights.lora(shape[0], job["rank"], shape[2], shape[1])
        factors[name] = (loaded[f"{name}.lora_A"], loaded[f"{name}.lora_B"]) if loaded else (a, b)
    for module in model.modules():  # ParamWrappers, nested (one per targeted parameter)
        if type(module).__name__ == "ParamWrapper":
            a, b = factors[module.parameter_name]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
    stored = sum(p.nbytes for n, p in model.named_parameters() if n.rpartition(".")[2] in TARGETS)
    return model, stored, quantized


def lora_grads_peft(model) -> dict[str, torch.Tensor]:
    out = {}
    for module in model.modules():
        if type(module).__name__ == "ParamWrapper":
            out[f"{module.parameter_name}.lora_A.grad"] = module.lora_A["default"].weight.grad
            out[f"{module.parameter_name}.lora_B.grad"] = module.lora_B["default"].weight.grad
    return out


def timed(fn, warmup: int, repeats: int, device: str = "cpu") -> list[float]:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def worker(job: dict) -> dict:
    from qlora_kit.config import parse_dtype

    dtype = parse_dtype(job["dtype"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    weights = Weights(job["seed"])
    check_file = job.get("check_file")
    rss_before = rss()
    t0 = time.perf_counter()
    quantized = None
    if job["side"] == "qlora-kit":
        saved = {} if check_file else None
        model, stored = build_qlora_kit(job, dtype, weights, saved)
    else:
        from safetensors.torch import load_file

        loaded = load_file(check_file) if check_file else None
        model, stored, quantized = build_peft(job, dtype, weights, loaded)
    build_s = time.perf_counter() - t0
    rss_built = rss()
    device = job.get("device", "cpu")
    if device == "cuda":
        model.to(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    x = weights.dense((1, job["tokens"], job["hidden"]), dtype).mul_(50.0)  # entries ~ N(0, 1)
    if check_file and job["side"] == "peft":
        x = loaded["x"].to(dtype)
    x = x.to(device).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        return model(x)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        out = model(x)
        out.float().pow(2).mean().backward()
        return out

    out = {"side": job["side"], "threads": torch.get_num_threads(), "stored": stored, "build_s": build_s,
           "rss_before": rss_before, "rss_build_growth": rss_built - rss_before, "trainable": sum(p.numel() for p in params),
           "bnb_linear4bit": quantized}
    if check_file:
        y = step()
        result = {"y": y.detach().float().cpu(), "x.grad": x.grad.float().cpu()}
        grads = lora_grads_qlora_kit(model) if job["side"] == "qlora-kit" else lora_grads_peft(model)
        result.update({k: v.float().cpu() for k, v in grads.items()})
        if job["side"] == "qlora-kit":
            from safetensors.torch import save_file

            save_file({**saved, "x": x.detach().float().cpu(), **{f"qlora-kit.{k}": v for k, v in result.items()}},
                      check_file)
        else:
            out["check"] = compare(job, loaded, result)
        return out
    from qlora_kit.memory.observed import reset_rss_peak

    build_peak = peak_rss()
    hwm_reset = reset_rss_peak()  # from here on, ru_maxrss is the peak since the build ended
    if device == "cuda":
        out["cuda_weights"] = torch.cuda.memory_allocated()  # the layer on the GPU, before any step
    out["forward_times"] = timed(forward, job["warmup"], job["repeats"], device)
    out["step_times"] = timed(step, job["warmup"], job["repeats"], device)
    if device == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
    out["forward_s"], out["step_s"] = statistics.median(out["forward_times"]), statistics.median(out["step_times"])
    out["rss_peak"] = max(build_peak, peak_rss())
    out["rss_step_peak_growth"] = peak_rss() - rss_built if hwm_reset else None
    return out


# ---- the check: both sides against a float64 reference -------------------------------------------------

def reference(job: dict, saved: dict) -> dict[str, torch.Tensor]:
    """transformers' eager experts loop in float64 over W + (alpha/r) B @ A, merged here (PEFT's layout:
    A (r*E, in) with expert e in rows e*r.., B (out, r*E) with column j*E + e for expert e's column j)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = make_config(job)
    config._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(config).double()
    block.gate.weight.data.copy_(saved["router"].double())
    e, r, scale = job["experts"], job["rank"], job["alpha"] / job["rank"]
    factors = {}
    for name in TARGETS:
        a = saved[f"{name}.lora_A"].double().requires_grad_(True)
        b = saved[f"{name}.lora_B"].double().requires_grad_(True)
        factors[name] = (a, b)
        a_e = a.reshape(e, r, -1)  # (E, r, in)
        b_e = b.reshape(b.shape[0], r, e).permute(2, 0, 1)  # (E, out, r)
        merged = saved[f"{name}.weight"].double() + scale * (b_e @ a_e)  # (E, out, in)
        delattr(block.experts, name)
        setattr(block.experts, name, merged)  # a plain tensor: autograd reaches A and B through it
    x = saved["x"].detach().to(torch.float64).requires_grad_(True)
    y = block(x)
    y.pow(2).mean().backward()
    ref = {"y": y.detach(), "x.grad": x.grad}
    for name, (a, b) in factors.items():
        ref[f"{name}.lora_A.grad"], ref[f"{name}.lora_B.grad"] = a.grad, b.grad
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def compare(job: dict, saved: dict, peft_result: dict) -> dict:
    ref = reference(job, saved)
    rows = {}
    for key, want in ref.items():
        ours, theirs = saved[f"qlora-kit.{key}"], peft_result[key]
        rows[key] = {"qlora-kit vs f64": rel_err(ours, want), "peft vs f64": rel_err(theirs, want),
                     "qlora-kit vs peft": rel_err(ours, theirs)}
    return rows


# ---- parent ------------------------------------------------------------------------------------------------

def spread(times: list[float]) -> str:
    return f"{min(times):.3f}..{max(times):.3f}"


def main() -> None:
    args = parse_args()
    if args.worker:
        serve_worker(args.worker, worker)
        return

    host, vers = machine(torch.device(args.device)), versions()
    print(f"machine: {host}; {cpu_flags()}")
    print(", ".join(f"{k} {v}" for k, v in vers.items()))
    job = {k: getattr(args, k) for k in ("experts", "tokens", "hidden", "intermediate", "top_k", "dtype", "rank",
                                         "alpha", "peft_experts", "threads", "warmup", "repeats", "seed", "device")}
    print(f"Qwen3MoeSparseMoeBlock: E={args.experts} experts of (2x{args.intermediate}) x {args.hidden} and "
          f"{args.hidden} x {args.intermediate}, top-{args.top_k}, T={args.tokens} tokens, {args.dtype}; LoRA "
          f"r={args.rank} alpha={args.alpha:g} on both expert parameters; qlora-kit nf4 (double quant, block 64); "
          f"PEFT experts forward: {args.peft_experts}; median of {args.repeats} after {args.warmup} warm-up")
    print()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_moe-") as tmp:
        for side in SIDES:
            results[side] = run_worker(__file__, {**job, "side": side}, Path(tmp))
            r = results[side]
            print(f"{side}: {r['threads']} torch threads, built in {r['build_s']:.1f} s, "
                  f"forward {r['forward_s']:.3f} s "
                  f"({spread(r['forward_times'])}), fwd+bwd {r['step_s']:.3f} s ({spread(r['step_times'])}), peak RSS "
                  f"{mib(r['rss_peak'])} MiB; load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.check:
            check_job = {**job, "experts": args.check_experts, "dtype": "fp32",
                         "check_file": str(Path(tmp) / "check.safetensors")}
            run_worker(__file__, {**check_job, "side": "qlora-kit"}, Path(tmp))
            results["check"] = run_worker(__file__, {**check_job, "side": "peft"}, Path(tmp))["check"]

    ours, peft = results["qlora-kit"], results["peft"]
    rows = [("stored expert bytes", ours["stored"], peft["stored"], lambda n: f"{n:,}"),
            ("forward s", ours["forward_s"], peft["forward_s"], lambda s: f"{s:.3f}"),
            ("fwd+bwd s", ours["step_s"], peft["step_s"], lambda s: f"{s:.3f}"),
            ("peak RSS MiB (process)", ours["rss_peak"], peft["rss_peak"], mib),
            ("RSS growth over build MiB", ours["rss_build_growth"], peft["rss_build_growth"], mib),
            ("peak RSS growth while stepping MiB", ours["rss_step_peak_growth"], peft["rss_step_peak_growth"], mib),
            ("RSS after imports MiB", ours["rss_before"], peft["rss_before"], mib)]
    if args.device == "cuda":  # the allocator's view: what the GPU holds
        rows += [("CUDA allocated, layer on the GPU MiB", ours["cuda_weights"], peft["cuda_weights"], mib),
                 ("CUDA peak allocated (forward + fwd/bwd) MiB", ours["cuda_peak_allocated"],
                  peft["cuda_peak_allocated"], mib),
                 ("CUDA peak reserved MiB", ours["cuda_peak_reserved"], peft["cuda_peak_reserved"], mib)]
    print("\n| | qlora-kit | PEFT+bnb | ratio |\n|---|---|---|---|")
    for label, a, b, fmt in rows:
        ratio = f"{a / b:.3f}x" if a is not None and b else "-"
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
    print(f"\nratio = qlora-kit / PEFT (below 1: qlora-kit smaller or faster). Trainable: qlora-kit "
          f"{ours['trainable']:,}, PEFT {peft['trainable']:,}. bitsandbytes Linear4bit modules on the PEFT side: "
          f"{peft['bnb_linear4bit']} (its experts are dense {args.dtype}).")
    if args.check:
        print(f"\ncheck: E={args.check_experts}, T={args.tokens}, fp32, identical dequantized base weights and "
              f"LoRA factors; max |a - b| / max |b|, tolerance {CHECK_TOL:g} against float64")
        print("| tensor | qlora-kit vs f64 | PEFT vs f64 | qlora-kit vs PEFT |\n|---|---|---|---|")
        ok = True
        for key, errs in results["check"].items():
            print(f"| {key} | " + " | ".join(f"{v:.1e}" for v in errs.values()) + " |")
            ok &= errs["qlora-kit vs f64"] <= CHECK_TOL and errs["peft vs f64"] <= CHECK_TOL
        print(f"check: {'pass' if ok else 'FAIL'}")
    if args.json:
        from qlora_kit.io import atomic_write_bytes

        meta = dict(machine=host, cpu=cpu_flags(), versions=vers, args={k: v for k, v in vars(args).items()
                                                                           if k != "worker"})
        atomic_write_bytes(Path(args.json), json.dumps(dict(meta=meta, results=results), indent=2).encode())
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
