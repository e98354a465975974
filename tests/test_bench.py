"""`dispatcher bench`: the physical lower bound, and small end-to-end scenario runs."""

from __future__ import annotations

import io
import math

import msgspec
import pytest
from rich.console import Console

from dispatcher.cli import build_parser
from dispatcher.contract.config import builtin_config
from dispatcher.tools.bench import (
    BenchReport,
    BenchSettings,
    FairnessReport,
    FairnessVariant,
    PriorityReport,
    Probe,
    capacity,
    lower_bound_s,
    percentile,
    priority_config,
    render,
    run_burst,
    run_fairness_variant,
    run_priority,
    with_strategy,
)
from dispatcher.tools.bench_limits import (
    FleetReport,
    HostDiesRun,
    LimitsBenchReport,
    LimitsSettings,
    learn_ideal_s,
    limits_settings,
    loopback_redis_url,
    render_limits,
    run_fleet_host_dies,
    run_fleet_latency,
    run_fleet_redis_down,
    run_fleet_shared,
    run_learn,
)
from tests.helpers import uvloop_only

# -- lower_bound_s ---------------------------------------------------------------------


def test_bound_of_one_provider_is_jobs_over_its_rate() -> None:
    """5 slots at 1 s each finish 50 jobs in 10 s."""
    assert lower_bound_s([(5, 1.0, 0)], 50) == pytest.approx(10.0)


def test_bound_adds_the_rates_of_several_providers() -> None:
    """1 job/s plus 2 jobs/s finish 30 jobs in 10 s."""
    assert lower_bound_s([(1, 1.0, 0), (4, 2.0, 0)], 30) == pytest.approx(10.0)


def test_bound_when_the_rpm_cap_is_not_reached() -> None:
    """10 jobs/s capped at 5 per minute: 5 jobs take half a second."""
    assert lower_bound_s([(10, 1.0, 5)], 5) == pytest.approx(0.5)


def test_rpm_cap_pushes_the_bound_into_the_next_minute() -> None:
    """The 6th job of a 5-per-minute provider cannot start before the second minute."""
    assert lower_bound_s([(10, 1.0, 5)], 6) == pytest.approx(60.0)


def test_capped_provider_contributes_its_rpm_and_the_other_the_rest() -> None:
    """5 jobs/s free plus 10 jobs/s capped at 10/min: 60 jobs need 10 s (50 + 10)."""
    assert lower_bound_s([(5, 1.0, 0), (5, 0.5, 10)], 60) == pytest.approx(10.0)


def test_bound_of_the_seed_burst() -> None:
    """400 jobs over SEED.md's four chat providers at time scale 0.1: nvidia1 and nvidia2
    give 40 each, zhipu and hunyuan the other 320 at 1/0.103 + 5/0.12 jobs per second."""
    providers = [(1, 0.103, 0), (5, 0.12, 0), (5, 0.268, 40), (5, 0.717, 40)]
    expected = 320 / (1 / 0.103 + 5 / 0.12)
    assert lower_bound_s(providers, 400) == pytest.approx(expected, rel=1e-6)
    assert capacity(providers, expected) == pytest.approx(400, rel=1e-6)


def test_bound_of_no_jobs_is_zero() -> None:
    """Nothing to do takes no time."""
    assert lower_bound_s([(5, 1.0, 0)], 0) == 0.0


def test_bound_without_any_slot_is_an_error() -> None:
    """Providers without a single slot can never finish a job."""
    with pytest.raises(ValueError, match="never finish"):
        lower_bound_s([(0, 1.0, 0)], 1)


def test_zero_latency_provider_is_bounded_by_its_rpm_only() -> None:
    """An instant provider with 5/min does 5 jobs at once and the 6th in the next minute."""
    assert lower_bound_s([(1, 0.0, 5)], 5) < 1e-6
    assert lower_bound_s([(1, 0.0, 5)], 6) == pytest.approx(60.0)


def test_percentile_is_nearest_rank() -> None:
    """Median and p95 of ten values are the 5th and the 10th."""
    values = [float(v) for v in range(10, 0, -1)]
    assert percentile(values, 0.5) == 5.0
    assert percentile(values, 0.95) == 10.0
    assert math.isnan(percentile([], 0.5))


# -- configurations --------------------------------------------------------------------


def test_weighted_copy_sets_every_class_and_keeps_the_weights() -> None:
    """The weighted run uses the built-in classes' seed weights under strategy weighted."""
    config = with_strategy(builtin_config(), "weighted")
    assert {c.strategy for c in config.classes.values()} == {"weighted"}
    assert config.classes["default"].weights["hunyuan"] == 50.0


