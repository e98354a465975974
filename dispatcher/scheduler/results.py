"""A job's `result` reply, built from the answer of the attempt that won or from the cache."""

from __future__ import annotations

import msgspec

from dispatcher.contract.protocol import ChatRequest, Result
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers.actor import Answer
from dispatcher.scheduler.job import Job


def build(job: Job, provider: str, limits: ProviderLimits, answer: Answer, now: float) -> Result:
    body = answer.answer
    result = Result(
        id=job.request.id,
        job=job.id,
        provider=provider,
        model=body.model or limits.config.model,
        class_=job.klass,
        usage=body.usage,
        latency_ms=round((now - job.accepted_at) * 1000, 3),
        attempts=job.attempts,
        cached=False,
    )
    if isinstance(job.request, ChatRequest):
        result.content = getattr(body, "content", "")
        result.reasoning = getattr(body, "reasoning", None)
        result.finish_reason = getattr(body, "finish_reason", None)
        result.tool_calls = getattr(body, "tool_calls", None)
    else:
        result.embeddings = getattr(body, "embeddings", [])
    return result


def from_cache(job: Job, cached: Result, latency_s: float) -> Result:
    """A cached answer as this job's reply: its own ids, no attempt, marked cached."""
    return msgspec.structs.replace(
        cached,
        id=job.request.id,
        job=job.id,
        cached=True,
        attempts=0,
        latency_ms=round(latency_s * 1000, 3),
    )
