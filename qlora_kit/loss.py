"""Next-token loss without the full logits: the output head and cross-entropy fused, chunk by chunk.

transformers computes the loss as `lm_head(hidden)` for every token (tokens x vocab in the compute
dtype), an fp32 copy of it, its log-softmax, and in backward gradients of the same size: with a 128k
vocabulary that is most of the memory of a step at long sequence lengths. Here the head is frozen, so
the gradient the loss sends back is only the one for the hidden states; it is computed in the forward,
one chunk of tokens at a time, and kept (tokens x hidden) instead of anything vocabulary-sized:

    for each chunk:  z = (h_c @ W.T) in fp32,  loss += logsumexp(z) - z[label]
                     dh_c = (softmax(z) - onehot(label)) @ W / n_labelled

The numbers are transformers' ForCausalLMLoss (labels shifted left, -100 ignored, mean over the
labelled tokens): same head matmul in the compute dtype, same fp32 upcast, same reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100  # the label of a token that carries no loss (transformers' convention)
CHUNK_ELEMENTS = 2**24  # fp32 logits per chunk: 64 MiB, whatever the vocabulary

# transformers config fields that change the logits after the head (softcapping, scaling): with any of
# them set, the model's own forward is used.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) against labels; only `hidden` gets a gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp_min(1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        safe = labels.clamp_min(0)
        for start in range(0, hidden.shape[0], chunk):
            h, y, ok = hidden[start:start + chunk], safe[start:start + chunk], valid[start:start + chunk]
            z = (h @ weight.t()).float()  # (c, vocab): the head in the compute dtype, then fp32 as transformers
            picked = z.gather(1, y[:, None]).squeeze(1)
            # logsumexp in place: torch.logsumexp would allocate another chunk-sized buffer inside the op
            top = z.amax(dim=-1)
            z.sub_(top[:, None]).exp_()
            norm = z.sum(dim=-1)
            total = total + ((norm.log() + top - picked) * ok).sum()
            if grad is not None:
                z.div_(norm[:, None])  # softmax
                z.scatter_add_(1, y[:, None], -ok[:, None].float())  # minus the one-hot of the label
                z.mul_(ok[:, None])
                grad[start:start + chunk] = z.to(weight.dtype) @ weight
            del z
        if grad is not None:
            grad.div_(count.to(grad.dtype))
            ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of hidden (tokens, h) @ weight.T (vocab, h) against labels (tokens,), -100 ignored.

    Memory beyond the inputs: the gradient for `hidden` (same size) and one chunk of fp32 logits.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy is for a frozen output head: its weight must not require grad")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)


def fused_loss_supported(model: nn.Module) -> bool:
    """Whether causal_lm_loss can skip the logits: a plain, frozen, bias-free linear head on the
    decoder's last hidden state, and no logit transform in the config."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return False
    if decoder_of(model) is None:
        return False
    text = model.config.get_text_config()
    return not any(getattr(text, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS)


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder under a causal LM's head (transformers' get_decoder), or None where there is none."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    inner = decoder.get_output_embeddings() if hasattr(decoder, "get_output_embeddings") else None
    return None if inner is not None else decoder  # a "decoder" with a head is the whole LM again


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks of the decoder (`layers` in most families, `h` in GPT-2's), or None."""
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], chunk: int | None = None) -> Tensor:
    """The next-token loss transformers' `model(**batch).loss` gives, without materialising the logits
    when the model allows it (`fused_loss_supported`); otherwise the model's own forward."""
    if not fused_loss_supported(model):
        return model(**batch).loss
    if hasattr(model, "qlora_fused_loss"):  # sharded by FSDP2: the same, inside the root's gather hooks
        return model.qlora_fused_loss(batch, chunk)
    return fused_causal_lm_loss(model, batch, chunk)


def fused_causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], chunk: int | None = None) -> Tensor:
    """causal_lm_loss's fused path: the decoder, then head and cross-entropy in chunks."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder_of(model)(**inputs, use_cache=False)[0]  # (batch, seq, h)
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return linear_cross_entropy(hidden.flatten(0, 1), model.get_output_embeddings().weight, shifted.flatten(), chunk)
