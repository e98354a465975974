"""A job as the daemon holds it between acceptance and its one final answer."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import msgspec

from dispatcher.contract.errors import DispatcherError, InternalError, UpstreamError
from dispatcher.contract.protocol import (
    Chunk,
    Error,
    JobRequest,
    JobState,
    Result,
    Usage,
    error_reply,
)
from dispatcher.core.admission import Admission, Kind
from dispatcher.core.keys import request_digest
from dispatcher.core.outcomes import bare

if TYPE_CHECKING:
    from dispatcher.scheduler.flights import Flight

ChunkSink = Callable[[Chunk], Awaitable[None]]

# Job ids: a random prefix per process and a counter, 16 hex digits (uuid4 per job cost a
# system call each). Unique within a run, and across runs by the prefix's 32 random bits.
_RUN = secrets.token_hex(4)
_COUNT = itertools.count()


def new_job_id() -> str:
    return f"{_RUN}{next(_COUNT) & 0xFFFFFFFF:08x}"


DEFAULT_TIMEOUT_S = 600.0

CLASS_RANK = {"realtime": 3, "complex": 2, "default": 1, "bulk": 0, "embed": 1}


class Signal:
    """A one-shot event that costs an ``anyio.Event`` only once someone waits before it is
    set: most jobs are answered before anyone waits, or are waited for by nobody, and an
    event with its waiter queue is ~0.4 KB, a tenth of a queued job."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._set = False

    def __repr__(self) -> str:
        return f"<Signal {'set' if self._set else 'unset'}>"

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


@dataclass(slots=True)
class EmbedWork:
    """An embed job's texts on their way: which are answered, which wait, which are out.

    A job's texts may be answered by the cache, split over several upstream requests and
    packed beside other jobs' texts (:mod:`dispatcher.scheduler.batches`); the job is
    answered once every text has its vector.
    """

    texts: list[str]
    tokens: list[int]  # estimated tokens per text
    keys: list[bytes] | None  # embedding-cache key per text; None: the job skips the cache
    vectors: list[list[float] | None]
    unsent: list[int]  # indices waiting for a request, in input order
    in_flight: int = 0  # texts in requests not yet answered
    cached: int = 0  # texts answered from the cache
    usage: Usage = field(default_factory=Usage)
    owner: str | None = None  # whose cache entries these are (None: the shared cache)
    model: str = ""  # the configured model its vectors come from (and are cached under)
    provider: str = ""  # where its last texts were answered
    answered_model: str = ""  # the model that provider reported


@dataclass(slots=True)
class Batch:
    """What one packed upstream request carries: per member job, (its text index, position)."""

    members: list[tuple[Job, list[tuple[int, int]]]]
    keys: list[bytes] = field(default_factory=list)  # its texts' cache keys others may await


