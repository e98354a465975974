"""The response cache: same request, same answer without an upstream call; never failures."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from dispatcher.contract.chat import FunctionCall, ToolCall
from dispatcher.contract.config import parse_config
from dispatcher.contract.protocol import ChatRequest, Error, Result, Usage
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.providers.actor import Answer
from dispatcher.providers.wire import ChatAnswer
from dispatcher.scheduler.job import Job
from dispatcher.scheduler.loop import Scheduler
from dispatcher.store.cache import ResponseCache, cache_key
from dispatcher.testing.simulator import Behaviour
from tests.helpers import FakeHandle, build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio


async def test_a_repeated_request_is_answered_from_the_cache(start_daemon: Any) -> None:
    """The second identical deterministic request comes back cached, with no upstream call."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            first = await client.call(chat("same question", max_tokens=50, temperature=0))
            second = await client.call(chat("same question", max_tokens=50, temperature=0))
            longer = await client.call(chat("same question", max_tokens=500, temperature=0))
            fresh = await client.call(
                chat("same question", max_tokens=50, temperature=0, cache=False)
            )
    assert isinstance(first, Result)
    assert isinstance(second, Result)
    assert not first.cached
    assert second.cached
    assert second.content == first.content
    assert second.job != first.job
    assert isinstance(longer, Result)
    assert not longer.cached
    assert isinstance(fresh, Result)
    assert not fresh.cached
    assert f["a"].stats.requests == 3


async def test_only_deterministic_chat_is_cached_unless_the_job_asks(start_daemon: Any) -> None:
    """A sampled answer is not reused by default; a seed makes it reusable, cache: true too."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            sampled = [await client.call(chat("poem", temperature=1.0)) for _ in range(2)]
            seeded = [await client.call(chat("poem", temperature=1.0, seed=1)) for _ in range(2)]
            other_seed = await client.call(chat("poem", temperature=1.0, seed=2))
            asked = [await client.call(chat("poem", temperature=1.0, cache=True)) for _ in range(2)]
    replies = [*sampled, *seeded, other_seed, *asked]
    assert all(isinstance(reply, Result) for reply in replies)
    assert [getattr(reply, "cached", None) for reply in replies] == [
        False,
        False,
        False,
        True,
        False,  # another seed is another answer
        False,
        True,
    ]
    assert f["a"].stats.requests == 5


def test_every_field_that_shapes_an_answer_is_in_the_key() -> None:
    """Requests that differ in any answer-shaping field get different cache keys."""
    base = {"id": "r", "messages": [{"role": "user", "content": "q"}], "temperature": 0}
    variants = [
        {},
        {"seed": 3},
        {"stop": ["\n"]},
        {"top_p": 0.5},
        {"presence_penalty": 1.0},
        {"frequency_penalty": 1.0},
        {"logit_bias": {"50256": -100}},
        {"user": "u1"},
        {"extra": {"top_k": 5}},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"max_tokens": 9},
        {"thinking": True},
        {"providers": ["a"]},
    ]
    keys = [
        cache_key(msgspec.convert({**base, **variant}, ChatRequest), "default")
        for variant in variants
    ]
    assert None not in keys
    assert len(set(keys)) == len(variants)
    same = msgspec.convert({**base, "id": "other", "priority": 5, "timeout_s": 9.0}, ChatRequest)
    assert cache_key(same, "default") == keys[0]


async def test_failures_are_not_cached(start_daemon: Any) -> None:
    """A request that failed is sent upstream again next time."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])}, retry={"max_attempts": 1})
        f["a"].set_down(500)
        async with start_daemon(config) as running, running.client() as client:
            failed = await client.call(chat("flaky"))
            f["a"].set_down(None)
            ok = await client.call(chat("flaky"))
    assert isinstance(failed, Error)
    assert isinstance(ok, Result)
    assert not ok.cached


def _result(content: str) -> Result:
    return Result(job="j", provider="a", model="m", class_="default", content=content, cached=False)


def test_cache_entries_expire() -> None:
    """An entry older than ttl_s is a miss."""
    now = [0.0]
    cache = ResponseCache(ttl_s=10.0, max_bytes=10_000, clock=lambda: now[0])
    cache.put("k", _result("x"))
    now[0] = 9.0
    assert cache.get("k") is not None
    now[0] = 10.5
    assert cache.get("k") is None


def test_cache_stays_under_its_byte_budget() -> None:
    """Old entries are evicted to keep the total under max_bytes."""
    cache = ResponseCache(ttl_s=60.0, max_bytes=3000)
    for i in range(10):
        cache.put(f"k{i}", _result("y" * 500))
    assert cache.bytes <= 3000
    assert cache.get("k9") is not None
    assert cache.get("k0") is None


def test_tool_call_arguments_count_against_the_byte_budget() -> None:
    """A result whose size is in its tool-call arguments still keeps the cache in budget."""
    cache = ResponseCache(ttl_s=60.0, max_bytes=5000)
    call = ToolCall(id="c", function=FunctionCall(name="f", arguments="x" * 2000))
    for i in range(5):
        result = _result("")
        result.tool_calls = [call]
        cache.put(f"k{i}", result)
    assert cache.bytes <= 5000
    assert len(cache) <= 2


def _scheduler(*, shared: bool) -> tuple[Scheduler, FakeHandle]:
    config = parse_config(
        {
            "providers": {"a": {"url": "http://127.0.0.1:9", "model": "m", "concurrency": 4}},
            "classes": {"default": {"providers": ["a"]}},
            "cache": {"shared": shared},
        }
    )
    scheduler = Scheduler(config)
    handle = FakeHandle("a", ProviderLimits.from_config("a", config.providers["a"]))
    scheduler.add_provider(handle)
    return scheduler, handle


def _ask(scheduler: Scheduler, uid: int) -> Job:
    request = ChatRequest(id=f"r{uid}", messages=[{"role": "user", "content": "q"}], temperature=0)
    return scheduler.submit(request, client=f"{uid}:1", uid=uid)


def _answer(scheduler: Scheduler, job: Job) -> None:
    answer = ChatAnswer(
        content="a", reasoning=None, usage=Usage(), model=None, finish_reason="stop"
    )
    scheduler.on_outcome(job, "a", Answer(answer, latency_s=0.1, ratelimit=None))


@pytest.mark.parametrize("shared", [False, True], ids=["partitioned", "shared"])
async def test_one_users_answer_is_not_another_users_cache_hit(shared: bool) -> None:
    """By default a cached answer serves only its owner; [cache] shared = true serves all."""
    scheduler, handle = _scheduler(shared=shared)
    first = _ask(scheduler, uid=1001)
    _answer(scheduler, first)
    mine, theirs = _ask(scheduler, uid=1001), _ask(scheduler, uid=1002)
    assert isinstance(mine.outcome, Result)
    assert mine.outcome.cached
    assert (theirs in handle.delivered) is not shared
    assert isinstance(theirs.outcome, Result) is shared