def test_priority_config_lets_bulk_use_every_realtime_provider() -> None:
    """No provider realtime may use is left idle by the bulk backlog."""
    config = priority_config(builtin_config())
    assert set(config.classes["realtime"].providers) <= set(config.classes["bulk"].providers)


def test_bench_verb_parses_its_options() -> None:
    """`dispatcher bench` takes the scenario, jobs, time scale, JSON and seed options."""
    args = build_parser().parse_args(
        ["bench", "--scenario", "burst", "--jobs", "40", "--time-scale", "0.02", "--json"]
    )
    assert (args.scenario, args.jobs, args.time_scale, args.json) == ("burst", 40, 0.02, True)
    assert args.max_wall_s == 150.0
    assert args.fairness_jobs == 10_000


# -- end to end ------------------------------------------------------------------------

SMALL = BenchSettings(
    jobs=40,
    time_scale=0.02,
    max_wall_s=15.0,
    priority_bulk=60,
    priority_probes=2,
    fairness_jobs=200,
    fairness_b_jobs=3,
    fairness_interval_s=0.05,
)


def _quiet(_: str) -> None:
    pass


@pytest.mark.anyio
async def test_small_burst_completes_without_upstream_429s(log_output: io.StringIO) -> None:
    """A 40-job burst finishes every job with no 429 from the fakes, under both strategies."""
    report = await run_burst(builtin_config(), SMALL, _quiet)
    for run in (report.capacity, report.weighted):
        assert run is not None
        assert run.completed == 40
        assert run.upstream_429 == 0
        assert sum(run.per_provider.values()) == 40
        assert not run.hit_wall_cap
    assert set(report.providers) == {"hunyuan", "nvidia2", "nvidia1", "zhipu"}
    assert report.capacity.lower_bound_s > 0


@pytest.mark.anyio
async def test_small_priority_run_measures_every_probe(log_output: io.StringIO) -> None:
    """Each realtime probe behind the bulk backlog is answered and its wait measured."""
    report = await run_priority(builtin_config(), SMALL, _quiet)
    assert len(report.probes) == 2
    assert all(p.provider is not None and p.wait_s is not None for p in report.probes)
    assert report.fastest_provider == "zhipu"


@pytest.mark.anyio
async def test_small_fairness_run_answers_every_job_of_client_b(log_output: io.StringIO) -> None:
    """Client B's jobs are all answered, idle and behind client A's flood."""
    variant = await run_fairness_variant(builtin_config(), SMALL, "bulk", _quiet)
    assert variant.b_errors == 0
    assert sum(variant.b_providers.values()) == 3
    assert variant.loaded_median_s is not None


def test_report_renders_with_missing_measurements() -> None:
    """A run cut short (no loaded samples, no probe answer) still renders every table."""
    variant = FairnessVariant(
        b_class="bulk",
        flood_jobs=10,
        b_jobs=2,
        idle_median_s=0.1,
        idle_p95_s=0.1,
        loaded_median_s=None,
        loaded_p95_s=None,
        ratio_median=None,
        ratio_p95=None,
        b_errors=0,
        flood_accepted=3,
        flood_accept_s=150.0,
        flood_done_meanwhile=0,
        flood_queued_at_end=0,
        b_providers={},
        upstream_429=0,
        target_met=False,
    )
    probe = Probe(
        queued_ahead=5,
        provider=None,
        latency_s=None,
        wait_s=None,
        wait_estimate_s=None,
        error="timeout: too slow",
    )
    report = BenchReport(
        time_scale=0.1,
        seed=0,
        config="built-in",
        priority=PriorityReport(
            bulk_jobs=10,
            bulk_accepted=10,
            bulk_accept_s=0.1,
            bulk_providers=["hunyuan"],
            realtime_providers=["zhipu"],
            fastest_provider="zhipu",
            fastest_service_s=0.103,
            probes=[probe],
            max_wait_s=None,
            upstream_429=0,
            target_met=False,
        ),
        fairness=FairnessReport(variants=[variant], target_met=False),
    )
    console = Console(file=io.StringIO(), width=200)
    render(report, console)
    text = console.file.getvalue()
    assert "timeout: too slow" in text
    assert "missed" in text
    assert msgspec.json.decode(msgspec.json.encode(report), type=BenchReport) is not None


# -- the limits scenarios (learn, fleet) in a reduced form: correctness only, never timing --

TINY = LimitsSettings(
    max_wall_s=20.0,
    learn_jobs=4,
    learn_latency_s=0.05,
    fleet_clients=3,  # the two survivors of a host's death can still fill five slots
    fleet_rpm=600,
    fleet_latency_s=0.1,
    fleet_duration_s=1.5,
    lease_s=1.0,
    kill_min_held=1,
    kill_deadline_s=5.0,
    after_kill_s=0.5,
    redis_before_s=1.0,
    redis_down_s=3.0,
    redis_after_s=1.0,
    drain_s=20.0,
    latency_jobs=20,
    latency_warmup=2,
)


