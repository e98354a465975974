"""Upstream failures through a real daemon: Retry-After, fallback, bad keys, timeouts, hang-ups."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest

from dispatcher.contract.config import RetryConfig
from dispatcher.contract.errors import UpstreamError
from dispatcher.contract.protocol import ChatRequest, Error, Result, Status
from dispatcher.core import outcomes
from dispatcher.scheduler.job import Job
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import REPLY_WAIT_S, build_config, chat, fakes, provider_entry, wire

RETRY_AFTER_S = 0.4


@pytest.mark.anyio
async def test_429_with_retry_after_is_retried_after_the_wait(start_daemon: Any) -> None:
    """A 429 with Retry-After is retried once the wait is over, and the job succeeds."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="status", status=429, retry_after=RETRY_AFTER_S))
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("patience"))
    assert isinstance(reply, Result)
    assert reply.attempts == 2
    assert f["a"].stats.requests == 2
    first, second = f["a"].stats.times
    assert second - first >= RETRY_AFTER_S


@pytest.mark.anyio
async def test_no_request_reaches_a_provider_during_its_retry_after(start_daemon: Any) -> None:
    """Jobs arriving while a provider's Retry-After runs wait it out instead of drawing more 429s."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="status", status=429, retry_after=RETRY_AFTER_S))
        config = build_config({"a": provider_entry(f["a"], rpm=1000)})
        async with start_daemon(config) as running, running.client() as client:
            replies: list[Any] = []

            async def one(i: int) -> None:
                replies.append(await client.call(chat(f"job {i}")))

            with anyio.fail_after(REPLY_WAIT_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, 0)
                    await f["a"].wait_until(lambda s: s.rate_limited == 1)
                    for i in range(1, 4):
                        tg.start_soon(one, i)
    assert len(replies) == 4
    assert all(isinstance(r, Result) for r in replies)
    rejected_at, *later = f["a"].stats.times
    assert len(later) == 4
    assert min(later) >= rejected_at + RETRY_AFTER_S
    assert f["a"].stats.rate_limited == 1


@pytest.mark.anyio
async def test_one_short_429_does_not_throttle_an_unlimited_provider(start_daemon: Any) -> None:
    """After one 429 with a short Retry-After, a provider without a published rpm keeps serving."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="status", status=429, retry_after=0.2))
        config = build_config({"a": provider_entry(f["a"], rpm=0)})
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(2):
                replies = [await client.call(chat(f"job {i}")) for i in range(4)]
    assert all(isinstance(r, Result) for r in replies)


@pytest.mark.anyio
async def test_500_falls_back_to_the_next_provider(start_daemon: Any) -> None:
    """A provider that keeps answering 500 hands the job on to the next provider of its class."""
    async with fakes(first=Behaviour(name="first"), second=Behaviour(name="second")) as f:
        f["first"].set_down(500)
        config = build_config(
            {"first": provider_entry(f["first"]), "second": provider_entry(f["second"])}
        )
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("fall back"))
    assert isinstance(reply, Result)
    assert reply.provider == "second"
    assert f["first"].stats.requests == reply.attempts - 1
    assert f["first"].stats.requests <= 3  # retry.per_provider


@pytest.mark.anyio
async def test_401_disables_the_provider_and_status_names_the_key_variable(
    start_daemon: Any,
) -> None:
    """A refused key takes the provider out, and status says which variable to check."""
    async with fakes(
        locked=Behaviour(name="locked", api_key="the-right-key"), open=Behaviour(name="open")
    ) as f:
        config = build_config(
            {"locked": provider_entry(f["locked"]), "open": provider_entry(f["open"])}
        )
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("who answers?"))
                later = [await client.call(chat(f"then {i}")) for i in range(3)]
                status = await client.call({"op": "status"})
    assert isinstance(reply, Result)
    assert reply.provider == "open"
    assert all(isinstance(r, Result) and r.provider == "open" for r in later)
    assert f["locked"].stats.requests == 1
    assert isinstance(status, Status)
    locked = status.providers["locked"]
    assert locked.state == "disabled"
    assert "$KEY_LOCKED" in (locked.problem or "")
    assert "401" in (locked.problem or "")


@pytest.mark.anyio
async def test_401_on_the_only_provider_fails_naming_the_key_variable(start_daemon: Any) -> None:
    """With no other provider to try, a refused key fails the job with a message naming the variable."""
    async with fakes(locked=Behaviour(name="locked", api_key="the-right-key")) as f:
        config = build_config({"locked": provider_entry(f["locked"])})
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("refused"))
                again = await client.call(chat("refused again"))
    assert isinstance(reply, Error)
    assert "locked" in reply.message
    assert "401" in reply.message
    assert isinstance(again, Error)
    assert again.code == "no_provider"
    assert "$KEY_LOCKED" in again.message
    assert f["locked"].stats.requests == 1


@pytest.mark.anyio
async def test_final_error_names_every_provider_tried_and_why(start_daemon: Any) -> None:
    """When every provider fails, the error names each one with its HTTP status."""
    async with fakes(alpha=Behaviour(name="alpha"), bravo=Behaviour(name="bravo")) as f:
        f["alpha"].set_down(500)
        f["bravo"].set_down(503)
        config = build_config(
            {"alpha": provider_entry(f["alpha"]), "bravo": provider_entry(f["bravo"])}
        )
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("doomed"))
    assert isinstance(reply, Error)
    assert reply.code == "upstream_failed"
    assert reply.retryable
    assert "alpha" in reply.message
    assert "HTTP 500" in reply.message
    assert "bravo" in reply.message
    assert "HTTP 503" in reply.message


