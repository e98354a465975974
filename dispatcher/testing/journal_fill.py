"""Fill a journal with unfinished jobs, as a daemon killed mid-work would leave it.

Used by ``benchmarks/restart.py`` (how long a restart on a full journal takes) and
``tests/test_restart.py`` (every such job is replayed). The jobs are written through
:class:`dispatcher.store.journal.Journal`, the daemon's own writer, so the rows are exactly
what a real daemon stores.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from dispatcher.contract.protocol import ChatRequest
from dispatcher.core.keys import request_digest
from dispatcher.scheduler.job import Job
from dispatcher.store.journal import Journal

__all__ = ["unfinished_job", "write_unfinished"]


def unfinished_job(i: int, *, uid: int = 0) -> Job:
    """The ``i``-th of the journaled jobs: detached, keyed ``restart-<i>``, never started."""
    request = ChatRequest(
        id=f"r{i}",
        messages=[{"role": "user", "content": f"replayed job {i}"}],
        task="bulk",
        key=f"restart-{i}",
        detach=True,
    )
    return Job(
        id=f"job{i:08d}",
        request=request,
        kind="chat",
        klass="bulk",
        eligible=(),
        client=f"{uid}:bench",
        uid=uid,
        prompt_tokens=8,
        accepted_at=0.0,
        durable=True,
        digest=request_digest(request),
    )


async def write_unfinished(path: Path, jobs: int) -> None:
    """A journal at ``path`` holding ``jobs`` accepted jobs without an answer."""
    journal = Journal(path)
    await anyio.to_thread.run_sync(journal.open)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(journal.run)
            async with anyio.create_task_group() as writers:
                for i in range(jobs):
                    writers.start_soon(journal.accept, unfinished_job(i))
            tg.cancel_scope.cancel()
    finally:
        journal.close()
