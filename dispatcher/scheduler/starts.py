"""Handing a planned chat job to its provider: the slot, the token, the hedge timer.

(Embed jobs go in packed requests instead: :func:`dispatcher.scheduler.batches.start`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.contract.protocol import ChatRequest
from dispatcher.core import hedging
from dispatcher.scheduler.job import Job

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler


def start(scheduler: Scheduler, job: Job, name: str, now: float) -> None:
    """Reserve the slot and token the plan gave the job and hand it to the actor."""
    scheduler.queue.remove(job, served=True)
    limits = scheduler.limits[name]
    limits.reserve(job.id, now, job.prompt_tokens)
    if scheduler.ledger is not None:  # written down, so a restart remembers the spend
        scheduler.ledger.spent(name)
        if limits.daily is not None:
            scheduler.ledger.charged(name, job.prompt_tokens)
    job.state, job.provider = "running", name
    job.attempts += 1
    scheduler.attempts_sent += 1
    if job.attempts > 1:
        scheduler.retries_in_flight.add(job.id)
    streaming = isinstance(job.request, ChatRequest) and job.request.stream
    if hedging.hedgeable(job, scheduler.config.classes.get(job.klass), streaming=streaming):
        scheduler.timers.add_hedge(now + limits.hedge_after_s(), job)
    if not scheduler.actors[name].deliver(job):
        limits.release(job.id)
        scheduler.retries_in_flight.discard(job.id)
        job.attempts -= 1
        job.provider = None
        scheduler.requeue(job)
