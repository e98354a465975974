"""`dispatcher bench --scenario overhead`: a tiny run answers every job and reports every figure.

Correctness only: the figures are timings of a shared machine, so no test asserts on them.
"""

from __future__ import annotations

import argparse
import io
import math

import msgspec
import pytest
from rich.console import Console

from dispatcher.cli import build_parser
from dispatcher.tools.bench_overhead import (
    QUICK,
    OverheadReport,
    measure_planning,
    overhead_settings,
    render_overhead,
    run_overhead,
)
from tests.helpers import uvloop_only


def _tiny() -> argparse.Namespace:
    """Smaller still than --quick: the whole scenario, subprocesses included, in seconds."""
    return build_parser().parse_args(
        [
            "bench",
            "--scenario",
            "overhead",
            "--quick",
            "--soak-s",
            "0.3",
            "--requests",
            "20",
            "--rate-jobs",
            "60",
            "--queued-jobs",
            "120",
            "--journal-jobs",
            "30",
            "--plan-sizes",
            "5,50",
        ]
    )


def test_options_shrink_the_quick_sizes() -> None:
    """Every size option overrides --quick's, and the rest keep --quick's."""
    settings = overhead_settings(_tiny())
    assert settings.requests == 20
    assert settings.queued_jobs == 120
    assert settings.plan_sizes == (5, 50)
    assert settings.rounds == QUICK.rounds


def test_a_size_that_is_not_positive_is_refused() -> None:
    """--queued-jobs 0 is an error that names the option."""
    args = build_parser().parse_args(["bench", "--scenario", "overhead", "--queued-jobs", "0"])
    with pytest.raises(ValueError, match="--queued-jobs"):
        overhead_settings(args)


@pytest.mark.anyio
async def test_planning_decides_on_every_turn_at_each_size() -> None:
    """A slot freed every turn: on a queue longer than a slow provider's wait, every turn
    starts one job; on a short one the planner may leave a slow provider's slot free."""
    settings = overhead_settings(_tiny())
    figures = measure_planning(settings)
    assert figures.sizes == [5, 50]
    assert 0 < figures.decisions[0] <= settings.plan_turns
    assert figures.decisions[1] == settings.plan_turns
    assert all(math.isfinite(us) and us > 0 for us in figures.median_us)


@uvloop_only
@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_tiny_run_answers_every_job_and_reports_every_figure() -> None:
    """The upstream and the daemons run as subprocesses; every request is answered, every
    queued and journaled job is held, and every target has a value and a verdict."""
    settings = overhead_settings(_tiny())
    report = await run_overhead(settings)
    assert report.latency.answered == settings.requests
    assert report.rate.answered == settings.rate_jobs * settings.rounds
    assert report.memory.soak_answered > 0
    assert report.memory.queued_held >= settings.queued_jobs
    assert report.start.journal_replayed == settings.journal_jobs
    assert len(report.targets) == 10
    assert all(t.value and t.target for t in report.targets)
    assert [t.met is None for t in report.targets].count(True) == 1  # CPU: reported only
    for figure in (
        report.latency.raw_p50_ms,
        report.latency.via_p50_ms,
        report.rate.raw_rate,
        report.rate.via_rate,
        report.cpu.daemon_us,
        report.memory.idle_mb,
        report.memory.queued_mb,
        report.start.empty_ready_s,
        report.start.journal_ready_s,
    ):
        assert math.isfinite(figure)
        assert figure > 0
    decoded = msgspec.json.decode(msgspec.json.encode(report), type=OverheadReport)
    assert decoded.targets == report.targets
    out = io.StringIO()
    render_overhead(report, Console(file=out, width=160))
    text = out.getvalue()
    assert "added latency p50" in text
    assert "planning per turn" in text
