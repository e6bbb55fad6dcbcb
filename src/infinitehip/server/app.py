"""OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Iterator, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from .scheduler import QueueFull, Scheduler

log = logging.getLogger("infinitehip.server")


class Engine(Protocol):
    """What the server needs from a loaded model (see ``server.engine.ModelEngine``)."""

    model_id: str
    max_context: int

    def render_chat(self, messages: list[dict]) -> str | list[int]: ...
    def count_tokens(self, prompt: str | list[int]) -> int: ...
    def stream(self, prompt: str | list[int], *, max_tokens: int, temperature: float, top_p: float,
               seed: int | None, stop: list[str], cancelled) -> Iterator[tuple[str, int]]:
        """Yields (text piece, tokens generated so far)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class _Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


def create_app(engine: Engine, *, max_queue: int = 64) -> FastAPI:
    app = FastAPI(title="infinitehip")
    scheduler = Scheduler(max_queue)
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
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "owned_by": "infinitehip"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _serve(req, req.prompt, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prompt = engine.render_chat([m.model_dump() for m in req.messages])
        return await _serve(req, prompt, "chat.completion", request)

    async def _serve(req: _Sampling, prompt: str | list[int], kind: str, request: Request):
        if req.model != engine.model_id:
            raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models lists {engine.model_id!r}",
                           "model", "model_not_found")
        n_prompt = await asyncio.to_thread(engine.count_tokens, prompt)
        if n_prompt + req.max_tokens > engine.max_context:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds this "
                           f"server's capacity of {engine.max_context} tokens; shorten the prompt or lower "
                           "max_tokens", "max_tokens")
        try:
            job = scheduler.submit(lambda cancelled: engine.stream(
                prompt, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                seed=req.seed, stop=req.stop, cancelled=cancelled))
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", None, "rate_limit_exceeded") from None
        rid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_sse(job, rid, kind, req, request), media_type="text/event-stream")
        text, n_out = "", 0
        try:
            for piece, n_out in await asyncio.to_thread(lambda: list(job.results())):
                text += piece
        except ValueError as e:  # the engine refused the input (e.g. too long once tokenized)
            raise APIError(400, str(e)) from None
        finish = "length" if n_out >= req.max_tokens else "stop"
        return _body(rid, kind, req.model, text, finish, usage=(n_prompt, n_out))

    async def _sse(job, rid, kind, req: _Sampling, request: Request):
        model, pieces = req.model, job.results()
        n_out = 0
        try:
            while True:
                item = await asyncio.to_thread(next, pieces, None)
                if item is None:
                    break
                piece, n_out = item
                yield _event(_body(rid, kind, model, piece, None, chunk=True))
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
            finish = "length" if n_out >= req.max_tokens else "stop"
            yield _event(_body(rid, kind, model, "", finish, chunk=True))
            yield "data: [DONE]\n\n"
        except Exception:
            job.cancelled.set()
            log.exception("stream failed")
            yield _event({"error": {"message": "internal server error", "type": "server_error"}})
        finally:
            job.cancelled.set()

    app.router.on_shutdown.append(scheduler.close)
    return app


def _body(rid, kind, model, text, finish, usage=None, chunk=False):
    chat = kind.startswith("chat")
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta" if chunk else "message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = {"id": rid, "object": kind + (".chunk" if chunk and chat else ""), "created": int(time.time()),
            "model": model, "choices": [choice]}
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
