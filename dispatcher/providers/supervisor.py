"""Supervision shaped like OTP, kept small: restart a crashed child with backoff.

A child is anything with ``async run(*, task_status)``. When it raises, the
supervisor calls its ``on_crash`` hook (so the jobs it held go back to the
scheduler), waits a jittered, growing backoff and starts it again. More than
``max_restarts`` within ``window_s`` means something is deeply wrong: the
supervisor raises :class:`RestartIntensityExceeded`, the process exits non-zero
and systemd, the top supervisor, restarts it.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
import structlog
from anyio.abc import TaskStatus

log = structlog.get_logger("dispatcher.supervisor")


class Child(Protocol):
    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...


class RestartIntensityExceeded(Exception):
    """A child crashed too often; the process should exit non-zero."""


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    child: Child
    on_crash: Callable[[], None] | None = None


class Supervisor:
    def __init__(
        self,
        *,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._sleep = sleep
        self.restarts: dict[str, int] = {}

    async def supervise(
        self, spec: ChildSpec, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``spec.child`` until it returns; restart it when it raises."""
        recent: deque[float] = deque()
        readiness = _ReportOnce(task_status)
        while True:
            try:
                await spec.child.run(task_status=readiness)
            except Exception as exc:
                now = self._clock()
                recent.append(now)
                while recent and recent[0] <= now - self.window_s:
                    recent.popleft()
                self.restarts[spec.name] = self.restarts.get(spec.name, 0) + 1
                log.error(
                    "actor.crashed",
                    actor=spec.name,
                    error=f"{type(exc).__name__}: {exc}",
                    crashes_in_window=len(recent),
                    exc_info=exc,
                )
                if spec.on_crash is not None:
                    spec.on_crash()
                if len(recent) > self.max_restarts:
                    raise RestartIntensityExceeded(
                        f"{spec.name} crashed {len(recent)} times within {self.window_s:g} s"
                    ) from exc
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (len(recent) - 1))
                await self._sleep(random.uniform(delay / 2, delay))
                log.info("actor.restarting", actor=spec.name)
            else:
                return


class _ReportOnce:
    """Passes the first ``started()`` on to the parent: readiness is reported once, even
    when the first start crashed before it was ready and a restart got there."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self._inner = inner
        self.reported = False

    def started(self, value: None = None) -> None:
        if not self.reported:
            self.reported = True
            self._inner.started()
