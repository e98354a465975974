"""Three daemons on the same key, sharing its limits through Redis (127.0.0.1:6379).

The fake enforces the key's limits exactly, for the whole fleet: one more request
in flight than the key allows is a 429. Offered three times what the key can take,
the fleet must never draw one, and still use the key's capacity.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from dispatcher.client.connection import Client
from dispatcher.contract.config import Config
from dispatcher.contract.protocol import Result, Status
from dispatcher.testing.simulator import Behaviour, FakeProvider
from tests.helpers import Running, build_config, chat, fakes, provider_entry

# Several daemons on one Redis; `make test-fleet` runs these alone.
pytestmark = [pytest.mark.anyio, pytest.mark.fleet]

REDIS_URL = "redis://127.0.0.1:6379/0"
SLOTS = 5
LATENCY_S = 0.2
CLIENTS_PER_DAEMON = 16
JOBS_PER_CLIENT = 2


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A prefix of this test's own in the shared Redis, deleted afterwards."""
    prefix = f"test-fleet-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


# A short lease: should a loaded machine make Redis miss its 0.25 s deadline, a daemon
# that falls back to its local share waits at most this long for the others' slots.
def _config(fake: FakeProvider, prefix: str, name: str, tmp: Path) -> Config:
    return build_config(
        {"n": provider_entry(fake, concurrency=SLOTS, latency_s=LATENCY_S)},
        daemon={"state_dir": str(tmp / name / "state")},
        cluster={
            "redis_url": REDIS_URL,
            "key_prefix": prefix,
            "instance_name": name,
            "lease_s": 2.0,
        },
    )


@asynccontextmanager
async def _fleet(
    start_daemon: Callable[..., Any], fake: FakeProvider, prefix: str, tmp: Path
) -> AsyncIterator[list[Running]]:
    async with AsyncExitStack() as stack:
        running = [
            await stack.enter_async_context(
                start_daemon(_config(fake, prefix, name, tmp), socket=str(tmp / f"{name}.sock"))
            )
            for name in ("d1", "d2", "d3")
        ]
        yield running


async def _offer(daemon: Running, results: list[Any]) -> None:
    async def one_client(c: int) -> None:
        async with Client.connect(daemon.socket) as client:
            results.extend(
                [
                    await client.call(chat(f"{daemon.socket} {c} {j}"))
                    for j in range(JOBS_PER_CLIENT)
                ]
            )

    async with anyio.create_task_group() as tg:
        for c in range(CLIENTS_PER_DAEMON):
            tg.start_soon(one_client, c)


async def test_three_daemons_never_exceed_the_keys_concurrency(
    start_daemon: Any, key_prefix: str, tmp_path: Path, record_property: Any
) -> None:
    """48 clients on 3 daemons against a 5-slot key: every job answered, 0 429s, never 6 in
    flight. (How much of the key the fleet uses is measured by benchmarks/fleet.py.)"""
    behaviour = Behaviour(name="n", concurrency=SLOTS, latency_s=LATENCY_S)
    async with fakes(n=behaviour) as f, _fleet(start_daemon, f["n"], key_prefix, tmp_path) as fleet:
        results: list[Any] = []
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for daemon in fleet:
                    tg.start_soon(_offer, daemon, results)
        # From the key's first request to its last answer: the key's time, not start-up's.
        elapsed = time.monotonic() - f["n"].stats.times[0]
        async with Client.connect(fleet[0].socket) as client:
            status = await client.call({"op": "status"})
    jobs = 3 * CLIENTS_PER_DAEMON * JOBS_PER_CLIENT
    ideal = math.ceil(jobs / SLOTS) * LATENCY_S  # the key's physical bound
    record_property("fleet_share_of_limit", ideal / elapsed)
    print(
        f"\n{jobs} jobs in {elapsed:.2f} s; ideal {ideal:.2f} s: {ideal / elapsed:.2f} of the key"
    )
    assert all(isinstance(r, Result) for r in results), [
        r for r in results if not isinstance(r, Result)
    ][:3]
    assert len(results) == jobs
    assert f["n"].stats.rate_limited == 0
    assert f["n"].stats.max_in_flight <= SLOTS
    assert isinstance(status, Status)
    assert status.ledger is not None
    assert status.ledger.mode == "shared"
    assert status.ledger.instances == 3
