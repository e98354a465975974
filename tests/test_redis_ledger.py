"""The Redis ledger against a real Redis: one window and one set of slots for the fleet.

Each test works under its own random key prefix on the Redis at 127.0.0.1:6379 and
deletes its keys afterwards; the "Redis down" tests start a private redis-server
on a free port and stop it. Two ledgers in one process stand for two hosts.
"""

from __future__ import annotations

import itertools
import math
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
import redis
import redis.asyncio
from structlog.testing import capture_logs

from dispatcher.store import redis_ledger
from dispatcher.store.ledger import Deny, Grant, ProviderUse, SharedLedger
from dispatcher.store.redis_ledger import LocalShare, RedisLedger

URL = "redis://127.0.0.1:6379/0"
_SERVER = ("redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    name = f"test-ledger-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(URL)
    try:
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _eventually(check: Callable[[], bool], *, within: float, step: float = 0.02) -> None:
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110  # polling state that has no event to wait on
            await anyio.sleep(step)


@asynccontextmanager
async def _running(*ledgers: RedisLedger, shared: bool = True) -> AsyncIterator[anyio.CancelScope]:
    """Run the ledgers (waiting until they reached Redis, if ``shared``) and cancel them after."""
    async with anyio.create_task_group() as tg:
        for ledger in ledgers:
            await tg.start(ledger.run)
        if shared:
            await _eventually(lambda: all(x.mode == "shared" for x in ledgers), within=2.0)
        yield tg.cancel_scope
        tg.cancel_scope.cancel()


async def _start_redis(port: int, directory: Path) -> anyio.abc.Process:
    """A private redis-server on ``port``, answering PING when this returns."""
    process = await anyio.open_process(
        [*_SERVER, "--port", str(port), "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.asyncio.Redis(port=port, socket_connect_timeout=0.1)
    try:
        with anyio.fail_after(5):
            while True:
                try:
                    await client.ping()
                    return process
                except redis.ConnectionError:
                    await anyio.sleep(0.02)
    finally:
        await client.aclose()


async def _stop_redis(process: anyio.abc.Process) -> None:
    with anyio.CancelScope(shield=True), anyio.fail_after(5):
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await process.aclose()


def _two(prefix: str, *, lease_s: float = 30.0) -> tuple[RedisLedger, RedisLedger]:
    """Two "hosts" sharing one key prefix."""
    a = RedisLedger(URL, instance="host-a", key_prefix=prefix, lease_s=lease_s)
    b = RedisLedger(URL, instance="host-b", key_prefix=prefix, lease_s=lease_s)
    return a, b


def test_satisfies_the_protocol() -> None:
    """A RedisLedger is a SharedLedger, and building one does no I/O (nothing listens here)."""
    ledger: SharedLedger = RedisLedger(f"redis://127.0.0.1:{_free_port()}", instance="x")
    assert ledger.mode == "degraded"
    assert ledger.instances == 1
    assert ledger.use() == {}


@pytest.mark.anyio
async def test_two_hosts_share_one_window(prefix: str) -> None:
    """With rpm=5 per 2 s across two hosts the 6th send waits until the first leaves, then goes."""
    a, b = _two(prefix)
    limits = {"rpm": 5, "concurrency": 0, "window_s": 2.0}
    async with _running(a, b):
        first_at = anyio.current_time()
        for i in range(5):
            ledger = a if i % 2 else b
            assert await ledger.acquire("p", f"j{i}", **limits) == Grant()
        denied = await a.acquire("p", "j5", **limits)
        assert isinstance(denied, Deny)
        assert denied.reason == "rate"
        elapsed = anyio.current_time() - first_at
        assert 2.0 - elapsed - 0.05 <= denied.retry_after_s <= 2.0
        assert isinstance(await b.acquire("p", "j5", **limits), Deny)  # the other host agrees
        await anyio.sleep(denied.retry_after_s + 0.01)
        assert await b.acquire("p", "j5", **limits) == Grant()


@pytest.mark.anyio
async def test_slots_are_shared_and_a_release_notifies_the_other_host(prefix: str) -> None:
    """Three slots across two hosts: the 4th is refused, and a release frees it and wakes the other."""
    a, b = _two(prefix)
    freed = anyio.Event()
    b.on_freed = lambda provider: freed.set() if provider == "p" else None
    limits = {"rpm": 0, "concurrency": 3, "window_s": 60.0}
    async with _running(a, b):
        probe = redis.asyncio.Redis.from_url(URL)
        try:  # both listeners are subscribed before anything is released
            with anyio.fail_after(2):
                while (await probe.pubsub_numsub(f"{prefix}:freed"))[0][1] < 2:  # noqa: ASYNC110  # Redis has no event for it
                    await anyio.sleep(0.02)
        finally:
            await probe.aclose()
        assert await a.acquire("p", "j1", **limits) == Grant()
        assert await b.acquire("p", "j2", **limits) == Grant()
        assert await a.acquire("p", "j3", **limits) == Grant()
        denied = await b.acquire("p", "j4", **limits)
        assert isinstance(denied, Deny)
        assert denied.reason == "concurrency"
        assert 0 < denied.retry_after_s <= 1.0
        await a.release("p", "j1")
        with anyio.fail_after(2):
            await freed.wait()
        assert await b.acquire("p", "j4", **limits) == Grant()


@pytest.mark.anyio
async def test_a_host_that_dies_frees_its_slots_within_lease_s(prefix: str) -> None:
    """A ledger cancelled without releasing loses its two slots within lease_s (1 s)."""
    a, b = _two(prefix, lease_s=1.0)
    limits = {"rpm": 0, "concurrency": 2, "window_s": 60.0}
    async with _running(b):
        async with _running(a) as dying:
            assert await a.acquire("p", "j1", **limits) == Grant()
            assert await a.acquire("p", "j2", **limits) == Grant()
            await anyio.sleep(0.4)  # a renews at least once: the leases outlive their first term
            assert isinstance(await b.acquire("p", "j3", **limits), Deny)
            dying.cancel()
        died_at = anyio.current_time()
        with anyio.fail_after(2):
            while isinstance(decision := await b.acquire("p", "j3", **limits), Deny):
                assert decision.reason == "concurrency"
                await anyio.sleep(min(decision.retry_after_s, 0.05))
        assert anyio.current_time() - died_at <= 1.0 + 0.1


@pytest.mark.anyio
async def test_a_block_from_one_host_denies_the_other(prefix: str) -> None:
    """A Retry-After block recorded by one host refuses the other's sends; a shorter one does not shorten it."""
    a, b = _two(prefix)
    limits = {"rpm": 0, "concurrency": 0, "window_s": 60.0}
    async with _running(a, b):
        await a.block("p", 1.5)
        await a.block("p", 0.2)
        denied = await b.acquire("p", "j1", **limits)
        assert isinstance(denied, Deny)
        assert denied.reason == "blocked"
        assert 1.2 < denied.retry_after_s <= 1.5
        assert await b.acquire("q", "j1", **limits) == Grant()  # other providers go on


@pytest.mark.anyio
async def test_use_reports_the_fleet_after_a_refresh(prefix: str) -> None:
    """use() shows in-flight, window spend, daily tokens and learned limits of both hosts."""
    a, b = _two(prefix)
    limits = {"rpm": 10, "concurrency": 5, "window_s": 60.0}
    async with _running(a, b):
        assert await a.acquire("p", "j1", **limits) == Grant()
        assert await a.acquire("p", "j2", **limits) == Grant()
        assert await b.acquire("p", "j3", **limits) == Grant()
        await b.release("p", "j3", tokens=120)
        await b.learned("p", 7)
        await b.block("p", 5.0)

        def seen() -> bool:
            use = a.use()["p"]
            return (use.in_flight, use.window_spent, use.daily_tokens, use.learned_rpm) == (
                2,
                3,
                120,
                7,
            ) and use.blocked_for_s > 4

        await _eventually(seen, within=2.0)
        assert a.instances == 2


@pytest.mark.anyio
async def test_blocks_and_learned_limits_noted_without_io_reach_the_other_host(
    prefix: str,
) -> None:
    """note_block / note_learned (for synchronous callers) travel in the next turn, and the
    other host hears of them through on_view."""
    a, b = _two(prefix)
    views: list[dict[str, ProviderUse]] = []
    b.on_view = views.append
    limits = {"rpm": 0, "concurrency": 5, "window_s": 60.0}
    async with _running(a, b):
        assert await b.acquire("p", "j0", **limits) == Grant()  # b knows the provider
        a.note_block("p", 5.0)
        a.note_learned("p", 30)

        def heard() -> bool:
            use = views[-1].get("p") if views else None
            return use is not None and use.learned_rpm == 30 and use.blocked_for_s > 4

        await _eventually(heard, within=3.0)
        assert isinstance(await b.acquire("p", "j1", **limits), Deny)


@pytest.mark.anyio
async def test_a_clients_daily_tokens_are_counted_for_the_fleet(prefix: str) -> None:
    """What each host charges a client adds up in Redis, and each host reads the sum."""
    a, b = _two(prefix)
    day = "2026-12-02"
    async with _running(a, b):
        a.charge_client("alice", 600, day=day)
        b.charge_client("alice", 500, day=day)
        b.charge_client("alice", -100, day=day)  # an estimate corrected
        assert a.client_tokens("alice", day=day) == 600  # ours at once, before any refresh
        await _eventually(
            lambda: a.client_tokens("alice", day=day) == b.client_tokens("alice", day=day) == 1000,
            within=3.0,
        )
        assert a.client_tokens("alice", day="2026-12-03") == 0  # a new day starts again
    client = redis.Redis.from_url(URL)
    try:
        assert int(client.get(f"{prefix}:client:{{alice}}:{day}") or 0) == 1000
        assert 0 < client.ttl(f"{prefix}:client:{{alice}}:{day}") <= 2 * 86_400
    finally:
        client.close()


@pytest.mark.anyio
async def test_starts_and_keeps_a_local_share_when_nothing_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no Redis the ledger starts at once, allows 1/n of each limit (n = instances_hint), logs once."""
    monkeypatch.setattr(redis_ledger, "PROBE_S", 0.02)  # many failed probes in a short test
    ledger = RedisLedger(
        f"redis://127.0.0.1:{_free_port()}", instance="alone", instances_hint=2, timeout_s=0.2
    )
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(0.1):
                await tg.start(ledger.run)
            with anyio.fail_after(0.2 * 8):
                rate = {"rpm": 4, "concurrency": 0, "window_s": 60.0}
                assert await ledger.acquire("r", "j1", **rate) == Grant()
                assert await ledger.acquire("r", "j2", **rate) == Grant()
                denied = await ledger.acquire("r", "j3", **rate)
                assert isinstance(denied, Deny)
                assert denied.reason == "rate"
                slots = {"rpm": 0, "concurrency": 4, "window_s": 60.0}
                assert await ledger.acquire("c", "j1", **slots) == Grant()
                assert await ledger.acquire("c", "j2", **slots) == Grant()
                denied = await ledger.acquire("c", "j3", **slots)
                assert isinstance(denied, Deny)
                assert denied.reason == "concurrency"
                await ledger.release("c", "j1", tokens=10)
                assert await ledger.acquire("c", "j3", **slots) == Grant()
            await _eventually(lambda: any(e["event"] == "ledger.degraded" for e in logs), within=1)
            await anyio.sleep(0.2)  # about ten more failed probes, none of them logged
            assert ledger.mode == "degraded"
            tg.cancel_scope.cancel()
    assert [e["event"] for e in logs].count("ledger.degraded") == 1


@pytest.mark.anyio
async def test_redis_stops_and_returns(tmp_path: Path) -> None:
    """Redis stopped mid-run: degraded within a second, no call hangs, shared again soon after it returns."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    ledger = RedisLedger(url, instance="h", lease_s=3.0, timeout_s=0.2)
    limits = {"rpm": 100, "concurrency": 10, "window_s": 60.0}
    server = await _start_redis(port, tmp_path)
    try:
        with capture_logs() as logs:
            async with _running(ledger):
                assert await ledger.acquire("p", "before", **limits) == Grant()
                await _stop_redis(server)
                with anyio.fail_after(2):
                    for i in itertools.count():
                        with anyio.fail_after(0.3):
                            await ledger.acquire("p", f"probe-{i}", **limits)
                            await ledger.release("p", f"probe-{i}")
                        if ledger.mode == "degraded":
                            break
                        await anyio.sleep(0.05)
                with anyio.fail_after(0.3):
                    assert await ledger.acquire("p", "during", **limits) == Grant()
                    await ledger.release("p", "before", tokens=50)
                server = await _start_redis(port, tmp_path)
                await _eventually(lambda: ledger.mode == "shared", within=3.0)
                check = redis.asyncio.Redis.from_url(url)
                try:
                    # what happened while degraded was written back before shared mode resumed
                    slots = await check.zrange("dispatcher:{p}:slots", 0, -1)
                    assert slots == [b"h/during"]
                    assert await check.zcard("dispatcher:{p}:window") >= 1
                finally:
                    await check.aclose()
                await _eventually(lambda: ledger.use()["p"].daily_tokens == 50, within=2.0)
    finally:
        await _stop_redis(server)
    events = [e["event"] for e in logs if e["event"].startswith("ledger.")]
    assert events == ["ledger.shared", "ledger.degraded", "ledger.shared"]


@pytest.mark.anyio
async def test_a_frozen_redis_costs_one_timeout(tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP) costs one call its timeout, then the ledger decides alone."""
    port = _free_port()
    ledger = RedisLedger(f"redis://127.0.0.1:{port}/0", instance="h", timeout_s=0.2)
    limits = {"rpm": 100, "concurrency": 10, "window_s": 60.0}
    server = await _start_redis(port, tmp_path)
    try:
        async with _running(ledger):
            server.send_signal(signal.SIGSTOP)
            try:
                with anyio.fail_after(0.2 + 0.1):  # the deadline, not a hang
                    assert await ledger.acquire("p", "j1", **limits) == Grant()
                assert ledger.mode == "degraded"
                with anyio.fail_after(0.05):  # degraded: no I/O at all
                    assert await ledger.acquire("p", "j2", **limits) == Grant()
                    await ledger.release("p", "j2")
            finally:
                server.send_signal(signal.SIGCONT)
            await _eventually(lambda: ledger.mode == "shared", within=3.0)
            assert ledger.use()["p"].in_flight == 1  # j1, written back
    finally:
        await _stop_redis(server)


def test_local_share_counts_the_others_last_seen_use() -> None:
    """After degrading, the fleet's last-seen sends and slots count against our share until they must be over."""
    share = LocalShare(window_s=60.0)
    share.take(100.0, "mine")
    share.seed(101.0, fleet_spent=10, fleet_held=3, lease_s=30.0)  # 9 sends, 2 slots are others'
    # rpm 30 over 3 hosts: a share of 10, all spent in the window as last seen
    denied = share.decide(101.0, rpm=30, concurrency=0, instances=3)
    assert denied == Deny("rate", 59.0)
    assert share.decide(130.0, rpm=30, concurrency=0, instances=3) == Deny("rate", 30.0)
    # our own send left at 160, the others' (stamped at 101) stay until 161
    assert share.decide(160.0, rpm=30, concurrency=0, instances=3) == Grant()
    share.take(160.0, "next")
    share.free("next")
    assert share.decide(160.0, rpm=30, concurrency=0, instances=3) == Deny("rate", 1.0)
    # concurrency 9 over 3 hosts: a share of 3, held by ours and the others' last seen
    slots = LocalShare(window_s=60.0)
    slots.take(100.0, "mine")
    slots.seed(101.0, fleet_spent=1, fleet_held=3, lease_s=30.0)
    assert slots.decide(101.0, rpm=0, concurrency=9, instances=3) == Deny("concurrency", 1.0)
    assert slots.decide(131.0, rpm=0, concurrency=9, instances=3) == Grant()
    slots.seed(132.0, fleet_spent=1, fleet_held=3, lease_s=30.0)
    slots.forget_ghosts()  # shared again: the fleet counts
    assert slots.decide(132.0, rpm=0, concurrency=9, instances=3) == Grant()


def test_local_share_keeps_at_least_one() -> None:
    """More hosts than the limit still leaves each host one send per window and one slot."""
    share = LocalShare(window_s=10.0)
    assert share.decide(0.0, rpm=2, concurrency=2, instances=5) == Grant()
    share.take(0.0, "j")
    assert share.decide(1.0, rpm=2, concurrency=0, instances=5) == Deny("rate", 9.0)
    assert share.decide(10.0, rpm=0, concurrency=2, instances=5) == Deny("concurrency", 1.0)
    share.free("j")
    assert share.decide(10.0, rpm=2, concurrency=2, instances=5) == Grant()
    assert math.isinf(share.blocked_until)
