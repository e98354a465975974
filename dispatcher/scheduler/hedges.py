"""Sending hedged copies of slow jobs, and calling off the copy once the race is decided."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from dispatcher.contract.errors import Cancelled
from dispatcher.core import hedging
from dispatcher.scheduler.job import Job

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler

log = structlog.get_logger("dispatcher.scheduler")


def send_due(scheduler: Scheduler, now: float) -> None:
    """Send a second copy of slow hedgeable jobs to another provider, within budget."""
    for job in list(scheduler.timers.due_hedges(now)):
        others = hedging.hedge_targets(
            job,
            scheduler.limits,
            now,
            per_provider=scheduler.config.retry.per_provider,
            hedges_sent=scheduler.hedges_sent,
            attempts_sent=scheduler.attempts_sent,
        )
        if not others:
            continue
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
        scheduler.hedges_sent += 1
        scheduler.queue.push(copy, front=True)
        log.info("job.hedged", job=job.id, slow=job.provider, others=list(others))


def call_off(scheduler: Scheduler, job: Job) -> None:
    """The original finished (it won, or gave up): its copy has nothing left to race for."""
    copy = job.hedge
    if copy is None:
        return
    if copy.outcome is None:
        copy.stop = Cancelled("the hedged job finished")
        copy.finish(copy.stop)
        if not scheduler.queue.remove(copy) and copy.provider is not None:
            scheduler.actors[copy.provider].cancel(copy.id)
    if copy.provider is None:
        end_race(job, copy)  # the copy runs nowhere: nothing reads the links any more


def copy_ended(copy: Job) -> None:
    """A copy's attempt reported back: once its original is over too, the race is."""
    original = copy.hedge_of
    if original is not None and original.outcome is not None:
        end_race(original, copy)


def end_race(original: Job, copy: Job) -> None:
    """Cut the links between a finished job and its hedged copy: they make a cycle."""
    original.hedge = None
    copy.hedge_of = None
