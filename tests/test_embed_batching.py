"""Embeddings at a 5-rpm wall: texts packed across jobs, split, cached per text across restarts.

Every test runs against a fake that allows 5 requests a minute and refuses more than
32 inputs per request with a 413, as SiliconFlow is assumed to.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from dispatcher.contract.protocol import EmbedRequest, Error, Result, Status
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import build_config, fakes, provider_entry, until

pytestmark = pytest.mark.anyio


def _wall(**overrides: Any) -> Behaviour:
    """The 5-rpm embeddings fake that refuses more than 32 inputs a request."""
    fields: dict[str, Any] = {
        "name": "e",
        "kind": "embed",
        "rpm": 5,
        "max_inputs": 32,
        "embed_dims": 8,
        "concurrency": 5,
    }
    fields.update(overrides)
    return Behaviour(**fields)


def _config(fake: Any, **overrides: Any) -> Any:
    return build_config({"e": provider_entry(fake, max_batch=32, **overrides)})


async def test_160_single_text_jobs_go_in_at_most_6_requests(start_daemon: Any) -> None:
    """160 one-text jobs submitted at once are packed into at most 6 upstream requests."""
    async with fakes(e=_wall()) as f:
        # A long linger makes the packing independent of how fast 160 submits arrive.
        config = _config(f["e"], batch_linger_ms=5000)
        async with start_daemon(config) as running:
            scheduler = running.daemon.scheduler
            jobs = [
                scheduler.submit(EmbedRequest(id=f"n{n}", input=f"note {n}"), client="test")
                for n in range(160)
            ]
            with anyio.fail_after(30):
                for job in jobs:
                    await job.done.wait()
    stats = f["e"].stats
    replies = [job.outcome for job in jobs]
    assert all(isinstance(r, Result) and r.embeddings and len(r.embeddings) == 1 for r in replies)
    assert stats.requests <= 6
    assert stats.rate_limited == 0
    assert stats.errors == 0
    assert stats.texts == 160


async def test_a_partly_cached_job_sends_only_its_unknown_texts(start_daemon: Any) -> None:
    """A 100-text job with 90 texts already embedded sends exactly 10 texts upstream."""
    known = [f"known {n}" for n in range(90)]
    new = [f"new {n}" for n in range(10)]
    async with (
        fakes(e=_wall()) as f,
        start_daemon(_config(f["e"])) as running,
        running.client() as client,
    ):
        first = await client.call({"op": "embed", "input": known})
        sent_before = f["e"].stats.texts
        mixed = await client.call({"op": "embed", "input": known[:45] + new + known[45:]})
    assert isinstance(first, Result)
    assert isinstance(mixed, Result)
    assert f["e"].stats.texts - sent_before == 10
    assert mixed.cached is False
    assert mixed.cached_texts == 90
    assert mixed.embeddings is not None
    assert first.embeddings is not None
    assert mixed.embeddings[:45] == first.embeddings[:45]
    assert mixed.embeddings[55:] == first.embeddings[45:]


async def test_a_job_larger_than_one_request_is_split_and_answered_in_order(
    start_daemon: Any,
) -> None:
    """A 70-text job goes in three requests of at most 32 and comes back whole, in order."""
    texts = [f"text {n}" for n in range(70)]
    async with (
        fakes(e=_wall()) as f,
        start_daemon(_config(f["e"])) as running,
        running.client() as client,
    ):
        whole = await client.call({"op": "embed", "input": texts})
        backwards = await client.call({"op": "embed", "input": texts[::-1]})
    stats = f["e"].stats
    assert isinstance(whole, Result)
    assert whole.embeddings is not None
    assert isinstance(backwards, Result)
    assert backwards.embeddings is not None
    assert len(whole.embeddings) == 70
    assert backwards.embeddings == whole.embeddings[::-1]  # the same vector per text
    assert backwards.cached is True
    assert stats.requests == 3
    assert stats.errors == 0
    assert max(len(body["input"]) for body in stats.bodies) <= 32


async def test_cached_texts_survive_a_restart(start_daemon: Any) -> None:
    """After a restart on the same state_dir, the same 50 texts send nothing upstream."""
    texts = [f"memory {n}" for n in range(50)]
    async with fakes(e=_wall()) as f:
        config = _config(f["e"])
        async with start_daemon(config) as running, running.client() as client:
            first = await client.call({"op": "embed", "input": texts})
        sent = f["e"].stats.texts
        async with start_daemon(config) as running, running.client() as client:
            again = await client.call({"op": "embed", "input": texts})
    assert isinstance(first, Result)
    assert isinstance(again, Result)
    assert sent == 50
    assert f["e"].stats.texts == 50
    assert again.cached is True
    assert again.cached_texts == 50
    assert again.embeddings == first.embeddings


async def test_a_text_over_max_input_tokens_is_refused_naming_it(start_daemon: Any) -> None:
    """A text over max_input_tokens is refused with its index and size, and nothing is sent."""
    async with fakes(e=_wall()) as f:
        config = _config(f["e"], max_input_tokens=10)
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call({"op": "embed", "input": ["short", "x" * 100, "ok"]})
    assert isinstance(reply, Error)
    assert reply.code == "bad_request"
    assert "input[1]" in reply.message
    assert "25" in reply.message
    assert f["e"].stats.requests == 0


async def test_a_cancelled_member_of_a_batch_does_not_stop_the_others(start_daemon: Any) -> None:
    """Cancelling one job of a packed request answers it `cancelled`; the other gets vectors."""
    async with fakes(e=_wall(latency_s=1.0)) as f:
        config = build_config({"e": provider_entry(f["e"], max_batch=2, batch_linger_ms=5000)})
        replies: dict[str, Any] = {}
        async with start_daemon(config) as running, running.client() as client:

            async def one(name: str) -> None:
                replies[name] = await client.call({"op": "embed", "id": name, "input": name})

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "gone")
                tg.start_soon(one, "kept")
                with anyio.fail_after(5):
                    await f["e"].wait_until(lambda s: s.in_flight == 1)
                await client.call({"op": "cancel", "target": "gone"})
                await until(lambda: "gone" in replies)
                assert "kept" not in replies  # the request is still on its way
    assert f["e"].stats.requests == 1
    assert isinstance(replies["gone"], Error)
    assert replies["gone"].code == "cancelled"
    assert isinstance(replies["kept"], Result)
    assert replies["kept"].embeddings


async def test_a_failed_batch_retries_every_member(start_daemon: Any) -> None:
    """A packed request that gets a 500 is sent again, and each member gets its vectors once."""
    async with fakes(e=_wall()) as f:
        f["e"].script(Fault(kind="status", status=500))
        config = build_config({"e": provider_entry(f["e"], max_batch=2, batch_linger_ms=5000)})
        replies: list[Any] = []
        async with start_daemon(config) as running, running.client() as client:

            async def one(text: str) -> None:
                replies.append(await client.call({"op": "embed", "input": text}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "a")
                tg.start_soon(one, "b")
    assert f["e"].stats.requests == 2
    assert len(replies) == 2
    assert all(isinstance(r, Result) and r.attempts == 2 for r in replies)


async def test_status_shows_embedding_cache_and_batching(start_daemon: Any) -> None:
    """status reports cache hits and misses, cached texts and bytes, and texts per request."""
    async with (
        fakes(e=_wall()) as f,
        start_daemon(_config(f["e"])) as running,
        running.client() as client,
    ):
        await client.call({"op": "embed", "input": ["a", "b", "c", "d"]})
        await client.call({"op": "embed", "input": ["a", "b"]})
        status = await client.call({"op": "status"})
    assert isinstance(status, Status)
    assert status.cache is not None
    embed = status.cache.kinds["embed"]
    assert (embed.hits, embed.misses) == (2, 4)
    assert status.cache.embed_texts == 4
    assert status.cache.embed_bytes == 4 * 8 * 4
    assert status.cache.texts_per_request == 4.0


async def test_a_refused_batch_gives_every_member_the_refusal_once(start_daemon: Any) -> None:
    """A packed request refused with a 400 is final for each member: one error each."""
    async with fakes(e=_wall()) as f:
        f["e"].script(Fault(kind="status", status=400))
        config = build_config({"e": provider_entry(f["e"], max_batch=2, batch_linger_ms=5000)})
        replies: list[Any] = []
        async with start_daemon(config) as running, running.client() as client:

            async def one(text: str) -> None:
                replies.append(await client.call({"op": "embed", "input": text}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "a")
                tg.start_soon(one, "b")
    assert f["e"].stats.requests == 1
    errors = [r for r in replies if isinstance(r, Error)]
    assert [(e.code, e.retryable, e.upstream_status) for e in errors] == [
        ("upstream_failed", False, 400)
    ] * 2
    assert all(e.message.startswith("e refused the request") for e in errors)


async def test_cache_false_neither_reads_nor_fills_the_embedding_cache(start_daemon: Any) -> None:
    """A job with cache: false sends every text, even ones the cache knows."""
    async with (
        fakes(e=_wall()) as f,
        start_daemon(_config(f["e"])) as running,
        running.client() as client,
    ):
        await client.call({"op": "embed", "input": ["a", "b"]})
        fresh = await client.call({"op": "embed", "input": ["a", "b"], "cache": False})
    assert isinstance(fresh, Result)
    assert fresh.cached is False
    assert fresh.cached_texts == 0
    assert f["e"].stats.texts == 4
