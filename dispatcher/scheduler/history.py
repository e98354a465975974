"""Finished jobs: kept a while for `result`, the latest few for status, one log line each."""

from __future__ import annotations

from collections import OrderedDict, deque

import structlog

from dispatcher.contract.errors import DispatcherError
from dispatcher.contract.protocol import RecentJob, Result
from dispatcher.scheduler.job import Job

log = structlog.get_logger("dispatcher.scheduler")

FINISHED_KEPT = 10_000  # finished jobs kept in memory for `result`
RECENT_KEPT = 20  # finished jobs shown by status (and `dispatcher top`)


class History:
    __slots__ = ("done", "failed", "finished", "recent")

    def __init__(self) -> None:
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self.recent: deque[RecentJob] = deque(maxlen=RECENT_KEPT)
        self.done = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"<History kept {len(self.finished)} done {self.done} failed {self.failed}>"

    def get(self, job_id: str) -> Job | None:
        return self.finished.get(job_id)

    def record(self, job: Job, outcome: Result | DispatcherError) -> None:
        """Keep the finished job and log its one summary line."""
        self.finished[job.id] = job
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        self.recent.appendleft(
            RecentJob(
                job=job.id,
                cls=job.klass,
                outcome="ok" if isinstance(outcome, Result) else outcome.code,
                provider=outcome.provider if isinstance(outcome, Result) else None,
                latency_ms=outcome.latency_ms if isinstance(outcome, Result) else None,
                attempts=job.attempts,
                client=job.owner,
            )
        )
        if isinstance(outcome, Result):
            self.done += 1
            log.info(
                "job.done",
                job=job.id,
                cls=job.klass,
                provider=outcome.provider,
                attempts=outcome.attempts,
                latency_ms=outcome.latency_ms,
                tokens=outcome.usage.total_tokens,
                client=job.client,
            )
        else:
            self.failed += 1
            log.warning(
                "job.failed",
                job=job.id,
                cls=job.klass,
                code=outcome.code,
                attempts=job.attempts,
                reason=outcome.message,
                client=job.client,
            )
