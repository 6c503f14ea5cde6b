"""Evaluation: held-out perplexity, logits at the scored positions, and a greedy sample."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import Sequences, pad_id
from .loss import IGNORE_INDEX


def perplexity(model: nn.Module, seqs: Sequences, batch_size: int, limit: int = 0) -> float:
    """exp(mean next-token loss) over the labelled tokens of the first `limit` sequences (0: all)."""
    return score(model, seqs, batch_size, limit)[0]


@torch.no_grad()
def score(model: nn.Module, seqs: Sequences, batch_size: int, limit: int = 0,
          keep_logits: bool = False) -> tuple[float, torch.Tensor | None]:
    """Perplexity as above, and with keep_logits the fp32 logits at the scored positions, (tokens, vocab)."""
    was_training = model.training
    model.eval()
    n = len(seqs) if limit <= 0 else min(limit, len(seqs))
    total, count, kept = 0.0, 0, []
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        batch = {k: v.to(device) for k, v in seqs.select(slice(i, min(i + batch_size, n))).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten()
        total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
        if keep_logits:
            kept.append(logits[labels != IGNORE_INDEX].cpu())
    model.train(was_training)
    return math.exp(total / max(count, 1)), (torch.cat(kept) if keep_logits else None)


@torch.no_grad()
def sample(model: nn.Module, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy continuation (uses no randomness, so it never disturbs a run's RNG)."""
    was_training = model.training
    model.eval()
    ids = prompt_ids.to(next(model.parameters()).device)[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id(tokenizer))
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
