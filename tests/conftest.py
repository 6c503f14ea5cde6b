"""Tiny random models of the decoder families the toolkit must handle, saved as HF folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker (and per process a test starts): `-n 2` on 2 cores with torch's default of a thread per
    # core ran 4 spinning OpenMP threads on 2 cores, and test_memory.py took 2.3x as long
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in its interpreter (read at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 160


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    elif arch == "qwen2":  # biased q/k/v projections
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = Phi3Config(**common, tie_word_embeddings=False)
    elif arch == "gpt2":  # Conv1D projections, weights stored (in, out)
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                         bos_token_id=1, eos_token_id=2)
    else:
        raise KeyError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt2"]


def make_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():  # non-trivial values everywhere, biases and norms included
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def saved_models(tmp_path_factory, names, build) -> dict:
    """{name: folder} of `build(name)` saved with save_pretrained."""
    out = {}
    for name in names:
        out[name] = tmp_path_factory.mktemp(name)
        build(name).save_pretrained(out[name])
    return out


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{arch: folder} of saved tiny random models (float32 safetensors)."""
    return saved_models(tmp_path_factory, ARCHS, make_model)


def randomize_b(model, seed=0, std=0.1):
    """Nonzero B factors on every LoRA layer, so that the adapter changes the outputs."""
    import qlora_kit as qk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def bnb_exact(model):
    """bitsandbytes' modules in their exact mode: on AVX512-BF16 CPUs a Linear4bit repacks its weight with bf16
    block scales at its first no-grad evaluation (a per-module switch); a reference must not be approximate.
    Their own kernels still dequantize, so the reference stays independent of this package."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def token_batch(n: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def synthetic_text(n_lines: int = 600, seed: int = 0) -> str:
    """Text with learnable structure: a small grammar of names, verbs and objects."""
    import random
    rng = random.Random(seed)
    names, verbs, things = ["ROMEO", "JULIET", "NURSE", "TYBALT"], ["loves", "fears", "sees", "keeps"], [
        "the moon", "a rose", "the night", "her sword", "his name"]
    lines = []
    for _ in range(n_lines):
        who = rng.choice(names)
        lines.append(f"{who}:\n{rng.choice(names).title()} {rng.choice(verbs)} {rng.choice(things)}.\n")
    return "\n".join(lines)


def make_tokenizer(folder, vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained on the synthetic text, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([synthetic_text(200)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_sp_tokenizer(folder, vocab_size: int = 400, prefix_space: bool = True):
    """A small sentencepiece-style BPE tokenizer (the Llama 2 / Mistral / Gemma kind: '▁' for spaces, byte
    fallback pieces <0x00>..<0xFF>, <unk>, BOS added) trained on the synthetic text; Gemma's adds no '▁' before
    the text (prefix_space=False)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix_space
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([synthetic_text(200)], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   add_bos_token=True)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def run_model(tmp_path_factory):
    """A tiny random Llama with a real tokenizer: what `qlora-kit train --model` needs."""
    folder = tmp_path_factory.mktemp("run_model")
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "play.txt"
    path.write_text(synthetic_text())
    return path


@pytest.fixture(scope="session")
def moe_run_model(tmp_path_factory):
    """A small Qwen3-MoE with a real tokenizer, saved in transformers' per-expert checkpoint layout."""
    from .families import small_config

    folder = tmp_path_factory.mktemp("moe_run")
    tok = make_tokenizer(folder)
    cfg = small_config("qwen3_moe")
    cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = len(tok), tok.eos_token_id, \
        tok.pad_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder
