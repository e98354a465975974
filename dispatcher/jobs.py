"""A job as the daemon holds it between acceptance and its one final answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio

from dispatcher.errors import DispatcherError, UpstreamError
from dispatcher.protocol import Chunk, JobRequest, JobState, Result

ChunkSink = Callable[[Chunk], Awaitable[None]]
Kind = Literal["chat", "embed"]

CLASS_RANK = {"realtime": 3, "complex": 2, "default": 1, "bulk": 0, "embed": 1}


@dataclass(eq=False, slots=True)
class Job:
    """One accepted request. Identity is the object; ``id`` is unique per daemon run and journal."""

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
    outcome: Result | DispatcherError | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    def __repr__(self) -> str:
        return (
            f"<Job {self.id} {self.klass} {self.state} attempts {self.attempts} on {self.provider}>"
        )

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

    def finish(self, outcome: Result | DispatcherError) -> bool:
        """Record the final answer once; later calls are ignored and return False."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.state = "done" if isinstance(outcome, Result) else "failed"
        self.done.set()
        return True
