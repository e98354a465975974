"""Nothing lost under SIGKILL: the chaos run of dispatcher.tools.chaos, small enough for CI.

A real ``python -m dispatcher serve`` subprocess on a journal in tmp_path, fake
providers in this process, keyed detached jobs from several clients, and the
daemon SIGKILLed and restarted at random moments while jobs are open.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.tools.chaos import ChaosConfig, run_chaos
from tests.helpers import uvloop_only

# The daemon under test is a subprocess that always runs uvloop; only the harness would
# change loop, so the slow run (about 5 s) goes on the production loop only.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60), uvloop_only]


async def test_every_job_is_answered_exactly_once_across_sigkills(tmp_path: Path) -> None:
    """300 keyed detached jobs from 4 clients, the daemon SIGKILLed 3 times: every job gets
    one answer under one job id, none is lost, and only jobs running at a kill reach the
    providers twice."""
    config = ChaosConfig(
        jobs=300,
        clients=4,
        kills=3,
        providers=2,
        concurrency=6,
        latency_s=0.1,
        window=32,
        seed=20240501,
        timeout_s=35.0,
        workdir=tmp_path / "chaos",
    )
    report = await run_chaos(config)
    assert report.violations == [], report.summary()
    assert len(report.kills) == 3, report.summary()
    assert report.answered == 300
    assert report.journal_rows == 300
    assert report.duplicates <= report.running_at_kills
    assert report.upstream_after_verify == 0
