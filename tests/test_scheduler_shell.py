"""The scheduler shell on its own: an injected clock, fake provider handles, no HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from dispatcher.contract.config import Config, parse_config
from dispatcher.contract.errors import (
    InternalError,
    NoProvider,
    Timeout,
    UpstreamError,
    UpstreamFailed,
)
from dispatcher.contract.protocol import ChatRequest, EmbedRequest, Result, Usage
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers.actor import Answer
from dispatcher.providers.wire import ChatAnswer
from dispatcher.scheduler import fleet
from dispatcher.scheduler.loop import Scheduler
from dispatcher.store.ledger import ProviderUse
from tests.helpers import FakeClock, FakeHandle

pytestmark = pytest.mark.anyio


def _config(**concurrency: int) -> Config:
    providers = {
        name: {"url": f"http://127.0.0.1:1/{name}", "model": f"m-{name}", "concurrency": slots}
        for name, slots in concurrency.items()
    }
    return parse_config(
        {
            "providers": providers,
            "classes": {"default": {"providers": list(concurrency)}},
            "retry": {"backoff_base_s": 1.0, "backoff_max_s": 1.0},
        }
    )


def _scheduler(config: Config, clock: FakeClock) -> tuple[Scheduler, dict[str, FakeHandle]]:
    scheduler = Scheduler(config, clock=clock)
    handles = {}
    for name, provider in config.providers.items():
        handle = FakeHandle(name, ProviderLimits.from_config(name, provider))
        scheduler.add_provider(handle)
        handles[name] = handle
    return scheduler, handles


def _request(n: int, **fields: object) -> ChatRequest:
    return ChatRequest(
        id=f"r{n}", messages=[{"role": "user", "content": f"question {n}"}], **fields
    )


def _answer(text: str = "ok") -> Answer:
    return Answer(
        ChatAnswer(content=text, reasoning=None, usage=Usage(), model=None, finish_reason="stop"),
        latency_s=0.5,
        ratelimit=None,
    )


@asynccontextmanager
async def _running(scheduler: Scheduler) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        yield
        tg.cancel_scope.cancel()


async def test_a_freed_slot_is_filled_at_once() -> None:
    """With one slot, the second job is handed over the moment the first reports back."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=1), clock)
    first = scheduler.submit(_request(1), client="c")
    second = scheduler.submit(_request(2), client="c")
    assert handles["a"].delivered == [first]
    clock.advance(0.5)
    scheduler.on_outcome(first, "a", _answer("one"))
    assert handles["a"].delivered == [first, second]
    assert isinstance(first.outcome, Result)
    assert first.outcome.content == "one"
    assert first.outcome.latency_ms == 500.0


async def test_retry_after_holds_the_retry_until_the_clock_passes_it() -> None:
    """A 429 with Retry-After 10 s: the retry is handed over only once the clock passes it."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=1), clock)
    job = scheduler.submit(_request(1), client="c")
    scheduler.on_outcome(
        job, "a", UpstreamError("rate_limited", "slow down", status=429, retry_after_s=10.0)
    )
    assert handles["a"].delivered == [job]
    assert job.state == "retrying"
    async with _running(scheduler):
        clock.advance(9.0)
        scheduler.poke()
        await anyio.wait_all_tasks_blocked()
        assert handles["a"].delivered == [job]
        clock.advance(1.5)
        scheduler.poke()
        await anyio.wait_all_tasks_blocked()
        assert handles["a"].delivered == [job, job]
    assert job.attempts == 2


async def test_a_deadline_answers_a_job_no_provider_started() -> None:
    """A job stuck behind a busy slot times out by its deadline on the injected clock."""
    clock = FakeClock()
    scheduler, _ = _scheduler(_config(a=1), clock)
    scheduler.submit(_request(1), client="c")
    stuck = scheduler.submit(_request(2, timeout_s=5.0), client="c")
    async with _running(scheduler):
        clock.advance(6.0)
        scheduler.poke()
        with anyio.fail_after(2):
            await stuck.done.wait()
    assert stuck.outcome is not None
    assert getattr(stuck.outcome, "code", None) == "timeout"


async def test_an_actor_that_keeps_dying_fails_the_job_once() -> None:
    """A job handed back by crashing actors three times gets one internal error, not a loop."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=1), clock)
    job = scheduler.submit(_request(1), client="c")
    for _ in range(3):
        scheduler.on_outcome(job, "a", None)
    assert isinstance(job.outcome, InternalError)
    assert "crashed 3 times" in job.outcome.message
    assert len(handles["a"].delivered) == 3
    assert scheduler.active == {}