@dataclass(eq=False, slots=True, weakref_slot=True)
class Job:
    """One accepted request. Identity is the object; ``id`` is unique per daemon run and journal.

    Weak references are allowed, so tests can prove a finished job is freed.
    """

    id: str
    request: JobRequest
    kind: Kind
    klass: str
    eligible: tuple[str, ...]  # providers allowed, in order of preference
    client: str  # fairness key: "uid:connection"
    uid: int
    prompt_tokens: int
    accepted_at: float
    deadline: float | None = None
    pick: str | None = None  # strategy = "weighted": the provider drawn for it
    on_chunk: ChunkSink | None = None

    state: JobState = "queued"
    attempts: int = 0
    provider: str | None = None  # where it runs now
    excluded: set[str] = field(default_factory=set)
    holds: dict[str, float] = field(default_factory=dict)  # provider -> not before
    failures: dict[str, int] = field(default_factory=dict)
    history: list[tuple[str, UpstreamError]] = field(default_factory=list)
    streamed: bool = False  # a chunk reached the client: no more retries
    stop: DispatcherError | None = None  # why the scheduler wants it stopped (cancel, deadline)
    handbacks: int = 0  # times an actor died holding it
    durable: bool = False  # journaled: outlives its connection and the daemon
    digest: str = ""  # content hash, for idempotency keys
    key_released: bool = False  # failed in a way that frees its key for a retry
    size: int = 0  # bytes of the request line, held in memory while queued
    cache_key: str | None = None  # where its answer goes in the response cache
    hedge: Job | None = None  # the second copy sent while this one was slow
    hedge_of: Job | None = None  # set on that copy: the job it races for
    embed: EmbedWork | None = None  # an embed job's texts, packed into shared requests
    batch: Batch | None = None  # set on a packed request: the member jobs it answers
    flight: Flight | None = None  # the shared call it leads or follows (flights.py)
    parked: bool = False  # held back by its client's rpm (clients.py)
    outcome: Result | Error | DispatcherError | None = None  # Error: replayed from the journal
    done: Signal = field(default_factory=Signal)
    # Called once with the job when its answer is delivered (set ``done``), by whoever
    # finishes it: a connection that waits with no task of its own per job. Never raises.
    on_finish: Callable[[Job], None] | None = None
    persisted: Signal = field(default_factory=Signal)  # its journal row is committed

    def __repr__(self) -> str:
        return (
            f"<Job {self.id} {self.klass} {self.state} attempts {self.attempts} on {self.provider}>"
        )

    @classmethod
    def admitted(
        cls,
        request: JobRequest,
        admission: Admission,
        *,
        client: str,
        uid: int,
        now: float,
        job_id: str | None = None,
    ) -> Job:
        """A new job for an admitted request; ``job_id`` keeps a journaled job's id."""
        return cls(
            digest=request_digest(request) if request.key is not None else "",
            id=job_id or new_job_id(),
            request=request,
            kind=admission.kind,
            klass=admission.klass,
            eligible=admission.eligible,
            client=client,
            uid=uid,
            prompt_tokens=admission.prompt_tokens,
            accepted_at=now,
            deadline=now + (request.timeout_s or DEFAULT_TIMEOUT_S),
            pick=admission.pick,
        )

    @property
    def owner(self) -> str:
        """Whose job it is: the client a token named, else the Unix user."""
        return self.client if self.client.startswith("client:") else f"uid:{self.uid}"

    @property
    def waits_outside(self) -> bool:
        """It waits outside the queue: for an identical job's upstream call (flights.py),
        or for room in its client's minute (clients.py)."""
        return self.parked or (self.flight is not None and self.flight.leader is not self)

    @property
    def timeout_s(self) -> float:
        return self.request.timeout_s or DEFAULT_TIMEOUT_S

    @property
    def priority(self) -> tuple[int, int]:
        """Higher runs first: the class rank, then the request's own priority."""
        return (CLASS_RANK.get(self.klass, 1), self.request.priority)

    def candidates(self, per_provider: int) -> list[str]:
        """Providers this job may still try, in order of preference."""
        pick = self.pick
        if (
            pick is not None
            and pick not in self.excluded
            and self.failures.get(pick, 0) < per_provider
        ):
            return [pick]
        return [p for p in self.eligible if p not in self.excluded]

    def finish(self, outcome: Result | Error | DispatcherError, *, deliver: bool = True) -> bool:
        """Record the final answer once; later calls are ignored and return False.

        ``deliver=False`` leaves ``done`` unset: the journal sets it once the answer
        is committed, so nobody sees an answer a crash could take back. An error is
        kept without its traceback, which would hold the job in a cycle.
        """
        if self.outcome is not None:
            return False
        self.outcome = bare(outcome) if isinstance(outcome, BaseException) else outcome
        self.state = "done" if isinstance(outcome, Result) else "failed"
        if deliver:
            self.done.set()
            if self.on_finish is not None:
                self.on_finish(self)
        return True

    def reply(self, request_id: str) -> Result | Error:
        """The final answer as a reply to the request ``request_id``."""
        outcome = self.outcome
        if isinstance(outcome, Result):
            return msgspec.structs.replace(outcome, id=request_id)
        if isinstance(outcome, Error):
            return msgspec.structs.replace(outcome, id=request_id)
        if isinstance(outcome, DispatcherError):
            return error_reply(request_id, outcome, job=self.id)
        return error_reply(request_id, InternalError("the job has no answer yet"), job=self.id)
