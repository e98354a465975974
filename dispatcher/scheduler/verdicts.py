"""Carrying out what an attempt's outcome means: the shell around :func:`outcomes.judge`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from dispatcher.contract.errors import Cancelled, NoProvider, UpstreamError
from dispatcher.core import outcomes
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers.actor import Answer, NotSent, Outcome
from dispatcher.scheduler import fleet, results
from dispatcher.scheduler.job import Job
from dispatcher.store.ledger import Deny

if TYPE_CHECKING:
    from dispatcher.scheduler.loop import Scheduler

log = structlog.get_logger("dispatcher.scheduler")


def after_outcome(
    scheduler: Scheduler, job: Job, provider: str, outcome: Outcome, now: float, started: float
) -> None:
    """Tell the observers, judge the outcome and carry out the verdict."""
    limits = scheduler.limits[provider]
    verdict = judged(scheduler, job, provider, outcome, now, started)
    if verdict is None:
        return
    match verdict:
        case outcomes.Success():
            assert isinstance(outcome, Answer)
            correct_charge(scheduler, limits, outcome, job.prompt_tokens, now)
            result = results.build(job, provider, limits, outcome, now)
            if job.cache_key is not None:
                scheduler.cache.put(job.cache_key, result)
                if scheduler.shared_cache is not None:  # and for the other hosts
                    scheduler.shared_cache.put_answer(job.cache_key, result)
            scheduler.finish(job, result)
        case outcomes.Requeue():
            scheduler.requeue(job)
        case outcomes.Final(error):
            scheduler.finish(job, error)


def correct_charge(
    scheduler: Scheduler, limits: ProviderLimits, answer: Answer, estimate: int, now: float
) -> None:
    """The real token count replaces the estimate ``reserve`` charged to the daily quota."""
    if limits.daily is not None:
        correction = answer.answer.usage.total_tokens - estimate
        limits.daily.spend(now, correction)
        if scheduler.ledger is not None:
            scheduler.ledger.charged(limits.name, correction)


def judged(
    scheduler: Scheduler, job: Job, provider: str, outcome: Outcome, now: float, started: float
) -> outcomes.Success | outcomes.Requeue | outcomes.Final | None:
    """Tell the observers and judge the outcome: the verdict to carry out for ``job``, with
    the provider's side (blocks, learned limits, a disabled key) already done; None when
    nothing is left to carry out (deferred, not sent, a hedge's race)."""
    limits = scheduler.limits[provider]
    if isinstance(outcome, Deny):  # another host holds the capacity: not an attempt
        _defer(scheduler, job, limits, outcome, now)
        return None
    if isinstance(outcome, NotSent):  # nothing reached the upstream: not an attempt
        _not_sent(scheduler, job, limits, outcome, now)
        return None
    if isinstance(outcome, Answer):
        for observer in scheduler.observers:
            observer.on_attempt(provider, "ok", outcome.latency_s)
        info = outcome.ratelimit
        if info is not None and info.remaining == 0:
            _note_capped_wait(limits, info.reset_s)
    elif outcome is not None:
        outcome = outcomes.after_stream(outcome, streamed=job.streamed)
        for observer in scheduler.observers:
            observer.on_attempt(provider, outcome.kind, max(0.0, now - started))
        if outcome.kind == "timeout":
            limits.observe_latency(now - started)  # slowness the planner must see
    if job.hedge_of is not None:
        _on_copy_outcome(scheduler, job, provider, limits, outcome, now)
        return None
    if job.outcome is not None:
        return None  # the race was won by its hedge; this attempt was cancelled
    was_open = limits.circuit.state == "open"
    blocked, learned = limits.blocked_until, limits.learned()
    verdict = outcomes.judge(
        job, provider, limits, outcome, now, scheduler.config.retry, scheduler.rng
    )
    ledger = scheduler.ledger
    if ledger is not None:  # what a restart must remember: blocks and learned limits
        if limits.blocked_until > blocked:
            ledger.blocked(provider, limits.blocked_until - now)
        new = limits.learned()
        if new is not None and new != learned:
            ledger.learned(provider, new, age_s=now - new.at)
    opened = not was_open and limits.circuit.state == "open"
    fleet.tell(
        scheduler,
        limits,
        now,
        blocked_before=blocked,
        learned_before=learned,
        circuit_opened=opened,
    )
    if isinstance(outcome, UpstreamError):
        _note_capped_wait(limits, outcome.retry_after_s)
        if opened:
            log.warning("circuit.open", provider=provider, reason=outcome.short())
        log.info(
            "attempt.failed",
            job=job.id,
            provider=provider,
            kind=outcome.kind,
            reason=outcome.short(),
        )
    if isinstance(verdict, outcomes.Disable):
        disable(scheduler, provider, verdict.problem)
        verdict = verdict.then
    return verdict


def _defer(scheduler: Scheduler, job: Job, limits: ProviderLimits, deny: Deny, now: float) -> None:
    """The fleet's ledger said not now: give the local token back, hold the provider, requeue.

    A concurrency refusal holds only briefly: a slot coming free anywhere ends it
    (:meth:`Scheduler.on_freed`). A hedged copy is simply dropped.
    """
    job.attempts -= 1
    limits.give_back(job.id)
    limits.defer(now + deny.retry_after_s)
    if job.hedge_of is not None:
        job.finish(Cancelled("the fleet had no room for the hedged copy"))
    elif job.stop is not None:
        scheduler.finish(job, job.stop)
    elif job.outcome is None:
        scheduler.requeue(job)


def _not_sent(
    scheduler: Scheduler, job: Job, limits: ProviderLimits, not_sent: NotSent, now: float
) -> None:
    """The attempt never went out (stopped, or its deadline passed before it was sent):
    its token comes back, the circuit hears nothing, and the job gets its stop reason or
    its ``timeout``. A hedged copy is simply dropped."""
    job.attempts -= 1
    limits.give_back(job.id)
    if limits.daily is not None and job.prompt_tokens:  # the estimate reserve() charged
        limits.daily.spend(now, -job.prompt_tokens)
        if scheduler.ledger is not None:
            scheduler.ledger.charged(limits.name, -job.prompt_tokens)
    log.info("attempt.not_sent", job=job.id, provider=limits.name, reason=not_sent.reason)
    if job.hedge_of is not None:
        job.finish(Cancelled("the hedged copy was not sent"))
    elif job.outcome is None:
        error = job.stop or outcomes.timeout_error(job, "could not start before its deadline")
        scheduler.finish(job, error)


def _note_capped_wait(limits: ProviderLimits, given_s: float | None) -> None:
    """Say once per provider that an upstream asked for a longer wait than the cap."""
    if given_s is None or given_s <= outcomes.MAX_RETRY_AFTER_S or limits.retry_after_capped:
        return
    limits.retry_after_capped = True
    log.warning(
        "provider.retry_after_capped",
        provider=limits.name,
        retry_after_s=given_s,
        cap_s=outcomes.MAX_RETRY_AFTER_S,
    )


def _on_copy_outcome(
    scheduler: Scheduler,
    copy: Job,
    provider: str,
    limits: ProviderLimits,
    outcome: Outcome,
    now: float,
) -> None:
    """A hedged copy ended: its answer wins the race if the original has none yet.

    A failed copy is dropped quietly: the original is still running and keeps
    its own retries; the copy was only ever a bet on speed.
    """
    original = copy.hedge_of
    assert original is not None
    copy.finish(Cancelled("hedge finished"))
    if isinstance(outcome, Answer):
        outcomes.record_success(limits, outcome, now)
        if original.outcome is None:
            original.attempts += 1
            scheduler.finish(original, results.build(original, provider, limits, outcome, now))
            if original.provider is not None:
                scheduler.actors[original.provider].cancel(original.id)
    elif isinstance(outcome, UpstreamError):
        limits.failed += 1
        limits.rate_limited += outcome.kind == "rate_limited"


def disable(scheduler: Scheduler, provider: str, problem: str) -> None:
    """Take a provider out and fail the queued jobs no other provider can take."""
    limits = scheduler.limits[provider]
    if limits.enabled:
        limits.enabled, limits.problem = False, problem
        log.error("provider.disabled", provider=provider, problem=problem)
    fail_stranded(scheduler, f"{provider}: {problem}")


def fail_stranded(scheduler: Scheduler, why: str) -> None:
    per_provider = scheduler.config.retry.per_provider
    stranded = [
        job
        for job in scheduler.queue
        if not any(
            name in scheduler.limits and scheduler.limits[name].enabled
            for name in job.candidates(per_provider)
        )
    ]
    for job in stranded:
        scheduler.queue.remove(job)
        scheduler.finish(job, NoProvider(f"no provider is left for this job ({why})"))
