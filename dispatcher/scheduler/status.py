"""The `status` snapshot: every provider's limits and use, the queue, the latest jobs."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import TYPE_CHECKING

from dispatcher.contract.protocol import (
    CacheHits,
    CacheStatus,
    FleetUse,
    LedgerStatus,
    ProviderStatus,
    Status,
)
from dispatcher.core.provider_state import ProviderLimits

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler


def snapshot(scheduler: Scheduler, request_id: str | None = None) -> Status:
    now = scheduler.clock()
    queue = scheduler.queue
    shared = scheduler.shared
    fleet = shared.use() if shared is not None else {}
    providers = {}
    for name, limits in scheduler.limits.items():
        state = provider_status(limits, now, queued=queue.count_provider(name))
        use = fleet.get(name)
        if use is not None:
            state.fleet = FleetUse(
                in_flight=use.in_flight,
                window_spent=use.window_spent,
                daily_tokens=use.daily_tokens,
            )
        providers[name] = state
    ledger = (
        LedgerStatus(mode="local")
        if shared is None
        else LedgerStatus(mode=shared.mode, instances=shared.instances)
    )
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
        ledger=ledger,
        rss_bytes=rss_bytes(),
        cache=cache_status(scheduler),
    )


def cache_status(scheduler: Scheduler) -> CacheStatus:
    """Hits and misses per kind (chat: whole answers; embed: texts) and the batching."""
    answers, texts = scheduler.cache, scheduler.embed_cache
    requests = scheduler.embed_requests
    return CacheStatus(
        kinds={
            "chat": CacheHits(hits=answers.hits, misses=answers.misses),
            "embed": CacheHits(hits=texts.hits, misses=texts.misses),
            **_shared_hits(scheduler),
        },
        embed_texts=texts.texts,
        embed_bytes=texts.held_bytes,
        embed_requests=requests,
        texts_per_request=round(scheduler.embed_texts_sent / requests, 2) if requests else 0.0,
        coalesced=scheduler.flights.coalesced,
    )


def _shared_hits(scheduler: Scheduler) -> dict[str, CacheHits]:
    """The Redis tier's lookups (keys found and not), when there is one."""
    shared = scheduler.shared_cache
    if shared is None:
        return {}
    return {"shared": CacheHits(hits=shared.hits, misses=shared.misses)}


def rss_bytes() -> int | None:
    """The daemon's resident memory now (Linux's /proc/self/statm), else its peak so far."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not peak:
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, others KiB


def provider_status(limits: ProviderLimits, now: float, *, queued: int) -> ProviderStatus:
    bucket = limits.bucket
    return ProviderStatus(
        state=provider_state(limits, now),
        kind=limits.config.kind,
        in_flight=limits.in_flight,
        queued=queued,
        concurrency=limits.concurrency,
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
        learned=learned_note(limits, now),
    )


def learned_note(limits: ProviderLimits, now: float) -> str | None:
    """What was learned and from what, for a person: "30/min from a 429 at 12:01:07"."""
    learned = limits.learned()
    if learned is None:
        return None
    parts = []
    if learned.rpm:
        parts.append(f"{learned.rpm}/min")
    if learned.concurrency:
        parts.append(f"{learned.concurrency} at once")
    if not parts:
        return None
    at = time.strftime("%H:%M:%S", time.localtime(time.time() - (now - learned.at)))
    confirmed = "" if learned.confirmed else ", not yet confirmed"
    return f"{' and '.join(parts)} from {learned.source} at {at}{confirmed}"


def provider_state(limits: ProviderLimits, now: float) -> str:
    if not limits.enabled:
        return "disabled"
    if limits.circuit.state != "closed":
        return limits.circuit.state
    if now < limits.blocked_until:
        return "rate_limited"
    if limits.in_flight >= limits.concurrency:
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
