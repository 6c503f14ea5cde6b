"""GGUF export and merge-aware training on the quickstart: what each GGUF type keeps of the adapter's gain, read
back by transformers' GGUF loader; and what merge-aware training costs and keeps.

  python benchmarks/bench_gguf.py export --adapter runs/quickstart/adapter --json gguf_export.json
  python benchmarks/bench_gguf.py train --json gguf_train.json [--steps 40] [--rounds 1]

export: for every type and method (default q8_0, q4_0, q4_1, q5_0, q5_1, each with gptq and rtn) one
`python -m qlora_kit merge --out X.gguf` in a fresh process (wall time, peak RSS from wait4), its report
(perplexities, kept gain, KL), and an independent read-back: transformers loads the .gguf
(AutoModelForCausalLM.from_pretrained(gguf_file=...)) and scores the same held-out rows; its perplexity is
set beside the report's "export" perplexity, and its logits are compared with the adapter unmerged
(qlora_kit.load_quantized + load_adapter, fp32): relative error and KL.

train: the quickstart (`python -m qlora_kit train`, default flags) plain and with --merge-aware nf4 / q4_0
(from the first step, or after 30 plain steps), alternating in fresh processes (--rounds of each; a finished
run under --work is reused); the median step time over the merge-aware steps (from the third) from
metrics.jsonl, the peak RSS (wait4), the held-out perplexity after training as the training forward
computes it. Then every adapter is merged to nf4 (bitsandbytes folder) and to q4_0 (GGUF): the
merge-aware adapters with the rounding they trained against (what `merge` picks: the fixed dither for nf4 unless
trained with --merge-aware-rounding nearest, round to nearest otherwise), the plain one with GPTQ (the default); the table gives each export's kept gain against the plain adapter unmerged and its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import machine  # noqa: E402

FORMATS = "q8_0,q4_0,q4_1,q5_0,q5_1"


def run(cmd: list[str]) -> dict:
    """Run a child; its wall time and peak RSS (ru_maxrss from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "output": out}