async def test_a_refused_key_disables_the_provider_and_falls_back() -> None:
    """A 401 takes the provider out, and the job goes to the next one in its class."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=1, b=1), clock)
    job = scheduler.submit(_request(1, providers=["a", "b"]), client="c")
    waiting = scheduler.submit(_request(2, providers=["a"]), client="c")
    assert handles["a"].delivered == [job]
    scheduler.on_outcome(job, "a", UpstreamError("auth", "bad key", status=401))
    assert not scheduler.limits["a"].enabled
    assert handles["b"].delivered == [job]
    assert isinstance(waiting.outcome, NoProvider)
    scheduler.on_outcome(job, "b", _answer())
    assert isinstance(job.outcome, Result)
    assert job.outcome.provider == "b"


async def test_a_rejected_request_is_never_sent_twice_to_one_provider() -> None:
    """A 400 from the only provider is final at once: no resend of a request it refused."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=2), clock)
    job = scheduler.submit(_request(1), client="c")
    scheduler.on_outcome(job, "a", UpstreamError("rejected", "bad field", status=400))
    assert isinstance(job.outcome, UpstreamFailed)
    assert handles["a"].delivered == [job]


async def test_a_stream_handed_back_midway_is_not_sent_twice() -> None:
    """An actor that dies after chunks reached the client ends the job: no second stream."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=1), clock)
    job = scheduler.submit(_request(1, stream=True), client="c")
    job.streamed = True  # a chunk went out before the actor died
    scheduler.on_outcome(job, "a", None)
    assert isinstance(job.outcome, UpstreamFailed)
    assert "broke the stream" in job.outcome.message
    assert handles["a"].delivered == [job]


# -- single-flight ---------------------------------------------------------------------


def test_a_final_upstream_refusal_reaches_every_follower() -> None:
    """The same request would be refused again: each follower gets the leader's error."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=4), clock)
    same = {"temperature": 0.0}
    leader = scheduler.submit(_request(1, **same), client="c")
    followers = [scheduler.submit(_request(1, **same), client=f"c{i}") for i in range(3)]
    assert handles["a"].delivered == [leader]  # one call for all four
    scheduler.on_outcome(leader, "a", UpstreamError("rejected", "bad request", status=400))
    assert isinstance(leader.outcome, UpstreamFailed)
    assert [type(f.outcome) for f in followers] == [type(leader.outcome)] * 3
    assert handles["a"].delivered == [leader]


def test_a_leader_that_timed_out_hands_its_followers_a_call() -> None:
    """The leader's deadline is its own: the first follower is sent, the others follow it."""
    clock = FakeClock()
    scheduler, handles = _scheduler(_config(a=4), clock)
    leader = scheduler.submit(_request(1, temperature=0.0, timeout_s=5.0), client="c")
    followers = [
        scheduler.submit(_request(1, temperature=0.0, timeout_s=60.0), client="c") for _ in range(2)
    ]
    clock.advance(6.0)
    scheduler._expire(clock())  # the leader's deadline: its attempt is cancelled
    assert handles["a"].cancelled == [leader.id]
    scheduler.on_outcome(leader, "a", None)
    assert isinstance(leader.outcome, Timeout)
    scheduler._dispatch(clock())
    assert handles["a"].delivered == [leader, followers[0]]
    scheduler.on_outcome(followers[0], "a", _answer("late but here"))
    assert [getattr(f.outcome, "content", None) for f in followers] == ["late but here"] * 2
    assert [getattr(f.outcome, "attempts", None) for f in followers] == [1, 0]


