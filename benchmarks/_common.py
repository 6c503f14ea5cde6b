"""Shared by the benchmark scripts: a one-line description of the machine, the model folder both sides load,
and running one side in its own fresh process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

SHARD_BYTES = 2 * 2**30


def serve_worker(job_json: str, worker) -> None:
    """The worker side of run_worker: run `worker(job)` and write its JSON where the job says."""
    job = json.loads(job_json)
    Path(job["out"]).write_text(json.dumps(worker(job)))


def run_worker(script: str, job: dict, tmp: Path, env: dict | None = None) -> dict:
    """Run `script --worker JOB` in a fresh process (one side of a comparison) and return the JSON it writes;
    `env`: variables added to its environment."""
    path = tmp / f"{job['side']}.json"
    path.unlink(missing_ok=True)
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps({**job, "out": str(path)})],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not path.is_file():
        sys.exit(f"the {job['side']} worker failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(path.read_text())


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def machine(device: torch.device) -> str:
    """GPU name, or CPU model, cores, torch threads and the load average (a busy machine skews timings)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{load}"


def model_folder(model: str, dtype: torch.dtype, tmp: Path) -> tuple[Path, str]:
    """A Hugging Face folder with weights for both sides, and where its weights come from.

    The embedded default or a .gguf is converted once; a folder with safetensors is used as it is; a
    config.json (or a folder holding only one) gets random weights written to `tmp` (values do not change
    speed or memory).
    """
    from qlora_kit.defaults import model_folder as resolve

    path = Path(model)
    if str(model) == "smollm2-135m" or path.suffix == ".gguf":
        return resolve(model), "weights of the model"
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path, "weights of the model"
    return random_weights(model, dtype, tmp / "random-model"), "random weights"


def random_weights(model: str, dtype: torch.dtype, folder: Path) -> Path:
    """Write `folder` with the config and N(0, 0.02) weights (norms 1), sharded as transformers writes them.

    The model is built on the meta device and each tensor drawn on its own, so an 8B model takes seconds
    of arithmetic rather than transformers' per-layer initialisation.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from qlora_kit.memory import read_model_config

    config = read_model_config(model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    shards, shard, size, index = [], {}, 0, {}
    for name, p in model.named_parameters():  # shared (tied) parameters come once, under their first name
        t = torch.ones(p.shape, dtype=dtype) if p.dim() == 1 and "norm" in name else \
            (torch.randn(p.shape, generator=gen) * 0.02).to(dtype)
        if p.dim() == 1 and "norm" not in name:  # biases
            t.zero_()
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, file))
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder
