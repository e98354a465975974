"""The scheduler's clocks: each job's deadline, and when a slow attempt gets a hedged copy.

Memory: the deadline heap holds job ids, not jobs, so a finished job is not kept
alive until its deadline (a day, with ``timeout_s = 86400``); finished jobs'
entries are dropped lazily, in a rebuild once they outnumber the live ones, so
the cost stays constant per job on average. The hedge heap holds only attempts
started within about two service times, so a finished job leaves it at once.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Mapping

from dispatcher.scheduler.job import Job

DEADLINES_SLACK = 1024  # finished jobs' deadline entries tolerated before a rebuild


class Timers:
    __slots__ = ("_deadlines", "_hedge_ids", "_hedges", "_seq", "_wakes")

    def __init__(self) -> None:
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, seq, job id)
        self._hedges: list[tuple[float, int, Job]] = []  # (when to hedge, seq, job)
        self._hedge_ids: set[str] = set()  # jobs that may have an entry in _hedges
        self._seq = itertools.count()
        self._wakes: list[float] = []  # when something else is due (a client's minute frees)

    def __repr__(self) -> str:
        return f"<Timers deadlines {len(self._deadlines)} hedges {len(self._hedges)}>"

    def add_deadline(self, job: Job) -> None:
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, next(self._seq), job.id))

    def add_hedge(self, at: float, job: Job) -> None:
        heapq.heappush(self._hedges, (at, next(self._seq), job))
        self._hedge_ids.add(job.id)

    def add_wake(self, at: float) -> None:
        heapq.heappush(self._wakes, at)

    def next_at(self) -> float | None:
        heads = [heap[0][0] for heap in (self._hedges, self._deadlines) if heap]
        if self._wakes:
            heads.append(self._wakes[0])
        return min(heads) if heads else None

    def wakes_due(self, now: float) -> bool:
        """Whether a wake-up is due; the due ones are dropped."""
        due = False
        while self._wakes and self._wakes[0] <= now:
            heapq.heappop(self._wakes)
            due = True
        return due

    def due_deadlines(self, now: float, active: Mapping[str, Job]) -> Iterator[Job]:
        """Unfinished jobs whose deadline passed by ``now``."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, job_id = heapq.heappop(heap)
            job = active.get(job_id)
            if job is not None and job.outcome is None:
                yield job

    def due_hedges(self, now: float) -> Iterator[Job]:
        heap = self._hedges
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            self._hedge_ids.discard(job.id)
            yield job

    def forget(self, job: Job, active: Mapping[str, Job]) -> None:
        """A job finished: its hedge timer goes now, its deadline entry lazily."""
        if job.id in self._hedge_ids:
            self._hedge_ids.discard(job.id)
            kept = [entry for entry in self._hedges if entry[2] is not job]
            if len(kept) != len(self._hedges):
                self._hedges[:] = kept
                heapq.heapify(self._hedges)
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(active) + DEADLINES_SLACK:
            deadlines[:] = [entry for entry in deadlines if entry[2] in active]
            heapq.heapify(deadlines)

    @property
    def deadline_entries(self) -> int:
        return len(self._deadlines)

    def hedged(self) -> list[Job]:
        """The jobs waiting for a hedge timer, earliest first (for status and tests)."""
        return [entry[2] for entry in sorted(self._hedges)]
