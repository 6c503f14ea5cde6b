"""The training loop: learning, exact resume after SIGKILL, NaN handling, the CLI and its bad input."""

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

import qlora_kit as qk
from qlora_kit.checkpoints import latest_checkpoint, save_checkpoint
from qlora_kit.cli import main
from qlora_kit.config import TrainConfig
from qlora_kit.train import TrainingDiverged, train


def cfg_for(run_model, text_file, out, **kw):
    base = dict(model=str(run_model), data=str(text_file), out=str(out), steps=12, seq_len=32, batch_size=4,
                lr=3e-3, warmup_steps=2, save_every=4, eval_sequences=8, sample_tokens=0, rank=4, alpha=8,
                eval_fraction=0.1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def test_loss_falls_and_perplexity_improves(run_model, text_file, tmp_path):
    res = train(cfg_for(run_model, text_file, tmp_path / "run", steps=30, sample_tokens=5, lr=1e-2, rank=8,
                        alpha=16), log=lambda s: None, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.93 * sum(losses[:5]) / 5  # a random 2-layer base learns slowly...
    assert res.ppl_after < 0.7 * res.ppl_before  # ...but held-out perplexity falls by a third
    assert isinstance(res.sample_after, str)
    assert all({"lr", "tokens_per_s", "mem_mb", "grad_norm"} <= set(r) for r in rows if "loss" in r)
    # the final adapter is a PEFT adapter that loads back onto the base
    model = qk.load_quantized(run_model)
    qk.load_adapter(model, res.adapter)
    assert len(qk.lora_layers(model)) == 14
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000028", "step-000030"]  # keep_checkpoints=2


@pytest.mark.parametrize("options", [dict(optimizer="adamw8bit", grad_accum=2, dropout=0.1),
                                     dict(gradient_checkpointing=True, schedule="constant", quant="int8")])
def test_resume_is_exact_in_process(run_model, text_file, tmp_path, options):
    full = train(cfg_for(run_model, text_file, tmp_path / "full", steps=8, **options), log=lambda s: None,
                 progress=False)
    part = cfg_for(run_model, text_file, tmp_path / "part", steps=8, **options)
    stop = RuntimeError("stop here")

    def crash(step, model):
        if step == 6:  # after the step-4 checkpoint, before the next
            raise stop

    with pytest.raises(RuntimeError, match="stop here"):
        train(part, log=lambda s: None, progress=False, _on_step=crash)
    assert latest_checkpoint(tmp_path / "part" / "checkpoints").name == "step-000004"
    resumed = train(cfg_for(run_model, text_file, tmp_path / "part", steps=8, resume=True, **options),
                    log=lambda s: None, progress=False)
    a, b = adapter_tensors(full.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_s", "mem_mb")} for r in rows]  # noqa: E731
    assert strip(lines("full")) == strip(lines("part"))


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(run_model, text_file, tmp_path):
    """Kill -9 the CLI mid-run (several times), resume each time: the final adapter is bit-identical."""
    def cmd(out, resume=False):
        return [sys.executable, "-m", "qlora_kit", "train", "--model", str(run_model), "--data", str(text_file),
                "--out", str(out), "--steps", "40", "--seq-len", "32", "--batch-size", "4", "--rank", "4",
                "--dropout", "0.1", "--save-every", "3", "--eval-sequences", "4", "--sample-tokens", "0",
                "--device", "cpu", "--no-progress", "--lr", "3e-3"] + (["--resume"] if resume else [])

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd(tmp_path / "full"), check=True, capture_output=True, env=env)
    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"
    kills = 0
    for target in (5, 17, 29):  # kill once the log shows this many steps (at whatever the process is doing)
        proc = subprocess.Popen(cmd(out, resume=kills > 0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= target:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        for ckpt in (out / "checkpoints").glob("step-*"):  # every checkpoint a kill leaves is whole
            assert {p.name for p in ckpt.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json",
                                                        "trainer_state.safetensors", "trainer_state.json"}
            load_file(ckpt / "trainer_state.safetensors")
            json.loads((ckpt / "trainer_state.json").read_text())
    assert kills >= 2
    done = subprocess.run(cmd(out, resume=True), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    a, b = adapter_tensors(tmp_path / "full" / "adapter"), adapter_tensors(out / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_checkpoint_write_leaves_the_last_good_one(run_model, text_file, tmp_path, monkeypatch):
    cfg = cfg_for(run_model, text_file, tmp_path / "run", steps=4, save_every=2)
    train(cfg, log=lambda s: None, progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    before = latest_checkpoint(ckpts)

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("killed while writing")

    monkeypatch.setattr("qlora_kit.checkpoints.save_file", half_written)
    model = qk.load_quantized(cfg.model)
    qk.add_lora(model, r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError):
        save_checkpoint(ckpts, 6, model, opt, sched, {}, keep=2)
    assert latest_checkpoint(ckpts) == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_model, text_file, tmp_path):
    def poison(step, model):
        if step == 5:
            with torch.no_grad():
                next(iter(qk.lora_layers(model).values())).lora_B.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6.*Last good checkpoint: .*step-000004"):
        train(cfg_for(run_model, text_file, tmp_path / "run", steps=10, save_every=2), log=lambda s: None,
              progress=False, _on_step=poison)
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step-000004"
    state = load_file(ckpts / "step-000004" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


# ---- CLI --------------------------------------------------------------------------------------------

def test_cli_train_eval_generate(run_model, text_file, tmp_path, capsys):
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text(f"model: {run_model}\ndata: {text_file}\nsteps: 3\nseq-len: 32\nrank: 4\nlr: 0.003\n"
                        "sample_tokens: 0\neval_sequences: 4\ndevice: cpu\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(yaml_cfg), "--steps", "4", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "run.json").read_text())
    assert saved["steps"] == 4 and saved["rank"] == 4  # flags override the YAML file, which overrides defaults
    assert "done: 4 steps" in capsys.readouterr().out
    assert main(["eval", "--model", str(run_model), "--adapter", str(out / "adapter"), "--data", str(text_file),
                 "--seq-len", "32", "--eval-sequences", "4", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--model", str(run_model), "--adapter", str(out / "adapter"), "--prompt", "ROMEO:",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert main(["generate", "--model", str(run_model), "--prompt", "Who keeps the moon?", "--chat",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0


@pytest.mark.parametrize("args,match", [
    (["--data", "/nonexistent.txt"], "no such data file"),
    (["--model", "/nonexistent"], "no such model folder"),
    (["--seq-len", "100000"], "beyond the model's context of 256"),
    (["--rank", "0"], "must be an integer >= 1"),
    (["--quant", "nf5"], None),  # argparse's own error (exit 2)
])
def test_cli_bad_input_exits_nonzero_with_one_line(run_model, text_file, tmp_path, capsys, args, match):
    base = ["train", "--model", str(run_model), "--data", str(text_file), "--out", str(tmp_path / "r"),
            "--steps", "1", "--seq-len", "32", "--device", "cpu", "--no-progress"]
    try:
        code = main(base + args)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    if match:
        assert match in err and len(err.splitlines()) == 1, err


def test_cli_refuses_to_overwrite_or_resume_differently(run_model, text_file, tmp_path, capsys):
    base = ["train", "--model", str(run_model), "--data", str(text_file), "--out", str(tmp_path / "r"),
            "--steps", "2", "--seq-len", "32", "--device", "cpu", "--no-progress", "--sample-tokens", "0"]
    assert main(base) == 0
    assert main(base) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(base + ["--resume", "--rank", "8"]) == 2
    assert "different settings (rank: 16 then, 8 now)" in capsys.readouterr().err


def test_cli_bad_yaml(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("stepz: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("steps: lots\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "setting 'steps' should be int" in capsys.readouterr().err
