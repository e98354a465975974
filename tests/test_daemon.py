"""End to end through the socket: chat, thinking, streaming, embeddings, status, cancel."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dispatcher.contract.protocol import Accepted, Chunk, Error, Health, Pong, Result, Status
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio


async def test_chat_returns_the_upstream_answer(start_daemon: Any) -> None:
    """A chat job comes back with the provider's content, usage and the class it ran as."""
    async with fakes(a=Behaviour(name="a", model="m-a", latency_s=0.01)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("hello world"))
    assert isinstance(reply, Result)
    assert "hello world" in (reply.content or "")
    assert reply.provider == "a"
    assert reply.model == "m-a"
    assert reply.class_ == "default"
    assert reply.usage.total_tokens > 0
    assert reply.attempts == 1
    assert f["a"].stats.headers[-1]["Authorization"].startswith("Bearer ")


async def test_thinking_reaches_reasoning_with_nvidia_quirk(start_daemon: Any) -> None:
    """A thinking job sends chat_template_kwargs at the top level and returns the reasoning."""
    async with fakes(n=Behaviour(name="n", thinking=True)) as f:
        config = build_config({"n": provider_entry(f["n"], adapter="nvidia", thinking=True)})
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("why?", thinking=True))
    assert isinstance(reply, Result)
    assert reply.reasoning
    assert reply.class_ == "complex"
    body = f["n"].stats.bodies[-1]
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "clear_thinking": False}
    assert "extra_body" not in body


async def test_thinking_skips_providers_without_it(start_daemon: Any) -> None:
    """A thinking job never goes to a provider that cannot think."""
    async with fakes(
        plain=Behaviour(name="plain"), deep=Behaviour(name="deep", thinking=True, latency_s=0.05)
    ) as f:
        config = build_config(
            {
                "plain": provider_entry(f["plain"], adapter="hunyuan"),
                "deep": provider_entry(f["deep"], adapter="zhipu", thinking=True),
            }
        )
        async with start_daemon(config) as running, running.client() as client:
            replies = [await client.call(chat(f"q{i}", thinking=True)) for i in range(3)]
    assert {r.provider for r in replies if isinstance(r, Result)} == {"deep"}
    assert f["plain"].stats.requests == 0
    assert f["deep"].stats.bodies[-1]["thinking"] == {"type": "enabled"}


async def test_stream_sends_chunks_then_one_result(start_daemon: Any) -> None:
    """A streamed chat yields chunks whose text joins into the final result's content."""
    async with fakes(a=Behaviour(name="a", latency_s=0.02)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            events = [
                e
                async for e in client.request(
                    chat("one two three four five six seven", stream=True)
                )
            ]
    chunks = [e for e in events if isinstance(e, Chunk)]
    assert len(chunks) >= 2
    assert isinstance(events[-1], Result)
    assert "".join(c.delta for c in chunks) == events[-1].content
    assert sum(isinstance(e, Result) for e in events) == 1


async def test_embeddings_come_back_in_order(start_daemon: Any) -> None:
    """An embed job returns one vector per input, in input order."""
    async with fakes(e=Behaviour(name="e", kind="embed", embed_dims=8)) as f:
        config = build_config({"e": provider_entry(f["e"])})
        async with start_daemon(config) as running, running.client() as client:
            one = await client.call({"op": "embed", "input": ["x", "y"]})
            swapped = await client.call({"op": "embed", "input": ["y", "x"]})
    assert isinstance(one, Result)
    assert isinstance(swapped, Result)
    assert one.embeddings is not None
    assert swapped.embeddings is not None
    assert len(one.embeddings) == 2
    assert len(one.embeddings[0]) == 8
    assert one.embeddings[0] == swapped.embeddings[1]


async def test_status_reports_every_provider(start_daemon: Any) -> None:
    """status lists each provider with its limits and counts."""
    async with fakes(a=Behaviour(name="a"), b=Behaviour(name="b", rpm=40, concurrency=5)) as f:
        config = build_config({"a": provider_entry(f["a"]), "b": provider_entry(f["b"])})
        async with start_daemon(config) as running, running.client() as client:
            await client.call(chat("hi", providers=["b"]))
            status = await client.call({"op": "status"})
            pong = await client.call({"op": "ping"})
    assert isinstance(status, Status)
    assert set(status.providers) == {"a", "b"}
    assert status.providers["b"].rpm == 40
    assert status.providers["b"].tokens == 39
    assert status.providers["b"].ok == 1
    assert isinstance(pong, Pong)


async def test_cancel_stops_a_running_job(start_daemon: Any) -> None:
    """cancel on a running request answers it with `cancelled` and frees the slot."""
    async with fakes(a=Behaviour(name="a", latency_s=30.0)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=1)})
        async with start_daemon(config) as running, running.client() as client:
            results: list[Any] = []

            async def submit() -> None:
                results.append(await client.call(chat("slow", id="slow-1")))

            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                with anyio.fail_after(5):
                    await f["a"].wait_until(lambda s: s.in_flight == 1)
                ack = await client.call({"op": "cancel", "target": "slow-1"})
            with anyio.fail_after(5):
                await f["a"].wait_until(lambda s: s.in_flight == 0)
            status = await client.call({"op": "status"})
    assert isinstance(ack, Accepted)
    assert isinstance(results[0], Error)
    assert results[0].code == "cancelled"
    assert isinstance(status, Status)
    assert status.providers["a"].in_flight == 0


async def test_cancel_of_unknown_target_is_an_error(start_daemon: Any) -> None:
    """Cancelling something that is not in flight says so."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call({"op": "cancel", "target": "nope"})
    assert isinstance(reply, Error)
    assert reply.code == "unknown_job"


async def test_many_requests_in_flight_on_one_connection(start_daemon: Any) -> None:
    """Fifty requests on one connection each get their own answer, echoing their id."""
    async with fakes(a=Behaviour(name="a", latency_s=0.01, concurrency=4)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=4)})
        async with start_daemon(config) as running, running.client() as client:
            answers: dict[str, Any] = {}

            async def one(i: int) -> None:
                answers[f"r{i}"] = await client.call(chat(f"question {i}", id=f"r{i}"))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(one, i)
    assert len(answers) == 50
    for rid, reply in answers.items():
        assert isinstance(reply, Result)
        assert reply.id == rid
        assert f"question {rid[1:]}" in (reply.content or "")
    assert f["a"].stats.max_in_flight <= 4


async def test_health_probes_each_provider_once(start_daemon: Any) -> None:
    """health sends one tiny request per provider and reports who answered and why not."""
    async with fakes(good=Behaviour(name="good"), bad=Behaviour(name="bad")) as f:
        f["bad"].set_down(401)
        config = build_config({"good": provider_entry(f["good"]), "bad": provider_entry(f["bad"])})
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call({"op": "health", "timeout_s": 5})
    assert isinstance(reply, Health)
    assert reply.providers["good"].ok
    assert not reply.providers["bad"].ok
    assert "KEY_BAD" in (reply.providers["bad"].error or "")
    assert f["good"].stats.requests == 1
    assert f["good"].stats.bodies[-1]["max_tokens"] == 1
