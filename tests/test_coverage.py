"""Coverage over transformers' causal-LM registry: every decoder-only family that builds as a small random
model loads exactly (quant='none'), stores >= 90% of its matmul weights quantized in nf4 (linears and
expert stacks), takes LoRA everywhere and backpropagates into the LoRA factors only (families.check_family)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from .families import build_small, check_family, decoder_families, encoder_style

# The families users ask for most, dense and Mixture-of-Experts: each must pass.
TARGETS = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
           "gemma3_text", "phi3", "phimoe", "gpt_neox", "gpt2", "olmo2", "olmoe", "gpt_oss", "granite",
           "granitemoe", "falcon", "starcoder2", "cohere2", "glm4", "glm4_moe", "smollm3", "exaone4", "minimax",
           "ernie4_5_moe", "jetmoe"]

# Decoder families that build small but cannot pass, and why.
KNOWN = {
    "llama4_text": "its experts run as one batched matmul over every expert (Llama4TextExperts), not through "
                   "transformers' experts interface, so they stay dense",
}


@pytest.mark.parametrize("family", TARGETS)
def test_target_family(family, tmp_path):
    figures = check_family(family, tmp_path)
    if "moe" in family or family in ("mixtral", "phimoe", "olmoe", "gpt_oss", "minimax", "jetmoe"):
        assert figures["experts"] > 0, "the experts were not stored as quantized expert stacks"


def _builds_small(family: str, folder) -> str | None:
    """None, or why the family does not build, run and reload as a small random model in transformers."""
    try:
        model = build_small(family)
        model(input_ids=torch.randint(3, 100, (2, 9)), use_cache=False)
        model.save_pretrained(folder)
        AutoModelForCausalLM.from_pretrained(folder)
    except Exception as e:  # each family fails its own way
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
    return None


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in decoder_families() if f not in TARGETS])
def test_registry_family(family, tmp_path):
    """Every other decoder family: skipped (with the reason) when transformers cannot build, run and reload
    it as a small random model; expected to fail only when listed in KNOWN."""
    why = _builds_small(family, tmp_path / "ref")
    if why:
        pytest.skip(f"does not build small: {why}")
    if family in KNOWN:
        with pytest.raises(AssertionError):
            check_family(family, tmp_path / "fam")
        return
    check_family(family, tmp_path / "fam")


def test_known_failures_are_few():
    """The families allowed to fail stay under 5% of the decoder families that build small. The per-family
    tests skip the ones that do not build small, so this counts on what they found: at least 120 build."""
    assert set(KNOWN) <= set(decoder_families()) and not set(KNOWN) & set(TARGETS)
    assert not set(decoder_families()) & encoder_style()
    assert len(KNOWN) <= 0.05 * 120
