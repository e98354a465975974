"""What an attempt's outcome means for its job and its provider: the one place the retry rule lives.

:func:`judge` turns the end of one attempt into a verdict the scheduler carries out:

- :class:`Success`: finish the job with the answer.
- :class:`Requeue`: queue it again; ``job.holds`` and ``job.excluded`` say where and
  when it may run next (a retry at the same provider after a backoff, or a fallback).
- :class:`Final`: finish the job with this error.
- :class:`Disable`: take the provider out (its key was refused), then apply ``then``.

The rule, in one place:

- 429 blocks the provider until its Retry-After (else a backoff) and the job retries;
  a provider with no published limit learns its rate from it, and one whose error body
  says "concurrency" learns its slots (see ``LimitLearner``). The upstream chooses the
  wait, so it is capped at ``MAX_RETRY_AFTER_S``.
- 401/403 takes the provider out; the job falls back.
- 5xx, timeouts, resets and unusable answers retry here after a jittered backoff and
  count against the provider's circuit.
- Any other 4xx (not 408, 409 or 429) is final: the provider refused the request itself,
  and sending it again, there or elsewhere, would spend quota to fail the same way.
- An attempt that raised something no translation knows (:class:`AttemptCrashed`: a bug,
  or a local setting aiohttp refuses) takes that provider out for the job, which falls
  back; it says nothing about the upstream's health, so the circuit does not hear of it.
- A failure after chunks reached the client is final: a stream cannot be replayed.
- At most ``retry.per_provider`` attempts per provider and ``retry.max_attempts`` in
  all, never past the job's deadline; an actor that dies holding a job gives it back
  at most ``MAX_HANDBACKS`` times.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from dispatcher.contract.config import RetryConfig
from dispatcher.contract.errors import (
    DispatcherError,
    InternalError,
    Timeout,
    UpstreamError,
    UpstreamFailed,
    UpstreamKind,
    UpstreamRejected,
)
from dispatcher.core.provider_state import ProviderLimits

if TYPE_CHECKING:
    from typing import TypeAlias

    from dispatcher.providers.actor import Answer
    from dispatcher.scheduler.job import Job

    Outcome: TypeAlias = Answer | UpstreamError | None

MAX_HANDBACKS = 2  # an actor died holding the job this often: the job is poison
RETRYABLE_KINDS: frozenset[UpstreamKind] = frozenset(
    {"rate_limited", "server", "timeout", "connect", "bad_answer", "conflict"}
)
# Failures that say the provider itself is sick: the circuit breaker's input.
SICK_KINDS: frozenset[UpstreamKind] = frozenset({"server", "timeout", "connect", "bad_answer"})
# The longest an upstream may hold a provider with Retry-After (or a rate-limit reset
# header): past it, one request finds out whether the block is still meant.
MAX_RETRY_AFTER_S = 3600.0

E = TypeVar("E", bound=BaseException)


class AttemptCrashed(UpstreamError):
    """An attempt raised an exception no translation knows: a bug, or a local setting the
    HTTP client refuses (a key with a newline makes aiohttp reject the header).

    Its wire kind is ``bad_answer`` (no usable answer came back), but :func:`judge`
    reads it apart: sending the same request through the same code would raise the
    same way, so the provider is excluded for this job (it falls back to the others);
    and the upstream never said anything, so the circuit does not count it: one bad
    setting must not mark a healthy provider sick, nor every job through it.
    """

    def __init__(self, exc: Exception, detail: str) -> None:
        super().__init__("bad_answer", f"the attempt failed inside the daemon ({detail})")
        self.error_type = type(exc).__name__


def bare(error: E) -> E:
    """``error`` without its traceback and chained exceptions, to be stored on a job.

    A raised exception's traceback holds the frames it passed through, and those hold
    the job: stored on the job, it makes a cycle that only a full collection frees,
    keeping a large request alive long after it finished.
    """
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


def capped_wait_s(seconds: float) -> float:
    """An upstream-chosen wait (Retry-After, a reset header), at most ``MAX_RETRY_AFTER_S``."""
    return min(seconds, MAX_RETRY_AFTER_S)


@dataclass(frozen=True, slots=True)
class Success:
    """The attempt answered."""


@dataclass(frozen=True, slots=True)
class Requeue:
    """Queue the job again: a retry or a fallback, as its holds and exclusions say."""


@dataclass(frozen=True, slots=True)
class Final:
    """The job is over with this error."""

    error: DispatcherError


@dataclass(frozen=True, slots=True)
class Disable:
    """Take the provider out for ``problem``, then carry out ``then`` for the job."""

    problem: str
    then: Requeue | Final


Verdict = Success | Requeue | Final | Disable


def judge(
    job: Job,
    provider: str,
    limits: ProviderLimits,
    outcome: Outcome,
    now: float,
    retry: RetryConfig,
    rng: random.Random,
) -> Verdict:
    """Record what the attempt says about the provider and decide the job's next step.

    ``now`` is when the attempt ended; ``limits`` is the provider's state, updated
    here (counters, circuit, Retry-After block, learned rate).
    """
    if outcome is None:  # stopped, or the actor died holding it
        if job.stop is not None:
            return Final(job.stop)
        if job.streamed:  # a second stream would repeat what the client already has
            return Final(_broken_stream(provider, "the provider actor stopped mid-stream"))
        job.handbacks += 1
        job.attempts -= 1
        if job.handbacks > MAX_HANDBACKS:
            return Final(InternalError(f"{provider} crashed {job.handbacks} times on this job"))
        return Requeue()
    if not isinstance(outcome, UpstreamError):
        record_success(limits, outcome, now)
        return Success()
    error = after_stream(outcome, streamed=job.streamed)
    disable = _record_failure(
        limits, error, now, retry, rng, stopped=job.stop is not None, job_id=job.id
    )
    if job.stop is not None:
        return Final(job.stop)
    verdict = _next_step(job, provider, error, now, retry, rng)
    return verdict if disable is None else Disable(disable, verdict)


def record_success(limits: ProviderLimits, answer: Answer, now: float) -> None:
    """What an answer says about its provider: healthy, this fast, maybe near its limit."""
    limits.ok += 1
    limits.observe_latency(answer.latency_s)
    limits.circuit.on_success(limits.concurrency)
    info = answer.ratelimit
    if info is None:
        return
    limits.learn_from_headers(info.limit, info.reset_s, now)
    if info.remaining == 0 and info.reset_s:
        limits.block(now + capped_wait_s(info.reset_s))


def after_stream(error: UpstreamError, *, streamed: bool) -> UpstreamError:
    """A failure once chunks reached the client is a broken stream, whatever caused it."""
    if streamed and error.kind != "stream_broken":
        return UpstreamError("stream_broken", error.short())
    return error


def is_retryable(error: UpstreamError) -> bool:
    return error.kind in RETRYABLE_KINDS


def key_hint(limits: ProviderLimits) -> str:
    """Where the provider's key comes from, for a person to check."""
    config = limits.config
    if config.api_key_env:
        return f"${config.api_key_env}"
    if config.api_key_file:
        return f"the key file {config.api_key_file}"
    return "its key"


