"""The response cache: same request, same answer without an upstream call; never failures."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.contract.protocol import ChatRequest, Error, Result
from dispatcher.store.cache import ResponseCache, cache_key
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio


async def test_a_repeated_request_is_answered_from_the_cache(start_daemon: Any) -> None:
    """The second identical request comes back cached, with no second upstream call."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            first = await client.call(chat("same question", max_tokens=50))
            second = await client.call(chat("same question", max_tokens=50))
            longer = await client.call(chat("same question", max_tokens=500))
            fresh = await client.call(chat("same question", max_tokens=50, cache=False))
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


def test_key_covers_what_shapes_the_answer() -> None:
    """Temperature, max_tokens and thinking change the key; the request id does not."""
    base = ChatRequest(id="1", messages=[{"role": "user", "content": "x"}])
    assert cache_key(base, "default") == cache_key(
        ChatRequest(id="2", messages=base.messages), "default"
    )
    for other in (
        ChatRequest(id="1", messages=base.messages, temperature=0.3),
        ChatRequest(id="1", messages=base.messages, max_tokens=9),
        ChatRequest(id="1", messages=base.messages, thinking=True),
    ):
        assert cache_key(other, "default") != cache_key(base, "default")
    assert cache_key(ChatRequest(id="1", messages=base.messages, stream=True), "default") is None
