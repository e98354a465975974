"""Daily token quotas (daily_tokens): spent tokens come back a day later; beyond, quota_exhausted."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.contract.protocol import Error, Result, Status
from dispatcher.core.limits import DailyBudget
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, fakes, provider_entry


def test_budget_returns_tokens_a_day_after_use() -> None:
    """Tokens spent at t are available again at t + 24 h; frees_at says when a job fits."""
    budget = DailyBudget(1000)
    budget.spend(0.0, 600)
    budget.spend(100.0, 300)
    assert budget.remaining(50.0) == 100
    assert budget.frees_at(200.0, 500) == 86_400.0
    assert budget.remaining(86_400.0) == 700
    assert budget.remaining(86_500.0) == 1000


@pytest.mark.anyio
async def test_a_job_past_the_daily_quota_gets_quota_exhausted(start_daemon: Any) -> None:
    """Once a provider's daily tokens are spent, the next job is refused with a retry hint."""
    async with fakes(e=Behaviour(name="e", kind="embed", embed_dims=4)) as f:
        config = build_config({"e": provider_entry(f["e"], daily_tokens=40)})
        async with start_daemon(config) as running, running.client() as client:
            first = await client.call({"op": "embed", "input": "x" * 100})  # ~25 tokens
            second = await client.call({"op": "embed", "input": "y" * 100, "cache": False})
            status = await client.call({"op": "status"})
    assert isinstance(first, Result)
    assert isinstance(second, Error)
    assert second.code == "quota_exhausted"
    assert second.retryable
    assert (second.retry_after_s or 0) > 3600
    assert "daily token quota" in second.message
    assert isinstance(status, Status)
    assert status.providers["e"].daily_tokens_left is not None
    assert status.providers["e"].daily_tokens_left < 40
    assert f["e"].stats.requests == 1
