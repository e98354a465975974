"""Hedging: a slow realtime job gets a second copy elsewhere; the first answer wins."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from dispatcher.contract.protocol import Result
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import build_config, chat, fakes, provider_entry


@pytest.mark.anyio
async def test_a_slow_realtime_job_is_hedged_to_another_provider(start_daemon: Any) -> None:
    """When the first provider is far slower than its p95, a copy goes elsewhere and wins;
    the slow attempt is cancelled and hedges stay within 5% of attempts."""
    async with fakes(
        a=Behaviour(name="a", latency_s=0.02), b=Behaviour(name="b", latency_s=0.05)
    ) as f:
        config = build_config(
            {
                "a": provider_entry(f["a"], concurrency=1),
                "b": provider_entry(f["b"], concurrency=4),
            },
            classes={"realtime": ["a", "b"], "default": ["a", "b"]},
        )
        raw_classes = msgspec.structs.replace(config.classes["realtime"], hedge=True)
        config = msgspec.structs.replace(
            config, classes={**config.classes, "realtime": raw_classes}
        )
        async with start_daemon(config) as running, running.client() as client:
            for i in range(60):
                warm = await client.call(chat(f"warm {i}", task="realtime"))
                assert isinstance(warm, Result)
            f["a"].script(Fault(kind="slow", delay_s=30.0))
            with anyio.fail_after(10):
                reply = await client.call(chat("hurry", task="realtime"))
                await f["a"].wait_until(lambda s: s.in_flight == 0)
            scheduler = running.daemon.scheduler
    assert isinstance(reply, Result)
    assert reply.provider == "b"
    assert 1 <= scheduler.hedges_sent <= 0.05 * scheduler.attempts_sent
