"""A job the local caches missed, looked up in the answers other hosts cached (Redis).

With ``[cache] redis_url`` (:mod:`dispatcher.store.redis_cache`), :func:`look_up`
holds a cacheable job outside the queue for one Redis round trip (at most the
shared cache's ``timeout_s``): a chat job whose whole answer is there is answered
with it, an embed job takes the vectors there are, and whatever is left joins the
queue as any job would (:meth:`Scheduler.enqueue`). The answers found fill the local
caches too. A job cancelled meanwhile is answered at once by the scheduler
(it waits outside the queue), and its lookup's reply is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.scheduler import batches, results
from dispatcher.scheduler.job import Job

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler


def look_up(scheduler: Scheduler, job: Job) -> bool:
    """Ask Redis for what the local caches missed; True when the job waits for the answer."""
    cache, tasks = scheduler.shared_cache, scheduler.flights.tasks
    if cache is None or tasks is None:
        return False
    work = job.embed
    if work is not None:
        if work.keys is None or not work.unsent:
            return False
        keys = [cache.vector_key(work.keys[i]) for i in work.unsent]
    elif job.cache_key is not None:
        keys = [cache.answer_key(job.cache_key)]
    else:
        return False
    job.parked = True  # outside the queue until Redis answers: a cancel answers it at once
    tasks.start_soon(_ask, scheduler, job, keys)
    return True


async def _ask(scheduler: Scheduler, job: Job, keys: list[str]) -> None:
    cache = scheduler.shared_cache
    assert cache is not None
    found = await cache.lookup(keys)  # never raises; {} when Redis is away or slow
    job.parked = False
    if job.outcome is not None:
        return  # cancelled or timed out while Redis was asked
    now = scheduler.clock()
    work = job.embed
    if work is not None:
        assert work.keys is not None
        vectors = {}
        for index, key in zip(work.unsent, keys, strict=True):
            value = found.get(key)
            vector = cache.vector(value) if value is not None else None
            if vector is not None:
                vectors[index] = vector
                scheduler.embed_cache.put(work.keys[index], vector)
        batches.take_vectors(scheduler, job, vectors)
        whole = batches.answered(scheduler, job)
        if whole is not None:
            scheduler.finish(job, whole)
            return
    elif job.cache_key is not None and (value := found.get(keys[0])) is not None:
        result = cache.answer(value)
        if result is not None:
            scheduler.cache.put(job.cache_key, result)
            scheduler.finish(job, results.from_cache(job, result, now - job.accepted_at))
            return
    scheduler.enqueue(job, now)
