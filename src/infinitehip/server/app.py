"""OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine.sampling import SamplingParams
from .scheduler import EngineFailure, Job, QueueFull, Runner, Scheduler, Unavailable
from .schema import UNION_TAGS, ChatRequest, CompletionRequest, Sampling

log = logging.getLogger("infinitehip.server")


class Engine(Runner, Protocol):
    """What the server needs from a loaded model (see ``server.engine.ModelEngine``): a tokenizer
    front and the continuous-batching runner the scheduler drives (``add`` takes the tokens)."""

    model_id: str
    max_context: int

    def tokenize(self, text: str) -> list[int]: ...
    def render_chat(self, messages: list[dict]) -> list[int]: ...


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


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
        where = ".".join(str(p) for p in first.get("loc", ())[1:] if p not in UNION_TAGS) or None
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", None)
        return _error(400, f"{where or 'body'}: {first.get('msg')}", where)

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        # Starlette's own errors (an unknown path, a wrong method, a body FastAPI cannot decode:
        # its only 400 here) were {"detail": ...}, not OpenAI's shape.
        message = "the request body is not valid JSON (send UTF-8 text)" if e.status_code == 400 else str(e.detail)
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        response = _error(e.status_code, message, None, kind)
        response.headers.update(e.headers or {})   # a 405's Allow
        return response

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

    def _model_card():
        return {"id": engine.model_id, "object": "model", "owned_by": "infinitehip"}

    def _check_model(model: str, param: str | None):
        if model != engine.model_id:
            raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists {engine.model_id!r}",
                           param, "model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model:path}")   # :path: ids such as org/name hold a slash
    async def retrieve_model(model: str):
        _check_model(model, None)
        return _model_card()

    # Tokenized here, once, in a thread (a long document takes seconds): tokenized again by the
    # worker, as it was, it stalled every running request meanwhile.
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model, "model")
        ids = req.prompt if isinstance(req.prompt, list) else await asyncio.to_thread(engine.tokenize, req.prompt)
        check = getattr(engine, "check_ids", None)   # here: the worker's check came after a stream's 200
        if ids is req.prompt and ids and check is not None:
            try:
                check(ids)
            except ValueError as e:
                raise APIError(400, str(e), "prompt") from None
        return await _serve(req, ids, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(req.model, "model")
        try:
            messages = [m.rendered() for m in req.messages]
            prompt = await asyncio.to_thread(engine.render_chat, messages)
        except ValueError as e:  # e.g. a model without a chat template
            raise APIError(400, f"{e}; or send the text to /v1/completions", "messages") from None
        return await _serve(req, prompt, "chat.completion", request)

    async def _serve(req: Sampling, prompt: list[int], kind: str, request: Request):
        n_prompt = len(prompt)
        if n_prompt == 0:  # refused here, not by the worker: a stream would get it after its 200
            raise APIError(400, "empty prompt: it has no tokens (this tokenizer adds no BOS); send some text",
                           "prompt" if kind == "text_completion" else "messages")
        max_tokens = req.max_tokens if req.max_tokens is not None else req.DEFAULT_MAX_TOKENS
        if max_tokens is None:   # as many as fit
            if n_prompt >= engine.max_context:
                raise APIError(400, f"the prompt ({n_prompt} tokens) fills this server's capacity of "
                               f"{engine.max_context} tokens, leaving none to answer with; shorten it", "messages")
            max_tokens = engine.max_context - n_prompt
        if n_prompt + max_tokens > engine.max_context:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds this "
                           f"server's capacity of {engine.max_context} tokens; shorten the prompt or lower "
                           "max_tokens", "max_tokens")
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
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
        except ValueError as e:  # the engine refused the input (e.g. ids beyond the model's vocabulary)
            raise APIError(400, str(e)) from None
        except Unavailable as e:
            raise APIError(503, str(e), None, "server_error") from None
        except EngineFailure as e:  # already logged by the scheduler, with its traceback
            raise APIError(500, f"{e}; see the server log", None, "server_error") from None
        finally:
            watch.cancel()
            job.cancelled.set()
        return _body(rid, kind, req.model, text, finish, usage=(n_prompt, n_out))

    async def _sse(job: Job, rid, kind, req: Sampling, n_prompt: int, request: Request):
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
        except Exception as e:   # after the 200: an error event, in the shape of the others
            if not isinstance(e, (ValueError, Unavailable, EngineFailure)):
                log.exception("stream failed")
            message = str(e) if isinstance(e, (ValueError, Unavailable)) else "internal server error"
            etype = "invalid_request_error" if isinstance(e, ValueError) else "server_error"
            yield _event({"error": {"message": message, "type": etype, "param": None, "code": None}})
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
