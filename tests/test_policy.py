"""The pure decision core, with explicit clocks: limits, planning, classification, failures."""

from __future__ import annotations

import random
from typing import Any

import pytest

from dispatcher.contract.config import ProviderConfig, RetryConfig, builtin_config
from dispatcher.contract.errors import (
    ContextTooLong,
    NoProvider,
    UpstreamError,
    UpstreamRejected,
    status_kind,
)
from dispatcher.contract.protocol import ChatRequest
from dispatcher.core.circuit import CircuitBreaker
from dispatcher.core.classify import classify_chat
from dispatcher.core.fair_queue import FairQueue
from dispatcher.core.limits import LimitLearner, TokenBucket
from dispatcher.core.outcomes import describe_attempts, judge_failure
from dispatcher.core.plan import plan
from dispatcher.core.provider_state import RPM_WINDOW_S, ProviderLimits
from dispatcher.scheduler.job import Job

RETRY = RetryConfig(max_attempts=6, per_provider=3, backoff_base_s=1.0, backoff_max_s=8.0)


def limits(
    name: str, *, concurrency: int = 1, latency: float = 1.0, rpm: int = 0
) -> ProviderLimits:
    config = ProviderConfig(
        url="http://x", model="m", concurrency=concurrency, rpm=rpm, latency_s=latency
    )
    return ProviderLimits.from_config(name, config)


def job(
    n: int,
    *,
    klass: str = "default",
    eligible: tuple[str, ...] = ("a", "b"),
    client: str = "c",
    **fields: Any,
) -> Job:
    request = ChatRequest(id=f"r{n}", messages=[{"role": "user", "content": "x"}])
    return Job(
        id=f"j{n}",
        request=request,
        kind="chat",
        klass=klass,
        eligible=eligible,
        client=client,
        uid=0,
        prompt_tokens=1,
        accepted_at=0.0,
        **fields,
    )


# -- token bucket --------------------------------------------------------------------


def test_bucket_never_allows_more_than_rpm_in_any_sliding_window() -> None:
    """Taking tokens greedily, no 60-second span ever holds more than rpm requests."""
    bucket = TokenBucket(40)
    taken: list[float] = []
    now = 0.0
    while now < 300:
        if bucket.available(now):
            bucket.take(now)
            taken.append(now)
        else:
            now = bucket.next_free(now)
            continue
        now += 0.37
    for start in taken:
        assert sum(1 for t in taken if start <= t < start + 60) <= 40
    assert len(taken) >= 40 * 5 - 1


def test_bucket_token_returns_sixty_seconds_after_use() -> None:
    """A token spent at t is available again at t + 60, not at the next calendar minute."""
    bucket = TokenBucket(2)
    bucket.take(10.0)
    bucket.take(50.0)
    assert bucket.available(59.0) == 0
    assert bucket.next_free(59.0) == 70.0
    assert bucket.available(70.0) == 1


def test_bucket_burst_paces_requests() -> None:
    """With burst 1 at 60 rpm, requests are spaced one second apart."""
    bucket = TokenBucket(60, burst=1)
    bucket.take(0.0)
    assert bucket.available(0.5) == 0
    assert bucket.next_free(0.5) == pytest.approx(1.0)
    assert bucket.available(1.0) == 1


def test_limit_learner_holds_the_first_429s_count_and_a_second_confirms() -> None:
    """The first 429 after 30 admitted requests sets 30/min unconfirmed; a second at 30 confirms."""
    learner = LimitLearner(window_s=RPM_WINDOW_S)
    assert learner.rpm is None
    assert learner.on_rate_429(30, 10.0)
    assert (learner.rpm, learner.confirmed, learner.source) == (30, False, "a 429")
    learner.on_rate_429(30, 12.0)
    assert (learner.rpm, learner.confirmed) == (30, True)
    for _ in range(100):  # successes alone teach nothing: no additive creep
        assert not learner.settle(13.0)
    assert learner.rpm == 30


# -- circuit breaker -----------------------------------------------------------------


def test_circuit_opens_probes_and_ramps() -> None:
    """closed -> open after the threshold -> one probe after cool-down -> ramp -> closed."""
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0)
    assert not breaker.on_failure(0.0)
    assert not breaker.on_failure(0.1)
    assert breaker.on_failure(0.2)
    assert breaker.allowed_slots(5.0, 8) == 0
    assert breaker.allowed_slots(10.3, 8) == 1
    breaker.on_success(8)
    assert breaker.allowed_slots(10.4, 8) == 2
    breaker.on_success(8)
    breaker.on_success(8)
    assert breaker.state == "closed"
    assert breaker.allowed_slots(11.0, 8) == 8


