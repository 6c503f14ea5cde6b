"""Merge at scale: peak RSS and wall time of `qlora-kit merge` per format, beside PEFT's bf16 merge.

Each merge runs as `python -m qlora_kit merge` in a fresh process; its peak RSS is the kernel's
(ru_maxrss of the child, from wait4), its time the wall clock. The PEFT side loads the bf16 base with
transformers, applies the same adapter with PeftModel.from_pretrained, merge_and_unload()s it and
save_pretrained()s the result, also in a fresh process.

Cases:
  quickstart  the embedded SmolLM2-135M-Instruct and an adapter folder you give (--adapter)
  780m        a random Llama of 783M parameters (hidden 1536, 24 layers, intermediate 4352, 24 heads / 8 KV,
              untied, SmolLM2's tokenizer), bf16 in 400 MB shards, with a random r=16 all-linear adapter;
              built once under --work
  8b          the same for Llama-3.1-8B's shape (examples/configs/llama-3.1-8b.json; 16 GB of bf16 in 5 GB shards)

  python benchmarks/bench_merge.py --case 780m --formats bf16,nf4 --peft --json merge_780m.json
  python benchmarks/bench_merge.py --case quickstart --adapter runs/quickstart/adapter --formats nf4,int8,bf16
  --qlora-kit-tree DIR runs another checkout's qlora_kit (for a before / after comparison).
  python benchmarks/bench_merge.py --plan examples/configs/llama-3.1-8b.json --formats bf16,nf4   (the plan alone)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine  # noqa: E402

CASE_780M = dict(hidden_size=1536, num_hidden_layers=24, intermediate_size=4352, num_attention_heads=24,
                 num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048)


def build(case: str, work: Path) -> tuple[Path, Path]:
    """A random model folder and its random adapter (built once, in a child process to keep this one small)."""
    folder, adapter = work / f"llama-{case}", work / f"adapter-{case}"
    if (adapter / "adapter_config.json").is_file():
        return folder, adapter
    if case == "780m":
        config, shard = CASE_780M, "400MB"
    else:  # Llama-3.1-8B's shape
        config = json.loads((Path(__file__).resolve().parent.parent / "examples/configs/llama-3.1-8b.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
        shard = "5GB"
    code = f"""
import torch, qlora_kit as qk
from transformers import AutoModelForCausalLM, LlamaConfig
from qlora_kit import defaults
from qlora_kit.loading import load_tokenizer
tok = load_tokenizer(defaults.model_folder("smollm2-135m"))
torch.manual_seed(0)
cfg = LlamaConfig(**{config!r})
cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained({str(folder)!r}, max_shard_size={shard!r})
tok.save_pretrained({str(folder)!r})
del model
q = qk.load_quantized({str(folder)!r})
qk.add_lora(q, r=16, alpha=32, dropout=0.0)
g = torch.Generator().manual_seed(1)
for layer in qk.lora_layers(q).values():
    layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.01