def _record_failure(
    limits: ProviderLimits,
    error: UpstreamError,
    now: float,
    retry: RetryConfig,
    rng: random.Random,
    *,
    stopped: bool,
    job_id: str | None = None,
) -> str | None:
    """Update the provider's state; the problem to disable it for, if any."""
    limits.failed += 1
    if error.kind == "rate_limited":
        limits.rate_limited += 1
        wait = error.retry_after_s
        if wait is None:
            wait = backoff_s(1, retry, rng)
        limits.block(now + capped_wait_s(wait))
        limits.learn_from_429(now, job_id=job_id, limit_kind=error.limit_kind)
    elif error.kind == "auth":
        hint = key_hint(limits)
        error.detail = f"{error.detail}; the key was refused: check {hint}"
        return f"the key was refused (HTTP {error.status}); check {hint} and reload"
    elif error.kind in SICK_KINDS and not stopped and not isinstance(error, AttemptCrashed):
        limits.circuit.on_failure(now)
    return None


def _next_step(
    job: Job,
    provider: str,
    error: UpstreamError,
    now: float,
    retry: RetryConfig,
    rng: random.Random,
) -> Requeue | Final:
    """Update the job after a failed attempt: where it may go next, or its final error."""
    job.history.append((provider, bare(error)))
    if error.kind == "stream_broken":
        return Final(_broken_stream(provider, error.short()))
    if error.kind == "rejected":
        return Final(
            UpstreamRejected(
                f"{provider} refused the request ({error.short()}); sending it again "
                "unchanged will fail the same way: fix the request",
                upstream_status=error.status,
            )
        )
    count = job.failures[provider] = job.failures.get(provider, 0) + 1
    if not is_retryable(error) or count >= retry.per_provider or isinstance(error, AttemptCrashed):
        job.excluded.add(provider)
    elif error.retry_after_s is not None:
        job.holds[provider] = now + capped_wait_s(error.retry_after_s)
    else:
        job.holds[provider] = now + backoff_s(count, retry, rng)
    if job.deadline is not None and now >= job.deadline:
        return Final(
            Timeout(
                f"the job's deadline passed after {describe_attempts(job)}; "
                "allow more time with timeout_s"
            )
        )
    if job.attempts >= retry.max_attempts:
        return Final(UpstreamFailed(f"gave up after {describe_attempts(job)}"))
    if not job.candidates(retry.per_provider):
        return Final(UpstreamFailed(f"every eligible provider failed: {describe_attempts(job)}"))
    return Requeue()


def timeout_error(job: Job, what: str) -> Timeout:
    """The job ran out of time: how long it had, what was tried, what to do."""
    tried = f" after {describe_attempts(job)}" if job.history else ""
    return Timeout(
        f"the job {what} ({job.timeout_s:g} s, set with timeout_s){tried}; "
        "raise timeout_s or retry when the providers are less busy"
    )


def _broken_stream(provider: str, why: str) -> UpstreamFailed:
    return UpstreamFailed(
        f"{provider} broke the stream after it had started ({why}); "
        "the partial answer above is all there is: send the request again"
    )


def backoff_s(failures: int, retry: RetryConfig, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, base * 2^(n-1)], capped."""
    ceiling = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** max(0, failures - 1))
    return rng.uniform(0.0, ceiling)


def describe_attempts(job: Job) -> str:
    """One sentence naming every provider tried, how often and why: "hunyuan 3x (HTTP 500: ...)"."""
    if not job.history:
        return "no attempt"
    order: dict[str, list[UpstreamError]] = {}
    for name, error in job.history:
        order.setdefault(name, []).append(error)
    parts = []
    for name, errors in order.items():
        reasons = list(dict.fromkeys(e.short() for e in errors))
        parts.append(f"{name} {len(errors)}x ({'; '.join(reasons[-2:])})")
    total = len(job.history)
    return f"{total} attempt{'s' if total != 1 else ''}: " + ", ".join(parts)


def judge_failure(
    job: Job,
    provider: str,
    error: UpstreamError,
    now: float,
    retry: RetryConfig,
    rng: random.Random,
) -> DispatcherError | None:
    """The job's side of a failed attempt alone: its final error, or None to queue it again."""
    verdict = _next_step(job, provider, error, now, retry, rng)
    return verdict.error if isinstance(verdict, Final) else None
