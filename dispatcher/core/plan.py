"""Planning: which queued jobs start now, and where.

Planning is earliest-expected-completion: jobs are taken in priority and
fairness order, and each goes, on paper, to the eligible provider where it
would finish first given that provider's free slots, tokens (returning 60 s
after use), Retry-After block, circuit and observed latency. Only the jobs whose
best start is *now* are sent; the rest stay queued in the daemon. So every
provider is kept busy up to its limits, and a slow provider takes a job only
when the fast ones could not finish it sooner.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.core.provider_state import ProviderLimits

if TYPE_CHECKING:
    from dispatcher.scheduler.job import Job

EPSILON = 1e-6
EXPIRY_SCAN = 64  # queued jobs checked for a hopeless deadline when nothing can start


@dataclass(slots=True)
class Plan:
    assign: list[tuple[Job, str]] = field(default_factory=list)
    expired: list[Job] = field(default_factory=list)  # cannot start before their deadline
    wake_at: float | None = None  # replan then even if nothing happens


class _Times:
    """A multiset of times, read smallest first, built only as far as it is read.

    It holds ``count`` copies of ``base``, a heap of times that may come earlier
    (``early``), and the times ``later()`` computes, none earlier than ``base``:
    those are computed only once the copies of ``base`` run out. A provider with
    free slots (or ready tokens) thus costs the planner nothing per attempt it
    has running (or token it has out).
    """

    __slots__ = ("_early", "_late", "_later", "base", "count")

    def __init__(
        self, base: float, count: int, early: list[float], later: Callable[[], list[float]]
    ) -> None:
        self.base = base
        self.count = count
        self._early = early
        heapq.heapify(early)
        self._late: list[float] | None = None
        self._later = later

    def _late_heap(self) -> list[float]:
        if self._late is None:
            self._late = self._later()
            heapq.heapify(self._late)
        return self._late

    def first(self) -> float:
        """The smallest time; ``math.inf`` when there is none."""
        early = self._early[0] if self._early else math.inf
        if self.count:
            return min(early, self.base)
        late = self._late_heap()
        return min(early, late[0]) if late else early

    def replace(self, value: float) -> None:
        """Take the smallest time out and put ``value`` in (nothing when empty)."""
        early = self._early
        head = early[0] if early else math.inf
        if self.count:
            if head < self.base:
                heapq.heapreplace(early, value)
            else:
                self.count -= 1
                heapq.heappush(early, value)
            return
        late = self._late_heap()
        if early and (not late or head <= late[0]):
            heapq.heapreplace(early, value)
        elif late:
            heapq.heapreplace(late, value)


class _Paper:
    """A provider's future on paper: when its slots and tokens free up."""

    __slots__ = (
        "blocked",
        "earliest",
        "latency",
        "limits",
        "packed",
        "slots",
        "tentative",
        "tokens",
    )

    def __init__(self, limits: ProviderLimits, now: float) -> None:
        self.limits = limits
        self.earliest: float | None = None  # start(now), kept until the next commit
        self.packed = 0  # embed texts on paper in the request not yet full
        latency = self.latency = limits.latency_s
        self.blocked = limits.held_until
        # A learned rate no second observation backs may be far too low: it orders the
        # work but is no reason to fail a job as hopeless.
        self.tentative = limits.learner.tentative
        usable = limits.usable_slots(now)
        reopen = limits.circuit.reopens_at()
        if usable == 0 and reopen is not None:
            usable, self.blocked = 1, max(self.blocked, reopen)
        running = limits.running

        def ends() -> list[float]:
            # An attempt past its expected end is assumed to need as long again as it has
            # run (at least a quarter of a service time): a hanging provider must not look
            # almost free. Only the `usable` earliest count when fewer slots are usable.
            times = [
                max(start + latency, now + max(0.25 * latency, now - start))
                for start in running.values()
            ]
            return heapq.nsmallest(usable, times) if len(times) > usable else times

        self.slots = _Times(now, max(0, usable - len(running)), [], ends)
        self.tokens: _Times | None = None
        bucket = limits.bucket
        if bucket.rpm:
            first = bucket.next_free(now)  # later than now only under burst pacing

            def returning() -> list[float]:
                return [max(first, t) for t in bucket.return_times(now)]

            # Only asked of providers a queued job may use.
            probe = [now] if limits.may_probe(now) else []
            self.tokens = _Times(first, min(bucket.available(now), 1024), probe, returning)

    def start(self, now: float, *, tokens: bool = True) -> float:
        """The earliest start on paper; ``tokens=False``: as if the rate did not bind."""
        slot = self.slots.first()
        if slot == math.inf:
            return math.inf
        at = max(now, slot, self.blocked)
        if tokens and self.tokens is not None:
            at = max(at, self.tokens.first())
        return at

    def commit(self, at: float) -> None:
        self.earliest = None
        self.slots.replace(at + self.latency)
        if self.tokens is not None:
            self.tokens.replace(at + self.limits.bucket.window_s)

    def pack(self, at: float, texts: int, now: float) -> None:
        """An embed job's texts ride in packed requests of ``max_batch``: only a request
        that fills takes a slot and a token on paper, so a deep queue of one-text jobs
        looks as far away as its requests are, not as its jobs."""
        batch = self.limits.config.max_batch
        self.packed += texts
        while self.packed >= batch:
            self.commit(at)
            self.packed -= batch
            at = self.start(now)