qk.save_adapter(q, {str(adapter)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder, adapter


def plan_only(config_path: str, fmt: str) -> dict:
    """The merge's plan for a config.json alone (no checkpoint): `qlora-kit merge`'s defaults, nf4-trained base."""
    import torch
    from transformers import AutoConfig

    from qlora_kit import export, merge_report
    from qlora_kit.config import MergeConfig, QuantConfig
    from qlora_kit.loading import decoder_layers
    from qlora_kit.memory.models import meta_quantized

    config = AutoConfig.from_pretrained(config_path)
    source = getattr(config, "dtype", None) or torch.float32  # (read first: building the model changes it)
    source = getattr(torch, source) if isinstance(source, str) else source
    model = meta_quantized(config, QuantConfig(quant="nf4", compute_dtype=torch.float32), "cpu")
    name, _ = decoder_layers(model)
    cfg = MergeConfig(adapter="-", out="-", format=fmt)
    untied = None if config.tie_word_embeddings else ("model.embed_tokens.weight", "lm_head.weight")
    q = QuantConfig(quant=fmt if cfg.quantized else "nf4", compute_dtype=torch.float32)
    calib_rows = -(-cfg.calib_tokens // cfg.seq_len)
    # the checkpoint's dtype (config.json's) against the export's dense one: whether the export changes the
    # tensors outside the blocks
    copied = export.cast_changes_values(source, export.dense_dtype(cfg))
    p = merge_report.plan(model, name, untied, cfg, q, calib_rows, cfg.eval_sequences, 4, outside_copied=copied)
    print(merge_report.format_plan(p, cfg))
    return p


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Wall time and peak RSS (the kernel's ru_maxrss for the child) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})), cwd=cwd)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "output": out}


PEFT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=("quickstart", "780m", "8b"), default="780m")
    p.add_argument("--adapter", help="adapter folder (quickstart case)")
    p.add_argument("--formats", default="bf16,nf4", help="comma-separated export formats, each 'FMT' or 'FMT:METHOD'")
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--extra", default="", help="more `qlora-kit merge` flags, space-separated")
    p.add_argument("--peft", action="store_true", help="also PEFT's bf16 merge_and_unload + save_pretrained")
    p.add_argument("--qlora-kit-tree", help="run the qlora_kit of this checkout instead")
    p.add_argument("--work", default="bench-merge-work")
    p.add_argument("--json")
    p.add_argument("--plan", metavar="CONFIG", help="print the merge's planned peak for a config.json and stop")
    args = p.parse_args()
    if args.plan:
        for fmt in args.formats.split(","):
            plan_only(args.plan, fmt.partition(":")[0])
        return
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.case in ("780m", "8b"):
        model, adapter = build(args.case, work)
    else:
        if not args.adapter:
            sys.exit("--case quickstart needs --adapter DIR (e.g. runs/quickstart/adapter)")
        model, adapter = "smollm2-135m", Path(args.adapter).resolve()
    env = {"TRANSFORMERS_VERBOSITY": "error"}
    tree = None
    if args.qlora_kit_tree:  # `python -m` puts the working folder first on sys.path: run from inside the tree
        tree = str(Path(args.qlora_kit_tree).resolve())
        env["PYTHONPATH"] = tree
    rows = []
    print(f"machine: {machine(torch.device('cpu'))}")
    for spec in args.formats.split(","):
        fmt, _, method = spec.partition(":")
        out = work / f"out-{args.case}-{fmt}-{method or 'auto'}"
        cmd = [sys.executable, "-m", "qlora_kit", "merge", "--model", str(model), "--adapter", str(adapter),
               "--out", str(out), "--format", fmt, "--eval-sequences", str(args.eval_sequences), "--force"]
        cmd += ["--method", method] if method else []
        cmd += args.extra.split()
        r = run(cmd, env, tree)
        report = json.loads((out / "merge_report.json").read_text())
        m = report.get("model_metrics", {})
        row = {"side": "qlora-kit", "format": fmt, "method": report.get("method"), "wall_s": r["wall_s"],
               "peak_rss_mib": r["peak_rss_mib"], "kept_gain": m.get("kept_gain"), "ppl_base": m.get("ppl_base"),
               "ppl_unmerged": m.get("ppl_unmerged"), "ppl_merged": m.get("ppl_merged"),
               "kl": m.get("kl_merged_vs_unmerged"), "planned_peak_mib": round(report["plan"]["peak_bytes"] / 2**20, 1)
               if "plan" in report else None,
               "output_mib": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 1)}
        rows.append(row)
        print(json.dumps(row))
    if args.peft:
        if args.case == "quickstart":
            from qlora_kit import defaults
            model = defaults.model_folder("smollm2-135m")
        r = run([sys.executable, "-c", PEFT, str(model), str(adapter), str(work / "out-peft")], env)
        row = {"side": "peft", "format": "bf16", "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(torch.device("cpu")), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
