"""Per-client budgets and usage: the shell around :mod:`dispatcher.core.budgets`.

At submit, :meth:`Budgets.check` refuses what a client's budget forbids (a class, a
provider, a priority, its share of the queue, today's tokens) and narrows the job's
providers to the client's. At accept, :meth:`Budgets.admit` counts the job and, for a
client with an ``rpm``, lets it into the queue only while the client's minute has room:
the others are *parked* outside the queue, in arrival order, until the window frees
(:meth:`release_due`, woken by the scheduler's timers). So a client that sends 30 jobs
at once with ``rpm = 10`` has 10 queued in the first minute, and another client's jobs
meet only those 10 in the fair queue.

As an observer of every final answer (:meth:`on_job_done`) it corrects the client's
token charge to the real count and records the job in the usage store: a cached or
coalesced answer costs nothing upstream and is charged nothing.

Memory: a parked job is held here and in ``Scheduler.active``; one that is cancelled
while parked is answered by the scheduler and dropped here lazily.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from dispatcher.contract.config import Config
from dispatcher.contract.errors import DispatcherError
from dispatcher.contract.protocol import JobRequest, Result
from dispatcher.core.admission import Admission
from dispatcher.core.budgets import ClientState, refusal, utc_day
from dispatcher.scheduler.job import Job
from dispatcher.store.ledger import SharedLedger
from dispatcher.store.usage import UsageStore

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler

CLIENT_PREFIX = "client:"


def client_name(owner: str) -> str:
    """The name a usage row and a budget go by: ``alice`` for ``client:alice``, else the owner."""
    return owner.removeprefix(CLIENT_PREFIX)


def _owner(client: str, uid: int) -> str:
    return client if client.startswith(CLIENT_PREFIX) else f"uid:{uid}"


class Budgets:
    """Every client's budget state, its parked jobs, and the usage store it records into."""

    def __init__(self, config: Config, *, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.states: dict[str, ClientState] = {}
        self.parked: dict[str, deque[Job]] = {}
        self.usage = UsageStore(None)  # the daemon opens one in state_dir
        self.shared: SharedLedger | None = None  # several daemons: daily tokens fleet-wide
        self.reconfigure(config)

    def __repr__(self) -> str:
        parked = sum(len(jobs) for jobs in self.parked.values())
        return f"<Budgets {len(self.states)} clients, {parked} jobs parked>"

    def reconfigure(self, config: Config) -> None:
        """New budgets (SIGHUP): spends so far keep counting; a client removed has none."""
        for name, policy in config.clients.items():
            state = self.states.get(name)
            if state is None:
                self.states[name] = state = ClientState.of(name, policy)
                state.restore(self.wall(), self.usage.spent_today(name))
            else:
                state.reconfigure(policy)
        for name in set(self.states) - set(config.clients):
            del self.states[name]

    def restore(self) -> None:
        """Today's tokens per client from the usage store (once it is open)."""
        wall = self.wall()
        for name, state in self.states.items():
            state.restore(wall, self.usage.spent_today(name))

    def state_of(self, owner: str) -> ClientState | None:
        if not owner.startswith(CLIENT_PREFIX):
            return None
        return self.states.get(client_name(owner))

    # -- submit and accept ---------------------------------------------------------------

    def check(
        self, request: JobRequest, admitted: Admission, *, client: str, uid: int
    ) -> Admission:
        """The admission narrowed to the client's providers, or the error its budget gives."""
        state = self.state_of(_owner(client, uid))
        if state is None:
            return admitted
        wall = self.wall()
        fleet = 0
        if self.shared is not None and state.policy.daily_tokens:
            fleet = self.shared.client_tokens(state.name, day=utc_day(wall))
        decided = refusal(
            state,
            klass=admitted.klass,
            eligible=admitted.eligible,
            priority=request.priority,
            prompt_tokens=admitted.prompt_tokens,
            wall=wall,
            fleet_tokens=fleet,
        )
        if isinstance(decided, DispatcherError):
            raise decided
        if decided == admitted.eligible:
            return admitted
        pick = admitted.pick if admitted.pick in decided else None
        return dataclasses.replace(admitted, eligible=decided, pick=pick)

    def admit(self, scheduler: Scheduler, job: Job, now: float) -> bool:
        """Count an accepted job; True when it may join the queue now, False: parked."""
        state = self.state_of(job.owner)
        if state is None:
            return True
        state.jobs.add(job.id)
        self._charge(state, job.prompt_tokens)  # corrected when it ends
        bucket = state.bucket
        if not bucket.rpm:
            return True
        parked = self.parked.setdefault(state.name, deque())
        if not parked and bucket.available(now):
            bucket.take(now)
            return True
        job.parked = True
        parked.append(job)
        scheduler.timers.add_wake(bucket.next_free(now))
        return False

    def release_due(self, scheduler: Scheduler, now: float) -> None:
        """Parked jobs whose client's minute has room again join the queue, oldest first."""
        if not scheduler.timers.wakes_due(now):
            return
        for name, parked in list(self.parked.items()):
            state = self.states.get(name)
            bucket = state.bucket if state is not None else None
            while parked:
                job = parked[0]
                if job.outcome is not None:  # cancelled or timed out while parked
                    parked.popleft()
                    continue
                if bucket is not None and bucket.rpm and not bucket.available(now):
                    scheduler.timers.add_wake(bucket.next_free(now))
                    break
                parked.popleft()
                if bucket is not None and bucket.rpm:
                    bucket.take(now)
                job.parked = False
                scheduler.queue.push(job)
            if not parked:
                del self.parked[name]

    def _charge(self, state: ClientState, tokens: int) -> None:
        wall = self.wall()
        state.charge(wall, tokens)
        if self.shared is not None and state.policy.daily_tokens and tokens:
            self.shared.charge_client(state.name, tokens, day=utc_day(wall))

    # -- the observer ----------------------------------------------------------------------

    def on_attempt(self, provider: str, outcome: str, latency_s: float) -> None:
        pass

    def on_job_done(self, job: Job, outcome: Result | DispatcherError) -> None:
        """Charge the real tokens, record the job's usage."""
        spent = upstream_tokens(outcome)
        state = self.state_of(job.owner)
        if state is not None and job.id in state.jobs:
            state.jobs.discard(job.id)
            self._charge(state, spent - job.prompt_tokens)
        usage = outcome.usage if isinstance(outcome, Result) else None
        cached = isinstance(outcome, Result) and (outcome.cached or outcome.attempts == 0)
        self.usage.record(
            client=client_name(job.owner),
            provider=(outcome.provider if isinstance(outcome, Result) else job.provider) or "",
            klass=job.klass,
            prompt_tokens=usage.prompt_tokens if usage is not None and spent else 0,
            completion_tokens=usage.completion_tokens if usage is not None and spent else 0,
            total_tokens=spent,
            cached=cached,
            attempts=job.attempts,
            latency_ms=outcome.latency_ms if isinstance(outcome, Result) else 0.0,
        )


def upstream_tokens(outcome: Result | DispatcherError) -> int:
    """The tokens an answer cost upstream: none for a failure, a cached or a shared one.

    An embed job answered partly from the cache carries only its uncached texts' share.
    """
    if not isinstance(outcome, Result) or outcome.attempts == 0:
        return 0
    if outcome.cached:
        return 0
    return outcome.usage.total_tokens
