"""OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ..engine.sampling import SamplingParams
from .scheduler import EngineFailure, Job, QueueFull, Runner, Scheduler, Unavailable

log = logging.getLogger("infinitehip.server")


class Engine(Runner, Protocol):
    """What the server needs from a loaded model (see ``server.engine.ModelEngine``): a tokenizer
    front and the continuous-batching runner the scheduler drives."""

    model_id: str
    max_context: int

    def render_chat(self, messages: list[dict]) -> str | list[int]: ...
    def count_tokens(self, prompt: str | list[int]) -> int: ...


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# OpenAI fields this server does not implement, with the values that ask for nothing (clients
# send those); any other value, and any field not known at all, is a 400 rather than silently
# ignored (a client asking n=2 would read a missing choices[1]).
_NEUTRAL = {"n": (1,), "best_of": (1,), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (False,),
            "suffix": (None, ""), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
            "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none")}


def _unicode(text: str) -> str:
    # JSON's \ud800 escape decodes to a lone surrogate, which is no Unicode text: the tokenizer
    # raised TypeError on it (a 500), and so did writing an answer that echoed it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a lone surrogate {text[e.start]!r} at character {e.start} is not Unicode text; "
                         "send valid UTF-8 (pair the surrogate or leave it out)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    # Strict like the request itself: a misspelt key or include_usage "yes" would otherwise be
    # an answer without the usage chunk the client asked for.
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False     # a last chunk with usage


class _Sampling(BaseModel):
    # Strict types, as OpenAI's API: "5" or true for max_tokens, "yes" for stream were converted
    # (a client with a bug got an answer instead of the error that would show it).
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int = Field(16, ge=1, le=1 << 20, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, strict=True)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _openai_fields(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data.pop("user", None)                           # an end-user id, for the provider's logs
        if "max_completion_tokens" in data:              # chat's newer name for max_tokens
            data.setdefault("max_tokens", data.pop("max_completion_tokens"))
        for name, neutral in _NEUTRAL.items():
            if name in data and data.pop(name) not in neutral:
                raise ValueError(f"{name} is not supported by this server: leave it out (or send {neutral[0]!r})")
        return data

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:  # as OpenAI's API: nothing would read them
            raise ValueError("stream_options is only allowed when stream is true: leave it out or send stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: Text


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


def create_app(engine: Engine, *, max_queue: int = 64) -> FastAPI:
    app = FastAPI(title="infinitehip")
    scheduler = Scheduler(engine, max_queue)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", None)
        return _error(400, f"{where or 'body'}: {first.get('msg')}", where)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("internal error")
        return _error(500, "internal server error; see the server log", None, "server_error")

    @app.get("/health")
    async def health():
        if scheduler.alive:
            return {"status": "ok"}
        return JSONResponse(status_code=503, content={"status": "unavailable"})

    @app.get("/metrics")
    async def metrics():
        """Queue, batching and context-caching counters (JSON)."""
        body = {"scheduler": {"alive": scheduler.alive, "outstanding": scheduler.outstanding,
                              "limit": scheduler.limit, "max_queue": max_queue}}
        if hasattr(engine, "metrics"):
            body.update(engine.metrics())
        return body

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "owned_by": "infinitehip"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _serve(req, req.prompt, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:  # in a thread, as count_tokens: tokenizing a long document takes seconds
            prompt = await asyncio.to_thread(engine.render_chat, [m.model_dump() for m in req.messages])
        except ValueError as e:  # e.g. a model without a chat template
            raise APIError(400, f"{e}; or send the text to /v1/completions", "messages") from None
        return await _serve(req, prompt, "chat.completion", request)

    async def _serve(req: _Sampling, prompt: str | list[int], kind: str, request: Request):
        if req.model != engine.model_id:
            raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models lists {engine.model_id!r}",
                           "model", "model_not_found")
        n_prompt = await asyncio.to_thread(engine.count_tokens, prompt)
        if n_prompt == 0:  # refused here, not by the worker: a stream would get it after its 200
            raise APIError(400, "empty prompt: it has no tokens (this tokenizer adds no BOS); send some text",
                           "prompt" if kind == "text_completion" else "messages")
        if n_prompt + req.max_tokens > engine.max_context:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds this "
                           f"server's capacity of {engine.max_context} tokens; shorten the prompt or lower "
                           "max_tokens", "max_tokens")
        try:
            params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    seed=req.seed, stop=tuple(req.stop))
            job = scheduler.submit(prompt, params, asyncio.get_running_loop())
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", None, "rate_limit_exceeded") from None
        except Unavailable as e:
            raise APIError(503, f"{e}", None, "server_error") from None
        rid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_sse(job, rid, kind, req, n_prompt, request), media_type="text/event-stream")
        text, n_out, finish = "", 0, "stop"
        # Watched all along, not only between tokens: a client that leaves while its request
        # waits for a slot frees its place then, instead of being prefilled for nobody.
        watch = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            async for e in job.aresults():
                text, n_out, finish = text + e.text, e.n_generated, e.finish_reason or finish
        except ValueError as e:  # the engine refused the input (e.g. too long once tokenized)
            raise APIError(400, str(e)) from None
        except Unavailable as e:
            raise APIError(503, str(e), None, "server_error") from None
        except EngineFailure as e:  # already logged by the scheduler, with its traceback
            raise APIError(500, f"{e}; see the server log", None, "server_error") from None
        finally:
            watch.cancel()
            job.cancelled.set()
        return _body(rid, kind, req.model, text, finish, usage=(n_prompt, n_out))

    async def _sse(job: Job, rid, kind, req: _Sampling, n_prompt: int, request: Request):
        model, n_out, finish = req.model, 0, "stop"
        try:
            async for e in job.aresults():
                n_out, finish = e.n_generated, e.finish_reason or finish
                if e.text:
                    yield _event(_body(rid, kind, model, e.text, None, chunk=True))
                if await request.is_disconnected():
                    return
            yield _event(_body(rid, kind, model, "", finish, chunk=True))
            if req.stream_options and req.stream_options.include_usage:
                yield _event(_body(rid, kind, model, None, None, usage=(n_prompt, n_out), chunk=True))
            yield "data: [DONE]\n\n"
        except Exception as e:
            if not isinstance(e, (ValueError, Unavailable, EngineFailure)):
                log.exception("stream failed")
            message = str(e) if isinstance(e, (ValueError, Unavailable)) else "internal server error"
            yield _event({"error": {"message": message, "type": "server_error"}})
        finally:  # also when the client disconnects: the worker frees the slot at its next round
            job.cancelled.set()

    app.router.on_shutdown.append(lambda: _shutdown(scheduler, engine))
    return app


async def _cancel_on_disconnect(request: Request, job: Job):
    """Cancel ``job`` once the client disconnects (the body is read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _shutdown(scheduler: Scheduler, engine):
    scheduler.close()
    if hasattr(engine, "metrics"):
        log.info("served: %s", json.dumps(engine.metrics()))


def _body(rid, kind, model, text, finish, usage=None, chunk=False):
    """A response or stream chunk in OpenAI's shape; ``text=None``: no choice (a usage-only chunk)."""
    chat = kind.startswith("chat")
    choices = []
    if text is not None:
        content = {"role": "assistant", "content": text}
        choices = [{"index": 0, "finish_reason": finish,
                    **({("delta" if chunk else "message"): content} if chat else {"text": text})}]
    body = {"id": rid, "object": kind + (".chunk" if chunk and chat else ""), "created": int(time.time()),
            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": usage[0] + usage[1]}
    return body


def _event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error(status, message, param, kind="invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                               "param": param, "code": None}})


__all__ = ["create_app", "APIError", "Engine"]