def test_a_failed_probe_reopens_the_circuit() -> None:
    """A probe that fails sends the breaker back to open for another cool-down."""
    breaker = CircuitBreaker(threshold=1, cooldown_s=10.0)
    breaker.on_failure(0.0)
    assert breaker.allowed_slots(10.0, 4) == 1
    assert breaker.on_failure(10.5)
    assert breaker.allowed_slots(15.0, 4) == 0


# -- planning ------------------------------------------------------------------------


def test_plan_fills_every_free_slot() -> None:
    """Free slots on every eligible provider get a job at once."""
    provs = {"a": limits("a", concurrency=2), "b": limits("b", concurrency=1)}
    decided = plan([job(i) for i in range(5)], provs, 0.0, per_provider=3)
    assert sorted(name for _, name in decided.assign) == ["a", "a", "b"]


def test_plan_leaves_the_tail_to_the_fast_provider() -> None:
    """A slow provider takes a job only when the fast one could not finish it sooner."""
    provs = {"fast": limits("fast", latency=1.0), "slow": limits("slow", latency=10.0)}
    eligible = ("fast", "slow")
    few = plan([job(i, eligible=eligible) for i in range(3)], provs, 0.0, per_provider=3)
    assert [name for _, name in few.assign] == ["fast"]
    many = plan([job(i, eligible=eligible) for i in range(20)], provs, 0.0, per_provider=3)
    assert sorted(name for _, name in many.assign) == ["fast", "slow"]


def test_plan_respects_tokens_and_wakes_when_one_returns() -> None:
    """With the minute's tokens spent, nothing is sent; the plan wakes when one returns."""
    provs = {"a": limits("a", rpm=2, concurrency=5)}
    provs["a"].bucket.take(0.0)
    provs["a"].bucket.take(1.0)
    decided = plan([job(0, eligible=("a",))], provs, 5.0, per_provider=3)
    assert decided.assign == []
    assert decided.wake_at == RPM_WINDOW_S  # 60 s and a second for the request's transit


def test_plan_sends_nothing_to_a_provider_inside_its_retry_after() -> None:
    """A provider blocked by Retry-After gets no job until the block ends."""
    provs = {"a": limits("a"), "b": limits("b")}
    provs["a"].block(30.0)
    decided = plan([job(0), job(1)], provs, 1.0, per_provider=3)
    assert [name for _, name in decided.assign] == ["b"]
    assert decided.wake_at == 30.0


def test_plan_expires_a_job_that_cannot_start_before_its_deadline() -> None:
    """A job whose earliest start is past its deadline is failed now, not left waiting."""
    provs = {"a": limits("a", rpm=1)}
    provs["a"].bucket.take(0.0)
    late = job(1, eligible=("a",), deadline=10.0)
    decided = plan([late], provs, 1.0, per_provider=3)
    assert decided.expired == [late]


def test_plan_caps_retries_by_the_budget() -> None:
    """Jobs that already had an attempt start only while the retry budget lasts."""
    provs = {"a": limits("a", concurrency=10)}
    jobs = [job(i, eligible=("a",), attempts=1) for i in range(5)]
    decided = plan(jobs, provs, 0.0, per_provider=3, retry_budget=2)
    assert len(decided.assign) == 2


def test_plan_honours_a_jobs_hold_on_one_provider() -> None:
    """A job backing off from provider a goes to b meanwhile."""
    provs = {"a": limits("a"), "b": limits("b", latency=3.0)}
    held = job(0, holds={"a": 5.0})
    decided = plan([held], provs, 0.0, per_provider=3)
    assert decided.assign == [(held, "b")]


# -- fair queue ----------------------------------------------------------------------


def test_queue_puts_realtime_before_bulk() -> None:
    """A realtime job queued behind a thousand bulk jobs is served first."""
    queue = FairQueue()
    for i in range(1000):
        queue.push(job(i, klass="bulk"))
    urgent = job(9999, klass="realtime")
    queue.push(urgent)
    assert next(iter(queue)) is urgent


def test_queue_interleaves_clients_within_a_level() -> None:
    """A client arriving behind another's hundred jobs is served first, then they alternate."""
    queue = FairQueue()
    for i in range(100):
        queue.push(job(i, client="big"))
    queue.push(job(500, client="small"))
    queue.push(job(501, client="small"))
    first_four = [j.client for _, j in zip(range(4), queue, strict=False)]
    assert first_four == ["small", "big", "small", "big"]


def test_plan_reads_little_of_the_queue_when_only_an_unwanted_provider_is_idle() -> None:
    """An idle provider no queued job may use does not make planning read the queue."""
    provs = {"busy": limits("busy"), "embed": limits("embed")}
    provs["busy"].reserve("running", 0.0)
    read = 0

    def jobs() -> Any:
        nonlocal read
        for i in range(1000):
            read += 1
            yield job(i, eligible=("busy",))

    decided = plan(jobs(), provs, 0.1, per_provider=3, wanted={"busy"}, expiry_scan=0)
    assert decided.assign == []
    assert read <= 1


