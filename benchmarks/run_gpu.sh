#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one command, on one CUDA machine, from the repository root:
#
#     bash benchmarks/run_gpu.sh [OUT_DIR]          # default OUT_DIR: bench-gpu
#
# Needs the package installed with its test extra (PEFT) and a CUDA build of torch (triton comes with it).
# Writes OUT_DIR/*.txt (the printed tables) and OUT_DIR/*.json; takes about an hour on an H100, most of it
# writing and loading the random-weight Llama-3.1-8B (16 GB) for both sides.
set -euo pipefail
out=${1:-bench-gpu}
py=${PYTHON:-python}
mkdir -p "$out"
run() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$out/$name.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, triton, bitsandbytes, transformers, peft, platform; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, python {platform.python_version()}')"
} | tee "$out/machine.txt"

# layers: nf4 / fp4 / int8 / nf4 through bitsandbytes, fwd+bwd at 8k tokens and 1-token decode, vs dense bf16
run layer $py benchmarks/bench_layer.py --decode --json "$out/layer.json"
# whole training steps against PEFT + bitsandbytes: seq 2048, r=16, all linear layers, checkpointing on both
run train-llama-3.2-1b $py benchmarks/bench_train.py --model examples/configs/llama-3.2-1b.json \
    --seq-len 2048 --batch-size 4 --gradient-checkpointing --json "$out/train-llama-3.2-1b.json"
run train-llama-3.1-8b $py benchmarks/bench_train.py --model examples/configs/llama-3.1-8b.json \
    --seq-len 2048 --batch-size 1 --gradient-checkpointing --json "$out/train-llama-3.1-8b.json"
run train-quickstart $py benchmarks/bench_train.py --json "$out/train-quickstart.json"
# peak memory against PEFT, and the estimator against the measurement
run memory $py benchmarks/bench_memory.py --device cuda --model examples/configs/llama-3.2-1b.json \
    --sweep seq-len=1024,2048,4096 --sweep gradient-checkpointing=false,true --json "$out/memory.json"
run memory-estimate qlora-kit memory --model examples/configs/llama-3.2-1b.json --measure \
    --sweep seq-len=1024,2048,4096 --sweep gradient-checkpointing=false,true \
    --csv "$out/memory.csv" --plot "$out/memory.png"
# estimate against measurement (allocated and reserved peaks) on the two Llama shapes
run memory-1b qlora-kit memory --model examples/configs/llama-3.2-1b.json --seq-len 2048 --batch-size 4 --measure
run memory-8b qlora-kit memory --model examples/configs/llama-3-8b.json --seq-len 2048 --batch-size 1 \
    --gradient-checkpointing --measure
# --fit against the real out-of-memory boundary, found by running (a GPU of the budget's size)
run fit-1b $py benchmarks/bench_fit.py --device cuda --model examples/configs/llama-3.2-1b.json --budget 12GiB \
    --json "$out/fit-1b.json"
run fit-8b $py benchmarks/bench_fit.py --device cuda --model examples/configs/llama-3-8b.json --budget 24GiB \
    --gradient-checkpointing --batch-size 1 --json "$out/fit-8b.json"
# one Qwen3-30B-A3B-shaped MoE layer (128 experts, top-8): quantized expert stacks vs PEFT target_parameters
run moe $py benchmarks/bench_moe.py --device cuda --dtype bf16 --tokens 4096 --json "$out/moe.json"
# merge at scale: the 780M case and Llama-3.1-8B's shape, bf16 and nf4 (update-keeping rounding on the GPU),
# peak RSS and wall time, with PEFT's bf16 merge beside them
run merge-780m $py benchmarks/bench_merge.py --case 780m --formats bf16,nf4 --peft --work "$out/merge-work" \
    --json "$out/merge-780m.json"
run merge-8b $py benchmarks/bench_merge.py --case 8b --formats nf4 --work "$out/merge-work" --json "$out/merge-8b.json"
# merge-aware training's step-time cost on a GPU (the quickstart, plain vs --merge-aware nf4 / q4_0), and what
# the exports keep
run gguf-train $py benchmarks/bench_gguf.py train --work "$out/gguf-work" --rounds 2 \
    --variants "plain,merge-aware nf4,merge-aware q4_0" --json "$out/gguf-train.json"
# serving: B concurrent requests over 1, 4 and 16 adapters (bf16, Triton base kernels + gathered LoRA), against
# the base alone and PEFT's adapter_names on the same batches
run serve-b16 $py benchmarks/bench_serve.py --device cuda --batch 16 --new-tokens 64
run serve-b64 $py benchmarks/bench_serve.py --device cuda --batch 64 --new-tokens 64
echo "results in $out/"
