"""Answers shared across hosts through Redis ([cache] redis_url), behind the local caches.

Two daemons on the Redis at 127.0.0.1:6379, each test under its own key prefix: what
one daemon got from upstream, the other answers without an upstream call; a Redis
that is not there is a miss, never a failure or a hang.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from dispatcher.contract.config import Config
from dispatcher.contract.protocol import Result, Status
from dispatcher.store.redis_cache import RedisCache
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry, until
from tests.test_redis_ledger import _free_port, _start_redis, _stop_redis

pytestmark = pytest.mark.anyio

REDIS_URL = "redis://127.0.0.1:6379/0"
NOBODY_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"test-cache-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _stored(prefix: str, kind: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return len(list(client.scan_iter(f"{prefix}:{kind}:*")))
    finally:
        client.close()


def _config(providers: dict[str, Any], tmp: Path, name: str, prefix: str, url: str) -> Config:
    return build_config(
        providers,
        daemon={"state_dir": str(tmp / name)},
        cache={"redis_url": url},
        cluster={"key_prefix": prefix},
    )


def _host(start_daemon: Any, providers: dict[str, Any], tmp: Path, name: str, prefix: str) -> Any:
    """One daemon ("host") of the two, on its own socket and state_dir."""
    config = _config(providers, tmp, name, prefix, REDIS_URL)
    return start_daemon(config, socket=str(tmp / f"{name}.sock"))


async def test_an_answer_one_host_got_is_the_others_without_an_upstream_call(
    start_daemon: Any, tmp_path: Path, prefix: str
) -> None:
    """A deterministic chat answered on d1 comes back cached on d2; the fake saw it once."""
    async with fakes(a=Behaviour(name="a")) as f:
        providers = {"a": provider_entry(f["a"])}
        request = chat("what is shared", temperature=0, max_tokens=30)
        async with (
            _host(start_daemon, providers, tmp_path, "d1", prefix) as d1,
            d1.client() as client,
        ):
            first = await client.call(request)
            await until(lambda: _stored(prefix, "answer") == 1)
        async with (
            _host(start_daemon, providers, tmp_path, "d2", prefix) as d2,
            d2.client() as client,
        ):
            again = await client.call(request)
            status = await client.call({"op": "status"})
    assert isinstance(first, Result)
    assert isinstance(again, Result)
    assert not first.cached
    assert again.cached
    assert again.content == first.content
    assert f["a"].stats.requests == 1
    assert isinstance(status, Status)
    assert status.cache is not None
    assert status.cache.kinds["shared"].hits == 1


async def test_embedding_texts_another_host_knows_are_not_sent_again(
    start_daemon: Any, tmp_path: Path, prefix: str
) -> None:
    """d1 embedded two texts; d2, asked for three, sends only the third upstream."""
    async with fakes(e=Behaviour(name="e", kind="embed", embed_dims=8)) as f:
        providers = {"e": provider_entry(f["e"])}
        async with (
            _host(start_daemon, providers, tmp_path, "d1", prefix) as d1,
            d1.client() as client,
        ):
            first = await client.call({"op": "embed", "input": ["alpha", "beta"]})
            await until(lambda: _stored(prefix, "vector") == 2)
        async with (
            _host(start_daemon, providers, tmp_path, "d2", prefix) as d2,
            d2.client() as client,
        ):
            second = await client.call({"op": "embed", "input": ["beta", "gamma", "alpha"]})
    assert isinstance(first, Result)
    assert isinstance(second, Result)
    assert first.embeddings is not None
    assert second.embeddings is not None
    assert second.cached_texts == 2
    assert second.embeddings[0] == first.embeddings[1]
    assert second.embeddings[2] == first.embeddings[0]
    assert f["e"].stats.texts == 3  # alpha, beta; then gamma alone


async def test_an_unreachable_redis_is_a_miss_not_a_failure(
    start_daemon: Any, tmp_path: Path
) -> None:
    """With nothing listening at redis_url, jobs are answered from upstream, promptly."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        providers = {"a": provider_entry(f["a"]), "e": provider_entry(f["e"])}
        config = _config(providers, tmp_path, "d", "unused", NOBODY_URL)
        async with start_daemon(config) as running, running.client() as client:
            with anyio.fail_after(10):
                replies = [
                    await client.call(chat("no redis", temperature=0)),
                    await client.call(chat("no redis", temperature=0)),  # the local cache
                    await client.call({"op": "embed", "input": ["x", "y"]}),
                ]
    assert all(isinstance(r, Result) for r in replies), replies
    assert [getattr(r, "cached", None) for r in replies] == [False, True, False]
    assert f["a"].stats.requests == 1


async def test_a_frozen_redis_is_a_miss_within_the_deadline(tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP) makes a lookup a miss by its deadline, not a
    hang; lookups then skip Redis for a while; once it answers, answers are found again."""
    port = _free_port()
    server = await _start_redis(port, tmp_path)
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", key_prefix="frozen", timeout_s=0.1)
    answer = Result(id="r", job="j", provider="a", model="m", class_="default", content="hi")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(cache.run)
            cache.put_answer("k", answer)
            key = cache.answer_key("k")
            await until(lambda: _stored_at(port, key))
            found = await cache.lookup([key])
            assert cache.answer(found[key]) == answer
            server.send_signal(signal.SIGSTOP)
            try:
                with anyio.fail_after(5):  # a miss at the deadline, far sooner than this
                    assert await cache.lookup([key]) == {}
                assert cache.mode == "unavailable"
                assert await cache.lookup([key]) == {}  # skipped: Redis is not asked
            finally:
                server.send_signal(signal.SIGCONT)
            await until(lambda: anyio.current_time() > cache.paused_until, timeout_s=5)
            assert key in await cache.lookup([key])
            assert cache.mode == "shared"
            tg.cancel_scope.cancel()
    finally:
        await _stop_redis(server)


def _stored_at(port: int, key: str) -> bool:
    client = redis.Redis(port=port)
    try:
        return bool(client.exists(key))
    finally:
        client.close()
