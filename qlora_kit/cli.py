"""The `qlora-kit` command."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _smoke(args: argparse.Namespace) -> None:
    """Load a model quantized, add LoRA, take a few steps, save the adapter and load it back."""
    import torch

    from . import add_lora, load_adapter, load_quantized, parameter_report, save_adapter

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
        for step in range(1, args.steps + 1):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:3d}  loss {loss.item():.4f}")
        model.eval()
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
    s = sub.add_parser("smoke", help="load quantized, add LoRA, train a few steps, save and reload the adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default=None, help="HF model folder or .gguf file (default: a small random Llama)")
    s.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8", "none"], help="base weight format")
    s.add_argument("--rank", type=int, default=16, help="LoRA rank")
    s.add_argument("--steps", type=int, default=20, help="optimizer steps")
    s.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    s.add_argument("--out", default="out/smoke-adapter", help="where the adapter folder goes")
    s.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=_smoke)
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qlora-kit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