def read_back(path: Path, eval_sequences: int, adapter: Path) -> dict:
    """transformers' reading of the file, scored on the merge's held-out rows, and against the adapter unmerged."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import qlora_kit as qk
    from qlora_kit import defaults
    from qlora_kit.config import MergeConfig
    from qlora_kit.loading import load_tokenizer
    from qlora_kit.merge import _eval_and_calibration

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    src = defaults.model_folder("smollm2-135m")
    rows, _ = _eval_and_calibration(MergeConfig(adapter="-", out="-", eval_sequences=eval_sequences),
                                    load_tokenizer(src), lambda *a: None)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref = qk.load_quantized(src, compute_dtype=torch.float32)
    qk.load_adapter(ref, adapter)
    ref.eval()
    nll, n, kl, d2, r2 = 0.0, 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for i in range(len(rows)):
            b = rows.select(slice(i, i + 1))
            lab = b["labels"][:, 1:]
            keep = lab != -100
            got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            nll += float(torch.nn.functional.cross_entropy(got.flatten(0, 1), lab.flatten(), ignore_index=-100,
                                                           reduction="sum"))
            n += int(keep.sum())
            g, w = got[keep], want[keep]
            kl += float(torch.nn.functional.kl_div(g.log_softmax(-1), w.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
            d2 += float((g - w).double().pow(2).sum())
            r2 += float(w.double().pow(2).sum())
    return {"transformers_ppl": math.exp(nll / n), "logits_rel_err_vs_unmerged": math.sqrt(d2 / r2),
            "kl_vs_unmerged": kl / n}


def export(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    for fmt in args.formats.split(","):
        for method in args.methods.split(","):
            out = work / f"quickstart-{fmt}-{method}.gguf"
            r = run([sys.executable, "-m", "qlora_kit", "merge", "--adapter", str(args.adapter), "--out", str(out),
                     "--format", fmt, "--method", method, "--eval-sequences", str(args.eval_sequences), "--force"])
            report = json.loads(out.with_name(out.name.removesuffix(".gguf") + ".merge_report.json").read_text())
            m = report["model_metrics"]
            row = {"format": fmt, "method": method, "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                   "file_mib": round(out.stat().st_size / 2**20, 1), "ppl_base": m["ppl_base"],
                   "ppl_unmerged": m["ppl_unmerged"], "ppl_export": m["ppl_merged"], "kept_gain": m["kept_gain"],
                   "kept_gain_note": m.get("kept_gain_note"), "floor": m["rounding_floor_nats_per_token"],
                   "kl_report": m["kl_merged_vs_unmerged"]}
            row.update(read_back(out, args.eval_sequences, Path(args.adapter)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


VARIANTS = {
    "plain": [],
    "merge-aware nf4": ["--merge-aware", "nf4"],  # the fixed dither on the base's grid (the default for nf4)
    "merge-aware nf4 nearest": ["--merge-aware", "nf4", "--merge-aware-rounding", "nearest"],
    "merge-aware q4_0": ["--merge-aware", "q4_0"],  # round to nearest (the default for GGUF types)
    "merge-aware q4_1": ["--merge-aware", "q4_1"],
    "merge-aware nf4 after 30": ["--merge-aware", "nf4", "--merge-aware-after", "30"],
    "merge-aware q4_0 after 30": ["--merge-aware", "q4_0", "--merge-aware-after", "30"],
}


def train(args: argparse.Namespace, work: Path) -> list[dict]:
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for rnd in range(args.rounds):
        for name in names:
            out = work / f"train-{name.replace(' ', '-')}-{rnd}"
            peak = None
            if not (out / "adapter" / "adapter_config.json").is_file():  # a finished run is reused (--work)
                peak = run([sys.executable, "-m", "qlora_kit", "train", "--out", str(out), "--steps", str(args.steps),
                            "--save-every", "0", "--sample-tokens", "0", *VARIANTS[name]])["peak_rss_mib"]
                (out / "peak_rss_mib").write_text(str(peak))
            peak = float((out / "peak_rss_mib").read_text())
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            steps = [x for x in metrics if "step_s" in x]
            evals = [x["eval_ppl"] for x in metrics if "eval_ppl" in x]
            after = int(VARIANTS[name][3]) if "--merge-aware-after" in VARIANTS[name] else 0
            aware = [x["step_s"] for x in steps if x["step"] > after + 2]
            runs[name].append({"out": out, "step_s": statistics.median(aware), "peak_rss_mib": peak,
                               "ppl_before": evals[0], "ppl_after": evals[-1]})
            print(name, rnd, {k: v for k, v in runs[name][-1].items() if k != "out"}, flush=True)
    plain = statistics.median(x["step_s"] for x in runs["plain"])
    rows = []
    for name, rs in runs.items():
        row = {"variant": name, "step_s": statistics.median(x["step_s"] for x in rs),
               "peak_rss_mib": max(x["peak_rss_mib"] for x in rs), "ppl_before": rs[0]["ppl_before"],
               "ppl_after_training_forward": rs[0]["ppl_after"]}
        row["step_ratio_vs_plain"] = round(row["step_s"] / plain, 3)
        adapter = rs[0]["out"] / "adapter"
        for fmt in (("nf4", "q4_0") if name == "plain" else (VARIANTS[name][1],)):
            gguf_out = fmt.startswith("q")
            out = work / (f"export-{name.replace(' ', '-')}-{fmt}" + (".gguf" if gguf_out else ""))
            run([sys.executable, "-m", "qlora_kit", "merge", "--adapter", str(adapter), "--out", str(out),
                 "--format", fmt, "--eval-sequences", str(args.eval_sequences), "--force"])
            rp = (out.with_name(out.name.removesuffix(".gguf") + ".merge_report.json") if gguf_out
                  else out / "merge_report.json")
            report = json.loads(rp.read_text())
            m = report["model_metrics"]
            row[f"{fmt}_method"] = report["method"]
            row[f"{fmt}_ppl_export"] = m["ppl_merged"]
            row[f"{fmt}_ppl_unmerged"] = m["ppl_unmerged"]
            row[f"{fmt}_kept_gain_own"] = m["kept_gain"]
        rows.append(row)
    base = rows[0]
    for row in rows:  # against the plain adapter unmerged: the model a plain run would serve unmerged
        for fmt in ("nf4", "q4_0", "q4_1"):
            if f"{fmt}_ppl_export" in row:
                b, u, e = base["ppl_before"], base["nf4_ppl_unmerged"], row[f"{fmt}_ppl_export"]
                row[f"{fmt}_kept_vs_plain_unmerged"] = round((b - e) / (b - u), 4)  # the report's `kept`
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("export", "train"))
    p.add_argument("--adapter", help="the quickstart adapter (export)")
    p.add_argument("--formats", default=FORMATS)
    p.add_argument("--methods", default="gptq,rtn")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"training variants, of: {', '.join(VARIANTS)}")
    p.add_argument("--work", default="bench-gguf")
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(torch.device('cpu'))}", flush=True)
    if args.part == "export":
        if not args.adapter:
            sys.exit("export needs --adapter DIR (e.g. runs/quickstart/adapter)")
        rows = export(args, work)
    else:
        rows = train(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(torch.device("cpu")), "rows": rows}, indent=2,
                                              default=str))


if __name__ == "__main__":
    main()
