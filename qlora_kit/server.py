"""An OpenAI-compatible HTTP server over the engine: one base, many adapters, continuous batching.

    GET  /v1/models                 the base and every loaded adapter
    POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions       {"model", "messages", ...}
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}     (vLLM's names)
    POST /v1/unload_lora_adapter    {"lora_name"}
    GET  /health                    running and waiting requests, resident adapters

A request's `model` picks the adapter: an adapter's name, or the base's name for none. Errors are OpenAI's
JSON shape: 404 for an unknown model, 400 for a malformed request. Streams are server-sent events; a client
that goes away frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .config import one_line
from .engine import Engine, Event, SamplingParams, UnknownAdapter, log

# fields OpenAI defines that this server does not act on: refused unless they hold the value that changes nothing
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "best_of": 1, "repetition_penalty": 1, "logit_bias": None,
           "suffix": None, "tools": None, "functions": None, "tool_choice": None, "top_logprobs": None,
           "response_format": None, "min_tokens": 0, "use_beam_search": False, "length_penalty": 1,
           "include_stop_str_in_output": False, "skip_special_tokens": True, "guided_json": None, "guided_regex": None,
           "guided_choice": None, "guided_grammar": None, "bad_words": None, "allowed_token_ids": None,
           "prompt_logprobs": None, "truncate_prompt_tokens": None, "logits_processors": None}
# fields that change nothing here, taken silently (others are taken with a log line naming them, as vLLM does)
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities", "stream_options"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server need not act on

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)  # None: 1, as OpenAI's
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None  # vLLM's extensions: top_k, min_p, stop_token_ids
    min_p: float | None = Field(default=None, ge=0, le=1)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension, for benchmarks


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


class LoadBody(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadBody(BaseModel):
    lora_name: str = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def create_app(engine: Engine, base_name: str) -> FastAPI:
    """The FastAPI app serving `engine`; its background loop runs while the app does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="qlora-kit", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'malformed request')}", where)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.code)

    def adapter_for(model: str) -> str | None:
        if model == base_name:
            return None
        if model not in engine.bank:
            raise ApiError(404, f"The model `{model}` does not exist (loaded: {', '.join(_names(engine, base_name))})",
                           "model", "model_not_found")
        return model

    def params_for(body: _Body, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if body.n != 1:
            raise ApiError(400, f"n={body.n}: only n=1 is supported", "n")
        ignored = []
        for key, value in (body.model_extra or {}).items():
            if key in NEUTRAL:
                if value not in (None, NEUTRAL[key]) and not (key == "response_format" and value == {"type": "text"}):
                    raise ApiError(400, f"{key}={json.dumps(value)[:60]} is not supported", key)
            elif key not in HARMLESS:
                ignored.append(key)
        if ignored:
            log.warning("request fields ignored: %s", ", ".join(sorted(ignored)))
        if getattr(body, "logprobs", None):
            raise ApiError(400, "logprobs are not supported", "logprobs")
        if getattr(body, "echo", False):
            raise ApiError(400, "echo is not supported", "echo")
        if max_tokens is None:  # as vLLM: what the context leaves
            max_tokens = max(1, (engine.context or prompt_len + 256) - prompt_len)
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                                  top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                                  min_p=body.min_p or 0.0, seed=body.seed, stop=body.stop or [],
                                  stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": base_name, "object": "model", "created": now, "owned_by": "qlora-kit", "root": base_name,
                 "parent": None}]
        data += [{"id": a.name, "object": "model", "created": now, "owned_by": "qlora-kit", "root": a.path,
                  "parent": base_name} for a in engine.adapters()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting),
                "adapters": len(engine.bank.adapters), "adapter_bytes": engine.bank.nbytes()}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody):
        if body.lora_name == base_name:
            raise ApiError(400, f"`{base_name}` is the base model's name; pick another for the adapter", "lora_name")
        try:
            info = await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        except (ValueError, OSError) as e:
            raise ApiError(400, one_line(e), "lora_path") from None
        return {"object": "model", "id": info.name, "root": info.path, "parent": base_name, "rank": info.rank,
                "layers": info.layers, "bytes": info.nbytes}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody):
        try:
            info = await run_in_threadpool(engine.unload_adapter, body.lora_name)
        except UnknownAdapter:
            raise ApiError(404, f"adapter `{body.lora_name}` is not loaded", "lora_name", "model_not_found") from None
        return {"object": "model", "id": info.name, "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        adapter = adapter_for(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ApiError(400, "prompt is empty", "prompt")
        ids = [engine.encode(p) for p in prompts]
        params = [params_for(body, len(i), body.max_tokens if body.max_tokens is not None else 16) for i in ids]
        return await _respond(engine, request, body, adapter, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        adapter = adapter_for(body.model)
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        try:
            ids = engine.chat_prompt(messages)
        except Exception as e:  # no template, or one that refuses these messages
            raise ApiError(400, f"messages: {one_line(e)}", "messages") from None
        params = params_for(body, len(ids), body.max_completion_tokens or body.max_tokens)
        return await _respond(engine, request, body, adapter, [ids], [params], chat=True)

    return app


def _names(engine: Engine, base_name: str) -> list[str]:
    return [base_name] + [a.name for a in engine.adapters()]


def _text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"messages: content parts of type {part.get('type')!r} are not supported", "messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


async def _respond(engine: Engine, request: Request, body: _Body, adapter: str | None, ids: list[list[int]],
                   params: list[SamplingParams], chat: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:  # called on the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    reqs = []
    try:
        for p, s in zip(ids, params, strict=True):
            reqs.append(engine.submit(p, adapter, s, sink))
    except UnknownAdapter:  # unloaded in between
        _cancel(engine, reqs)
        raise ApiError(404, f"The model `{body.model}` does not exist", "model", "model_not_found") from None
    except (ValueError, RuntimeError) as e:
        _cancel(engine, reqs)
        raise ApiError(400 if isinstance(e, ValueError) else 503, str(e)) from None
    index = {r.id: i for i, r in enumerate(reqs)}
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

    def usage() -> dict:
        p, c = sum(len(r.prompt_ids) for r in reqs), sum(len(r.out_ids) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    if not body.stream:
        try:
            finished = 0
            while finished < len(reqs):
                try:
                    finished += bool((await asyncio.wait_for(events.get(), timeout=0.5)).finish_reason)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # nobody to answer: free the rows
                        return JSONResponse({}, 499)
        finally:
            _cancel(engine, [r for r in reqs if not r.done.is_set()])
        failed = next((r for r in reqs if r.finish_reason.startswith("error")), None)
        if failed is not None:
            return _error(500, failed.finish_reason)
        choices = []
        for i, r in enumerate(reqs):
            c = {"index": i, "finish_reason": r.finish_reason, "logprobs": None}
            c.update({"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text})
            choices.append(c)
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": choices,
                "usage": usage()}

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            c = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            c = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                     "model": body.model, "choices": [c]})

    async def stream():
        try:
            if chat:
                yield chunk(0, None, None, first=True)
            open_ = len(reqs)
            while open_:
                event = await events.get()
                finish = event.finish_reason
                if finish and finish.startswith("error"):
                    yield _sse({"error": {"message": finish, "type": "server_error", "param": None, "code": None}})
                    return
                if event.text or finish:
                    yield chunk(index[event.request.id], event.text, finish)
                open_ -= bool(finish)
            if (body.stream_options or {}).get("include_usage"):
                yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                            "model": body.model, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled), or the stream ended
            _cancel(engine, [r for r in reqs if not r.done.is_set()])

    return StreamingResponse(stream(), media_type="text/event-stream")


def _cancel(engine: Engine, reqs) -> None:
    for r in reqs:
        engine.cancel(r)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serve(engine: Engine, base_name: str, host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 5.0,
          on_ready=None) -> None:
    """Run the server until SIGINT or SIGTERM; open requests get `graceful_s` seconds to finish. `on_ready()` is
    called once the socket is listening."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM:  # a service manager's stop: shut down and return, exit status 0
                self.should_exit = True
                return
            super().handle_exit(sig, frame)  # Ctrl-C: shut down, then re-raised as KeyboardInterrupt

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(create_app(engine, base_name), host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=graceful_s)
    Server(config).run()