# -- the fleet's view ---------------------------------------------------------------------


class _Shared:
    """The part of a shared ledger that fleet.tell writes to."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, float]] = []
        self.learned: list[tuple[str, int]] = []

    def note_block(self, provider: str, seconds: float) -> None:
        self.blocks.append((provider, seconds))

    def note_learned(self, provider: str, rpm: int) -> None:
        self.learned.append((provider, rpm))


def test_the_fleets_blocks_learned_limits_and_daily_use_hold_here() -> None:
    """A block, a learned rate and a spent daily quota another host saw shape our planning."""
    clock = FakeClock()
    config = parse_config(
        {
            "providers": {
                "a": {"url": "http://127.0.0.1:1/a", "model": "m", "daily_tokens": 1000},
                "b": {"url": "http://127.0.0.1:1/b", "model": "m"},
            },
            "classes": {"default": {"providers": ["a", "b"]}},
        }
    )
    scheduler, _ = _scheduler(config, clock)
    fleet.apply_view(
        scheduler,
        {
            "a": ProviderUse(in_flight=0, window_spent=0, daily_tokens=990, blocked_for_s=0.0),
            "b": ProviderUse(
                in_flight=0, window_spent=0, daily_tokens=0, blocked_for_s=5.0, learned_rpm=30
            ),
        },
    )
    a, b = scheduler.limits["a"], scheduler.limits["b"]
    assert not a.fits_today(20, clock())  # 990 of 1000 spent by the fleet
    assert a.fits_today(10, clock())
    assert b.blocked_until == clock() + 5.0
    assert b.bucket.rpm == 30
    learned = b.learned()
    assert learned is not None
    assert learned.source == fleet.FROM_FLEET


def test_what_a_verdict_finds_is_told_to_the_fleet() -> None:
    """A Retry-After block and an open circuit go to the shared ledger as blocks."""
    clock = FakeClock()
    scheduler, _ = _scheduler(_config(a=1), clock)
    shared = _Shared()
    scheduler.shared = shared  # type: ignore[assignment]
    limits = scheduler.limits["a"]
    limits.block(clock() + 7.0)
    fleet.tell(
        scheduler, limits, clock(), blocked_before=0.0, learned_before=None, circuit_opened=True
    )
    assert shared.blocks == [("a", 7.0), ("a", scheduler.config.circuit.cooldown_s)]


def test_a_deep_queue_of_one_text_embed_jobs_is_not_failed_as_hopeless() -> None:
    """640 one-text jobs at 5 requests a minute, 32 texts a request, 7 minutes each to live:
    their 20 requests fit in 4 minutes, so planning must not count one request per job
    (which would put the 36th job past its deadline)."""
    clock = FakeClock()
    config = parse_config(
        {
            "providers": {
                "e": {
                    "url": "http://127.0.0.1:1/e",
                    "model": "m",
                    "kind": "embed",
                    "rpm": 5,
                    "concurrency": 5,
                    "max_batch": 32,
                    "batch_linger_ms": 1,
                }
            },
            "classes": {"default": {"providers": []}},
        }
    )
    scheduler, handles = _scheduler(config, clock)
    jobs = [
        scheduler.submit(EmbedRequest(id=f"n{n}", input=f"note {n}", timeout_s=420), client="c")
        for n in range(640)
    ]
    for _ in range(3):
        clock.advance(0.1)
        scheduler._dispatch(clock())
    failed = [job for job in jobs if job.outcome is not None]
    assert failed == []
    assert len(handles["e"].delivered) == 5  # the minute's 5 requests, 32 texts each
    carried = [carrier.request for carrier in handles["e"].delivered]
    assert all(isinstance(r, EmbedRequest) and len(r.input) == 32 for r in carried)
