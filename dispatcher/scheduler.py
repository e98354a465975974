"""The scheduler actor: the async shell around the decision core in :mod:`dispatcher.policy`.

It accepts jobs (``submit``), keeps them in the fair queue, and each time
something changes (a job arrives, an attempt ends, a token returns, a deadline
passes) asks :func:`~dispatcher.policy.plan` who starts now, reserves those
slots and tokens and hands the jobs to the provider actors. Attempt outcomes
come back through :meth:`Scheduler.on_outcome`, where retries, fallbacks and
circuit state are decided; every job leaves through :meth:`_finish`, once.

All methods but ``run`` are synchronous and called from other tasks of the
same event loop; they only change state and wake ``run``.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Protocol

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from dispatcher import policy
from dispatcher.cache import ResponseCache, cache_key
from dispatcher.config import Config
from dispatcher.errors import (
    Cancelled,
    ClientError,
    DispatcherError,
    InternalError,
    NoProvider,
    Overloaded,
    Timeout,
    UpstreamError,
)
from dispatcher.jobs import ChunkSink, Job, Kind
from dispatcher.journal import Journal, StoredJob, request_digest
from dispatcher.policy import ProviderLimits
from dispatcher.protocol import (
    ChatRequest,
    EmbedRequest,
    JobRequest,
    ProbeResult,
    ProviderStatus,
    RecentJob,
    Result,
    Status,
)
from dispatcher.provider import Answer, Outcome, ProviderActor
from dispatcher.queueing import FairQueue
from dispatcher.tokens import estimate_messages, estimate_text

log = structlog.get_logger("dispatcher.scheduler")

DEFAULT_TIMEOUT_S = 600.0
FINISHED_KEPT = 10_000  # finished jobs kept in memory for `result`
RECENT_KEPT = 20  # finished jobs shown by status (and `dispatcher top`)
MAX_HANDBACKS = 2  # an actor died holding the job this often: the job is poison
MAX_IDLE_WAIT_S = 1.0  # the loop turns at least this often (watchdog, status)
RETRY_BUDGET_MIN = 3  # retries that may always be in flight
RETRY_BUDGET_SHARE = 0.2  # beyond that, at most this share of the attempts in flight
EXPIRY_SCAN_EVERY_S = 0.1  # how often planning also looks for hopeless deadlines
HEDGE_SHARE = 0.05  # hedged copies are at most this share of all attempts


class KnownJob(Exception):
    """The idempotency key names a finished job that only the journal still has."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class Observer(Protocol):
    """Something that wants to hear about every attempt and every final answer (metrics)."""

    def on_attempt(self, provider: str, outcome: str, latency_s: float) -> None: ...

    def on_job_done(self, job: Job, outcome: Result | DispatcherError) -> None: ...


