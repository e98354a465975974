"""The OpenAI-compatible HTTP front: every OpenAI client can use the daemon unchanged.

``POST /v1/chat/completions`` (plain, or streamed as server-sent events),
``POST /v1/embeddings`` and ``GET /v1/models`` on a localhost port and/or a Unix
socket, mapped onto the same scheduler as the NDJSON socket. The ``model`` names
the route: ``dispatcher/<class>`` (realtime, bulk, complex, default) for a chat
class, ``dispatcher/embed`` for embeddings, or a provider's own name to pin it.

Agents get OpenAI's whole chat surface: tools and tool turns, ``response_format``
(json_object, json_schema), the sampling fields, and provider fields sent through
the SDK's ``extra_body`` (``top_k``, ``repetition_penalty``...), all passed on;
what the daemon cannot honour (``n`` > 1, logprobs, audio, legacy ``functions``)
is refused with a 400 that says what to send instead (see ``openai_wire``).
Answers carry ``tool_calls`` and the provider's own ``finish_reason``, streamed
piece by piece as OpenAI streams them.

Resource handling: one aiohttp runner per front; each request is one aiohttp
handler task that submits its job and waits for its one answer. When the client
goes away the handler is cancelled (``handler_cancellation``) and the job is
cancelled upstream. A streamed job's chunks are written to the response from the
provider actor's task, as the socket server does, so a stalled reader is dropped
after ``WRITE_TIMEOUT_S`` instead of holding a provider slot.

Error handling: every failure leaves as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a fitting status and an
``x-should-retry`` header the official clients obey; a request the provider refused
(its 4xx) is the client's 4xx with ``x-should-retry: false``.

Access: with ``[clients.NAME]`` tokens configured, every request carries
``Authorization: Bearer <token>``; a wrong or missing one is a 401
``invalid_api_key`` (``x-should-retry: false``) that never quotes it. The
client's NAME is the job's fairness key (``client:NAME``) and is what the logs
show. ``[http] allow_anonymous = true`` also serves requests with no
``Authorization`` at all (a wrong token is still refused). Without tokens, a
TCP ``listen`` refuses to start unless ``allow_anonymous``; a Unix socket is
guarded by its file mode, and its ``Authorization`` header is ignored. Tokens
and headers are never logged (there is no access log at all; jobs are logged by
the scheduler).

Limits: ``[http] max_connections`` connections at once (one more gets a 503
and is closed), the request line and headers within ``header_timeout_s``, the
body within ``body_timeout_s`` (or a 408, and the connection is closed), and at
most ``max_body_bytes`` of it (413, closed), so a slow or endless body is dropped.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import anyio
import msgspec
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

from dispatcher.contract.config import ConfigError, HttpConfig, is_loopback, parse_listen
from dispatcher.contract.errors import ClientError, DispatcherError, InternalError
from dispatcher.contract.protocol import (
    ChatRequest,
    Chunk,
    EmbedRequest,
    Error,
    RequestDecoder,
    RequestError,
    Result,
    error_reply,
)
from dispatcher.ingress.openai_errors import (
    InvalidToken,
    SlowBody,
    UnknownModel,
    dumps,
    error_body_for,
    openai_errors,
    response_for_error,
)
from dispatcher.ingress.openai_wire import (
    DONE_EVENT,
    chat_payload,
    chunk_delta,
    chunk_event,
    completion_body,
    embed_payload,
    embeddings_body,
    finish_reason,
    model_list,
    route_chat,
    route_embed,
    whole_delta,
)
from dispatcher.ingress.web import ClientTokens, WebService, is_unix_connection
from dispatcher.scheduler.job import Job
from dispatcher.scheduler.loop import Scheduler

log = structlog.get_logger("dispatcher.http")

_R = TypeVar("_R", ChatRequest, EmbedRequest)

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
WRITE_TIMEOUT_S: Final = 30.0  # a streaming client that reads nothing for this long is dropped
ANSWER_GRACE_S: Final = 60.0  # the scheduler answers by the job's deadline; this bounds a bug

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()

CLIENT_KEY: Final = web.RequestKey("client", str)  # the token's client NAME (``_authenticate``)
TCP_NEEDS_TOKEN: Final = (
    "[http] listen on TCP needs at least one [clients.NAME] token, or allow_anonymous = true"
)


def check_access(config: HttpConfig, tokens: ClientTokens) -> None:
    """Refuse a front anyone on the network could use: TCP with no token and no consent."""
    if config.listen and not tokens and not config.allow_anonymous:
        raise ConfigError(TCP_NEEDS_TOKEN)


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
        tokens: ClientTokens | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.max_body_bytes = max_body_bytes
        self.tokens = tokens if tokens is not None else ClientTokens()
        self.created = int(time.time())
        self.service = WebService(
            self.build_app(),
            name="http",
            listen=config.listen,
            socket_path=config.socket,
            socket_mode=socket_mode,
            socket_group=socket_group,
            max_connections=config.max_connections,
            header_timeout_s=config.header_timeout_s,
            access=self._access(),
        )
        self.open_requests = 0
        self.refused_tokens = 0

    def __repr__(self) -> str:
        return f"<HttpFront {' '.join(self.service.addresses) or 'not serving'} open {self.open_requests}>"

    async def run(self, *, task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound addresses (URLs).

        Raises :class:`ConfigError` before binding anything when a TCP ``listen`` has
        no client token and no ``allow_anonymous``.
        """
        check_access(self.config, self.tokens)
        if self.config.listen and not self.tokens:
            host, _port = parse_listen(self.config.listen, key="http.listen")
            if not is_loopback(host):
                log.warning(
                    "http.anonymous_not_loopback",
                    listen=self.config.listen,
                    problem="allow_anonymous with no client token: anyone who can reach "
                    "it can spend your quotas",
                )
        await self.service.run(task_status=task_status)

    def _access(self) -> str:
        if self.tokens:
            anonymous = " or none" if self.config.allow_anonymous else ""
            return f"a client token{anonymous} ({', '.join(self.tokens.names)})"
        if self.config.listen:
            return "anonymous (allow_anonymous)" if self.config.allow_anonymous else "refused"
        return "anonymous (the socket's file mode)"

    async def stop_accepting(self) -> None:
        """Close the listeners (drain); requests already open are still answered."""
        await self.service.stop_accepting()

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_body_bytes, middlewares=[openai_errors, self._authenticate]
        )
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)
        return app

    # -- access ------------------------------------------------------------------------

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Name the request's client from its bearer token, or refuse it (before routing's 404)."""
        if self.tokens:
            header = request.headers.get("Authorization")
            name = self.tokens.match(header)
            if name is None and not (header is None and self.config.allow_anonymous):
                self.refused_tokens += 1
                log.info(
                    "http.unauthorized",
                    path=request.path,
                    problem="no Authorization header" if header is None else "unknown token",
                )
                raise InvalidToken(
                    "send Authorization: Bearer <token> with a client token of this daemon"
                    if header is None
                    else "the bearer token is not a client token of this daemon; "
                    "check the api_key your client sends"
                )
            if name is not None:
                request[CLIENT_KEY] = name
        elif not self.config.allow_anonymous and not is_unix_connection(request):
            raise InvalidToken("this front serves no anonymous TCP clients")  # a bug's net
        return await handler(request)

    # -- handlers ----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = model_list(self.scheduler, created=self.created)
        return web.json_response({"object": "list", "data": data}, dumps=dumps)

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for model in model_list(self.scheduler, created=self.created):
            if model["id"] == name:
                return web.json_response(model, dumps=dumps)
        raise UnknownModel(f"the model {name!r} does not exist; see GET /v1/models")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw, body = await _read_json(request, self.config.body_timeout_s)
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
            dumps=dumps,
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
        raw, body = await _read_json(request, self.config.body_timeout_s)
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
            dumps=dumps,
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
        name = request.get(CLIENT_KEY)
        if name is not None:
            client = f"client:{name}"  # the token's owner: one fair share across connections
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
        delta = chunk_delta(chunk, first=self.chunks == 0)
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
            await self._write(b"data: " + _encoder.encode(error_body_for(outcome)) + b"\n\n")
            return self.response
        whole = whole_delta(outcome) if self.chunks == 0 else None
        if whole is not None:
            await self._write(chunk_event(self.completion_id, self.created, outcome.model, whole))
        finish = finish_reason(outcome)
        events = [
            chunk_event(self.completion_id, self.created, outcome.model, {}, finish_reason=finish)
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


def final_answer(job: Job) -> Result | Error:
    """The job's outcome as a reply: a Result, or an Error whatever form the failure took."""
    outcome: object = job.outcome
    if isinstance(outcome, Result | Error):
        return outcome
    if isinstance(outcome, DispatcherError):
        return error_reply(None, outcome, job=job.id)
    return error_reply(None, InternalError("the job has no answer yet"), job=job.id)


# -- request helpers ------------------------------------------------------------------


async def _read_json(request: web.Request, timeout_s: float) -> tuple[bytes, dict[str, Any]]:
    """The body as a JSON object, read within ``timeout_s`` (aiohttp has no body deadline)."""
    try:
        with anyio.fail_after(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise SlowBody(
            f"the request body did not arrive within {timeout_s:g} s; send it at once"
        ) from None
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
