"""The provider actor: one per provider, owning its inbox, its limits and one HTTP session.

The scheduler reserves a slot and a token (``ProviderLimits.reserve``) and then
hands the job over with :meth:`ProviderActor.deliver`; the actor runs one
attempt and reports what happened with the ``report`` callback. It never
decides about retries: that is the scheduler's job, which sees every provider.

Resource handling: ``run`` owns the aiohttp session and a task group of
workers, each running attempts one after another: a worker that finished an
attempt waits, idle, for the next job instead of a new task being spawned per
attempt (a task costs more than the rest of the attempt's own Python work). The
pool grows to the most attempts ever in flight at once, at most the
provider's concurrency plus a reload's slack. When ``run`` is cancelled or
crashes, every worker reports "no outcome" for the job it holds on its way out,
so the scheduler takes the job back.

Error handling: aiohttp, OS and timeout exceptions are translated into
:class:`~dispatcher.contract.errors.UpstreamError` in :func:`translate`, the one place
foreign exceptions become ours. Any other exception from an attempt (a bug, or a
setting aiohttp refuses, like a key with a newline) is that job's failure,
:class:`~dispatcher.core.outcomes.AttemptCrashed`, logged as ``attempt.crashed``:
it never crashes the actor, which keeps serving every other job. An attempt
that had no time left, or was stopped, before anything was sent reports
:class:`NotSent`: the scheduler gives its token back and the circuit hears nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import structlog
import yarl
from anyio.abc import TaskStatus

from dispatcher.contract.chat import CallAssembler
from dispatcher.contract.config import ProviderConfig
from dispatcher.contract.errors import UpstreamError, status_kind
from dispatcher.contract.protocol import ChatRequest, Chunk, EmbedRequest, Usage
from dispatcher.core.outcomes import AttemptCrashed, bare
from dispatcher.core.provider_state import RPM_WINDOW_S, ProviderLimits
from dispatcher.logs import redact_text
from dispatcher.providers import adapters, sse, wire
from dispatcher.providers.headers import (
    RateLimitInfo,
    limit_kind,
    parse_error_code,
    parse_error_message,
    rate_limit_headers,
    retry_after_seconds,
)
from dispatcher.providers.wire import ChatAnswer, EmbedAnswer
from dispatcher.scheduler.job import Job
from dispatcher.store.ledger import Decision, Deny, SharedLedger

log = structlog.get_logger("dispatcher.provider")

MAX_ERROR_BODY = 64 * 1024
RELEASE_TIMEOUT_S = 2.0  # the ledger's own calls time out sooner; this bounds a bug
# Less time left than this and the attempt is not sent: no upstream answers so fast,
# and a request that cannot succeed would only spend a token and a circuit failure.
MIN_SEND_BUDGET_S = 0.01


@dataclass(slots=True)
class Answer:
    """A successful attempt."""

    answer: ChatAnswer | EmbedAnswer
    latency_s: float
    ratelimit: RateLimitInfo | None


@dataclass(slots=True)
class _Idle:
    """A worker waiting for its next job: ``deliver`` puts the job here and wakes it."""

    wake: anyio.Event
    job: Job | None = None


def _headers(key: str | None) -> dict[str, str]:
    """Every request's headers, built once per key instead of once per request."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


@dataclass(frozen=True, slots=True)
class NotSent:
    """The attempt ended before anything reached the upstream: stopped, or out of time."""

    reason: str


# None: no outcome (cancelled, handed back); Deny: the fleet's ledger had no room, nothing
# sent; NotSent: stopped or out of time before the request went out.
Outcome = Answer | UpstreamError | Deny | NotSent | None
Report = Callable[[Job, str, Outcome], None]