class Scheduler:
    """Owns the queue and the routing decisions. ``__init__`` does no I/O."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.limits: dict[str, ProviderLimits] = {}
        self.actors: dict[str, ProviderActor] = {}
        self.queue = FairQueue()
        self.active: dict[str, Job] = {}
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self._deadlines: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._wakeup = anyio.Event()
        self._dispatching = False
        self._last_expiry_scan = -1.0
        self.started_at = clock()
        self.turns = 0  # loop iterations: the watchdog's sign of progress
        self.jobs_done = 0
        self.jobs_failed = 0
        self.accepting = True
        self.observers: list[Observer] = []
        self.journal: Journal | None = None
        self.keys: dict[tuple[int, str], tuple[str, str]] = {}  # (uid, key) -> (digest, job id)
        self.queued_bytes = 0
        self.retries_in_flight: set[str] = set()
        self.recent: deque[RecentJob] = deque(maxlen=RECENT_KEPT)
        self._hedge_at: list[tuple[float, int, Job]] = []  # when a slow job gets a copy
        self.attempts_sent = 0
        self.hedges_sent = 0
        self.cache = ResponseCache(
            ttl_s=config.cache.ttl_s, max_bytes=config.cache.max_bytes
        )  # job ids whose running attempt is a retry
        self.draining = False  # journaled jobs still queued stay in the journal for the next run
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        return f"<Scheduler queued {len(self.queue)} active {len(self.active)}>"

    # -- wiring ------------------------------------------------------------------------

    def add_provider(self, actor: ProviderActor) -> None:
        self.actors[actor.name] = actor
        self.limits[actor.name] = actor.limits

    # -- client side -------------------------------------------------------------------

    def submit(
        self,
        request: JobRequest,
        *,
        client: str,
        uid: int = -1,
        on_chunk: ChunkSink | None = None,
        job_id: str | None = None,
        size: int = 0,
    ) -> Job:
        """Accept a job or raise the client error that says why not.

        A request whose idempotency ``key`` this user already used returns that
        job (raising :class:`KnownJob` when only the journal still has it).
        """
        if request.key is not None:
            known = self._known_key(uid, request)
            if known is not None:
                return known
        return self._accept(
            request, client=client, uid=uid, on_chunk=on_chunk, job_id=job_id, size=size
        )

    def _accept(
        self,
        request: JobRequest,
        *,
        client: str,
        uid: int,
        on_chunk: ChunkSink | None = None,
        job_id: str | None = None,
        size: int = 0,
        replay: bool = False,
    ) -> Job:
        if not replay:  # a replayed job was accepted by an earlier run: never refused now
            self._check_room(size)
        now = self.clock()
        job = self._make_job(request, client=client, uid=uid, now=now, job_id=job_id)
        job.on_chunk = on_chunk
        job.size = size
        self.queued_bytes += size
        if self.journal is not None and (request.detach or request.key is not None):
            job.durable = True
        if request.key is not None:
            self.keys[(uid, request.key)] = (job.digest, job.id)
        self.active[job.id] = job
        job.cache_key = cache_key(request, job.klass)
        cached = self.cache.get(job.cache_key) if job.cache_key else None
        if cached is not None:
            self._finish(job, self._from_cache(job, cached, now))
            return job
        self.queue.push(job)
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, next(self._seq), job))
        self._dispatch_now(now)
        return job

    def _check_room(self, size: int) -> None:
        """Overloaded, with a hint when to retry, past the caps on jobs and bytes."""
        if not self.accepting:
            raise Overloaded("the daemon is shutting down; try again in a moment", retry_after_s=5)
        if len(self.active) >= self.config.daemon.max_queued:
            raise Overloaded(
                f"{len(self.active):,} jobs are already waiting (max_queued); "
                "retry later or raise daemon.max_queued",
                retry_after_s=self._drain_estimate_s(),
            )
        if size and self.queued_bytes + size > self.config.daemon.max_queued_bytes:
            raise Overloaded(
                f"the queued jobs already hold {self.queued_bytes:,} bytes (max_queued_bytes); "
                "retry later or send smaller requests",
                retry_after_s=self._drain_estimate_s(),
            )

    def _from_cache(self, job: Job, cached: Result, now: float) -> Result:
        return msgspec.structs.replace(
            cached,
            id=job.request.id,
            job=job.id,
            cached=True,
            attempts=0,
            latency_ms=round((self.clock() - now) * 1000, 3),
        )

    def _make_job(
        self,
        request: JobRequest,
        *,
        client: str,
        uid: int,
        now: float,
        job_id: str | None,
        classify: bool = True,
    ) -> Job:
        pick: str | None = None
        kind: Kind
        eligible: tuple[str, ...] = ()
        if isinstance(request, EmbedRequest):
            inputs = [request.input] if isinstance(request.input, str) else request.input
            tokens = sum(estimate_text(text) for text in inputs)
            klass, kind = "embed", "embed"
            if classify:
                eligible = policy.classify_embed(request.providers, self.config, self.limits)
        elif not classify:
            tokens, kind, klass = (
                estimate_messages(request.messages),
                "chat",
                request.task or "default",
            )
        else:
            tokens = estimate_messages(request.messages)
            kind = "chat"
            klass, eligible = policy.classify_chat(
                task=request.task,
                thinking=request.thinking,
                pins=request.providers,
                prompt_tokens=tokens,
                max_tokens=request.max_tokens,
                config=self.config,
                limits=self.limits,
            )
            class_policy = self.config.classes.get(klass)
            if (
                class_policy is not None
                and class_policy.strategy == "weighted"
                and not request.providers
            ):
                pick = policy.weighted_pick(class_policy, eligible, self.rng)
        if classify:
            policy.check_quota(eligible, self.limits, tokens, now)
        timeout = request.timeout_s or DEFAULT_TIMEOUT_S
        return Job(
            digest=request_digest(request) if request.key is not None else "",
            id=job_id or uuid.uuid4().hex[:16],
            request=request,
            kind=kind,
            klass=klass,
            eligible=eligible,
            client=client,
            uid=uid,
            prompt_tokens=tokens,
            accepted_at=now,
            deadline=now + timeout,
            pick=pick,
        )

    def cancel(self, job: Job, reason: DispatcherError | None = None) -> None:
        """Stop a job wherever it is; it gets ``reason`` (default: cancelled) as its answer."""
        if job.outcome is not None:
            return
        job.stop = reason or Cancelled("the job was cancelled")
        if job.state in ("queued", "retrying") and self.queue.remove(job):
            self._finish(job, job.stop)
        elif job.provider is not None:
            self.actors[job.provider].cancel(job.id)
        self._poke()

    def _known_key(self, uid: int, request: JobRequest) -> Job | None:
        assert request.key is not None
        entry = self.keys.get((uid, request.key))
        if entry is None:
            return None
        digest, job_id = entry
        if digest != request_digest(request):
            raise ClientError(
                f"the key {request.key!r} was already used for a different request (job "
                f"{job_id}); use a new key for new content"
            )
        job = self.lookup(job_id)
        if job is None:
            raise KnownJob(job_id)
        return job

    def restore(self, stored: StoredJob) -> None:
        """Queue a journaled job again after a restart, under its old id."""
        try:
            job = self._accept(
                stored.request,
                client=f"{stored.uid}:replay",
                uid=stored.uid,
                job_id=stored.id,
                replay=True,
            )
        except DispatcherError as exc:
            # It cannot run under the current configuration: answer it with why.
            job = self._from_journal(stored, client="replay")
            self.active[job.id] = job
            self._finish(job, exc)
        else:
            job.durable = True
            job.persisted.set()

    def _from_journal(self, stored: StoredJob, *, client: str) -> Job:
        """A job rebuilt from its journal row: durable, already persisted, not routed."""
        job = self._make_job(
            stored.request,
            client=client,
            uid=stored.uid,
            now=self.clock(),
            job_id=stored.id,
            classify=False,
        )
        job.durable = True
        job.persisted.set()
        return job

    async def resolve(self, job_id: str) -> Job | None:
        """A job by id: in memory, or a finished one only the journal still has."""
        job = self.lookup(job_id)
        if job is not None or self.journal is None:
            return job
        stored = await anyio.to_thread.run_sync(self.journal.lookup, job_id)
        if stored is None or stored.outcome is None:
            return None
        job = self._from_journal(stored, client="journal")
        job.finish(stored.outcome)
        return job

    async def probe(self, name: str, *, timeout_s: float) -> ProbeResult:
        """A one-token job pinned to ``name``, queued like any other (free tiers count it)."""
        limits = self.limits.get(name)
        if limits is None:
            return ProbeResult(ok=False, error="no such provider")
        if not limits.enabled:
            return ProbeResult(ok=False, error=limits.problem or "disabled")
        request: JobRequest
        if limits.config.kind == "embed":
            request = EmbedRequest(id=f"health-{name}", input="ping", providers=[name])
        else:
            request = ChatRequest(
                id=f"health-{name}",
                messages=[{"role": "user", "content": "ping"}],
                max_tokens=1,
                task="realtime",
                providers=[name],
                timeout_s=timeout_s,
            )
        try:
            job = self._accept(request, client="health", uid=0)
        except DispatcherError as exc:
            return ProbeResult(ok=False, error=exc.message)
        with anyio.move_on_after(timeout_s + 5):
            await job.done.wait()
        outcome = job.outcome
        if isinstance(outcome, Result):
            return ProbeResult(ok=True, latency_ms=outcome.latency_ms, model=outcome.model)
        if isinstance(outcome, DispatcherError):
            return ProbeResult(ok=False, error=outcome.message)
        self.cancel(job)
        return ProbeResult(ok=False, error=f"no answer within {timeout_s:g} s")

    def drain(self) -> None:
        """Stop starting journaled jobs: they wait in the journal for the next start."""
        self.accepting = False
        self.draining = True
        self._poke()

    def must_finish(self) -> list[Job]:
        """Jobs a drain waits for: everything running, and queued jobs no journal keeps."""
        return [j for j in self.active.values() if j.state == "running" or not j.durable]

    async def wait_drained(self) -> None:
        while self.must_finish():
            self._changed = anyio.Event()
            await self._changed.wait()

    def reconfigure(self, config: Config) -> None:
        """Take a new configuration (SIGHUP); jobs already accepted keep their routes."""
        self.config = config

    def after_reconfigure(self) -> None:
        """Fail queued jobs that no provider can take any more; wake the planner."""
        self._fail_stranded("the configuration changed")
        self._poke()

    def lookup(self, job_id: str) -> Job | None:
        return self.active.get(job_id) or self.finished.get(job_id)

    # -- provider side -----------------------------------------------------------------

    def on_outcome(self, job: Job, provider: str, outcome: Outcome) -> None:
        """An attempt ended: success, a failure to judge, or no outcome (stopped, handed back)."""
        now = self.clock()
        limits = self.limits[provider]
        started = limits.running.get(job.id, now)
        limits.release(job.id)
        self.retries_in_flight.discard(job.id)
        job.provider = None
        try:
            self._after_outcome(job, provider, limits, outcome, now, started)
        finally:
            self._dispatch_now(self.clock())  # the slot is free: fill it without a loop turn

    def _after_outcome(
        self,
        job: Job,
        provider: str,
        limits: ProviderLimits,
        outcome: Outcome,
        now: float,
        started: float,
    ) -> None:
        if outcome is not None:
            kind = "ok" if isinstance(outcome, Answer) else outcome.kind
            latency = outcome.latency_s if isinstance(outcome, Answer) else max(0.0, now - started)
            for observer in self.observers:
                observer.on_attempt(provider, kind, latency)
        if job.hedge_of is not None:
            self._on_hedge_outcome(job, provider, limits, outcome, now)
        elif job.outcome is not None:
            return  # the race was won by its hedge; this attempt was cancelled
        elif isinstance(outcome, Answer):
            self._on_success(job, provider, limits, outcome, now)
        elif isinstance(outcome, UpstreamError):
            if outcome.kind == "timeout":
                limits.observe_latency(now - started)  # slowness the planner must see
            self._on_failure(job, provider, limits, outcome, now)
        elif job.stop is not None:
            self._finish(job, job.stop)
        else:
            job.handbacks += 1
            job.attempts -= 1
            if job.handbacks > MAX_HANDBACKS:
                self._finish(
                    job, InternalError(f"{provider} crashed {job.handbacks} times on this job")
                )
            else:
                self._requeue(job)

    def _on_hedge_outcome(
        self, copy: Job, provider: str, limits: ProviderLimits, outcome: Outcome, now: float
    ) -> None:
        """A hedged copy ended: its answer wins the race if the original has none yet.

        A failed copy is dropped quietly: the original is still running and keeps
        its own retries; the copy was only ever a bet on speed.
        """
        original = copy.hedge_of
        assert original is not None
        copy.finish(Cancelled("hedge finished"))
        if isinstance(outcome, Answer):
            self._record_success(limits, outcome, now)
            if original.outcome is None:
                original.attempts += 1
                self._finish(original, self._result(original, provider, limits, outcome, now))
                if original.provider is not None:
                    self.actors[original.provider].cancel(original.id)
        elif isinstance(outcome, UpstreamError):
            limits.failed += 1
            limits.rate_limited += outcome.kind == "rate_limited"

    def _maybe_hedge(self, now: float) -> None:
        """Send a second copy of slow hedgeable jobs to another provider, within budget."""
        heap = self._hedge_at
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            if job.outcome is not None or job.state != "running" or job.hedge is not None:
                continue
            if self.hedges_sent + 1 > HEDGE_SHARE * self.attempts_sent:
                continue
            others = tuple(
                p for p in job.candidates(self.config.retry.per_provider) if p != job.provider
            )
            if not any(self.limits[p].can_start(now) for p in others):
                continue  # a copy that would wait in the queue is no faster
            copy = Job(
                id=f"{job.id}-hedge",
                request=job.request,
                kind=job.kind,
                klass=job.klass,
                eligible=others,
                client=job.client,
                uid=job.uid,
                prompt_tokens=job.prompt_tokens,
                accepted_at=now,
                deadline=job.deadline,
                hedge_of=job,
            )
            job.hedge = copy
            self.hedges_sent += 1
            self.queue.push(copy, front=True)
            log.info("job.hedged", job=job.id, slow=job.provider, others=list(others))

    def _record_success(self, limits: ProviderLimits, answer: Answer, now: float) -> None:
        limits.ok += 1
        limits.observe_latency(answer.latency_s)
        limits.circuit.on_success(limits.config.concurrency)
        limits.learn_from_success()
        info = answer.ratelimit
        if info is not None and info.remaining == 0 and info.reset_s:
            limits.block(now + info.reset_s)

    def _on_success(
        self, job: Job, provider: str, limits: ProviderLimits, answer: Answer, now: float
    ) -> None:
        self._record_success(limits, answer, now)
        if limits.daily is not None:  # the real count replaces the estimate spent at dispatch
            limits.daily.spend(now, answer.answer.usage.total_tokens - job.prompt_tokens)
        result = self._result(job, provider, limits, answer, now)
        if job.cache_key is not None:
            self.cache.put(job.cache_key, result)
        self._finish(job, result)

    def _result(
        self, job: Job, provider: str, limits: ProviderLimits, answer: Answer, now: float
    ) -> Result:
        body = answer.answer
        request = job.request
        result = Result(
            id=request.id,
            job=job.id,
            provider=provider,
            model=body.model or limits.config.model,
            class_=job.klass,
            usage=body.usage,
            latency_ms=round((now - job.accepted_at) * 1000, 3),
            attempts=job.attempts,
            cached=False,
        )
        if isinstance(request, ChatRequest):
            result.content = getattr(body, "content", "")
            result.reasoning = getattr(body, "reasoning", None)
            result.finish_reason = getattr(body, "finish_reason", None)
        else:
            result.embeddings = getattr(body, "embeddings", [])
        return result

    def _on_failure(
        self, job: Job, provider: str, limits: ProviderLimits, error: UpstreamError, now: float
    ) -> None:
        limits.failed += 1
        if error.kind == "rate_limited":
            limits.rate_limited += 1
            wait = error.retry_after_s
            if wait is None:
                wait = policy.backoff_s(1, self.config.retry, self.rng)
            limits.block(now + wait)
            limits.learn_from_429(now, had_retry_after=error.retry_after_s is not None)
        elif error.kind == "auth":
            error.detail = f"{error.detail}; the key was refused: check {self._key_hint(provider)}"
            self._disable(
                provider,
                f"the key was refused (HTTP {error.status}); check {self._key_hint(provider)} and reload",
            )
        elif error.counts_against_provider and job.stop is None and limits.circuit.on_failure(now):
            log.warning("circuit.open", provider=provider, reason=error.short())
        log.info(
            "attempt.failed", job=job.id, provider=provider, kind=error.kind, reason=error.short()
        )
        if job.stop is not None:
            self._finish(job, job.stop)
            return
        final = policy.judge_failure(job, provider, error, now, self.config.retry, self.rng)
        if final is not None:
            self._finish(job, final)
        else:
            self._requeue(job)

    def _requeue(self, job: Job) -> None:
        job.state = "retrying"
        self.queue.push(job, front=True)

    def _disable(self, provider: str, problem: str) -> None:
        limits = self.limits[provider]
        if limits.enabled:
            limits.enabled, limits.problem = False, problem
            log.error("provider.disabled", provider=provider, problem=problem)
        self._fail_stranded(f"{provider}: {problem}")

    def _fail_stranded(self, why: str) -> None:
        per_provider = self.config.retry.per_provider
        stranded = [
            job
            for job in self.queue
            if not any(
                name in self.limits and self.limits[name].enabled
                for name in job.candidates(per_provider)
            )
        ]
        for job in stranded:
            self.queue.remove(job)
            self._finish(job, NoProvider(f"no provider is left for this job ({why})"))

    def _key_hint(self, provider: str) -> str:
        config = self.config.providers[provider]
        if config.api_key_env:
            return f"${config.api_key_env}"
        if config.api_key_file:
            return f"the key file {config.api_key_file}"
        return "its key"

    # -- the loop ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wakeup = anyio.Event()
            self.turns += 1
            now = self.clock()
            self._expire(now)
            self._maybe_hedge(now)
            wake_at = self._dispatch(now)
            if self._hedge_at:
                first_hedge = self._hedge_at[0][0]
                wake_at = first_hedge if wake_at is None else min(wake_at, first_hedge)
            if self._deadlines:
                first = self._deadlines[0][0]
                wake_at = first if wake_at is None else min(wake_at, first)
            delay = MAX_IDLE_WAIT_S if wake_at is None else min(MAX_IDLE_WAIT_S, wake_at - now)
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._wakeup.wait()
            else:
                await anyio.lowlevel.checkpoint()

    def _poke(self) -> None:
        self._wakeup.set()

    def _wanted(self) -> set[str]:
        """Providers some queued job may use."""
        return {name for name in self.limits if self.queue.count_provider(name)}

    def _dispatch_now(self, now: float) -> None:
        """Plan at once when a provider could start something; else leave it to the loop.

        Checking the providers first keeps a burst of submits cheap: while every
        provider is busy, a submit costs no planning at all.
        """
        wanted = self._wanted()
        if self._dispatching or not any(
            p.free_now(now) for name, p in self.limits.items() if name in wanted
        ):
            self._poke()
            return
        self._dispatching = True
        try:
            wake_at = self._dispatch(now, wanted)
        finally:
            self._dispatching = False
        if wake_at is not None:
            self._poke()  # the loop sets its timer

    def _dispatch(self, now: float, wanted: set[str] | None = None) -> float | None:
        jobs: Iterable[Job] = self.queue
        if self.draining:
            jobs = (job for job in self.queue if not job.durable)
        running = sum(limits.in_flight for limits in self.limits.values())
        budget = max(RETRY_BUDGET_MIN, int(RETRY_BUDGET_SHARE * running))
        expiry_scan = 0
        if now - self._last_expiry_scan >= EXPIRY_SCAN_EVERY_S:
            expiry_scan, self._last_expiry_scan = policy.EXPIRY_SCAN, now
        decided = policy.plan(
            jobs,
            self.limits,
            now,
            per_provider=self.config.retry.per_provider,
            retry_budget=budget - len(self.retries_in_flight),
            wanted=self._wanted() if wanted is None else wanted,
            expiry_scan=expiry_scan,
        )
        for job in decided.expired:
            self.queue.remove(job)
            self._finish(job, self._timeout_error(job, "could not start before its deadline"))
        for job, name in decided.assign:
            self.queue.remove(job, served=True)
            self.limits[name].reserve(job.id, now, job.prompt_tokens)
            job.state, job.provider = "running", name
            job.attempts += 1
            self.attempts_sent += 1
            if job.attempts > 1:
                self.retries_in_flight.add(job.id)
            if self._hedgeable(job):
                hedge_at = now + self.limits[name].hedge_after_s()
                heapq.heappush(self._hedge_at, (hedge_at, next(self._seq), job))
            if not self.actors[name].deliver(job):
                self.limits[name].release(job.id)
                self.retries_in_flight.discard(job.id)
                job.attempts -= 1
                job.provider = None
                self._requeue(job)
        return decided.wake_at

    def _hedgeable(self, job: Job) -> bool:
        policy_ = self.config.classes.get(job.klass)
        return (
            policy_ is not None
            and policy_.hedge
            and job.hedge_of is None
            and job.hedge is None
            and not (isinstance(job.request, ChatRequest) and job.request.stream)
        )

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            if job.outcome is None:
                self.cancel(job, self._timeout_error(job, "did not finish before its deadline"))

    def _timeout_error(self, job: Job, what: str) -> Timeout:
        limit = job.request.timeout_s or DEFAULT_TIMEOUT_S
        tried = f" after {policy.describe_attempts(job)}" if job.history else ""
        return Timeout(
            f"the job {what} ({limit:g} s, set with timeout_s){tried}; "
            "raise timeout_s or retry when the providers are less busy"
        )

    def _finish(self, job: Job, outcome: Result | DispatcherError) -> None:
        durable = job.durable and self.journal is not None
        if not job.finish(outcome, deliver=not durable):
            return
        copy = job.hedge
        if copy is not None and copy.outcome is None:  # the original won, or gave up
            copy.stop = Cancelled("the hedged job finished")
            copy.finish(copy.stop)
            if not self.queue.remove(copy) and copy.provider is not None:
                self.actors[copy.provider].cancel(copy.id)
        if (
            isinstance(outcome, DispatcherError)
            and (outcome.retryable or isinstance(outcome, Cancelled))
            and job.request.key is not None
        ):
            # A key stands for one answer; a failure worth retrying frees it for the retry.
            self.keys.pop((job.uid, job.request.key), None)
            job.key_released = True
        if durable:
            assert self.journal is not None
            self.journal.finish(job)
        self.queued_bytes -= job.size
        self.active.pop(job.id, None)
        self._changed.set()
        for observer in self.observers:
            observer.on_job_done(job, outcome)
        self.finished[job.id] = job
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        self.recent.appendleft(
            RecentJob(
                job=job.id,
                cls=job.klass,
                outcome="ok" if isinstance(outcome, Result) else outcome.code,
                provider=outcome.provider if isinstance(outcome, Result) else None,
                latency_ms=outcome.latency_ms if isinstance(outcome, Result) else None,
                attempts=job.attempts,
            )
        )
        if isinstance(outcome, Result):
            self.jobs_done += 1
            log.info(
                "job.done",
                job=job.id,
                cls=job.klass,
                provider=outcome.provider,
                attempts=outcome.attempts,
                latency_ms=outcome.latency_ms,
                tokens=outcome.usage.total_tokens,
                client=job.client,
            )
        else:
            self.jobs_failed += 1
            log.warning(
                "job.failed",
                job=job.id,
                cls=job.klass,
                code=outcome.code,
                attempts=job.attempts,
                reason=outcome.message,
                client=job.client,
            )

    def _drain_estimate_s(self) -> float:
        """A rough retry-after hint: how long the queue takes at the current capacity."""
        rate = sum(
            limits.config.concurrency / max(limits.latency_s, 0.001)
            for limits in self.limits.values()
            if limits.enabled
        )
        return round(min(300.0, max(0.5, len(self.queue) / rate)), 1) if rate else 60.0

    # -- status ------------------------------------------------------------------------

    def status(self, request_id: str | None = None) -> Status:
        now = self.clock()
        providers = {}
        for name, limits in self.limits.items():
            bucket = limits.bucket
            providers[name] = ProviderStatus(
                state=_state(limits, now),
                kind=limits.config.kind,
                in_flight=limits.in_flight,
                queued=self.queue.count_provider(name),
                concurrency=limits.config.concurrency,
                rpm=limits.config.rpm,
                tokens=bucket.available(now) if bucket.rpm else None,
                latency_ms=round(limits.latency_s * 1000, 1),
                ok=limits.ok,
                failed=limits.failed,
                rate_limited=limits.rate_limited,
                learned_rpm=None if limits.learner is None else limits.learner.rpm,
                circuit=limits.circuit.state,
                blocked_for_s=round(max(0.0, limits.blocked_until - now), 3),
                daily_tokens_left=None if limits.daily is None else limits.daily.remaining(now),
                problem=limits.problem,
            )
        return Status(
            id=request_id,
            providers=providers,
            queued=len(self.queue),
            running=sum(limits.in_flight for limits in self.limits.values()),
            uptime_s=round(now - self.started_at, 3),
            classes=self.queue.classes(),
            jobs_done=self.jobs_done,
            jobs_failed=self.jobs_failed,
            recent=list(self.recent),
        )


def _state(limits: ProviderLimits, now: float) -> str:
    if not limits.enabled:
        return "disabled"
    if limits.circuit.state != "closed":
        return limits.circuit.state
    if now < limits.blocked_until:
        return "rate_limited"
    if limits.in_flight >= limits.config.concurrency:
        return "busy"
    return "ready"
