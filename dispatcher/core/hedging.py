"""Hedging: when a slow attempt gets a second copy at another provider, within a budget.

A class with ``hedge = true`` sends a copy of a job whose attempt has run past
its provider's 95th percentile to another provider that can start it now; the
first answer wins and the other attempt is cancelled. Copies are at most
``HEDGE_SHARE`` of all attempts, so hedging never multiplies the load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from dispatcher.contract.config import ClassPolicy
from dispatcher.core.provider_state import ProviderLimits

if TYPE_CHECKING:
    from dispatcher.scheduler.job import Job

HEDGE_SHARE = 0.05  # hedged copies are at most this share of all attempts


def hedgeable(job: Job, policy: ClassPolicy | None, *, streaming: bool) -> bool:
    """Whether this job may ever get a copy: its class hedges, and a stream cannot be raced."""
    return (
        policy is not None
        and policy.hedge
        and job.hedge_of is None
        and job.hedge is None
        and not streaming
    )


def hedge_targets(
    job: Job,
    limits: Mapping[str, ProviderLimits],
    now: float,
    *,
    per_provider: int,
    hedges_sent: int,
    attempts_sent: int,
) -> tuple[str, ...]:
    """The providers a copy of this slow job may go to now; empty when it should get none."""
    if job.outcome is not None or job.state != "running" or job.hedge is not None:
        return ()
    if hedges_sent + 1 > HEDGE_SHARE * attempts_sent:
        return ()
    others = tuple(p for p in job.candidates(per_provider) if p != job.provider)
    if not any(limits[p].can_start(now) for p in others):
        return ()  # a copy that would wait in the queue is no faster
    return others