class ProviderActor:
    """Runs attempts at one provider. ``__init__`` does no I/O."""

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        key: str | None,
        limits: ProviderLimits,
        report: Report,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLedger | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.limits = limits
        self._key = key
        self._headers = _headers(key)
        self._url = yarl.URL(config.url)  # parsed once, not by aiohttp on every request
        self._report = report
        self._shared = shared  # several daemons on this key: take capacity from the fleet
        self._clock = clock
        # Reservations keep it at most `concurrency` deep; the slack absorbs a reload
        # that raises the concurrency without recreating the stream.
        capacity = max(1024, config.concurrency * 4)
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Job](capacity)
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tg: anyio.abc.TaskGroup | None = None  # set while run() serves
        self._idle: list[_Idle] = []  # workers waiting for a job, the latest idle last

    def __repr__(self) -> str:
        stats = self._inbox_send.statistics()
        return (
            f"<ProviderActor {self.name} slots {self.limits.in_flight}/{self.config.concurrency} "
            f"{self.limits.bucket!r} inbox {stats.current_buffer_used}/{stats.max_buffer_size}>"
        )

    def reconfigure(self, config: ProviderConfig, key: str | None) -> None:
        """Take new settings (SIGHUP); attempts already running keep theirs."""
        self.config, self._key = config, key
        self._headers, self._url = _headers(key), yarl.URL(config.url)

    def deliver(self, job: Job) -> bool:
        """Hand over a job whose slot and token are reserved; False if the inbox is full.

        While the actor runs, the attempt starts right away on an idle worker, or a
        new one (no extra hop through the inbox); while it is down between a crash
        and its restart, jobs wait in the inbox and the restarted actor takes them first.
        """
        if self._tg is not None:
            if self._idle:
                idle = self._idle.pop()
                idle.job = job
                idle.wake.set()
            else:
                self._tg.start_soon(self._work, job)
            return True
        try:
            self._inbox_send.send_nowait(job)
        except anyio.WouldBlock:
            return False
        return True

    def close(self) -> None:
        """Release the inbox once the actor will never run again."""
        self._inbox_send.close()
        self._inbox.close()

    def hand_back(self) -> None:
        """After a crash: give every job still waiting in the inbox back to the scheduler."""
        while True:
            try:
                job = self._inbox.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return
            self._report(job, self.name, None)

    def cancel(self, job_id: str) -> None:
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        # No connection cap beyond the provider's own slots; keep-alive connections are
        # reused for aiohttp's 15 s, below the idle timeout of most servers, so a POST is
        # never sent on a connection the server is closing (aiohttp retries no POST).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        async with (
            aiohttp.ClientSession(
                timeout=timeout,
                connector=connector,
                raise_for_status=False,
                # An API authenticates with its key: a cookie jar would only filter and
                # store cookies on every request, and carry one job's cookies to the next.
                cookie_jar=aiohttp.DummyCookieJar(),
            ) as session,
            anyio.create_task_group() as tg,
        ):
            self._session = session
            self._idle.clear()  # the workers of a crashed run are gone
            while True:  # what arrived while the actor was down goes first
                try:
                    tg.start_soon(self._work, self._inbox.receive_nowait())
                except anyio.WouldBlock:
                    break
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                self._idle.clear()

    async def _work(self, job: Job) -> None:
        """Run ``job``, then every job :meth:`deliver` hands this worker, until cancelled.

        Waiting idle has no deadline: the worker lives as long as the actor. Cancelled
        in the instant a job was handed to it, before that job started, it reports the
        job back with no outcome, as an attempt cancelled before sending does.
        """
        idle = _Idle(anyio.Event())
        while True:
            await self._attempt(job)
            idle.wake = anyio.Event()
            self._idle.append(idle)
            try:
                await idle.wake.wait()
            except BaseException:
                if idle in self._idle:
                    self._idle.remove(idle)
                if idle.job is not None:
                    self._report(idle.job, self.name, None)
                raise
            assert idle.job is not None, "deliver() sets the job before waking the worker"
            job, idle.job = idle.job, None

    async def _attempt(self, job: Job) -> None:
        outcome: Outcome = None
        granted: Decision | None = None
        started = self._clock()
        budget = self.config.timeout_s
        if job.deadline is not None:
            budget = max(0.0, min(budget, job.deadline - started))
        try:
            if job.stop is not None:  # stopped while it waited in the inbox
                outcome = NotSent("the job was stopped before it was sent")
                return
            if budget < MIN_SEND_BUDGET_S:  # its deadline passed while it waited
                outcome = NotSent(f"{budget:.3g} s left of the job's deadline")
                return
            # One scope: its deadline is the attempt's timeout, and cancel() stops the job.
            # A timeout only when the deadline, not a cancel, ended it (as fail_after does,
            # without its generator-based context manager on every attempt).
            with anyio.CancelScope(deadline=anyio.current_time() + budget) as scope:
                self._scopes[job.id] = scope
                if self._shared is not None:
                    granted = await self._acquire(job)
                    if isinstance(granted, Deny):
                        outcome = granted
                        return
                try:
                    answer, ratelimit = await self._call(job)
                    outcome = Answer(answer, self._clock() - started, ratelimit)
                except UpstreamError as exc:
                    outcome = bare(exc)
                except (aiohttp.ClientError, OSError, wire.AnswerFormatError) as exc:
                    outcome = translate(exc)
            if scope.cancelled_caught and anyio.current_time() >= scope.deadline:
                outcome = UpstreamError("timeout", f"no answer within {budget:.3g} s")
        except TimeoutError:
            outcome = UpstreamError("timeout", f"no answer within {budget:.3g} s")
        except Exception as exc:  # the job's failure, never the actor's crash
            outcome = self._crashed(job, exc)
        finally:
            self._scopes.pop(job.id, None)
            # The answer goes out first: the fleet's slot is given back after it, so the
            # release's round trip is not on the client's path.
            self._report(job, self.name, outcome)
            if self._shared is not None and granted is not None and not isinstance(granted, Deny):
                await self._release(job, outcome)

    def _crashed(self, job: Job, exc: Exception) -> AttemptCrashed:
        """An exception no translation knows: log it (redacted) and make it the job's error."""
        detail = redact_text(f"{type(exc).__name__}: {exc}")
        log.error(
            "attempt.crashed",
            job=job.id,
            provider=self.name,
            error_type=type(exc).__name__,
            error=detail,
        )
        return AttemptCrashed(exc, f"{detail}; check {self.name}'s key and settings")

    async def _acquire(self, job: Job) -> Decision:
        """One round trip to the fleet's ledger: this key's token and slot, or a Deny."""
        assert self._shared is not None
        limits = self.limits
        return await self._shared.acquire(
            self.name,
            job.id,
            rpm=limits.bucket.rpm,
            concurrency=limits.concurrency,
            window_s=RPM_WINDOW_S,
        )

    async def _release(self, job: Job, outcome: Outcome) -> None:
        """Give the fleet its slot back, whoever cancelled us: the second round trip."""
        assert self._shared is not None
        tokens = outcome.answer.usage.total_tokens if isinstance(outcome, Answer) else 0
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            await self._shared.release(self.name, job.id, tokens=tokens)

    async def _call(self, job: Job) -> tuple[ChatAnswer | EmbedAnswer, RateLimitInfo | None]:
        assert self._session is not None, "run() owns the session"
        request = job.request
        config = self.config
        body: dict[str, Any]
        if isinstance(request, EmbedRequest):
            inputs = [request.input] if isinstance(request.input, str) else request.input
            body = adapters.build_embed_body(config.adapter, model=config.model, inputs=inputs)
            body.update(config.extra_body)
        else:
            body = adapters.chat_body(
                config.adapter, model=config.model, request=request, extra_body=config.extra_body
            )
        async with self._session.post(
            self._url, data=adapters.encode_body(body), headers=self._headers
        ) as response:
            ratelimit = rate_limit_headers(response.headers)
            if response.status != 200:
                # (imported here only because this block is all of actor.py this change owns)
                payload = await response.content.read(MAX_ERROR_BODY)
                code = parse_error_code(payload) if response.status == 429 else None
                raise UpstreamError(
                    status_kind(response.status),
                    # upstreams sometimes quote the key back ("invalid key sk-..."): never pass it on
                    redact_text(parse_error_message(payload)),
                    status=response.status,
                    retry_after_s=retry_after_seconds(response.headers, time.time()),
                    # a 429 body may say which limit it hit (zhipu: 1302 concurrency, 1303 rate)
                    limit_kind=limit_kind(config.adapter, code),
                )
            if isinstance(request, EmbedRequest):
                answer = wire.parse_embed_answer(config.adapter, await response.read())
                expected = 1 if isinstance(request.input, str) else len(request.input)
                if len(answer.embeddings) != expected:
                    raise wire.AnswerFormatError(
                        f"asked for {expected} embeddings, got {len(answer.embeddings)}"
                    )
                return answer, ratelimit
            if request.stream:
                return await self._stream(job, request, response), ratelimit
            return wire.parse_chat_answer(config.adapter, await response.read()), ratelimit

    async def _stream(
        self, job: Job, request: ChatRequest, response: aiohttp.ClientResponse
    ) -> ChatAnswer:
        decoder = sse.SSEDecoder(self.config.adapter)
        content: list[str] = []
        reasoning: list[str] = []
        usage = Usage()
        model: str | None = None
        finish: str | None = None
        calls = CallAssembler()
        async for data in response.content.iter_any():
            for delta in decoder.feed(data):
                if delta.usage is not None:
                    usage = delta.usage
                model = delta.model or model
                finish = delta.finish_reason or finish
                for call in delta.tool_calls or ():
                    calls.add(call)
                if delta.content or delta.reasoning or delta.tool_calls:
                    content.append(delta.content)
                    reasoning.append(delta.reasoning)
                    # Set before the sink's await: a sink cancelled mid-write may still
                    # deliver the chunk, and a job that streamed anything is never retried.
                    job.streamed = True
                    if job.on_chunk is not None:
                        await job.on_chunk(
                            Chunk(
                                id=request.id,
                                delta=delta.content,
                                reasoning=delta.reasoning or None,
                                tool_calls=delta.tool_calls,
                            )
                        )
            if decoder.done:
                break
        for delta in decoder.close():
            content.append(delta.content)
            reasoning.append(delta.reasoning)
        if not decoder.done and finish is None:
            raise UpstreamError("connect", "the stream ended before its end marker")
        return ChatAnswer(
            content="".join(content),
            reasoning="".join(reasoning) or None,
            usage=usage,
            model=model,
            finish_reason=finish,
            tool_calls=calls.calls(),
        )


def translate(exc: BaseException) -> UpstreamError:
    """The one place foreign exceptions become upstream errors (their text redacted)."""
    error = _translate(exc)
    error.detail = redact_text(error.detail)
    return error


def _translate(exc: BaseException) -> UpstreamError:
    match exc:
        case wire.AnswerFormatError():
            return UpstreamError("bad_answer", f"the answer was not usable: {exc}")
        case aiohttp.ClientConnectorError():
            return UpstreamError("connect", f"cannot connect ({exc.os_error.strerror or exc})")
        case aiohttp.ServerDisconnectedError():
            return UpstreamError("connect", "the server closed the connection without answering")
        case aiohttp.ClientPayloadError():
            return UpstreamError("connect", "the connection broke during the answer")
        case aiohttp.ClientError() | OSError():
            return UpstreamError("connect", f"connection failed ({type(exc).__name__}: {exc})")
        case _:
            return UpstreamError("connect", f"{type(exc).__name__}: {exc}")
