"""The scheduler actor: the async shell that carries out the decisions of :mod:`dispatcher.core`.

It accepts jobs (:meth:`Scheduler.submit`), keeps them in the fair queue and,
each time something changes (a job arrives, an attempt ends, a token returns,
a deadline passes), asks :func:`~dispatcher.core.plan.plan` who starts now,
reserves those slots and tokens and hands the jobs to the provider actors.
Attempt outcomes come back through :meth:`Scheduler.on_outcome`, where
:func:`~dispatcher.core.outcomes.judge` gives the verdict; every job leaves
through :meth:`Scheduler._finish`, once.

Resource handling: ``run`` is the only task; it owns no I/O resource and only
sleeps until the next change or timer (at most ``MAX_IDLE_WAIT_S``, so the
watchdog sees it turn). Every other method is synchronous and called from the
tasks of the same event loop (connections, provider attempts): they change
state and wake ``run``. A job holds a slot and a token from ``reserve`` in
:meth:`_dispatch` until its attempt reports back through :meth:`on_outcome`.

Error handling: a request that cannot be taken raises the client error that
says why, before anything is queued. Every accepted job gets exactly one final
answer: its result, its verdict's error, ``cancelled`` or ``timeout`` by its
deadline, which the deadline heap enforces even when no provider answers.

Memory: a finished job is referenced only by :class:`History` (for ``result``),
so it is freed once that forgets it, by reference counting alone: the timers
hold job ids (:mod:`~dispatcher.scheduler.timers`), the links between a job
and its hedged copy are cut once their race is over, and stored errors carry
no traceback (see :func:`outcomes.bare`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

import anyio
import structlog
from anyio.abc import TaskStatus

from dispatcher.contract.config import Config
from dispatcher.contract.errors import Cancelled, ClientError, DispatcherError
from dispatcher.contract.protocol import JobRequest, Result, Status
from dispatcher.core import admission, keys, outcomes
from dispatcher.core.fair_queue import FairQueue
from dispatcher.core.plan import EXPIRY_SCAN, plan
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers import adapters
from dispatcher.providers.actor import Outcome
from dispatcher.scheduler import (
    batches,
    clients,
    flights,
    hedges,
    remote,
    starts,
    status,
    verdicts,
)
from dispatcher.scheduler.handles import Observer, ProviderHandle
from dispatcher.scheduler.history import History
from dispatcher.scheduler.job import ChunkSink, Job
from dispatcher.scheduler.timers import Timers
from dispatcher.store.cache import ResponseCache
from dispatcher.store.embed_cache import EmbedCache
from dispatcher.store.journal import Journal
from dispatcher.store.ledger import SharedLedger
from dispatcher.store.local_ledger import LocalLedger
from dispatcher.store.redis_cache import RedisCache

log = structlog.get_logger("dispatcher.scheduler")

MAX_IDLE_WAIT_S = 1.0  # the loop turns at least this often (watchdog, status)
RETRY_BUDGET_MIN = 3  # retries that may always be in flight
RETRY_BUDGET_SHARE = 0.2  # beyond that, at most this share of the attempts in flight
EXPIRY_SCAN_EVERY_S = 0.1  # how often planning also looks for hopeless deadlines


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
        self.actors: dict[str, ProviderHandle] = {}
        self.queue = FairQueue()
        self.active: dict[str, Job] = {}
        self.history = History()
        self.keys = keys.KeyTable()
        self.cache = ResponseCache(ttl_s=config.cache.ttl_s, max_bytes=config.cache.max_bytes)
        # Per-text vectors; the daemon opens it in state_dir (unopened: nothing is kept).
        self.embed_cache = EmbedCache(None, max_bytes=config.cache.embed_max_bytes)
        self.shared_cache: RedisCache | None = None  # [cache] redis_url: other hosts' answers
        self.journal: Journal | None = None
        self.ledger: LocalLedger | None = None
        self.shared: SharedLedger | None = None  # several daemons on the same keys
        self.timers = Timers()
        self.flights = flights.Flights()  # identical jobs in flight share one call
        self.budgets = clients.Budgets(config)  # per-client budgets; it observes every job
        self.observers: list[Observer] = [self.budgets]
        self._wakeup, self._changed = anyio.Event(), anyio.Event()
        self._dispatching = False
        self._last_expiry_scan = -1.0
        self.started_at = clock()
        self.turns = 0  # loop iterations: the watchdog's sign of progress
        self.accepting = True
        self.draining = False  # journaled jobs still queued stay in the journal for the next run
        self.queued_bytes = 0
        self.retries_in_flight: set[str] = set()  # job ids whose running attempt is a retry
        self.attempts_sent = 0
        self.hedges_sent = 0
        self.embed_requests = 0  # packed embeddings requests sent
        self.embed_texts_sent = 0  # texts they carried

    def __repr__(self) -> str:
        return f"<Scheduler queued {len(self.queue)} active {len(self.active)}>"

    def add_provider(self, actor: ProviderHandle) -> None:
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
        size: int = 0,
    ) -> Job:
        """Accept a job or raise the client error that says why not.

        A request whose idempotency ``key`` this user already used returns that
        job (raising :class:`~dispatcher.core.keys.KnownJob` when only the journal has it).
        """
        if request.key is not None:
            match self.keys.lookup(uid, request.key, keys.request_digest(request)):
                case keys.Known(job_id):
                    known = self.lookup(job_id)
                    if known is None:
                        raise keys.KnownJob(job_id)
                    return known
                case keys.Conflict(job_id):
                    raise ClientError(
                        f"the key {request.key!r} was already used for a different request "
                        f"(job {job_id}); use a new key for new content"
                    )
        now = self.clock()
        room = admission.Room(
            accepting=self.accepting,
            jobs=len(self.active),
            queued_bytes=self.queued_bytes,
            drain_estimate_s=status.drain_estimate_s(self),
        )
        admitted = admission.admit(
            request,
            size=size,
            room=room,
            config=self.config,
            limits=self.limits,
            now=now,
            rng=self.rng,
            refusal=adapters.refusals(self.config.providers),
        )
        admitted = self.budgets.check(request, admitted, client=client, uid=uid)
        return self.accept(request, admitted, client=client, uid=uid, on_chunk=on_chunk, size=size)

    def accept(
        self,
        request: JobRequest,
        admitted: admission.Admission,
        *,
        client: str,
        uid: int,
        on_chunk: ChunkSink | None = None,
        job_id: str | None = None,
        size: int = 0,
    ) -> Job:
        """Queue an admitted job (or answer it from the cache at once)."""
        now = self.clock()
        job = Job.admitted(request, admitted, client=client, uid=uid, now=now, job_id=job_id)
        job.on_chunk = on_chunk
        job.size = size
        self.queued_bytes += size
        if self.journal is not None and (request.detach or request.key is not None):
            job.durable = True
        if request.key is not None:
            self.keys.bind(uid, request.key, job.digest, job.id)
        self.active[job.id] = job
        answered = batches.from_caches(self, job, now)
        if answered is not None:
            self.finish(job, answered)
            return job
        self.timers.add_deadline(job)
        if not remote.look_up(self, job):
            self.enqueue(job, now)
        return job

    def enqueue(self, job: Job, now: float) -> None:
        """Queue a job no cache answered, unless it rides with an identical one or its
        client's minute is full."""
        if not self.flights.join(self, job) and self.budgets.admit(self, job, now):
            self.queue.push(job)
            self._dispatch_now(now)

    def cancel(self, job: Job, reason: DispatcherError | None = None) -> None:
        """Stop a job wherever it is; it gets ``reason`` (default: cancelled) as its answer."""
        if job.outcome is not None:
            return
        job.stop = reason or Cancelled("the job was cancelled")
        if job.state in ("queued", "retrying") and self.queue.remove(job):
            self.finish(job, job.stop)
        elif job.embed is not None or job.waits_outside:
            batches.stop(self, job, job.stop)  # it rides in a shared call: answer it now
        elif job.provider is not None:
            self.actors[job.provider].cancel(job.id)
        self.poke()

    def lookup(self, job_id: str) -> Job | None:
        return self.active.get(job_id) or self.history.get(job_id)

    def status(self, request_id: str | None = None) -> Status:
        return status.snapshot(self, request_id)

    # -- drain and reload ----------------------------------------------------------------

    def drain(self) -> None:
        """Stop starting journaled jobs: they wait in the journal for the next start."""
        self.accepting = False
        self.draining = True
        self.poke()

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
        self.budgets.reconfigure(config)

    def after_reconfigure(self) -> None:
        """Fail queued jobs that no provider can take any more; wake the planner."""
        verdicts.fail_stranded(self, "the configuration changed")
        self.poke()

    # -- provider side -----------------------------------------------------------------

    def on_freed(self, provider: str) -> None:
        """Another host gave a slot of ``provider`` back: stop deferring, plan now."""
        limits = self.limits.get(provider)
        if limits is not None:
            limits.undefer()
            self._dispatch_now(self.clock())

    def on_outcome(self, job: Job, provider: str, outcome: Outcome) -> None:
        """An attempt ended: success, a failure to judge, or no outcome (stopped, handed back)."""
        now = self.clock()
        limits = self.limits[provider]
        started = limits.running.get(job.id, now)
        limits.release(job.id)
        self.retries_in_flight.discard(job.id)
        job.provider = None
        try:
            if job.batch is not None:
                batches.after_outcome(self, job, provider, outcome, now, started)
                return
            verdicts.after_outcome(self, job, provider, outcome, now, started)
            hedges.copy_ended(job)
        finally:
            self._dispatch_now(self.clock())  # the slot is free: fill it without a loop turn

    def requeue(self, job: Job) -> None:
        job.state = "retrying"
        self.queue.push(job, front=True)

    # -- the loop ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Plan whenever something changes or a timer is due; runs until cancelled."""
        async with anyio.create_task_group() as self.flights.tasks:
            task_status.started()
            while True:
                self._wakeup = anyio.Event()
                self.turns += 1
                now = self.clock()
                self._expire(now)
                hedges.send_due(self, now)
                due = (self._dispatch(now), self.timers.next_at())
                wake_at = min((t for t in due if t is not None), default=None)
                delay = MAX_IDLE_WAIT_S if wake_at is None else min(MAX_IDLE_WAIT_S, wake_at - now)
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await self._wakeup.wait()
                else:
                    await anyio.lowlevel.checkpoint()

    def poke(self) -> None:
        """Wake the loop: something changed that planning or a timer should see."""
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
            self.poke()
            return
        self._dispatching = True
        try:
            wake_at = self._dispatch(now, wanted)
        finally:
            self._dispatching = False
        if wake_at is not None:
            self.poke()  # the loop sets its timer

    def _dispatch(self, now: float, wanted: set[str] | None = None) -> float | None:
        jobs: Iterable[Job] = self.queue
        if self.draining:
            jobs = (job for job in self.queue if not job.durable)
        running = sum(limits.in_flight for limits in self.limits.values())
        budget = max(RETRY_BUDGET_MIN, int(RETRY_BUDGET_SHARE * running))
        expiry_scan = 0
        if now - self._last_expiry_scan >= EXPIRY_SCAN_EVERY_S:
            expiry_scan, self._last_expiry_scan = EXPIRY_SCAN, now
        decided = plan(
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
            self.finish(job, outcomes.timeout_error(job, "could not start before its deadline"))
        packed = []
        for job, name in decided.assign:
            if job.embed is None:
                starts.start(self, job, name, now)
            else:
                packed.append((job, name))
        return batches.start_all(self, packed, now, decided.wake_at)

    def _expire(self, now: float) -> None:
        self.budgets.release_due(self, now)
        for job in list(self.timers.due_deadlines(now, self.active)):
            self.cancel(job, outcomes.timeout_error(job, "did not finish before its deadline"))

    def finish(self, job: Job, outcome: Result | DispatcherError) -> None:
        durable = job.durable and self.journal is not None
        if not job.finish(outcome, deliver=not durable):
            return
        hedges.call_off(self, job)
        if (
            isinstance(outcome, DispatcherError)
            and (outcome.retryable or isinstance(outcome, Cancelled))
            and job.request.key is not None
        ):
            # A key stands for one answer; a failure worth retrying frees it for the retry.
            self.keys.release(job.uid, job.request.key)
            job.key_released = True
        if durable:
            assert self.journal is not None
            self.journal.finish(job)
        self.queued_bytes -= job.size
        self.active.pop(job.id, None)
        self.timers.forget(job, self.active)
        self._changed.set()
        for observer in self.observers:
            observer.on_job_done(job, outcome)
        self.history.record(job, outcome)
        self.flights.leave(self, job)  # after its own answer: then its followers'
