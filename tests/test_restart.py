"""Restart on a full journal: every unfinished job is replayed and queued before ready.

Timing is measured by benchmarks/restart.py, not asserted here; the test prints
how long the daemon took from ``Daemon.run`` to its first ``pong``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from dispatcher.contract.protocol import Accepted, Error, Pending, Pong, Status
from dispatcher.testing.journal_fill import unfinished_job, write_unfinished
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, fakes, provider_entry, uvloop_only

pytestmark = pytest.mark.anyio

HOLD = Behaviour(name="hold", latency_s=3600.0)  # takes a request and keeps it for an hour


def _hold_config(fake: Any, **daemon: Any) -> Any:
    # latency_s is what the planner expects: short, so no queued job looks hopeless.
    entry = provider_entry(fake, concurrency=1, timeout_s=3600.0, latency_s=0.001)
    return build_config({"hold": entry}, daemon=daemon) if daemon else build_config({"hold": entry})


# About 5 s of replaying and polling 10,000 jobs: on the production loop only; the
# 30-job replay test below covers plain asyncio.
@uvloop_only
async def test_ten_thousand_unfinished_jobs_are_replayed_and_queued(
    start_daemon: Any, tmp_path: Path, record_property: Any
) -> None:
    """A daemon started on a journal of 10,000 unfinished jobs holds every one of them,
    under its old id and key, by the time it answers ping."""
    jobs = 10_000
    await write_unfinished(tmp_path / "state" / "journal.sqlite3", jobs)
    async with fakes(hold=HOLD) as f:
        config = _hold_config(f["hold"])
        started = time.monotonic()
        async with start_daemon(config) as running, running.client() as client:
            pong = await client.call({"op": "ping"})
            ready_s = time.monotonic() - started
            status = await client.call({"op": "status"})
            states: dict[str, int] = {}
            limiter = anyio.Semaphore(256)

            async def fetch(i: int) -> None:
                async with limiter:
                    reply = await client.call({"op": "result", "job": f"job{i:08d}", "wait": False})
                key = reply.state if isinstance(reply, Pending) else type(reply).__name__
                states[key] = states.get(key, 0) + 1

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(jobs):
                        tg.start_soon(fetch, i)
            again = await client.call(msgspec.to_builtins(unfinished_job(1234).request))
    record_property("ready_s", ready_s)
    print(f"\nready (Daemon.run to pong) in {ready_s:.3f} s with {jobs} unfinished jobs")
    assert isinstance(pong, Pong)
    assert isinstance(status, Status)
    assert status.queued + status.running == jobs
    assert status.running <= 1
    expected = {"queued": jobs - status.running, "running": status.running}
    assert states == {state: n for state, n in expected.items() if n}
    assert isinstance(again, Accepted)
    assert again.job == "job00001234"


async def test_replayed_jobs_are_held_even_beyond_max_queued_not_refused(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Jobs already accepted by an earlier run are replayed even when there are more of
    them than daemon.max_queued: the cap refuses new submits, never accepted work."""
    await write_unfinished(tmp_path / "state" / "journal.sqlite3", 30)
    async with fakes(hold=HOLD) as f:
        config = _hold_config(f["hold"], max_queued=10)
        async with start_daemon(config) as running, running.client() as client:
            replies = [
                await client.call({"op": "result", "job": f"job{i:08d}", "wait": False})
                for i in range(30)
            ]
            fresh = await client.call(
                {"op": "chat", "messages": [{"role": "user", "content": "new"}], "detach": True}
            )
    refused = [r for r in replies if isinstance(r, Error)]
    assert refused == [], f"{len(refused)} replayed jobs answered {refused[0].code}"
    assert all(isinstance(r, Pending) for r in replies)
    assert isinstance(fresh, Error)
    assert fresh.code == "overloaded"
