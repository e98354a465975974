"""`dispatcher bench --scenario embed`: the bound, the options, and a tiny run end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from dispatcher.cli import build_parser
from dispatcher.tools.bench_embed import (
    EmbedBenchReport,
    EmbedReport,
    EmbedSettings,
    embed_bound_s,
    embed_requests_ideal,
    embed_settings,
    embed_target_s,
    render_embed_bench,
    run_embed,
    vector_matches,
)
from tests.helpers import uvloop_only

TINY = EmbedSettings(texts=40, max_batch=32, connections=2, max_wall_s=60.0)
COMMAND_TIMEOUT_S = 60.0


def _quiet(_: str) -> None:
    pass


def _text(report: EmbedBenchReport) -> str:
    console = Console(record=True, width=200, color_system=None)
    render_embed_bench(report, console)
    return console.export_text()


def test_bound_counts_whole_windows_of_full_requests() -> None:
    """ceil(texts / max_batch / rpm) minutes: 10,000 texts at 32 a request and 5 rpm is 63."""
    assert embed_bound_s(10_000, max_batch=32, rpm=5) == 63 * 60.0
    assert embed_bound_s(640, max_batch=32, rpm=5) == 4 * 60.0
    assert embed_bound_s(641, max_batch=32, rpm=5) == 5 * 60.0
    assert embed_bound_s(0, max_batch=32, rpm=5) == 0.0
    assert embed_requests_ideal(641, 32) == 21


def test_target_is_the_ratio_of_the_bound_plus_one_window() -> None:
    """The makespan target is 1.1 x the bound plus one 60 s window."""
    assert embed_target_s(240.0) == pytest.approx(1.1 * 240.0 + 60.0)


def test_vectors_match_within_float32_rounding() -> None:
    """A vector matches the expected prefix within float32 rounding, not beyond."""
    assert vector_matches([0.1, 0.2, 0.3], [0.1 + 1e-7, 0.2])
    assert not vector_matches([0.1, 0.25], [0.1, 0.2])
    assert not vector_matches([0.1], [0.1, 0.2])


def test_embed_options_parse_and_refuse_nonsense() -> None:
    """--texts and --max-batch reach the settings; zero texts is refused."""
    args = build_parser().parse_args(
        ["bench", "--scenario", "embed", "--texts", "40", "--max-batch", "8"]
    )
    settings = embed_settings(args)
    assert (settings.texts, settings.max_batch, settings.rpm) == (40, 8, 5)
    assert (settings.max_wall_s, settings.job_timeout_s) == (None, None)
    defaults = embed_settings(build_parser().parse_args(["bench", "--scenario", "embed"]))
    assert (defaults.texts, defaults.max_batch) == (10_000, 32)
    args.texts = 0
    with pytest.raises(ValueError, match="--texts"):
        embed_settings(args)


@uvloop_only
@pytest.mark.anyio
async def test_tiny_embed_run_answers_every_job_with_its_own_vector(
    log_output: io.StringIO,
) -> None:
    """40 single-text jobs are all answered with their own vector, every figure reported."""
    report = await run_embed(TINY, _quiet)
    assert (report.answered, report.failed, report.incomplete) == (40, 0, 0)
    assert report.wrong_vectors == 0
    assert report.errors == {}
    assert report.texts_sent == 40
    assert report.requests_ok >= report.requests_ideal == 2
    assert report.requests_sent >= report.requests_ok
    assert report.texts_per_request is not None
    assert report.daemon_texts_per_request > 0
    assert report.upstream_413 == 0
    assert report.bound_s == 60.0
    assert report.target_s == pytest.approx(126.0)
    assert not report.hit_wall_cap
    assert report.job_timeout_s == TINY.max_wall_s + 60.0  # the cap plus one window
    text = _text(EmbedBenchReport(seed=0, time_scale=TINY.time_scale, embed=report))
    for figure in ("jobs answered", "makespan", "requests sent", "upstream 413s"):
        assert figure in text


def test_report_renders_a_run_cut_at_the_wall_cap() -> None:
    """A run cut short, with nothing answered upstream, still renders every row."""
    report = EmbedReport(
        texts=100,
        max_batch=32,
        rpm=5,
        window_s=60.0,
        connections=8,
        job_timeout_s=660.0,
        answered=10,
        failed=2,
        incomplete=88,
        errors={"timeout": 2},
        first_errors={"timeout": "the job could not start before its deadline"},
        wrong_vectors=0,
        requests_sent=1,
        requests_ideal=4,
        requests_ok=0,
        texts_sent=0,
        texts_per_request=None,
        daemon_texts_per_request=0.0,
        upstream_429=1,
        upstream_413=0,
        upstream_other_errors=0,
        makespan_s=5.0,
        bound_s=60.0,
        target_s=126.0,
        ratio=None,
        hit_wall_cap=True,
        target_met=False,
    )
    text = _text(EmbedBenchReport(seed=0, time_scale=0.1, embed=report))
    assert "88 cut at the wall cap" in text
    assert "timeout 2" in text
    assert "missed" in text


def test_the_bench_verb_runs_the_embed_scenario() -> None:
    """`dispatcher bench --scenario embed --json` runs the scenario and prints its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    argv = ["bench", "--scenario", "embed", "--texts", "40", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["embed"]
    assert report["answered"] == 40
    assert report["failed"] == 0
    assert report["wrong_vectors"] == 0
