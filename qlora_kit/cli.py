"""The `qlora-kit` command: train, eval, generate, merge, export-lora, serve, memory, smoke.

The flags of train, eval, generate and merge are generated from the fields of TrainConfig, EvalConfig,
GenerateConfig and MergeConfig (one flag per field, its help from the field), so the CLI, the YAML
config and the Python API can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
import types
import typing
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .config import (  # noqa: E402
    QUANT_FORMATS,
    EvalConfig,
    GenerateConfig,
    InferenceConfig,
    LoraExportConfig,
    MergeConfig,
    ServeConfig,
    TrainConfig,
    cli_fields,
    one_line,
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_dataclass_flags(parser: argparse.ArgumentParser, cls=TrainConfig, only: set[str] | None = None) -> None:
    """One flag per field; defaults stay None here so a YAML config can sit between defaults and flags.
    A field without a default is a required flag."""
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        kind, help_text = _field_type(cls, f), f.metadata["help"]
        required = f.default is dataclasses.MISSING
        if not required and f.default is not None:
            help_text += f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=kind, default=None, choices=f.metadata.get("choices"),
                                required=required, help=help_text)


def dataclass_from_args(args: argparse.Namespace, cls, values: dict | None = None):
    """`cls` from the flags given (the rest keep the field defaults), over `values`."""
    values = dict(values or {})
    for f in cli_fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then --config YAML, then explicit flags."""
    return dataclass_from_args(args, TrainConfig, _read_yaml(Path(args.config)) if getattr(args, "config", None)
                               else None)


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown setting {key!r}; settings are the `qlora-kit train` flags")
        kind = _field_type(TrainConfig, known[name])
        if value is not None and kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{path}: setting {key!r} should be {kind.__name__}, got {value!r}")
        out[name] = value
    return out


# ---- commands ------------------------------------------------------------------------------------

def _train(args: argparse.Namespace) -> None:
    from .train import train

    cfg = config_from_args(args)
    start = time.perf_counter()
    result = train(cfg, progress=not args.no_progress)
    gain = ""
    if result.ppl_before and result.ppl_after:
        gain = f", held-out perplexity {result.ppl_before:.2f} -> {result.ppl_after:.2f}"
    print(f"done: {result.steps} steps in {time.perf_counter() - start:.0f}s{gain}; adapter in {result.adapter}")


def _load_for_inference(cfg: InferenceConfig):
    """The model (quantized, with the adapter when one is given), its tokenizer and the device."""
    from .adapters import load_adapter
    from .loading import load_model_and_tokenizer, resolve_device

    device = resolve_device(cfg.device)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.quant_config(device), device, cfg.cache_dir)
    if cfg.adapter:
        load_adapter(model, cfg.adapter)
    return model, tok, device


def _eval(args: argparse.Namespace) -> None:
    from . import defaults
    from .data import load_dataset
    from .evaluate import perplexity
    from .loading import check_seq_len

    cfg = dataclass_from_args(args, EvalConfig)
    model, tok, _ = _load_for_inference(cfg)
    check_seq_len(model, cfg.seq_len)
    path = defaults.resolve_data(cfg.data, cfg.cache_dir)
    if cfg.split == "all":
        seqs, _ = load_dataset(path, tok, cfg.seq_len, eval_fraction=0.0)
    else:
        _, seqs = load_dataset(path, tok, cfg.seq_len, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    ppl = perplexity(model, seqs, cfg.batch_size, cfg.eval_sequences)
    n = min(len(seqs), cfg.eval_sequences or len(seqs))
    what = f"with adapter {cfg.adapter}" if cfg.adapter else "base model"
    print(f"perplexity {ppl:.3f} ({what}, {n} sequences of {cfg.seq_len} tokens from {path}, split={cfg.split})")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .data import pad_id

    cfg = dataclass_from_args(args, GenerateConfig)
    model, tok, device = _load_for_inference(cfg)
    prompt = cfg.prompt
    if cfg.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=not cfg.chat).input_ids.to(device)
    torch.manual_seed(cfg.seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                         do_sample=cfg.temperature > 0, temperature=cfg.temperature or None,
                         pad_token_id=pad_id(tok))
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def _merge(args: argparse.Namespace) -> None:
    from .merge import merge, report_path

    cfg = dataclass_from_args(args, MergeConfig)
    merge(cfg)
    print(f"merged model written to {cfg.out} (report: {report_path(cfg)})")


