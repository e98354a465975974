"""Single-flight: identical requests in flight at the same moment share one upstream call.

A chat job whose answer the cache could hold (deterministic, or ``cache: true``;
streamed or not) has a *flight key*: its cache key with the stream flag kept. The
first such job is the flight's *leader* and goes through the queue as usual; an
identical job arriving while the leader is unanswered becomes a *follower*: it
waits outside the queue, keeps its own deadline, and gets the leader's answer with
its own ids. A streamed leader's chunks are recorded, so a follower that joins late
gets every chunk from the first one, then the new ones as they come.

What ends the leader decides what the followers get:

* a result: each follower gets it (``attempts`` 0: it cost nothing upstream);
* the leader's own end, cancelled or timed out by its deadline: none of it concerns
  the followers, so the first follower leads a new flight through the queue, and the
  others follow it (unless chunks already reached them, which a second call would
  repeat: they get a retryable error);
* any other error (no provider, the upstream refused the request): the same
  request would meet it again, so each follower gets it.

A follower that is cancelled or times out just leaves its flight; the leader's call
goes on for the others. Durable (journaled) leaders take only durable followers:
a drain holds durable jobs back, and a follower must not wait for one.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import TaskGroup

from dispatcher.contract.errors import Cancelled, DispatcherError, Timeout, UpstreamFailed
from dispatcher.contract.protocol import ChatRequest, Chunk, Result
from dispatcher.scheduler.job import ChunkSink, Job
from dispatcher.store.cache import flight_key

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler


@dataclass(slots=True, eq=False)
class Flight:
    """One upstream call shared by identical jobs: its leader, the followers, the chunks so far."""

    key: str
    leader: Job
    own: ChunkSink | None  # the leader's own client's sink
    followers: list[Job] = field(default_factory=list)
    chunks: list[Chunk] | None = None  # a streamed leader's chunks, for late joiners
    sent: dict[str, int] = field(default_factory=dict)  # follower id -> chunks it has
    busy: set[str] = field(default_factory=set)  # followers a catch-up is writing to

    async def fan_out(self, chunk: Chunk) -> None:
        """The leader's sink: record the chunk, send it to the leader's client and everyone."""
        assert self.chunks is not None
        self.chunks.append(chunk)
        if self.own is not None:
            await self.own(chunk)
        for follower in list(self.followers):
            await self.catch_up(follower)

    async def catch_up(self, follower: Job) -> None:
        """Send ``follower`` the chunks it lacks, in order; one writer per follower at a time
        (a second caller leaves it to the first, which loops until it has them all)."""
        sink, chunks = follower.on_chunk, self.chunks
        if sink is None or chunks is None or follower.id in self.busy:
            return
        self.busy.add(follower.id)
        try:
            while follower.outcome is None and (n := self.sent.get(follower.id, 0)) < len(chunks):
                self.sent[follower.id] = n + 1
                await sink(msgspec.structs.replace(chunks[n], id=follower.request.id))
        finally:
            self.busy.discard(follower.id)

    def behind(self, follower: Job) -> bool:
        return self.chunks is not None and self.sent.get(follower.id, 0) < len(self.chunks)


class Flights:
    """The flights in the air, by key; ``coalesced`` counts the jobs that rode along."""

    def __init__(self) -> None:
        self.by_key: dict[str, Flight] = {}
        # Texts in embeddings requests on the wire, by cache key: who else awaits each
        # (job, index in its input); maintained by dispatcher.scheduler.batches.
        self.texts: dict[bytes, list[tuple[Job, int]]] = {}
        self.coalesced = 0
        self.tasks: TaskGroup | None = None  # the scheduler's, for late joiners' catch-up

    def __repr__(self) -> str:
        return f"<Flights {len(self.by_key)} in the air, {self.coalesced} coalesced>"

    def join(self, scheduler: Scheduler, job: Job) -> bool:
        """Make ``job`` a follower of an identical job in flight (True), or the leader of a
        new flight (False: it goes through the queue)."""
        if job.embed is not None:  # its texts ride along at once (batches.accept)
            return not job.embed.unsent
        if not scheduler.config.cache.coalesce or not isinstance(job.request, ChatRequest):
            return False
        # A cacheable job's cache key is its flight key already (the same digest); only a
        # streamed one, which the cache never holds, needs its own.
        key = job.cache_key
        if key is None and job.request.stream:
            owner = None if scheduler.config.cache.shared else job.owner
            key = flight_key(job.request, job.klass, owner=owner)
        if key is None:
            return False
        flight = self.by_key.get(key)
        if (
            flight is not None
            and flight.leader.outcome is None
            and (job.durable or not flight.leader.durable)
        ):
            flight.followers.append(job)
            job.flight = flight
            self.coalesced += 1
            if flight.chunks:  # a late joiner: the chunks so far, from the first
                self._spawn(flight.catch_up, job)
            return True
        self._lead(job, key)
        return False

    def _lead(self, job: Job, key: str) -> None:
        flight = Flight(key=key, leader=job, own=job.on_chunk)
        if isinstance(job.request, ChatRequest) and job.request.stream:
            flight.chunks = []
            job.on_chunk = flight.fan_out
        job.flight = flight
        self.by_key[key] = flight

    def leave(self, scheduler: Scheduler, job: Job) -> None:
        """``job`` has its answer: a follower leaves its flight; a leader's flight lands."""
        flight, job.flight = job.flight, None
        if flight is None:
            return
        if flight.leader is not job:
            if job in flight.followers:
                flight.followers.remove(job)
            flight.sent.pop(job.id, None)
            return
        if self.by_key.get(flight.key) is flight:
            del self.by_key[flight.key]
        followers = [f for f in flight.followers if f.outcome is None]
        for follower in followers:
            follower.flight = None
        if not followers:
            return
        outcome = job.outcome
        if isinstance(outcome, Result):
            for follower in followers:
                self._answer(
                    scheduler, flight, follower, shared_result(scheduler, follower, outcome)
                )
        elif isinstance(outcome, (Cancelled, Timeout)):
            self._relaunch(scheduler, flight, followers)
        else:
            error = outcome if isinstance(outcome, DispatcherError) else Cancelled("no answer")
            for follower in followers:
                scheduler.finish(follower, error)

    def _relaunch(self, scheduler: Scheduler, flight: Flight, followers: list[Job]) -> None:
        """The leader ended for a reason of its own: the followers get a call of their own."""
        fresh = [f for f in followers if not flight.sent.get(f.id)]
        for follower in followers:
            if flight.sent.get(follower.id):
                scheduler.finish(
                    follower,
                    UpstreamFailed(
                        "the stream this request shared was cut when its first client left; "
                        "send it again"
                    ),
                )
        if not fresh:
            return
        lead, rest = fresh[0], fresh[1:]
        self._lead(lead, flight.key)
        assert lead.flight is not None
        lead.flight.followers.extend(rest)
        for follower in rest:
            follower.flight = lead.flight
        scheduler.queue.push(lead)
        scheduler.poke()

    def _answer(self, scheduler: Scheduler, flight: Flight, follower: Job, result: Result) -> None:
        if flight.behind(follower) and self.tasks is not None:
            self.tasks.start_soon(self._deliver_late, scheduler, flight, follower, result)
        else:
            scheduler.finish(follower, result)

    async def _deliver_late(
        self, scheduler: Scheduler, flight: Flight, follower: Job, result: Result
    ) -> None:
        """A late joiner's missing chunks first, then its result; within its own deadline."""
        deadline = follower.deadline
        left = follower.timeout_s if deadline is None else deadline - scheduler.clock()
        with anyio.move_on_after(max(0.0, left)):
            await flight.catch_up(follower)
        scheduler.finish(follower, result)

    def _spawn(self, catch_up: Callable[[Job], Coroutine[Any, Any, None]], job: Job) -> None:
        if self.tasks is not None:
            self.tasks.start_soon(catch_up, job)


def shared_result(scheduler: Scheduler, follower: Job, result: Result) -> Result:
    """The leader's answer as a follower's reply: its own ids, no attempt of its own."""
    return msgspec.structs.replace(
        result,
        id=follower.request.id,
        job=follower.id,
        attempts=0,
        latency_ms=round((scheduler.clock() - follower.accepted_at) * 1000, 3),
    )
