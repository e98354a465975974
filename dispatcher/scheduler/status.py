"""The `status` snapshot: every provider's limits and use, the queue, the latest jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dispatcher.contract.protocol import ProviderStatus, Status
from dispatcher.core.provider_state import ProviderLimits

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler


def snapshot(scheduler: Scheduler, request_id: str | None = None) -> Status:
    now = scheduler.clock()
    queue = scheduler.queue
    providers = {
        name: provider_status(limits, now, queued=queue.count_provider(name))
        for name, limits in scheduler.limits.items()
    }
    history = scheduler.history
    return Status(
        id=request_id,
        providers=providers,
        queued=len(queue),
        running=sum(limits.in_flight for limits in scheduler.limits.values()),
        uptime_s=round(now - scheduler.started_at, 3),
        classes=queue.classes(),
        jobs_done=history.done,
        jobs_failed=history.failed,
        recent=list(history.recent),
    )


def provider_status(limits: ProviderLimits, now: float, *, queued: int) -> ProviderStatus:
    bucket = limits.bucket
    return ProviderStatus(
        state=provider_state(limits, now),
        kind=limits.config.kind,
        in_flight=limits.in_flight,
        queued=queued,
        concurrency=limits.config.concurrency,
        rpm=limits.config.rpm,
        tokens=bucket.available(now) if bucket.rpm else None,
        latency_ms=round(limits.latency_s * 1000, 1),
        ok=limits.ok,
        failed=limits.failed,
        rate_limited=limits.rate_limited,
        learned_rpm=None if limits.learner is None else limits.learner.rpm,
        circuit=limits.circuit.state,
        blocked_for_s=round(max(0.0, limits.blocked_until - now), 3),
        daily_tokens_left=None if limits.daily is None else limits.daily.remaining(now),
        problem=limits.problem,
    )


def provider_state(limits: ProviderLimits, now: float) -> str:
    if not limits.enabled:
        return "disabled"
    if limits.circuit.state != "closed":
        return limits.circuit.state
    if now < limits.blocked_until:
        return "rate_limited"
    if limits.in_flight >= limits.config.concurrency:
        return "busy"
    return "ready"


def drain_estimate_s(scheduler: Scheduler) -> float:
    """A rough retry-after hint: how long the queue takes at the current capacity."""
    rate = sum(
        limits.config.concurrency / max(limits.latency_s, 0.001)
        for limits in scheduler.limits.values()
        if limits.enabled
    )
    return round(min(300.0, max(0.5, len(scheduler.queue) / rate)), 1) if rate else 60.0
