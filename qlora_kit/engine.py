"""Generation for many requests at once, on one base with many adapters: the engine the server drives.

Each `step()` admits waiting requests (their prompts prefilled together, left-padded), then decodes one token
for every running request, each row with its own adapter (see multi_lora). The KV cache holds one row per
running request: a request that arrives joins the running batch (its cache is padded on the left to the
batch's length), and one that finishes leaves it, and the columns no row needs any more are cut off.

Threads: `start()` runs the steps on a background thread; `submit` and `cancel` may be called from any thread.
Loading and unloading adapters wait for the step in progress, so a running request never sees a half-made
change; an unloaded adapter's factors stay until no accepted request uses them.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .data import pad_id
from .multi_lora import AdapterBank, AdapterInfo
from .sampling import Completion, Event, Request, SamplingParams, sample

log = logging.getLogger("qlora_kit.serve")


class UnknownAdapter(KeyError):
    """A request named an adapter that is not loaded."""

    def __str__(self) -> str:
        return f"adapter {self.args[0]!r} is not loaded"


class Engine:
    """Continuous batching over one quantized base with many named adapters.

    Args:
        model: the base, from `load_quantized`, without LoRA layers.
        tokenizer: its tokenizer.
        max_batch: requests decoded together at most; more wait their turn.
        adapter_dtype: the dtype adapters are kept in (see AdapterBank).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 16, adapter_dtype: torch.dtype = torch.float32):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bank = AdapterBank(model, adapter_dtype)
        self.max_batch = max_batch
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context = getattr(cfg, "max_position_embeddings", None)
        self.eos = _eos_ids(model, tokenizer)
        # transformers >= 5.2x calls the KV cache `cache`, earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.pad = pad_id(tokenizer)  # what left padding holds (masked out)
        self._check_cache()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._retired: list[AdapterInfo] = []  # unloaded, factors kept while accepted requests use them
        self._cache: DynamicCache | None = None
        self._mask = self._pos = self._last = None  # (B, L) attention mask; (B,) next position, last token
        self._queue = threading.Condition()  # guards `waiting`; wakes the loop
        self._state = threading.RLock()  # held through a step, and by adapter changes
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _check_cache(self) -> None:
        """Refuse, before serving, a model whose generation state is not a key-value cache of attention layers
        (Mamba's, linear attention's): joining and leaving the batch cut the cache by rows and columns."""
        cache, why = DynamicCache(), ""
        ids = torch.tensor([[self.pad]], device=self.bank.device)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids),
                           use_cache=True, **{self._cache_arg: cache})
            ok = bool(cache.layers) and all(type(c) is DynamicLayer and c.is_initialized for c in cache.layers)
        except Exception as e:
            ok, why = False, f" ({' '.join(str(e).split())[:120]})"
        if not ok:
            raise ValueError(f"{type(self.model).__name__} keeps a generation state other than an attention "
                             f"key-value cache{why}; serving supports attention decoders")

    # ---- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, path) -> AdapterInfo:
        """Make a PEFT adapter folder resident under `name`: read while generation goes on, installed between
        steps. Raises ValueError, as AdapterBank.load."""
        prepared = self.bank.prepare(name, path)
        with self._state:
            return self.bank.install(prepared)

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Forget `name`; its factors go once no accepted request uses them. Raises UnknownAdapter."""
        with self._state, self._queue:
            if name not in self.bank:
                raise UnknownAdapter(name)
            info = self.bank.detach(name)
            self._retired.append(info)
            self._free_retired()
            return info

    def adapters(self) -> list[AdapterInfo]:
        return list(self.bank.adapters.values())

    def _free_retired(self) -> None:
        used = {r.adapter_id for r in itertools.chain(self.running, self.waiting)}
        for info in [i for i in self._retired if i.id not in used]:
            self.bank.free(info)
            self._retired.remove(info)

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        return list(prompt)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template; use completions with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def submit(self, prompt: str | list[int], adapter: str | None = None, params: SamplingParams | None = None,
               sink: Callable[[Event], None] | None = None) -> Request:
        """Queue a prompt (text, or token ids) for `adapter` (None: the base alone).

        Raises:
            UnknownAdapter: the adapter is not loaded.
            ValueError: an empty prompt, a bad token id, or a prompt plus max_tokens beyond the model's context.
        """
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.get_input_embeddings().num_embeddings
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if self.context and len(ids) + params.max_tokens > self.context:
            raise ValueError(f"the prompt's {len(ids)} tokens plus max_tokens={params.max_tokens} exceed the "
                             f"model's context of {self.context} tokens")
        with self._queue:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            try:
                adapter_id = self.bank.id_of(adapter)
            except KeyError:
                raise UnknownAdapter(adapter) from None
            req = Request(ids, adapter, adapter_id, params, sink)
            self.waiting.append(req)
            self._queue.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client that went away); its row is freed at the next step."""
        req.cancelled = True
        with self._queue:
            self._queue.notify()

    def generate(self, prompts: list[str | list[int]], adapters: list[str | None] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Continue every prompt, prompt i with adapters[i]; all are batched together."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter names")
        params = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.submit(p, a, s) for p, a, s in zip(prompts, adapters, params, strict=True)]
        self._wait(reqs)
        return [r.completion() for r in reqs]

    def stream(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt, adapter, params, sink=events.put)
        try:
            while True:
                if self._thread is None:
                    while events.empty() and not req.done.is_set():
                        self.step()
                event = events.get()
                if event.text:
                    yield event.text
                if event.finish_reason:
                    return
        finally:
            if not req.done.is_set():
                self.cancel(req)

    def _wait(self, reqs: list[Request]) -> None:
        if self._thread is None:  # no background loop: step here
            while not all(r.done.is_set() for r in reqs):
                self.step()
        for r in reqs:
            r.done.wait()

    # ---- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the steps on a background thread until `stop()`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="qlora-kit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the background thread; requests still open end with finish_reason 'cancelled'."""
        with self._queue:
            self._stopping = True
            self._queue.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._state:
            for req in [*self.running, *self.waiting]:
                self._finish(req, "cancelled")
            self.waiting.clear()
            self._reset()

    def _loop(self) -> None:
        while True:
            with self._queue:
                while not self._stopping and not self.waiting and not self.running:
                    self._queue.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # its requests have ended with the error; keep serving the others
                log.exception("generation step failed")

    def step(self) -> bool:
        """Admit waiting requests, decode one token for every running one. Returns whether work remains."""
        with self._state:
            self._drop([r for r in self.running if r.cancelled])
            with self._queue:
                for r in [r for r in self.waiting if r.cancelled]:
                    self.waiting.remove(r)
                    self._finish(r, "cancelled")
                room = self.max_batch - len(self.running)
                admit = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                if admit:
                    self._prefill(sorted(admit, key=lambda r: r.adapter_id))  # rows grouped by adapter
                if self.running:
                    self._decode()
            except Exception as e:  # a bug, or out of memory: what was admitted or running ends with the error
                for req in [*admit, *self.running]:
                    self._finish(req, f"error: {' '.join(str(e).split())[:200]}")
                self._reset()
                raise
            finally:
                self._free_retired()
            return bool(self.running or self.waiting)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, adapter_ids: list[int], cache: DynamicCache) -> Tensor:
        device = self.bank.device
        with torch.no_grad(), self.bank.rows(adapter_ids):
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1].float().cpu()  # (B, vocab)

    def _prefill(self, reqs: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row's last token is in the last column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        adapter_ids = [r.adapter_id for r in reqs]
        logits = self._forward(ids, mask, pos, adapter_ids, cache)
        tokens = sample(logits, reqs)
        finished = [r for r, t in zip(reqs, tokens, strict=True) if self._emit(r, t)]
        self._join(cache, mask, pos[:, -1] + 1, torch.tensor(tokens), reqs)
        self._drop(finished, finished=True)  # done at their first token: they leave at once

    def _join(self, cache: DynamicCache, mask: Tensor, pos: Tensor, last: Tensor, reqs: list[Request]) -> None:
        """Put freshly prefilled rows into the running batch, padding the shorter cache on the left."""
        if not self.running:
            self._cache, self._mask, self._pos, self._last, self.running = cache, mask, pos, last, list(reqs)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])
        self._pos, self._last = torch.cat([self._pos, pos]), torch.cat([self._last, last])
        self.running += reqs
        order = sorted(range(len(self.running)), key=lambda i: self.running[i].adapter_id)
        if order != list(range(len(self.running))):  # rows grouped by adapter: one run of rows per adapter
            self._select(order)

    def _decode(self) -> None:
        mask = torch.cat([self._mask, torch.ones((len(self.running), 1), dtype=torch.long)], dim=1)
        adapter_ids = [r.adapter_id for r in self.running]
        logits = self._forward(self._last[:, None], mask, self._pos[:, None], adapter_ids, self._cache)
        self._mask, self._pos = mask, self._pos + 1
        tokens = sample(logits, self.running)
        self._last = torch.tensor(tokens)
        self._drop([r for r, t in zip(self.running, tokens, strict=True) if self._emit(r, t)], finished=True)

    def _drop(self, reqs: list[Request], finished: bool = False) -> None:
        """Take rows out of the running batch (finished, or cancelled) and cut the cache columns none needs."""
        if not reqs:
            return
        gone = {id(r) for r in reqs}
        for r in reqs:
            if not finished:
                self._finish(r, "cancelled")
        keep = [i for i, r in enumerate(self.running) if id(r) not in gone]
        if not keep:
            self._reset()
            return
        self._select(keep)

    def _select(self, rows: list[int]) -> None:
        """Keep these rows of the running batch, in this order, and cut the cache columns none of them needs."""
        index = torch.tensor(rows)
        self.running = [self.running[i] for i in rows]
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns left of every row's first token hold nothing
        self._mask, self._pos, self._last = mask[:, first:], self._pos[index], self._last[index]
        for layer in self._cache.layers:
            i = index.to(layer.keys.device)
            layer.keys, layer.values = layer.keys[i, :, first:], layer.values[i, :, first:]

    def _reset(self) -> None:
        self.running, self._cache, self._mask, self._pos, self._last = [], None, None, None, None

    # ---- tokens -> text ------------------------------------------------------------------------
    def _emit(self, req: Request, token: int) -> bool:
        """Take one generated token: send the text it completes to the sink. Returns whether the request is done."""
        delta, finish = req.take(token, self.tokenizer, self.eos)
        if finish:
            self._finish(req, finish, delta)
        elif delta and req.sink is not None:
            req.sink(Event(req, delta))
        return finish is not None

    def _finish(self, req: Request, reason: str, delta: str = "") -> None:
        if req.done.is_set():
            return
        req.finish_reason, req.t_done = reason, time.perf_counter()
        if req.sink is not None:
            req.sink(Event(req, delta, reason))
        req.done.set()
        took = req.t_done - req.t_submit
        first = f", first token {req.t_first - req.t_submit:.2f}s" if req.t_first else ""
        log.info("%s %s: %d prompt + %d generated tokens in %.2fs%s, %.1f tokens/s, %s", req.id,
                 req.adapter or "base", len(req.prompt_ids), len(req.out_ids), took, first,
                 len(req.out_ids) / max(took, 1e-9), reason)


def _pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids |= set(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids
