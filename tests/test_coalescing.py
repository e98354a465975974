"""Single-flight: identical requests in flight at once share one upstream call.

Each client still gets its own reply (its own ids) and its own stream; a late joiner
of a stream gets the chunks from the first; a cancelled follower leaves the leader's
call alone, and a cancelled leader leaves its followers a call of their own.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dispatcher.client.connection import Client
from dispatcher.contract.protocol import Chunk, Error, Reply, Result, Status
from dispatcher.testing.simulator import Behaviour, ProviderStats
from tests.helpers import build_config, chat, fakes, provider_entry, until

pytestmark = pytest.mark.anyio

WAIT_S = 20.0
SAME = {"temperature": 0, "max_tokens": 40}


async def _collect(client: Client, payload: dict[str, Any], into: list[Reply]) -> None:
    async for reply in client.request(payload):
        into.append(reply)  # noqa: PERF401  # as each comes: the tests read it while it streams


async def test_fifty_identical_requests_make_one_upstream_call(start_daemon: Any) -> None:
    """50 identical deterministic chats at the same moment: 1 call, 50 answers, own ids."""
    async with fakes(a=Behaviour(name="a", latency_s=1.0)) as f:
        config = build_config({"a": provider_entry(f["a"], latency_s=1.0)})
        async with start_daemon(config) as running, running.client() as client:
            replies: dict[int, Reply] = {}

            async def one(i: int) -> None:
                replies[i] = await client.call(chat("the same question", id=f"q{i}", **SAME))

            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(one, i)
            status = await client.call({"op": "status"})
    assert f["a"].stats.requests == 1
    results = [replies[i] for i in range(50)]
    assert all(isinstance(r, Result) for r in results), results[:3]
    assert {r.id for r in results if isinstance(r, Result)} == {f"q{i}" for i in range(50)}
    assert len({r.job for r in results if isinstance(r, Result)}) == 50
    assert len({r.content for r in results if isinstance(r, Result)}) == 1
    assert isinstance(status, Status)
    assert status.cache is not None
    assert status.cache.coalesced == 49


async def test_different_requests_are_not_coalesced(start_daemon: Any) -> None:
    """Only requests identical in every answer-shaping field share a call; sampled ones never."""
    async with fakes(a=Behaviour(name="a", latency_s=0.5)) as f:
        config = build_config({"a": provider_entry(f["a"], latency_s=0.5)})
        async with start_daemon(config) as running, running.client() as client:
            payloads = [
                chat("q", **SAME),
                chat("q", temperature=0, max_tokens=41),  # another max_tokens
                chat("q", temperature=0.7, max_tokens=40),  # sampled: its own answer
                chat("q", temperature=0.7, max_tokens=40),
                chat("q", cache=False, **SAME),  # asked not to share
            ]
            replies: list[Reply] = []
            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    for payload in payloads:
                        tg.start_soon(_collect, client, payload, replies)
    assert all(isinstance(r, Result) for r in replies), replies
    assert f["a"].stats.requests == 5


async def test_a_late_joiner_of_a_stream_gets_every_chunk_from_the_first(
    start_daemon: Any,
) -> None:
    """A streamed request that joins after chunks went out still receives them all, in order."""
    behaviour = Behaviour(name="a", latency_s=1.0, stream_chunk_interval_s=0.15)
    async with fakes(a=behaviour) as f:
        config = build_config({"a": provider_entry(f["a"], latency_s=1.0)})
        async with (
            start_daemon(config) as running,
            running.client() as first,
            running.client() as late,
        ):
            leader: list[Reply] = []
            joiner: list[Reply] = []
            request = chat(
                "tell me a long story of the sea, the ships and the sailors of old",
                stream=True,
                **SAME,
            )
            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_collect, first, {**request, "id": "lead"}, leader)
                    await until(lambda: sum(isinstance(r, Chunk) for r in leader) >= 2)
                    tg.start_soon(_collect, late, {**request, "id": "late"}, joiner)
    assert f["a"].stats.requests == 1
    lead_chunks = [r for r in leader if isinstance(r, Chunk)]
    late_chunks = [r for r in joiner if isinstance(r, Chunk)]
    assert len(lead_chunks) >= 3
    assert [c.delta for c in late_chunks] == [c.delta for c in lead_chunks]
    assert {c.id for c in late_chunks} == {"late"}
    assert isinstance(leader[-1], Result)
    assert isinstance(joiner[-1], Result)
    assert joiner[-1].id == "late"
    assert "".join(c.delta for c in late_chunks) == joiner[-1].content


async def _cancel_one(
    start_daemon: Any, followers: tuple[str, ...], target: str
) -> tuple[dict[str, Reply], ProviderStats]:
    """A leader "lead" in flight, ``followers`` joining it, then ``target`` cancelled: every
    reply by request id, and the fake's counts."""
    async with fakes(a=Behaviour(name="a", latency_s=1.0)) as f:
        config = build_config({"a": provider_entry(f["a"], latency_s=1.0)})
        async with start_daemon(config) as running, running.client() as client:
            replies: dict[str, Reply] = {}

            async def one(request_id: str) -> None:
                replies[request_id] = await client.call(chat("q", id=request_id, **SAME))

            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, "lead")
                    await f["a"].wait_until(lambda s: s.in_flight == 1)
                    for name in followers:
                        tg.start_soon(one, name)
                    await client.call({"op": "ping"})  # the followers have been read and joined
                    await client.call({"op": "cancel", "target": target})
    return replies, f["a"].stats


async def test_a_cancelled_follower_leaves_the_leaders_call_alone(start_daemon: Any) -> None:
    """Cancelling one follower answers it ``cancelled``; the call goes on for the rest."""
    replies, stats = await _cancel_one(start_daemon, ("stays", "leaves"), "leaves")
    assert isinstance(replies["leaves"], Error)
    assert replies["leaves"].code == "cancelled"
    assert isinstance(replies["lead"], Result)
    assert isinstance(replies["stays"], Result)
    assert stats.requests == 1
    assert stats.dropped == 0


async def test_a_cancelled_leader_leaves_its_followers_a_call_of_their_own(
    start_daemon: Any,
) -> None:
    """The leader's own end (cancelled) is not its followers': they are answered anyway."""
    replies, stats = await _cancel_one(start_daemon, ("f1", "f2"), "lead")
    assert isinstance(replies["lead"], Error)
    assert replies["lead"].code == "cancelled"
    assert isinstance(replies["f1"], Result)
    assert isinstance(replies["f2"], Result)
    assert replies["f1"].content == replies["f2"].content
    assert stats.requests == 2  # the cancelled call, and one for both followers


async def test_coalescing_can_be_turned_off(start_daemon: Any) -> None:
    """``[cache] coalesce = false``: every request makes its own call."""
    async with fakes(a=Behaviour(name="a", latency_s=0.5)) as f:
        config = build_config(
            {"a": provider_entry(f["a"], latency_s=0.5)}, cache={"coalesce": False}
        )
        async with start_daemon(config) as running, running.client() as client:
            replies: list[Reply] = []
            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    for i in range(3):
                        tg.start_soon(_collect, client, chat("q", id=f"r{i}", **SAME), replies)
    assert sum(isinstance(r, Result) for r in replies) == 3
    assert f["a"].stats.requests == 3


async def test_texts_on_the_wire_are_awaited_not_sent_again(start_daemon: Any) -> None:
    """An embed job whose texts are in another job's request in flight sends only the rest;
    an identical job sends nothing; each gets every vector, in its own order."""
    behaviour = Behaviour(name="e", kind="embed", latency_s=1.0, embed_dims=8)
    async with fakes(e=behaviour) as f:
        config = build_config({"e": provider_entry(f["e"], latency_s=1.0)})
        async with start_daemon(config) as running, running.client() as client:
            replies: dict[str, Reply] = {}

            async def one(request_id: str, texts: list[str]) -> None:
                embed = {"op": "embed", "id": request_id, "input": texts}
                replies[request_id] = await client.call(embed)

            with anyio.fail_after(WAIT_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, "first", ["alpha", "beta", "gamma"])
                    await f["e"].wait_until(lambda s: s.in_flight == 1)
                    tg.start_soon(one, "same", ["alpha", "beta", "gamma"])
                    tg.start_soon(one, "more", ["gamma", "delta", "alpha"])
            status = await client.call({"op": "status"})
    first, same, more = replies["first"], replies["same"], replies["more"]
    assert isinstance(first, Result)
    assert isinstance(same, Result)
    assert isinstance(more, Result)
    assert f["e"].stats.requests == 2
    assert f["e"].stats.texts == 4  # alpha, beta, gamma; then delta alone
    assert same.embeddings == first.embeddings
    assert first.embeddings is not None
    assert more.embeddings is not None
    assert more.embeddings[0] == first.embeddings[2]
    assert more.embeddings[2] == first.embeddings[0]
    assert isinstance(status, Status)
    assert status.cache is not None
    assert status.cache.coalesced == 2
