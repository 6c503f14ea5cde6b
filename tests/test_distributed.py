"""Training under torchrun on the CPU (gloo, 2 processes): data-parallel and FSDP2 runs against one process
with the same global batch, resume under 2 processes, and a rank that dies or hangs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import TrainConfig

from .conftest import rel_err

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def flags(run_model, text_file, out, **kw):
    opts = dict(model=run_model, data=text_file, out=out, steps=8, seq_len=32, batch_size=4, rank=4, alpha=8,
                lr=3e-3, warmup_steps=2, save_every=3, eval_sequences=4, sample_tokens=0, dropout=0.0,
                eval_fraction=0.1, device="cpu")
    opts.update(kw)
    args = []
    for k, v in opts.items():
        if v is True:
            args.append(f"--{k.replace('_', '-')}")
        elif v is not False:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args + ["--no-progress"]


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def run(cmd, timeout=300, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(folder):
    return load_file(Path(folder) / "adapter" / "adapter_model.safetensors")


def losses(folder):
    rows = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def single(run_model, text_file, tmp_path_factory):
    """The reference: one process, global batch 4."""
    out = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "qlora_kit", "train", *flags(run_model, text_file, out)])
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["data-parallel", "fsdp2"])
def test_two_ranks_train_what_one_process_trains(single, run_model, text_file, tmp_path, fsdp):
    out = tmp_path / "two"
    proc = run(torchrun() + ["-m", "qlora_kit", "train", *flags(run_model, text_file, out, batch_size=2, fsdp=fsdp)])
    assert "global batch 2 per rank x 2 ranks x 1 accumulation = 4 sequences" in proc.stdout
    assert proc.stdout.count("adapter (") == 1  # rank 0 alone logs
    a, b = adapter(single), adapter(out)
    assert a.keys() == b.keys()
    for k in a:  # the same global batch and seed: equal up to the order of float sums
        assert rel_err(b[k], a[k]) < 1e-4, k
    la, lb = losses(single), losses(out)
    assert len(la) == len(lb) == 8
    assert max(abs(x - y) / x for x, y in zip(la, lb, strict=True)) < 1e-5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    state = json.loads((out / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert "rng/torch.rank1" in load_file(out / "checkpoints" / "step-000008" / "trainer_state.safetensors")


@pytest.mark.slow
def test_resume_under_two_ranks_after_sigkill(run_model, text_file, tmp_path):
    """Kill the whole torchrun job mid-run, resume it with 2 processes: the same adapter, bit for bit, as an
    uninterrupted 2-process run (dropout on: each rank's RNG state is restored too)."""
    def cmd(out, resume=False):
        return torchrun() + ["-m", "qlora_kit", "train",
                             *flags(run_model, text_file, out, batch_size=2, steps=10, dropout=0.1, resume=resume)]

    run(cmd(tmp_path / "full"))
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = run(cmd(out, resume=True))
    assert "resumed from" in done.stdout
    a, b = adapter(tmp_path / "full"), adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(out)


def test_resume_with_another_number_of_ranks_is_refused(single, run_model, text_file, tmp_path):
    proc = subprocess.run(torchrun() + ["-m", "qlora_kit", "train",
                                        *flags(run_model, text_file, single, resume=True)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert "written by a run on 1 rank(s), resumed on 2" in proc.stderr


def test_fsdp_without_torchrun_is_refused(run_model, text_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora_kit", "train", *flags(run_model, text_file, tmp_path, fsdp=True)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "torchrun" in proc.stderr


@pytest.mark.parametrize("mode", ["die", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failing_rank_takes_the_job_down(run_model, text_file, tmp_path, mode):
    """Rank 1 exits (or stops answering) after step 2: the job ends with an error well inside a minute, and
    when rank 0 is the one left waiting it says which collective failed."""
    cfg = TrainConfig(model=str(run_model), data=str(text_file), out=str(tmp_path / "run"), steps=8, seq_len=32,
                      batch_size=2, rank=4, eval_sequences=4, sample_tokens=0, eval_fraction=0.1, device="cpu",
                      dist_timeout=10)
    (tmp_path / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    t0 = time.time()
    proc = subprocess.run(torchrun() + [str(ROOT / "tests" / "dist_worker.py"), str(tmp_path / "cfg.json"), mode],
                          capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode != 0
    assert time.time() - t0 < 120
    if mode == "hang":
        assert "rank 0: the gradient all-reduce failed" in proc.stderr or "rank 0: the loss all-reduce failed" \
            in proc.stderr, proc.stderr[-2000:]


# ---- per-GPU memory for N ranks -------------------------------------------------------------------

def test_estimate_per_rank_under_fsdp_is_the_share_plus_what_is_gathered(model_dirs):
    """Against first principles on a loaded model: each rank keeps ceil(1/N) of the quantized and of the
    16-bit weights; gathered at the peak are the root's tensors (head, final norm) and three decoder layers'
    worth (two gathered, one all-gather buffer)."""
    from qlora_kit import memory
    from qlora_kit.layers import QuantLinear
    from qlora_kit.loading import load_quantized

    folder = model_dirs["mistral"]  # untied head: the embedding is its own FSDP unit
    cfg = TrainConfig(model=str(folder), quant="nf4", rank=4, seq_len=16, batch_size=2, gradient_checkpointing=True)
    single = memory.estimate(cfg, "cuda", compare=False)
    model = load_quantized(folder, "nf4", torch.bfloat16)

    def nbytes(module):
        tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    layer = max(nbytes(m) for m in model.model.layers)
    root = nbytes(model.lm_head) + nbytes(model.model.norm)
    for n in (2, 4):
        est = memory.estimate(TrainConfig(**{**dataclasses.asdict(cfg), "fsdp": True}), "cuda", compare=False, ranks=n)
        for cat in ("quantized weights", "unquantized weights"):
            assert est.components[cat] == -(-single.components[cat] // n), cat
        assert est.components["FSDP gathered weights"] == root + 3 * layer
        for cat in ("LoRA parameters", "optimizer state", "activations"):  # replicated / per rank: unchanged
            assert est.components[cat] == single.components[cat], cat
        assert est.settings["ranks"] == n and "FSDP2 over" in " ".join(est.notes)
    qlayer = sum(m.in_features * m.out_features for m in model.model.layers[0].modules() if isinstance(m, QuantLinear))
    assert layer > qlayer / 2  # a layer's gathered bytes are at least its 4-bit codes


def test_estimate_for_data_parallel_ranks_is_the_single_process_figure(model_dirs):
    from qlora_kit import memory

    cfg = TrainConfig(model=str(model_dirs["llama"]), rank=4, seq_len=16, batch_size=2)
    one, four = memory.estimate(cfg, "cuda", compare=False), memory.estimate(cfg, "cuda", compare=False, ranks=4)
    assert one.components == four.components and "data-parallel over 4 ranks" in " ".join(four.notes)


@pytest.mark.parametrize("args,match", [
    (["--fsdp"], "give --ranks N with N >= 2"),
    (["--ranks", "0"], "--ranks 0 must be an integer >= 1"),
    (["--ranks", "2", "--measure"], "--measure runs one process"),
])
def test_memory_cli_rank_errors(model_dirs, capsys, args, match):
    from qlora_kit.cli import main

    assert main(["memory", "--model", str(model_dirs["llama"] / "config.json"), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.strip().count("\n") == 0


def test_memory_cli_reports_one_rank_of_an_fsdp_launch(model_dirs, capsys):
    from qlora_kit.cli import main

    assert main(["memory", "--model", str(model_dirs["llama"] / "config.json"), "--fsdp", "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "one of 4 ranks (FSDP2)" in out and "FSDP gathered weights" in out


def test_fsdp2_trains_an_moe_model_as_one_process_does(moe_run_model, text_file, tmp_path):
    """Experts sharded with their layer, per-expert LoRA factors averaged over the ranks: the same adapter."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "qlora_kit", "train", *flags(moe_run_model, text_file, one, steps=4)])
    run(torchrun() + ["-m", "qlora_kit", "train", *flags(moe_run_model, text_file, two, steps=4, batch_size=2,
                                                         fsdp=True)])
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:
        assert rel_err(b[k], a[k]) < 1e-4, k


GRADS_SCRIPT = """
import json, os, sys, torch
from torch import nn
import qlora_kit.distributed as d
ctx, _ = d.setup("cpu", 60)
torch.manual_seed(ctx.rank)
params = [nn.Parameter(torch.zeros(3)) for _ in range(3)]
params[0].grad = torch.full((3,), float(ctx.rank + 1))      # every rank: averaged
if ctx.rank == 0:
    params[1].grad = torch.full((3,), 4.0)                   # routed on rank 0 only: zero on rank 1
d.average_gradients(ctx, params)                             # params[2]: no rank has a gradient
print(json.dumps([None if p.grad is None else p.grad.tolist() for p in params]))
d.teardown(ctx)
"""


def test_gradients_missing_on_some_ranks_average_as_zeros(tmp_path):
    """An expert routed on one rank only: its gradient is that rank's over the world size, as one process
    over the whole batch gives it; one routed nowhere keeps no gradient on every rank."""
    script = tmp_path / "grads.py"
    script.write_text(GRADS_SCRIPT)
    proc = run(torchrun() + ["--tee", "3", str(script)], timeout=120)
    rows = [json.loads(line.split(":", 1)[1]) for line in proc.stdout.splitlines() if ":[" in line.replace(" ", "")]
    assert len(rows) == 2
    for row in rows:
        assert row == [[1.5, 1.5, 1.5], [2.0, 2.0, 2.0], None]