def test_learn_ideal_is_one_window_then_the_rest_at_concurrency_pace() -> None:
    """60 jobs at 5 x 1 s against 30/min: 30 in the first window, the rest 60 s on: 66 s."""
    assert learn_ideal_s(60, limit=30, concurrency=5, latency_s=1.0) == pytest.approx(66.0)
    assert learn_ideal_s(30, limit=30, concurrency=5, latency_s=1.0) == pytest.approx(6.0)
    assert learn_ideal_s(4, limit=0, concurrency=5, latency_s=0.5) == pytest.approx(0.5)


def test_limits_options_parse_and_refuse_a_remote_redis() -> None:
    """`--scenario fleet` takes its parts and a loopback Redis URL, and nothing else."""
    args = build_parser().parse_args(
        ["bench", "--scenario", "fleet", "--fleet-part", "latency", "--lease-s", "2"]
    )
    settings = limits_settings(args)
    assert settings.fleet_parts == ("latency",)
    assert settings.lease_s == 2.0
    assert settings.learn_jobs == 60
    with pytest.raises(ValueError, match=r"loopback|127\.0\.0\.1"):
        loopback_redis_url("redis://10.0.0.1:6379/0")


@uvloop_only
@pytest.mark.anyio
async def test_tiny_learn_runs_answer_every_job(log_output: io.StringIO) -> None:
    """Both learn runs (headers off and on) answer every pinned job without a 429."""
    report = await run_learn(TINY, _quiet)
    for run in (report.without_headers, report.with_headers):
        assert run is not None
        assert (run.succeeded, run.failed, run.upstream_429) == (4, 0, 0)
        assert run.ideal_s > 0
    assert not report.without_headers.rate_headers


@uvloop_only
@pytest.mark.anyio
@pytest.mark.fleet
async def test_tiny_fleet_shares_the_key(log_output: io.StringIO) -> None:
    """Three daemons on one key through Redis: no 429, never above the key's slots, shared."""
    run = await run_fleet_shared(TINY)
    assert run.upstream_429 == 0
    assert 0 < run.max_in_flight <= TINY.fleet_concurrency
    assert run.succeeded > 0
    assert not run.errors
    assert run.modes == ["shared"] * 3


@uvloop_only
@pytest.mark.anyio
@pytest.mark.fleet
async def test_tiny_fleet_survives_a_killed_host(log_output: io.StringIO) -> None:
    """A subprocess daemon SIGKILLed holding leases: they expire, no 429, survivors answer."""
    run = await run_fleet_host_dies(TINY)
    assert run.held_at_kill >= 1
    assert run.leases_gone_s is not None
    assert run.upstream_429 == 0
    assert not run.survivor_errors
    assert run.survivor_ok > 0


@uvloop_only
@pytest.mark.anyio
@pytest.mark.fleet
async def test_tiny_fleet_rides_out_redis_down(log_output: io.StringIO) -> None:
    """A private Redis stopped and restarted: no job fails or hangs, degraded then shared."""
    run = await run_fleet_redis_down(TINY)
    assert (run.failed, run.hung) == (0, 0)
    assert run.degraded_after_s is not None
    assert run.resume_s is not None
    # 429s around the switches are a target the full-size run reports, not asserted here


@uvloop_only
@pytest.mark.anyio
async def test_tiny_added_latency_is_measured(log_output: io.StringIO) -> None:
    """One job at a time through a local and a shared daemon: every job answered, both timed."""
    run = await run_fleet_latency(TINY)
    assert run.errors == 0
    assert run.local_median_ms is not None
    assert run.shared_median_ms is not None


def test_limits_report_renders_with_missing_measurements() -> None:
    """A fleet report with parts unmeasured still renders, and says what was missed."""
    report = LimitsBenchReport(
        seed=0,
        fleet=FleetReport(
            redis_url="redis://127.0.0.1:6379/0",
            lease_s=3.0,
            host_dies=HostDiesRun(
                lease_s=3.0,
                held_at_kill=0,
                leases_gone_s=None,
                slots_back_s=None,
                upstream_429=0,
                survivor_errors={},
                survivor_ok=0,
                lost_with_host=0,
                target_met=False,
            ),
            target_met=False,
        ),
    )
    console = Console(file=io.StringIO(), width=200)
    render_limits(report, console)
    assert "missed" in console.file.getvalue()
    assert msgspec.json.decode(msgspec.json.encode(report), type=LimitsBenchReport) == report