def plan(
    jobs: Iterable[Job],
    limits: Mapping[str, ProviderLimits],
    now: float,
    *,
    per_provider: int,
    retry_budget: int | None = None,
    wanted: Collection[str] | None = None,
    expiry_scan: int = EXPIRY_SCAN,
    max_scan: int = 4096,
) -> Plan:
    """Decide which queued jobs start now and where.

    ``jobs`` must come in the order they should be served (priority, then fair
    share). Stops as soon as no provider can start anything now, so a deep
    queue costs nothing while every provider is busy. ``retry_budget`` caps how
    many jobs that already had an attempt may start now (None: no cap), so a
    failing provider cannot multiply the load on the others. ``wanted`` names the
    providers some queued job may use: an idle provider nobody can use (the
    embeddings one during chat work) must not make every call read the queue.
    ``expiry_scan`` is how many jobs to check for a hopeless deadline when
    nothing can start (0: none; the deadline heap enforces deadlines anyway).
    """
    result = Plan()
    # Only providers some queued job may use are asked: that is the demand a probe
    # above a learned rate needs.
    startable = {
        name: free
        for name, p in limits.items()
        if (wanted is None or name in wanted) and (free := p.free_now(now, probe=True))
    }
    wake = _next_change(limits, now)
    # With nothing startable only the head of the queue is read, to fail fast the
    # jobs that cannot start before their deadline; a deep queue costs nothing then.
    limit = max_scan if startable else expiry_scan
    paper: dict[str, _Paper] = {}
    for scanned, job in enumerate(jobs):
        if scanned >= limit:
            break
        if not startable:
            limit = min(limit, scanned + expiry_scan)
            if job.deadline is None:
                continue
        is_retry = job.attempts > 0
        if is_retry and retry_budget is not None and retry_budget <= 0:
            continue
        best_name, best_at, best_end = None, math.inf, math.inf
        in_time_maybe = False  # an unconfirmed learned rate alone makes it look late
        holds = job.holds
        for name in job.candidates(per_provider):
            state = limits.get(name)
            if state is None or not state.enabled or not state.fits_today(job.prompt_tokens, now):
                continue
            sheet = paper.get(name)
            if sheet is None:
                sheet = paper[name] = _Paper(state, now)
            at = sheet.earliest
            if at is None:  # read again only after a commit moved it
                at = sheet.earliest = sheet.start(now)
            if holds:
                at = max(at, holds.get(name, now))
            if sheet.tentative and job.deadline is not None and at > job.deadline:
                untokened = max(sheet.start(now, tokens=False), holds.get(name, now))
                in_time_maybe = in_time_maybe or untokened <= job.deadline
            end = at + sheet.latency
            if end < best_end - EPSILON:
                best_name, best_at, best_end = name, at, end
        if best_name is None:
            continue  # nothing can ever take it now; the scheduler fails it on its own check
        if job.deadline is not None and best_at > job.deadline and not in_time_maybe:
            result.expired.append(job)
            continue
        hold = holds.get(best_name)
        if hold is not None and hold > now:
            wake = hold if wake is None else min(wake, hold)
        embed = job.embed
        if embed is not None:
            paper[best_name].pack(best_at, len(embed.unsent), now)
        else:
            paper[best_name].commit(best_at)
        if best_at <= now + EPSILON and best_name in startable:
            result.assign.append((job, best_name))
            if is_retry and retry_budget is not None:
                retry_budget -= 1
            startable[best_name] -= 1
            if not startable[best_name]:
                del startable[best_name]
    result.wake_at = wake
    return result


def _next_change(limits: Mapping[str, ProviderLimits], now: float) -> float | None:
    """When a provider with a free slot next gets a token or a probe, its block or deferral
    lifts, or its circuit reopens."""
    times: list[float] = []
    for state in limits.values():
        if not state.enabled:
            continue
        reopen = state.circuit.reopens_at()
        if reopen is not None:
            times.append(reopen)
            continue
        if state.in_flight < state.usable_slots(now):
            token = state.bucket.next_free(now)
            probe = state.probe_opens_at()
            if probe is not None and now < probe < token:
                token = probe  # a probe may take a job before the next token returns
            at = max(state.held_until, token)
            if at > now:
                times.append(at)
    return min(times) if times else None
