"""One request's way from logits to text: its sampling parameters, the token drawn for it, and the text its tokens
make (detokenized a few tokens at a time, cut at stop strings, held back from a stream while it may still end in
one). The engine (engine.py) batches requests; this module sees one at a time.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How one request is continued."""

    max_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None  # same seed, same sample, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # strings that end the text (not included in it)
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end it, besides end-of-sequence
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k == -1:  # vLLM's "all"
            self.top_k = 0
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: all tokens)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be integers")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be non-empty strings")


@dataclass
class Event:
    """What a request's sink receives: new text, and at the end the reason it finished."""

    request: Request
    text: str
    finish_reason: str | None = None  # 'stop', 'length', 'cancelled' or 'error: ...'


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    adapter: str | None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


_ids = itertools.count(1)
CONTEXT_TOKENS = 5
GREEDY_BELOW = 1e-5  # a temperature this low is greedy (as vLLM has it): dividing by it overflows


class Request:
    """One prompt being continued (made by `Engine.submit`): its parameters, its tokens, its text so far."""

    def __init__(self, prompt_ids: list[int], adapter: str | None, adapter_id: int, params: SamplingParams,
                 sink: Callable[[Event], None] | None):
        self.id = f"req-{next(_ids)}"
        self.prompt_ids, self.adapter, self.adapter_id, self.params = prompt_ids, adapter, adapter_id, params
        self.sink = sink
        self.out_ids: list[int] = []  # generated, a final end-of-sequence or stop token included
        self.text = ""  # the text so far, cut at a stop string
        self.emitted = 0  # characters of `text` already sent to the sink
        # incremental detokenization: a few prompt tokens before the output (so its first piece keeps the space a
        # tokenizer marks on the token), and the window of ids [prefix, read) whose text is already in `text`
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.t_submit, self.t_first, self.t_done = time.perf_counter(), None, None
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2 ** 63)
        self.generator = None if params.temperature < GREEDY_BELOW else torch.Generator().manual_seed(seed % 2 ** 64)

    def take(self, token: int, tokenizer, eos: set[int]) -> tuple[str, str | None]:
        """One generated token: (the text it lets the sink have, the finish reason or None)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.out_ids.append(token)
        p = self.params
        finish = "stop" if (token in eos and not p.ignore_eos) or token in p.stop_token_ids else None
        if finish is None:
            self.ids.append(token)
        before = len(self.text)
        self._detokenize(tokenizer, last=finish is not None or len(self.out_ids) >= p.max_tokens)
        cut = min((at for s in p.stop if (at := self.text.find(s, max(0, before - len(s) + 1))) >= 0), default=-1)
        if cut >= 0:
            self.text, finish = self.text[:cut], "stop"
        elif finish is None and len(self.out_ids) >= p.max_tokens:
            finish = "length"
        hold = 0
        if finish is None:  # a tail that may grow into a stop string waits
            hold = max((k for s in p.stop for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                        if self.text.endswith(s[:k])), default=0)
        upto = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta, finish

    def _detokenize(self, tokenizer, last: bool) -> None:
        """Append to `text` what the newest tokens add, once it is whole: decoding a short window (the tokens since
        the last piece, after the ones before it for context) costs the same at any length, and a piece ending in
        a character split across tokens (U+FFFD) waits for the rest of its bytes, unless it is the last."""
        done = tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(done) and (last or not now.endswith("\ufffd")):
            self.text += now[len(done):]
            self.prefix, self.read = self.read, len(self.ids)

    def completion(self) -> Completion:
        return Completion(self.text, list(self.out_ids), self.finish_reason or "", len(self.prompt_ids), self.adapter)


def sample(logits: Tensor, reqs: list[Request]) -> list[int]:
    """One token for each row of (B, vocab) logits, by its request's parameters (argmax for greedy rows)."""
    tokens = logits.argmax(-1).tolist()  # greedy rows
    for i, r in enumerate(reqs):
        if r.generator is None:
            continue
        p, x = r.params, logits[i].double()
        if p.top_k:
            x[x < x.topk(min(p.top_k, x.numel())).values[-1]] = -math.inf
        probs = torch.softmax((x - x.max()) / p.temperature, dim=-1)  # the largest is exp(0): nothing overflows
        if p.min_p:
            probs[probs < p.min_p * probs.max()] = 0
        if p.top_p < 1:
            q, order = probs.sort(descending=True)
            q[q.cumsum(0) - q >= p.top_p * q.sum()] = 0  # tokens past the nucleus
            probs = torch.zeros_like(probs).scatter_(0, order, q)
        tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
    return tokens