def _export_lora(args: argparse.Namespace) -> None:
    from .gguf_export import export_lora

    export_lora(dataclass_from_args(args, LoraExportConfig))


def _serve(args: argparse.Namespace) -> None:
    import socket

    from .config import parse_dtype
    from .engine import Engine
    from .loading import load_model_and_tokenizer, resolve_device

    try:
        from .server import serve
    except ImportError as e:
        raise ValueError(f"qlora-kit serve needs {e.name}: pip install 'qlora-kit[serve]'") from None

    cfg = dataclass_from_args(args, ServeConfig)
    with socket.socket() as probe:  # before minutes of loading: is the address ours to take?
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((cfg.host, cfg.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})") from None
    device = resolve_device(cfg.device)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.quant_config(device), device, cfg.cache_dir)
    engine = Engine(model, tok, max_batch=cfg.max_batch, adapter_dtype=parse_dtype(cfg.adapter_dtype))
    for name, folder in cfg.adapters().items():
        info = engine.load_adapter(name, folder)
        print(f"adapter {name}: {folder}, r={info.rank} on {info.layers} layers, {info.nbytes / 2**20:.2f} MiB",
              file=sys.stderr)
    serve(engine, cfg.base_name, cfg.host, cfg.port, on_ready=lambda: print(
        f"serving {cfg.base_name!r} with {len(cfg.adapter)} adapter(s) at http://{cfg.host}:{cfg.port}/v1 "
        "(Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True))
    print("server stopped", file=sys.stderr)


def _memory(args: argparse.Namespace) -> None:
    import json

    from . import memory
    from .loading import resolve_device

    cfg = config_from_args(args)
    if args.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device {args.device!r}: use cuda, cpu or auto")
    if args.measure:
        device = resolve_device(args.device)  # the device measured on: auto means cuda when there is one
    else:
        device = "cpu" if args.device == "cpu" else "cuda"
    if args.fit and (args.sweep or args.measure):
        raise ValueError("--fit answers from the estimate alone: use it without --sweep and --measure")
    if args.measure and (args.ranks > 1 or cfg.fsdp):
        raise ValueError("--measure runs one process: per-rank figures (--ranks, --fsdp) are estimates only")
    if args.sweep:  # fail before any work when the CSV cannot be written
        csv_dir = Path(args.csv).resolve().parent
        if not csv_dir.is_dir():
            raise FileNotFoundError(f"--csv {args.csv}: folder {csv_dir} does not exist")
        if args.plot:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise ValueError("--plot needs matplotlib: pip install 'qlora-kit[plot]'")
            if not Path(args.plot).resolve().parent.is_dir():
                raise FileNotFoundError(f"--plot {args.plot}: folder {Path(args.plot).resolve().parent} does not exist")
    config = memory.read_model_config(cfg.model, cfg.cache_dir)
    out: dict = {}
    if args.sweep:
        axes = memory.parse_sweep(args.sweep)
        rows = memory.sweep(cfg, axes, device, args.measure, log=(lambda _: None) if args.json else print,
                            ranks=args.ranks)
        memory.write_csv(rows, args.csv)
        if args.plot:
            memory.write_plot(rows, axes, args.plot)
        out = {"sweep": rows, "csv": args.csv, "plot": args.plot}
        if not args.json:
            print(f"{len(rows)} rows written to {args.csv}" + (f", plot to {args.plot}" if args.plot else ""))
    elif args.fit:
        what = args.fit_for.replace("-", "_")
        reserve = memory.parse_size(args.reserve, allow_zero=True) if args.reserve is not None else None
        res = memory.fit(cfg, memory.parse_size(args.fit), device, what, reserve, config, ranks=args.ranks)
        out = {"fit": {"what": res.what, "budget": res.budget, "reserve": res.reserve, "best": res.best,
                       "alternatives": res.alternatives},
               "estimate": res.report.to_json() if res.report else None}
        if not args.json:
            print(memory.format_fit(res))
    else:
        est = memory.estimate(cfg, device, config, ranks=args.ranks)
        meas = None
        if args.measure:
            memory.check_measurable(est)
            meas = memory.measure(cfg, device, steps=args.measure_steps, config=config)
        out = {"estimate": est.to_json(), "measured": meas.to_json() if meas else None}
        if not args.json:
            print(memory.format_report(est, meas))
    if args.json:
        print(json.dumps(out, indent=2))


def _smoke(args: argparse.Namespace) -> None:
    """Load a model quantized, add LoRA, take a few steps, save the adapter and load it back."""
    import torch

    from . import add_lora, load_adapter, load_quantized, parameter_report, save_adapter
    from .step import train_step

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model
        if model_path is None:  # a small random Llama, built here: no download
            from transformers import AutoModelForCausalLM, LlamaConfig

            cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
            model_path = Path(scratch) / "tiny-llama"
            AutoModelForCausalLM.from_config(cfg).save_pretrained(model_path)
            print(f"model: random {cfg.num_hidden_layers}-layer Llama (hidden {cfg.hidden_size}) in {model_path}")
        start = time.perf_counter()
        model = load_quantized(model_path, quant=args.quant, device=args.device)
        print(f"loaded with {args.quant} weights in {time.perf_counter() - start:.1f}s")
        add_lora(model, r=args.rank, alpha=2 * args.rank, dropout=0.0)
        print(parameter_report(model))
        vocab = model.config.get_text_config().vocab_size
        batch = torch.randint(0, vocab, (4, 64), device=args.device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model.train()
        losses = []
        for step in range(1, args.steps + 1):
            loss = train_step(model, {"input_ids": batch, "labels": batch})
            losses.append(loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:3d}  loss {loss.item():.4f}")
        model.eval()
        if args.steps > 1 and not losses[-1] < losses[0]:
            raise SystemExit(f"smoke: the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
        out = Path(args.out)
        save_adapter(model, out)
        fresh = load_quantized(model_path, quant=args.quant, device=args.device)
        load_adapter(fresh, out)
        with torch.no_grad():
            same = torch.equal(fresh(batch).logits, model(batch).logits)
        print(f"adapter saved to {out} and reloaded: logits {'identical' if same else 'DIFFER'}")
        if not same:
            raise SystemExit("smoke: reloaded adapter gives different logits")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning: 4/8-bit frozen base, LoRA on top.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train", help="fine-tune with LoRA over a quantized base (no flags: the quickstart)")
    t.add_argument("--config", default=None, help="YAML file of settings (keys are these flags' names); "
                                                  "flags given here override it")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_flags(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="perplexity of a model, with or without an adapter, on a data file")
    add_dataclass_flags(e, EvalConfig)
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="continue a prompt, with or without an adapter")
    add_dataclass_flags(g, GenerateConfig)
    g.set_defaults(func=_generate)

    m = sub.add_parser("merge", help="fold an adapter into its base and export it (16-bit, or requantized with a "
                                     "fidelity report)")
    add_dataclass_flags(m, MergeConfig)
    m.set_defaults(func=_merge)

    x = sub.add_parser("export-lora", help="write an adapter alone as a GGUF LoRA file (llama.cpp --lora, Ollama "
                                           "ADAPTER)")
    add_dataclass_flags(x, LoraExportConfig)
    x.set_defaults(func=_export_lora)

    sv = sub.add_parser("serve", help="an OpenAI-compatible server: one quantized base, many adapters, each "
                                      "request's `model` naming its adapter")
    add_dataclass_flags(sv, ServeConfig, only={f.name for f in cli_fields(ServeConfig)} - {"adapter", "seed"})
    sv.add_argument("--adapter", action="append", default=None, metavar="NAME=DIR",
                    help="serve the PEFT adapter folder DIR as model NAME (repeat for more; more can be loaded at "
                         "runtime with POST /v1/load_lora_adapter)")
    sv.set_defaults(func=_serve)

    from .memory import MEMORY_FIELDS

    mem = sub.add_parser("memory", help="estimate (from config.json alone), measure, or fit training memory",
                         description="Peak training memory, by component: estimated from the model's config.json "
                                     "(no weights needed), measured on real steps with --measure, the largest "
                                     "sequence length or batch for a budget with --fit, or a sweep to CSV/PNG.")
    mem.add_argument("--model", default=None,  # None: the --config file's, else the training default
                     help="a config.json, a model folder, a Hub ID org/name[@rev] (only its config.json is "
                          "fetched), a .gguf, or 'smollm2-135m' (default)")
    mem.add_argument("--config", default=None, help="a training YAML (its memory-relevant settings are used)")
    mem.add_argument("--device", default="auto",
                     help="what to plan for: cuda or cpu (default: cuda; with --measure, the device measured on)")
    add_dataclass_flags(mem, only=set(MEMORY_FIELDS))
    mem.add_argument("--ranks", type=int, default=1, metavar="N",
                     help="per-GPU memory of one rank of a torchrun launch with N processes (--batch-size is per "
                          "rank); with --fsdp the base is sharded over them")
    mem.add_argument("--measure", action="store_true", help="also run real training steps (random weights) and "
                                                            "show the measured peak next to the estimate")
    mem.add_argument("--measure-steps", type=int, default=1, help="optimizer steps measured, after one warm-up "
                                                                  "step that creates the optimizer state (default 1)")
    mem.add_argument("--fit", default=None, metavar="SIZE",
                     help="a memory budget like 24GiB: print the largest --fit-for value that fits")
    mem.add_argument("--fit-for", default="seq-len", choices=["seq-len", "batch-size"], help="what --fit searches")
    mem.add_argument("--reserve", default=None, metavar="SIZE",
                     help="memory the budget cannot give to tensors (default 1GiB on cuda: CUDA context and "
                          "fragmentation; 0 on cpu)")
    mem.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                     help="sweep a setting (rank, seq-len, batch-size, quant, optimizer, gradient-checkpointing, "
                          "double-quant); repeat for a grid")
    mem.add_argument("--csv", default="memory_sweep.csv", help="where --sweep writes its rows")
    mem.add_argument("--plot", default=None, metavar="PNG", help="--sweep also draws estimate (and measurement) "
                                                                 "to this PNG (needs matplotlib)")
    mem.add_argument("--json", action="store_true", help="print JSON instead of text")
    mem.set_defaults(func=_memory)

    s = sub.add_parser("smoke", help="load quantized, add LoRA, train a few steps, save and reload the adapter",
                       formatter_class=fmt)
    s.add_argument("--model", default=None,
                   help="HF model folder, Hub ID org/name[@rev] or .gguf file (default: a small random Llama)")
    s.add_argument("--quant", default="nf4", choices=QUANT_FORMATS, help="base weight format")
    s.add_argument("--rank", type=int, default=16, help="LoRA rank")
    s.add_argument("--steps", type=int, default=20, help="optimizer steps")
    s.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    s.add_argument("--out", default="out/smoke-adapter", help="where the adapter folder goes")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=_smoke)
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment it writes (a plain StreamHandler keeps the one of its creation,
    which a redirect or a test's capture may since have closed)."""
    stream = property(lambda self: sys.stderr, lambda self, _: None)


def quiet_third_parties() -> None:
    """transformers' and the hub's info and warning lines and progress bars (loading, saving and fetching shards)
    are not this tool's output; their errors still are. Set here, not by environment variables: importing
    the package has already imported transformers."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    huggingface_hub.utils.logging.set_verbosity_error()
    # this package's own status lines (a one-time GGUF conversion, ...) go to stderr, beside the progress bar
    own = logging.getLogger("qlora_kit")
    if not any(getattr(h, "qlora_kit_cli", False) for h in own.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.qlora_kit_cli = True
        own.addHandler(handler)
        own.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_parties()
    from .distributed import RankFailure
    from .train import TrainingDiverged

    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun every rank fails alike: rank 0 says why
    try:
        args.func(args)
    except RankFailure as e:  # always said: which rank lost contact is the point
        print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        if not quiet:
            print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:  # bad input, or the machine (a full disk): one line
        if not quiet:
            print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlora-kit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
