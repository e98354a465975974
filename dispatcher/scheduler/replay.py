"""Jobs from the journal: replayed after a restart, or rebuilt to answer a late `result`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from dispatcher.contract.errors import DispatcherError
from dispatcher.core import admission
from dispatcher.providers import adapters
from dispatcher.scheduler.job import Job
from dispatcher.store.journal import StoredJob

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler


def restore(scheduler: Scheduler, stored: StoredJob) -> None:
    """Queue a journaled job again after a restart, under its old id.

    An earlier run accepted it, so no cap refuses it now; one that cannot run
    under the current configuration is answered at once with why.
    """
    try:
        admitted = admission.route(
            stored.request,
            config=scheduler.config,
            limits=scheduler.limits,
            now=scheduler.clock(),
            rng=scheduler.rng,
            refusal=adapters.refusals(scheduler.config.providers),
        )
    except DispatcherError as exc:
        job = rebuild(scheduler, stored, client=stored.client or "replay")
        scheduler.active[job.id] = job
        scheduler.finish(job, exc)
        return
    job = scheduler.accept(
        stored.request,
        admitted,
        client=stored.client or f"{stored.uid}:replay",
        uid=stored.uid,
        job_id=stored.id,
    )
    job.durable = True
    job.persisted.set()


def rebuild(scheduler: Scheduler, stored: StoredJob, *, client: str) -> Job:
    """A job rebuilt from its journal row: durable, already persisted, not routed."""
    job = Job.admitted(
        stored.request,
        admission.describe(stored.request),
        client=client,
        uid=stored.uid,
        now=scheduler.clock(),
        job_id=stored.id,
    )
    job.durable = True
    job.persisted.set()
    return job


async def resolve(scheduler: Scheduler, job_id: str) -> Job | None:
    """A job by id: in memory, or a finished one only the journal still has."""
    job = scheduler.lookup(job_id)
    journal = scheduler.journal
    if job is not None or journal is None:
        return job
    stored = await anyio.to_thread.run_sync(journal.lookup, job_id)
    if stored is None or stored.outcome is None:
        return None
    job = rebuild(scheduler, stored, client=stored.client or "journal")
    job.finish(stored.outcome)
    return job
