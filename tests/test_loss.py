"""The fused head + cross-entropy against transformers' own loss and gradients."""

from __future__ import annotations

import pytest
import torch

import qlora_kit as qk
from qlora_kit import memory
from qlora_kit.config import TrainConfig
from qlora_kit.loss import causal_lm_loss, fused_loss_supported, linear_cross_entropy

from .conftest import ARCHS, rel_err, token_batch


def _batch(ignore: bool = True) -> dict[str, torch.Tensor]:
    ids = token_batch(3, 20, seed=4)
    labels = ids.clone()
    if ignore:  # a prompt mask and padding, as data.py makes them
        labels[0, :7] = -100
        labels[2, 15:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [None, 7])
def test_loss_and_lora_grads_equal_transformers(model_dirs, arch, chunk):
    model = qk.load_quantized(model_dirs[arch], compute_dtype=torch.float32)
    qk.add_lora(model, r=4, dropout=0.0)
    for layer in qk.lora_layers(model).values():  # a non-zero B, so every factor gets a gradient
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    assert fused_loss_supported(model)
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, params)
    ours = causal_lm_loss(model, batch, chunk=chunk)
    grads = torch.autograd.grad(ours, params)
    assert rel_err(ours.detach(), ref.detach()) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-5


def test_linear_cross_entropy_against_float64():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (50,), generator=g)
    labels[::5] = -100
    loss = linear_cross_entropy(hidden, weight, labels, chunk=8)
    (grad,) = torch.autograd.grad(loss * 3.0, hidden)
    h64 = hidden.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ weight.double().t(), labels, ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref * 3.0, h64)
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-6
    assert rel_err(grad, ref_grad) < 1e-5


def test_all_labels_ignored_gives_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_falls_back_when_the_head_is_not_plain(model_dirs):
    model = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    qk.add_lora(model, r=4, targets=r".*(q_proj|lm_head)")  # LoRA on the head: the logits are needed
    assert not fused_loss_supported(model)
    batch = _batch()
    assert causal_lm_loss(model, batch).item() == model(**batch).loss.item()
    from peft import LoraConfig, get_peft_model  # a wrapper whose base_model is the whole LM again
    from transformers import AutoModelForCausalLM

    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
                             LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused_loss_supported(wrapped)  # through the wrapper to the decoder, and the same loss
    batch = _batch()
    assert abs(causal_lm_loss(wrapped, batch).item() - wrapped(**batch).loss.item()) < 1e-5
    plain = qk.load_quantized(model_dirs["llama"], compute_dtype=torch.float32)
    plain.config.final_logit_softcapping = 30.0  # a logit transform after the head
    assert not fused_loss_supported(plain)
    with pytest.raises(ValueError, match="frozen output head"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.zeros(2, dtype=torch.long))


def test_fused_loss_lowers_the_peak(tmp_path):
    """The estimate sees the logits go: at a 2,000-token vocabulary and 1,024 tokens, transformers' loss
    keeps several (tokens x vocab) fp32 tensors at once; the fused one a 64 MiB-bounded chunk."""
    from .conftest import tiny_config

    tiny_config("llama", vocab_size=2000, max_position_embeddings=1024).save_pretrained(tmp_path)
    cfg = TrainConfig(model=str(tmp_path), seq_len=512, batch_size=2)
    meas = memory.measure(cfg, "cpu")
    tokens_by_vocab = 1024 * 2000 * 4
    assert meas.components["logits & loss"] + meas.components["backward temporaries"] < 2 * tokens_by_vocab
