"""The OpenAI-compatible HTTP front: every OpenAI client can use the daemon unchanged.

``POST /v1/chat/completions`` (plain, or streamed as server-sent events),
``POST /v1/embeddings`` and ``GET /v1/models`` on a localhost port and/or a Unix
socket, mapped onto the same scheduler as the NDJSON socket. The ``model`` names
the route: ``dispatcher/<class>`` (realtime, bulk, complex, default) for a chat
class, ``dispatcher/embed`` for embeddings, or a provider's own name to pin it.

Resource handling: one aiohttp runner per front; each request is one aiohttp
handler task that submits its job and waits for its one answer. When the client
goes away the handler is cancelled (``handler_cancellation``) and the job is
cancelled upstream. A streamed job's chunks are written to the response from the
provider actor's task, as the socket server does, so a stalled reader is dropped
after ``WRITE_TIMEOUT_S`` instead of holding a provider slot.

Error handling: every failure leaves as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a fitting status and an
``x-should-retry`` header the official clients obey. No authentication: the front
is for local programs; an ``Authorization`` header is accepted, ignored and never
logged (there is no access log at all; jobs are logged by the scheduler).
"""

from __future__ import annotations

import base64
import contextlib
import math
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import anyio
import msgspec
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

from dispatcher.config import HttpConfig
from dispatcher.errors import ClientError, DispatcherError, ErrorCode, InternalError, NoProvider
from dispatcher.ingress.web import WebService
from dispatcher.jobs import Job
from dispatcher.protocol import (
    ChatRequest,
    Chunk,
    EmbedRequest,
    Error,
    RequestDecoder,
    RequestError,
    Result,
    error_reply,
)
from dispatcher.scheduler import Scheduler

log = structlog.get_logger("dispatcher.http")

_R = TypeVar("_R", ChatRequest, EmbedRequest)

MODEL_PREFIX: Final = "dispatcher/"
EMBED_MODEL: Final = "dispatcher/embed"
CHAT_CLASSES: Final = ("realtime", "bulk", "complex", "default")
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
WRITE_TIMEOUT_S: Final = 30.0  # a streaming client that reads nothing for this long is dropped
ANSWER_GRACE_S: Final = 60.0  # the scheduler answers by the job's deadline; this bounds a bug
SHUTDOWN_TIMEOUT_S: Final = 2.0  # handlers still open when the front stops get this long

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()


# -- errors in OpenAI's shape ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    status: int
    type: str
    code: str


# Our stable wire codes, as OpenAI clients expect to see them.
ERROR_SHAPES: Final[Mapping[str, _Shape]] = {
    "bad_request": _Shape(400, "invalid_request_error", "bad_request"),
    "frame_too_large": _Shape(413, "invalid_request_error", "frame_too_large"),
    "unknown_job": _Shape(404, "invalid_request_error", "unknown_job"),
    "no_provider": _Shape(400, "invalid_request_error", "no_provider"),
    "context_too_long": _Shape(400, "invalid_request_error", "context_length_exceeded"),
    "overloaded": _Shape(429, "rate_limit_error", "overloaded"),
    "quota_exhausted": _Shape(429, "insufficient_quota", "quota_exhausted"),
    "upstream_failed": _Shape(502, "api_error", "upstream_failed"),
    "timeout": _Shape(504, "timeout_error", "timeout"),
    "cancelled": _Shape(499, "cancelled", "cancelled"),
    "internal": _Shape(500, "server_error", "internal"),
}


class UnknownModel(NoProvider):
    """The ``model`` names neither a class of ours nor a provider (OpenAI's 404 model_not_found)."""


def error_body(
    code: ErrorCode | str, message: str, *, openai_code: str | None = None
) -> dict[str, Any]:
    shape = ERROR_SHAPES.get(code, ERROR_SHAPES["internal"])
    return {
        "error": {
            "message": message,
            "type": shape.type,
            "param": None,
            "code": openai_code or shape.code,
        }
    }


def error_response(
    code: ErrorCode | str,
    message: str,
    *,
    retryable: bool = False,
    retry_after_s: float | None = None,
    status: int | None = None,
    openai_code: str | None = None,
    job: str | None = None,
) -> web.Response:
    """One error as OpenAI's body, status, ``Retry-After`` and ``x-should-retry``."""
    shape = ERROR_SHAPES.get(code, ERROR_SHAPES["internal"])
    headers = {"x-should-retry": "true" if retryable else "false"}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        headers["retry-after-ms"] = str(max(0, round(retry_after_s * 1000)))
    if job is not None:
        headers["x-request-id"] = job
    status = status or shape.status
    return web.json_response(
        error_body(code, message, openai_code=openai_code),
        status=status,
        reason="Client Closed Request" if status == 499 else None,  # nginx's name for it
        headers=headers,
        dumps=_dumps,
    )


