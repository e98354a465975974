"""Health probes: one tiny job pinned to a provider, through its limits like any other."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from dispatcher.contract.errors import Cancelled, DispatcherError
from dispatcher.contract.protocol import ChatRequest, EmbedRequest, JobRequest, ProbeResult, Result

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler

GRACE_S = 5.0  # beyond the probe's own timeout, for the scheduler to answer it


async def probe(scheduler: Scheduler, name: str, *, timeout_s: float) -> ProbeResult:
    """Send a one-token job to ``name`` (free tiers count it) and report how it went.

    Resource handling: the probe job is cancelled when it has no answer in time
    or when the caller is cancelled, so it never holds a slot after we stop waiting.
    """
    limits = scheduler.limits.get(name)
    if limits is None:
        return ProbeResult(ok=False, error="no such provider")
    if not limits.enabled:
        return ProbeResult(ok=False, error=limits.problem or "disabled")
    request: JobRequest
    if limits.config.kind == "embed":
        # cache=False: a probe must reach the upstream, not the embedding cache
        request = EmbedRequest(id=f"health-{name}", input="ping", providers=[name], cache=False)
    else:
        request = ChatRequest(
            id=f"health-{name}",
            messages=[{"role": "user", "content": "ping"}],
            max_tokens=1,
            task="realtime",
            providers=[name],
            timeout_s=timeout_s,
        )
    try:
        job = scheduler.submit(request, client="health", uid=0)
    except DispatcherError as exc:
        return ProbeResult(ok=False, error=exc.message)
    try:
        with anyio.move_on_after(timeout_s + GRACE_S):
            await job.done.wait()
    finally:
        if job.outcome is None:  # timed out, or our caller was cancelled: stop the probe
            scheduler.cancel(job)
    outcome = job.outcome
    if isinstance(outcome, Result):
        return ProbeResult(ok=True, latency_ms=outcome.latency_ms, model=outcome.model)
    if isinstance(outcome, DispatcherError) and not isinstance(outcome, Cancelled):
        return ProbeResult(ok=False, error=outcome.message)
    return ProbeResult(ok=False, error=f"no answer within {timeout_s:g} s")