def test_queue_rotates_after_service() -> None:
    """The client just served goes to the back of the rotation."""
    queue = FairQueue()
    a, b = job(1, client="a"), job(2, client="b")
    queue.push(a)
    queue.push(job(3, client="a"))
    queue.push(b)
    queue.remove(a, served=True)
    assert next(iter(queue)) is b


# -- classification ------------------------------------------------------------------


def _all_limits() -> dict[str, ProviderLimits]:
    config = builtin_config()
    return {n: ProviderLimits.from_config(n, p) for n, p in config.providers.items()}


def test_thinking_goes_to_the_complex_class_and_thinking_providers() -> None:
    """No task given and thinking asked: class complex, only providers that think."""
    klass, eligible = classify_chat(
        task=None,
        thinking=True,
        pins=None,
        prompt_tokens=10,
        max_tokens=None,
        config=builtin_config(),
        limits=_all_limits(),
    )
    assert klass == "complex"
    assert set(eligible) <= {"nvidia1", "nvidia2", "zhipu"}


def test_long_prompts_only_go_where_they_fit() -> None:
    """A 150K-token prompt skips the 128K providers; a 300K one fits nowhere and says so."""
    _, eligible = classify_chat(
        task=None,
        thinking=False,
        pins=None,
        prompt_tokens=150_000,
        max_tokens=None,
        config=builtin_config(),
        limits=_all_limits(),
    )
    assert set(eligible) == {"hunyuan", "zhipu"}
    with pytest.raises(ContextTooLong, match="262,144"):
        classify_chat(
            task=None,
            thinking=False,
            pins=None,
            prompt_tokens=300_000,
            max_tokens=None,
            config=builtin_config(),
            limits=_all_limits(),
        )


def test_a_disabled_provider_is_named_with_its_problem() -> None:
    """When every provider of a class is disabled, the error says why each one is."""
    provs = _all_limits()
    for p in provs.values():
        p.enabled, p.problem = False, "key $X not set"
    with pytest.raises(NoProvider, match="key \\$X not set"):
        classify_chat(
            task="realtime",
            thinking=False,
            pins=None,
            prompt_tokens=1,
            max_tokens=None,
            config=builtin_config(),
            limits=provs,
        )


# -- failures ------------------------------------------------------------------------


def test_retry_after_holds_the_job_off_that_provider_exactly() -> None:
    """After a 429 with Retry-After 7, the job may use that provider again at now + 7."""
    j = job(0)
    j.attempts = 1
    final = judge_failure(
        j,
        "a",
        UpstreamError("rate_limited", "slow down", status=429, retry_after_s=7.0),
        100.0,
        RETRY,
        random.Random(1),
    )
    assert final is None
    assert j.holds["a"] == 107.0


def test_a_rejected_request_is_final_and_not_retryable() -> None:
    """A 400 ends the job at once, retryable false with the status: no resend, no fallback."""
    j = job(0)
    j.attempts = 1
    final = judge_failure(
        j, "a", UpstreamError("rejected", "bad field", status=400), 0.0, RETRY, random.Random(1)
    )
    assert isinstance(final, UpstreamRejected)
    assert final.code == "upstream_failed"
    assert not final.retryable
    assert final.upstream_status == 400
    assert "bad field" in final.message


def test_a_conflict_is_retried() -> None:
    """A 409 is a passing conflict: the job is queued again after a backoff."""
    j = job(0)
    j.attempts = 1
    error = UpstreamError(status_kind(409), "busy", status=409)
    assert judge_failure(j, "a", error, 0.0, RETRY, random.Random(1)) is None
    assert "a" in j.holds


def test_the_final_error_names_every_provider_and_why() -> None:
    """When nothing is left, the error counts the attempts per provider with reasons."""
    j = job(0, eligible=("a", "b"))
    rng = random.Random(1)
    for provider, status in (("a", 500), ("a", 502), ("a", 500), ("b", 503), ("b", 503)):
        j.attempts += 1
        final = judge_failure(
            j, provider, UpstreamError("server", "oops", status=status), 0.0, RETRY, rng
        )
    j.attempts += 1
    final = judge_failure(
        j, "b", UpstreamError("timeout", "no answer within 60 s"), 0.0, RETRY, rng
    )
    assert final is not None
    assert "a 3x" in final.message
    assert "b 3x" in final.message
    assert "no answer within 60 s" in final.message
    assert describe_attempts(j).startswith("6 attempts")


def test_no_retry_after_the_stream_started() -> None:
    """A stream that broke after chunks went out fails at once."""
    j = job(0)
    j.attempts = 1
    final = judge_failure(
        j, "a", UpstreamError("stream_broken", "reset"), 0.0, RETRY, random.Random(1)
    )
    assert final is not None
    assert final.code == "upstream_failed"