def response_for_error(error: DispatcherError | Error, *, job: str | None = None) -> web.Response:
    if isinstance(error, UnknownModel):
        return error_response(
            error.code, error.message, status=404, openai_code="model_not_found", job=job
        )
    return error_response(
        error.code,
        error.message,
        retryable=bool(error.retryable),
        retry_after_s=error.retry_after_s,
        job=job,
    )


def _dumps(value: Any) -> str:
    return _encoder.encode(value).decode()


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves in OpenAI's error format: ours, aiohttp's (404, 405, 413) and bugs."""
    try:
        return await handler(request)
    except DispatcherError as exc:
        return response_for_error(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(
            "frame_too_large",
            f"the request body is over the front's limit ({exc.text}); "
            "split the work into smaller requests",
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such endpoint {request.path!r}; the front serves /v1/chat/completions, "
            "/v1/embeddings and /v1/models",
            405: f"{request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        openai_code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        return error_response("bad_request", message, status=exc.status, openai_code=openai_code)
    except Exception:
        log.exception("http.internal_error", path=request.path)
        return error_response(
            "internal", "the HTTP front failed on this request; see the daemon's log"
        )


# -- routing by model name ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request's ``model`` sends it: a chat class, or pinned providers."""

    task: str | None = None
    providers: list[str] | None = None


def route_chat(model: str | None, scheduler: Scheduler) -> Route:
    """The chat route for ``model``; a missing model means ``dispatcher/default``."""
    config = scheduler.config
    name = model or f"{MODEL_PREFIX}default"
    if name == "dispatcher":
        name = f"{MODEL_PREFIX}default"
    if name.startswith(MODEL_PREFIX):
        klass = name.removeprefix(MODEL_PREFIX)
        if klass in CHAT_CLASSES and klass in config.classes:
            return Route(task=klass)
        if name == EMBED_MODEL:
            raise ClientError(
                f"{EMBED_MODEL} is the embeddings model; use it with /v1/embeddings, "
                "or a dispatcher/<class> model for chat"
            )
    elif name in config.providers:
        if config.providers[name].kind != "chat":
            raise ClientError(
                f"{name} is an embeddings provider; use it with /v1/embeddings, "
                "or a chat model here"
            )
        return Route(providers=[name])
    raise UnknownModel(f"the model {name!r} does not exist; {_known_models(scheduler, 'chat')}")


def route_embed(model: str | None, scheduler: Scheduler) -> Route:
    """The embeddings route for ``model``; a missing model means ``dispatcher/embed``."""
    config = scheduler.config
    if model in (None, "", "dispatcher", EMBED_MODEL):
        return Route()
    assert model is not None
    provider = config.providers.get(model)
    if provider is not None:
        if provider.kind != "embed":
            raise ClientError(
                f"{model} is a chat provider; use {EMBED_MODEL} or an embeddings provider here"
            )
        return Route(providers=[model])
    if model.startswith(MODEL_PREFIX) and model.removeprefix(MODEL_PREFIX) in CHAT_CLASSES:
        raise ClientError(f"{model} is a chat model; use {EMBED_MODEL} for embeddings")
    raise UnknownModel(f"the model {model!r} does not exist; {_known_models(scheduler, 'embed')}")


def _known_models(scheduler: Scheduler, kind: Literal["chat", "embed"]) -> str:
    names = [m["id"] for m in model_list(scheduler, created=0) if m["kind"] == kind]
    return f"use one of {', '.join(names)}" if names else "no model of that kind is configured"


def model_list(scheduler: Scheduler, *, created: int) -> list[dict[str, Any]]:
    """The models the front offers: our classes, ``dispatcher/embed``, every enabled provider."""
    config, limits = scheduler.config, scheduler.limits
    models: list[dict[str, Any]] = []

    def add(name: str, kind: str, owner: str, **extra: Any) -> None:
        models.append(
            {"id": name, "object": "model", "created": created, "owned_by": owner, "kind": kind}
            | extra
        )

    for klass in CHAT_CLASSES:
        if klass in config.classes:
            add(
                f"{MODEL_PREFIX}{klass}",
                "chat",
                "dispatcher",
                providers=list(config.classes[klass].providers),
            )
    embedders = [n for n, p in config.providers.items() if p.kind == "embed"]
    if embedders:
        add(EMBED_MODEL, "embed", "dispatcher", providers=embedders)
    for name, provider in config.providers.items():
        if name in limits and limits[name].enabled:
            add(name, provider.kind, name, upstream_model=provider.model)
    return models