@pytest.mark.anyio
async def test_hang_with_short_timeout_fails_with_timeout(start_daemon: Any) -> None:
    """A provider that never answers fails a job with timeout_s=1 (the floor) as `timeout`, promptly."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="hang"))
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            started = anyio.current_time()
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("anyone?", timeout_s=1.0))
            elapsed = anyio.current_time() - started
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 0)
    assert isinstance(reply, Error)
    assert reply.code == "timeout"
    assert elapsed < 3.0
    assert f["a"].stats.dropped == 1


def test_timeout_message_says_how_to_allow_more_time() -> None:
    """A job whose deadline passes during a failed attempt is told about timeout_s, the knob to raise."""
    request = ChatRequest(id="r", messages=[{"role": "user", "content": "hi"}], timeout_s=0.3)
    job = Job(
        id="j",
        request=request,
        kind="chat",
        klass="default",
        eligible=("a",),
        client="0:1",
        uid=0,
        prompt_tokens=5,
        accepted_at=100.0,
        deadline=100.3,
    )
    job.attempts = 1
    error = UpstreamError("timeout", "no answer within 0.3 s")
    final = outcomes.judge_failure(job, "a", error, 100.31, RetryConfig(), random.Random(0))
    assert final is not None
    assert final.code == "timeout"
    assert "timeout_s" in final.message


@pytest.mark.anyio
async def test_hang_past_the_provider_timeout_is_retried(start_daemon: Any) -> None:
    """An attempt that exceeds the provider's timeout_s is abandoned and the job retried."""
    async with fakes(a=Behaviour(name="a")) as f:
        f["a"].script(Fault(kind="hang"))
        config = build_config({"a": provider_entry(f["a"], timeout_s=0.2)})
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(REPLY_WAIT_S):
                reply = await client.call(chat("second time lucky"))
    assert isinstance(reply, Result)
    assert reply.attempts == 2


@pytest.mark.anyio
async def test_prompt_too_long_names_the_largest_window(start_daemon: Any) -> None:
    """A prompt longer than every window is refused with the largest window and its provider."""
    async with fakes(small=Behaviour(name="small"), large=Behaviour(name="large")) as f:
        config = build_config(
            {
                "small": provider_entry(f["small"], context_window=1000),
                "large": provider_entry(f["large"], context_window=2000),
            }
        )
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("word " * 4000))
    assert isinstance(reply, Error)
    assert reply.code == "context_too_long"
    assert "2,000" in reply.message
    assert "large" in reply.message
    assert f["small"].stats.requests == 0
    assert f["large"].stats.requests == 0


@pytest.mark.anyio
async def test_prompt_fitting_only_the_larger_window_goes_there(start_daemon: Any) -> None:
    """A prompt too long for one provider but not another is sent to the one it fits."""
    async with fakes(small=Behaviour(name="small"), large=Behaviour(name="large")) as f:
        config = build_config(
            {
                "small": provider_entry(f["small"], context_window=1000),
                "large": provider_entry(f["large"], context_window=8000),
            }
        )
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("word " * 2000))
    assert isinstance(reply, Result)
    assert reply.provider == "large"


@pytest.mark.anyio
async def test_client_disconnect_cancels_the_upstream_request(start_daemon: Any) -> None:
    """A client that hangs up mid-job has its upstream request closed and the slot freed."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running:
            async with wire(running.socket) as w:
                await w.send(chat("never mind", id="gone"))
                with anyio.fail_after(REPLY_WAIT_S):
                    await f["a"].wait_until(lambda s: s.in_flight == 1)
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 0)
            async with running.client() as client:
                status = await client.call({"op": "status"})
    assert f["a"].stats.dropped == 1
    assert isinstance(status, Status)
    assert status.providers["a"].in_flight == 0
    assert status.jobs_failed == 1


@pytest.mark.anyio
async def test_client_disconnect_cancels_a_queued_job(start_daemon: Any) -> None:
    """A job still waiting for a slot when its client hangs up is never sent upstream."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running, wire(running.socket) as keeper:
            await keeper.send(chat("holds the slot", id="keep"))
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            async with wire(running.socket) as w:
                await w.send(chat("queued then abandoned", id="gone"))
                await w.ping()  # the request has been read and queued
            async with running.client() as client:
                with anyio.fail_after(REPLY_WAIT_S):
                    while True:
                        status = await client.call({"op": "status"})
                        assert isinstance(status, Status)
                        if status.jobs_failed == 1:
                            break
            await keeper.send({"op": "cancel", "id": "c", "target": "keep"})
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 0)
    assert status.queued == 0
    assert f["a"].stats.requests == 1


@pytest.mark.anyio
async def test_client_disconnect_mid_stream_cancels_upstream(start_daemon: Any) -> None:
    """A client that hangs up while chunks are flowing has the upstream stream closed."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0, stream_chunk_interval_s=0.05)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running:
            async with wire(running.socket) as w:
                await w.send(chat("one two three four five six seven eight", id="s", stream=True))
                first = await w.recv()
            with anyio.fail_after(REPLY_WAIT_S):
                await f["a"].wait_until(lambda s: s.in_flight == 0)
    assert first["event"] == "chunk"
    assert f["a"].stats.ok == 0
