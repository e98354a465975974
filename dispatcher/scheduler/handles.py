"""What the scheduler talks to: the provider actors it hands jobs to, and its observers."""

from __future__ import annotations

from typing import Protocol

from dispatcher.contract.errors import DispatcherError
from dispatcher.contract.protocol import Result
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.scheduler.job import Job


class Observer(Protocol):
    """Something that wants to hear about every attempt and every final answer (metrics)."""

    def on_attempt(self, provider: str, outcome: str, latency_s: float) -> None: ...

    def on_job_done(self, job: Job, outcome: Result | DispatcherError) -> None: ...


class ProviderHandle(Protocol):
    """What the scheduler needs of a provider actor (tests use fakes of it)."""

    name: str
    limits: ProviderLimits

    def deliver(self, job: Job) -> bool: ...

    def cancel(self, job_id: str) -> None: ...