# -- bodies ---------------------------------------------------------------------------


def completion_body(result: Result, *, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object for a finished chat job."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content or ""}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    return {
        "id": f"chatcmpl-{result.job}",
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": result.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": msgspec.to_builtins(result.usage),
        "dispatcher": _extension(result),
    }


def embeddings_body(result: Result, *, encoding: str) -> dict[str, Any]:
    """An embeddings ``list`` object; ``base64`` packs little-endian float32 as OpenAI does."""
    data = []
    for index, vector in enumerate(result.embeddings or []):
        embedding: list[float] | str = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = result.usage
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {
            "prompt_tokens": usage.prompt_tokens or usage.total_tokens,
            "total_tokens": usage.total_tokens or usage.prompt_tokens,
        },
        "dispatcher": _extension(result),
    }


def _extension(result: Result) -> dict[str, Any]:
    """Non-standard facts about the job; OpenAI clients keep unknown fields and ignore them."""
    return {
        "job": result.job,
        "provider": result.provider,
        "class": result.class_,
        "attempts": result.attempts,
        "latency_ms": result.latency_ms,
        "cached": result.cached,
    }


def chunk_event(
    completion_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any] | None,
    *,
    finish_reason: str | None = None,
    usage: Mapping[str, Any] | None = None,
) -> bytes:
    """One ``chat.completion.chunk`` as an SSE ``data:`` event."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + _encoder.encode(chunk) + b"\n\n"


DONE_EVENT: Final = b"data: [DONE]\n\n"


# -- mapping OpenAI bodies onto our requests --------------------------------------------


def chat_payload(body: Mapping[str, Any], route: Route, request_id: str) -> dict[str, Any]:
    """The ``chat`` request for an OpenAI chat body; refuses what we would silently get wrong."""
    n = body.get("n")
    if n not in (None, 1):
        raise ClientError("n must be 1: the dispatcher returns one choice per request")
    if body.get("tools") or body.get("functions"):
        raise ClientError("tools and functions are not supported by the dispatcher's front")
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in (None, "text"):
        raise ClientError(
            "response_format other than text is not supported; ask for JSON in the prompt"
        )
    if body.get("logprobs"):
        raise ClientError("logprobs are not supported by the dispatcher's front")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    payload: dict[str, Any] = {
        "op": "chat",
        "id": request_id,
        "messages": body.get("messages"),
        "thinking": wants_thinking(body),
        "stream": body.get("stream") or False,
    }
    optional = {
        "task": route.task,
        "providers": route.providers,
        "max_tokens": max_tokens,
        "temperature": body.get("temperature"),
        # non-standard, for clients that pass them through extra_body
        "priority": body.get("priority"),
        "timeout_s": body.get("timeout_s"),
        "cache": body.get("cache"),
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def wants_thinking(body: Mapping[str, Any]) -> bool:
    """``thinking`` (ours: a bool, or zhipu's ``{"type": "enabled"}``) wins; else ``reasoning_effort``."""
    thinking = body.get("thinking")
    if isinstance(thinking, bool):
        return thinking
    if isinstance(thinking, Mapping):
        return thinking.get("type") == "enabled"
    if thinking is not None:
        raise ClientError("thinking must be true, false or {'type': 'enabled'}")
    effort = body.get("reasoning_effort")
    return effort is not None and effort != "none"


def embed_payload(body: Mapping[str, Any], route: Route, request_id: str) -> dict[str, Any]:
    """The ``embed`` request for an OpenAI embeddings body."""
    inputs = body.get("input")
    if isinstance(inputs, list) and any(not isinstance(item, str) for item in inputs):
        raise ClientError(
            "input must be a string or a list of strings; token arrays are not supported"
        )
    if body.get("dimensions") is not None:
        raise ClientError("dimensions is not supported: each embeddings model has a fixed size")
    payload: dict[str, Any] = {"op": "embed", "id": request_id, "input": inputs}
    optional = {
        "providers": route.providers,
        "priority": body.get("priority"),
        "timeout_s": body.get("timeout_s"),
        "cache": body.get("cache"),
    }
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


# -- the front ------------------------------------------------------------------------


class HttpFront:
    """The OpenAI-compatible front over one scheduler. ``__init__`` does no I/O."""

    def __init__(
        self,
        scheduler: Scheduler,
        config: HttpConfig,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        socket_mode: int = 0o660,
        socket_group: str | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.service = WebService(
            self.build_app(),
            name="http",
            listen=config.listen,
            socket_path=config.socket,
            socket_mode=socket_mode,
            socket_group=socket_group,
        )
        self.open_requests = 0

    def __repr__(self) -> str:
        return f"<HttpFront {' '.join(self.service.addresses) or 'not serving'} open {self.open_requests}>"

    async def run(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound addresses (URLs)."""
        await self.service.run(task_status=task_status)

    async def stop_accepting(self) -> None:
        """Close the listeners (drain); requests already open are still answered."""
        await self.service.stop_accepting()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[openai_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        return app

    # -- handlers ----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = model_list(self.scheduler, created=self.created)
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for model in model_list(self.scheduler, created=self.created):
            if model["id"] == name:
                return web.json_response(model, dumps=_dumps)
        raise UnknownModel(f"the model {name!r} does not exist; see GET /v1/models")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw, body = await _read_json(request)
        route = route_chat(_model_name(body), self.scheduler)
        chat = _decode(chat_payload(body, route, _request_id()), ChatRequest)
        created = int(time.time())
        if chat.stream:
            include_usage = _include_usage(body)
            return await self._chat_stream(request, chat, len(raw), created, include_usage)
        job = self._submit(request, chat, len(raw))
        outcome = await self._answer(job)
        if not isinstance(outcome, Result):
            return response_for_error(outcome, job=job.id)
        return web.json_response(
            completion_body(outcome, created=created),
            headers={"x-request-id": job.id},
            dumps=_dumps,
        )

    async def _chat_stream(
        self,
        request: web.Request,
        chat: ChatRequest,
        size: int,
        created: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        stream = SseStream(request, self.scheduler, created=created)
        job = self._submit(request, chat, size, on_chunk=stream.on_chunk)
        stream.job = job
        outcome = await self._answer(job)
        return await stream.finish(outcome, include_usage=include_usage)

    async def _embeddings(self, request: web.Request) -> web.Response:
        raw, body = await _read_json(request)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ClientError("encoding_format must be 'float' or 'base64'")
        route = route_embed(_model_name(body), self.scheduler)
        embed = _decode(embed_payload(body, route, _request_id()), EmbedRequest)
        job = self._submit(request, embed, len(raw))
        outcome = await self._answer(job)
        if not isinstance(outcome, Result):
            return response_for_error(outcome, job=job.id)
        return web.json_response(
            embeddings_body(outcome, encoding=encoding),
            headers={"x-request-id": job.id},
            dumps=_dumps,
        )

    # -- jobs --------------------------------------------------------------------------

    def _submit(
        self,
        request: web.Request,
        job_request: ChatRequest | EmbedRequest,
        size: int,
        *,
        on_chunk: Callable[[Chunk], Awaitable[None]] | None = None,
    ) -> Job:
        uid, client = peer_identity(request)
        return self.scheduler.submit(
            job_request, client=client, uid=uid, on_chunk=on_chunk, size=size
        )

    async def _answer(self, job: Job) -> Result | Error:
        """Wait for the job's one answer; if the client leaves first, cancel the job."""
        self.open_requests += 1
        try:
            limit = None if job.deadline is None else job.deadline - job.accepted_at
            with anyio.fail_after(None if limit is None else limit + ANSWER_GRACE_S):
                await job.done.wait()
        finally:
            self.open_requests -= 1
            if job.outcome is None:
                self.scheduler.cancel(job)  # the client went away (or a bug): stop the work
        return final_answer(job)


class SseStream:
    """A streamed chat answer: chunks go out as they come; the status line waits for the first.

    Until the first chunk nothing is sent, so a job that fails before it streams
    anything still gets a proper HTTP error status. After that, a failure is
    reported as a ``data: {"error": ...}`` event, which the official clients raise.
    """

    def __init__(self, request: web.Request, scheduler: Scheduler, *, created: int) -> None:
        self.request = request
        self.scheduler = scheduler
        self.created = created
        self.job: Job | None = None
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        self.chunks = 0
        self.gone = False
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return (
            f"<SseStream chunks {self.chunks} prepared {self.response.prepared} gone {self.gone}>"
        )

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.job.id if self.job is not None else 'pending'}"

    def _model(self) -> str:
        job = self.job
        if job is not None and job.provider in self.scheduler.limits:
            return self.scheduler.limits[job.provider].config.model
        return "dispatcher"

    async def on_chunk(self, chunk: Chunk) -> None:
        """Called from the provider actor's task for each delta; a dead reader cancels the job."""
        if self.gone:
            return
        delta: dict[str, Any] = {}
        if self.chunks == 0:
            delta["role"] = "assistant"
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        if chunk.delta or not chunk.reasoning:
            delta["content"] = chunk.delta
        await self._write(chunk_event(self.completion_id, self.created, self._model(), delta))
        self.chunks += 1

    async def _write(self, data: bytes) -> bool:
        if self.gone:
            return False
        try:
            async with self._lock:
                with anyio.fail_after(WRITE_TIMEOUT_S):
                    if not self.response.prepared:
                        if self.job is not None:
                            self.response.headers["x-request-id"] = self.job.id
                        await self.response.prepare(self.request)
                    await self.response.write(data)
        except OSError:  # the client left, or read nothing for WRITE_TIMEOUT_S (TimeoutError)
            self.gone = True
            if self.job is not None:
                self.scheduler.cancel(self.job)
            return False
        return True

    async def finish(self, outcome: Result | Error, *, include_usage: bool) -> web.StreamResponse:
        """The end of the stream: the rest of the answer, the finish chunk, usage, ``[DONE]``."""
        if not isinstance(outcome, Result):
            if not self.response.prepared:
                return response_for_error(outcome, job=self.job.id if self.job else None)
            await self._write(b"data: " + _encoder.encode(_error_event(outcome)) + b"\n\n")
            return self.response
        if self.chunks == 0 and (outcome.content or outcome.reasoning):
            delta: dict[str, Any] = {"role": "assistant", "content": outcome.content or ""}
            if outcome.reasoning:
                delta["reasoning_content"] = outcome.reasoning
            await self._write(chunk_event(self.completion_id, self.created, outcome.model, delta))
        events = [
            chunk_event(self.completion_id, self.created, outcome.model, {}, finish_reason="stop")
        ]
        if include_usage:
            usage = msgspec.to_builtins(outcome.usage)
            events.append(
                chunk_event(self.completion_id, self.created, outcome.model, None, usage=usage)
            )
        events.append(DONE_EVENT)
        if await self._write(b"".join(events)):
            with contextlib.suppress(OSError):
                await self.response.write_eof()
        return self.response


def _error_event(error: Error) -> dict[str, Any]:
    return error_body(
        error.code,
        error.message,
        openai_code="context_length_exceeded" if error.code == "context_too_long" else None,
    )


def final_answer(job: Job) -> Result | Error:
    """The job's outcome as a reply: a Result, or an Error whatever form the failure took."""
    outcome: object = job.outcome
    if isinstance(outcome, Result | Error):
        return outcome
    if isinstance(outcome, DispatcherError):
        return error_reply(None, outcome, job=job.id)
    return error_reply(None, InternalError("the job has no answer yet"), job=job.id)


# -- request helpers ------------------------------------------------------------------


async def _read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    raw = await request.read()
    try:
        body = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ClientError(f"the body is not valid JSON ({exc}); send one JSON object") from None
    if not isinstance(body, dict):
        raise ClientError(f"the body must be a JSON object, not {type(body).__name__}")
    return raw, body


def _model_name(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ClientError("model must be a string such as dispatcher/default")
    return model


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def _decode(payload: dict[str, Any], kind: type[_R]) -> _R:
    """Validate through the socket protocol's own decoder: one set of rules and wordings."""
    try:
        request = RequestDecoder().decode(_encoder.encode(payload))
    except RequestError as exc:
        raise ClientError(exc.message) from None
    assert isinstance(request, kind)
    return request


def _request_id() -> str:
    return f"http-{uuid.uuid4().hex[:12]}"


def peer_identity(request: web.Request) -> tuple[int, str]:
    """(uid, fairness key): the peer's uid on a Unix socket (SO_PEERCRED), -1 over TCP."""
    transport = request.transport
    if transport is None:
        return -1, "http:?"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return -1, f"http:{peer[0]}:{peer[1]}"
    sock = transport.get_extra_info("socket")
    uid = -1
    with contextlib.suppress(OSError, AttributeError):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
    fileno = sock.fileno() if sock is not None else 0
    return uid, f"http:{uid}:{fileno}"
