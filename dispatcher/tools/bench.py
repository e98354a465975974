"""``dispatcher bench``: scheduling scenarios against the simulator, through the real socket.

Each scenario starts a fresh in-process :class:`~dispatcher.app.Daemon` in
``--simulate`` mode on a temporary socket, drives it with
:class:`~dispatcher.client.connection.Client` as any other program would, and reads the
fake providers' counters (:attr:`FakeProvider.stats`) for what the providers saw.

* **burst**: N default-class jobs at once. Completed, upstream 429s, makespan,
  the physical lower bound (:func:`lower_bound_s`) and efficiency; then the
  same burst under ``strategy = "weighted"`` (the seed's static weights) on a
  fresh daemon, so the ratio is visible in one run.
* **priority**: realtime jobs submitted behind 1,000 queued bulk jobs: how long
  each waited for its attempt to start, against one service time of the
  fastest eligible provider.
* **fairness**: client A floods 10,000 bulk jobs on one connection; client B
  sends one job a second on another. B's latency against B's latency on the
  idle daemon, measured first in the same run; once with B in a higher class
  (default: priority between levels) and once in A's class (bulk: fair
  queueing between clients within a level).

Latencies are multiplied by the time scale; RPM windows stay 60 s, as the real
providers keep them. ``--scenario learn`` and ``--scenario fleet`` (a key's limits
when nobody published them, and shared by several daemons through Redis) live in
:mod:`dispatcher.tools.bench_limits`, run in real time and only when named. Resource handling: every daemon, socket and temporary
directory is closed when its scenario ends, also on Ctrl-C or the wall-time cap.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from dispatcher.client.connection import Client
from dispatcher.contract.config import ClassPolicy, Config, ConfigError, builtin_config, load_config
from dispatcher.contract.protocol import Error, Reply, Result, Status

if TYPE_CHECKING:  # the daemon (aiohttp and all) loads only when a benchmark runs
    from dispatcher.app import Daemon
    from dispatcher.scheduler.job import Job
    from dispatcher.testing.simulator import Simulator

Scenario = Literal["burst", "priority", "fairness"]
SCENARIOS: tuple[Scenario, ...] = ("burst", "priority", "fairness")

EFFICIENCY_TARGET = 0.95
FAIRNESS_TARGET = 1.20  # loaded latency at most 20% above idle
RPM_WINDOW_S = 60.0
STATUS_POLL_S = 0.05

ProviderLimit = tuple[int, float, int]  # concurrency, mean latency (s), rpm (0 = no cap)


R = TypeVar("R")  # a scenario's report


class BenchError(Exception):
    """The daemon under test answered something a scenario cannot go on with."""


# -- the physical bound ----------------------------------------------------------------


def capacity(providers: Sequence[ProviderLimit], t: float) -> float:
    """How many jobs the providers can finish in ``t`` seconds, at most.

    Each provider finishes at most ``concurrency / latency * t`` jobs and at
    most ``rpm`` per started minute (``rpm = 0``: no cap); a zero latency means
    only the RPM cap binds.
    """
    if t <= 0:
        return 0.0
    total = 0.0
    for concurrency, latency_s, rpm in providers:
        if concurrency <= 0:
            continue
        jobs = math.inf if latency_s <= 0 else concurrency / latency_s * t
        if rpm > 0:
            jobs = min(jobs, rpm * math.ceil(t / RPM_WINDOW_S))
        total += jobs
    return total


def lower_bound_s(providers: Sequence[ProviderLimit], n: int) -> float:
    """The least T in which ``providers`` can finish ``n`` jobs (bisection on :func:`capacity`).

    ``providers`` holds ``(concurrency, latency_s, rpm)`` per provider. Raises
    ValueError when they can never finish the jobs (no provider has a slot).
    """
    if n <= 0:
        return 0.0
    if not any(concurrency > 0 for concurrency, _, _ in providers):
        raise ValueError("no provider has a concurrency slot; the jobs can never finish")
    hi = 1.0
    while capacity(providers, hi) < n:
        hi *= 2.0
        if hi > 1e12:
            raise ValueError("the providers would need more than 10^12 s for these jobs")
    lo = 0.0
    for _ in range(200):
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
        mid = (lo + hi) / 2.0
        if capacity(providers, mid) >= n:
            hi = mid
        else:
            lo = mid
    return hi


def _finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or None (JSON null) when it is NaN or infinite: not measured."""
    return round(value, digits) if math.isfinite(value) else None


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in (0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ranked = sorted(values)
    return ranked[max(0, math.ceil(fraction * len(ranked)) - 1)]


# -- reports ---------------------------------------------------------------------------


class _Report(msgspec.Struct, kw_only=True):
    """What ``--json`` prints; times in seconds, None where nothing was measured."""


class BurstRun(_Report, kw_only=True):
    """One burst on one fresh daemon, under one strategy."""

    strategy: str
    jobs: int
    completed: int
    failed: int
    incomplete: int  # still unanswered when the wall-time cap hit
    errors: dict[str, int]
    upstream_429: int
    makespan_s: float
    lower_bound_s: float
    efficiency: float
    per_provider: dict[str, int]
    hit_wall_cap: bool


class BurstReport(_Report, kw_only=True):
    """The burst under the capacity strategy and, unless skipped, under the seed's weights."""

    providers: dict[str, tuple[int, float, int]]  # name -> (concurrency, latency_s, rpm) used
    capacity: BurstRun
    weighted: BurstRun | None = None
    slowdown: float | None = None  # weighted makespan / capacity makespan
    target_met: bool


class Probe(_Report, kw_only=True):
    """One realtime job sent behind the bulk backlog."""

    queued_ahead: int
    provider: str | None
    latency_s: float | None  # submit to answer, as the daemon reports it (latency_ms)
    wait_s: float | None  # submit to its attempt starting, from the daemon's attempt timing
    wait_estimate_s: float | None  # latency minus the serving provider's mean service time
    error: str | None = None


class PriorityReport(_Report, kw_only=True):
    """Realtime probes behind queued bulk jobs, against the fastest eligible service time."""

    bulk_jobs: int
    bulk_accepted: int  # held by the daemon before the first probe
    bulk_accept_s: float | None  # sending them and the daemon accepting them took this long
    bulk_providers: list[str]
    realtime_providers: list[str]
    fastest_provider: str
    fastest_service_s: float
    probes: list[Probe]
    max_wait_s: float | None
    upstream_429: int
    target_met: bool


class FairnessVariant(_Report, kw_only=True):
    """Client B idle and behind client A's flood, with B's jobs in one class."""

    b_class: str
    flood_jobs: int
    b_jobs: int
    idle_median_s: float | None
    idle_p95_s: float | None
    loaded_median_s: float | None
    loaded_p95_s: float | None
    ratio_median: float | None
    ratio_p95: float | None
    b_errors: int
    flood_accepted: int  # held by the daemon before B's loaded phase
    flood_accept_s: float | None  # sending them and the daemon accepting them took this long
    flood_done_meanwhile: int
    flood_queued_at_end: int
    b_providers: dict[str, int]
    upstream_429: int
    target_met: bool


class FairnessReport(_Report, kw_only=True):
    """Both fairness variants: B in default (between levels), B in bulk (within one)."""

    variants: list[FairnessVariant]
    target_met: bool


class BenchReport(_Report, kw_only=True):
    """Everything one ``dispatcher bench`` run measured."""

    time_scale: float
    seed: int
    config: str
    burst: BurstReport | None = None
    priority: PriorityReport | None = None
    fairness: FairnessReport | None = None


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """The knobs of a bench run (the verb's options)."""

    jobs: int = 400
    time_scale: float = 0.1
    seed: int = 0
    max_wall_s: float = 150.0
    weighted: bool = True
    priority_bulk: int = 1000
    priority_probes: int = 5
    fairness_jobs: int = 10_000
    fairness_b_jobs: int = 10
    fairness_interval_s: float = 1.0


# -- a daemon on the simulator ---------------------------------------------------------


class _Recorder:
    """An observer on the scheduler: when each watched job's attempt started, flood progress.

    ``on_attempt`` runs just before ``on_job_done`` for the same job, inside one
    synchronous call of the scheduler, so the last attempt seen is that job's.
    """

    def __init__(self) -> None:
        self.watched: set[str] = set()
        self.waits: dict[str, float] = {}
        self.done_by_prefix: Counter[str] = Counter()
        self._last: tuple[str, float] | None = None

    def on_attempt(self, provider: str, outcome: str, latency_s: float) -> None:
        self._last = (provider, latency_s)

    def on_job_done(self, job: Job, outcome: object) -> None:
        request_id = job.request.id
        self.done_by_prefix[request_id.split("-", 1)[0]] += 1
        last, self._last = self._last, None
        if request_id in self.watched and isinstance(outcome, Result) and last is not None:
            provider, service_s = last
            if provider == outcome.provider:
                self.waits[request_id] = outcome.latency_ms / 1000.0 - service_s


@dataclass(slots=True)
class _Bench:
    daemon: Daemon
    socket: str
    simulator: Simulator
    recorder: _Recorder = field(default_factory=_Recorder)

    def upstream_429(self) -> int:
        return sum(p.stats.rate_limited for p in self.simulator.providers.values())

    def service_s(self, name: str) -> float:
        """The simulator's mean (scaled) service time of a provider."""
        return self.simulator.providers[name].behaviour.latency_s

    def physical(self, name: str) -> ProviderLimit:
        """(concurrency, mean latency, rpm) as the fake provider enforces them."""
        behaviour = self.simulator.providers[name].behaviour
        concurrency = behaviour.concurrency or self.daemon.config.providers[name].concurrency
        return concurrency, behaviour.latency_s, behaviour.rpm


@asynccontextmanager
async def bench_daemon(config: Config, settings: BenchSettings) -> AsyncIterator[_Bench]:
    """A daemon on the simulator, serving on a socket in a fresh temporary directory."""
    from dispatcher.app import Daemon, Options

    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        daemon_config = msgspec.structs.replace(config.daemon, state_dir=str(Path(tmp) / "state"))
        config = msgspec.structs.replace(config, daemon=daemon_config)
        socket = str(Path(tmp) / "bench.sock")
        options = Options(
            config_path=None,
            socket=socket,
            simulate=True,
            time_scale=settings.time_scale,
            handle_signals=False,
            environ={},
        )
        daemon = Daemon(config, options)
        daemon.scheduler.rng = random.Random(settings.seed)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            assert daemon.simulator is not None, "simulate=True starts the simulator"
            bench = _Bench(daemon, socket, daemon.simulator)
            daemon.scheduler.observers.append(bench.recorder)
            try:
                yield bench
            finally:
                daemon.request_stop()
                daemon.request_stop()  # a second request skips the drain


def with_strategy(config: Config, strategy: Literal["capacity", "weighted"]) -> Config:
    """The configuration with every class routed by ``strategy``."""
    classes = {
        name: msgspec.structs.replace(policy, strategy=strategy)
        for name, policy in config.classes.items()
    }
    return msgspec.structs.replace(config, classes=classes)


def _class(config: Config, name: str) -> ClassPolicy:
    policy = config.classes.get(name)
    if policy is None:
        raise ConfigError(
            f"the bench needs a class {name!r}; the configuration has {', '.join(config.classes)}"
        )
    return policy


def _chat(request_id: str, text: str, task: str) -> dict[str, Any]:
    return {
        "op": "chat",
        "id": request_id,
        "messages": [{"role": "user", "content": text}],
        "task": task,
        "cache": False,
    }


async def _status(client: Client) -> Status:
    reply = await client.call({"op": "status"})
    match reply:
        case Status():
            return reply
        case Error():
            raise BenchError(f"the daemon refused a status request: {reply.message}")
        case _:
            raise BenchError(f"the daemon answered a status request with {reply!r}")


async def _enabled(client: Client, names: Sequence[str]) -> list[str]:
    status = await _status(client)
    return [n for n in names if n in status.providers and status.providers[n].state != "disabled"]


async def _flood(client: Client, count: int, task: str, prefix: str) -> None:
    """Send ``count`` jobs without waiting for them: the client keeps no state per job.

    Their replies carry ids no one waits for, so the client's reader drops them.
    """
    for i in range(count):
        await client.send(_chat(f"{prefix}-{i}", f"{prefix} job {i}: summarise this", task))


def _held(status: Status) -> int:
    """Jobs the daemon has accepted so far: queued, running or answered."""
    return status.queued + status.running + status.jobs_done + status.jobs_failed


async def _flood_accepted(
    flood: Client, watcher: Client, count: int, task: str, prefix: str, deadline_s: float
) -> tuple[int, float]:
    """Send ``count`` jobs on ``flood``; wait until the daemon holds them all (or the deadline).

    Returns how many it accepted and how long sending and accepting took.
    """
    base = _held(await _status(watcher))
    started = time.monotonic()
    accepted = 0
    with anyio.move_on_after(deadline_s):
        await _flood(flood, count, task, prefix)
        while accepted < count:
            accepted = _held(await _status(watcher)) - base
            if accepted < count:
                await anyio.sleep(STATUS_POLL_S)
    if accepted < count:
        accepted = _held(await _status(watcher)) - base
    return min(accepted, count), time.monotonic() - started


# -- burst -----------------------------------------------------------------------------


async def run_burst_once(
    config: Config, settings: BenchSettings, strategy: Literal["capacity", "weighted"]
) -> tuple[BurstRun, dict[str, ProviderLimit]]:
    """One burst of ``settings.jobs`` default-class jobs on a fresh daemon."""
    names = list(_class(config, "default").providers)
    async with bench_daemon(with_strategy(config, strategy), settings) as bench:
        per_provider: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        last_answer = 0.0
        async with Client.connect(bench.socket) as client:
            eligible = await _enabled(client, names)
            limits = {name: bench.physical(name) for name in eligible}
            bound = lower_bound_s(list(limits.values()), settings.jobs)

            first_submit: float | None = None

            async def one(i: int) -> None:
                nonlocal last_answer, first_submit
                if first_submit is None:
                    first_submit = time.monotonic()
                reply = await client.call(_chat(f"burst-{i}", f"burst job {i}", "default"))
                last_answer = time.monotonic()
                if isinstance(reply, Result):
                    per_provider[reply.provider] += 1
                elif isinstance(reply, Error):
                    errors[reply.code] += 1

            started = time.monotonic()
            with anyio.move_on_after(settings.max_wall_s) as cap:
                async with anyio.create_task_group() as tg:
                    for i in range(settings.jobs):
                        tg.start_soon(one, i)
            ended = time.monotonic() if cap.cancelled_caught else last_answer
            if first_submit is not None:
                started = first_submit  # makespan runs from the first submit to the last answer
        completed = sum(per_provider.values())
        failed = sum(errors.values())
        makespan = max(0.0, ended - started)
        run = BurstRun(
            strategy=strategy,
            jobs=settings.jobs,
            completed=completed,
            failed=failed,
            incomplete=settings.jobs - completed - failed,
            errors=dict(errors),
            upstream_429=bench.upstream_429(),
            makespan_s=round(makespan, 4),
            lower_bound_s=round(bound, 4),
            efficiency=round(bound / makespan, 4) if makespan > 0 else 0.0,
            per_provider={name: per_provider.get(name, 0) for name in eligible},
            hit_wall_cap=cap.cancelled_caught,
        )
        return run, limits


async def run_burst(
    config: Config, settings: BenchSettings, progress: Callable[[str], None]
) -> BurstReport:
    progress(f"burst: {settings.jobs} jobs, strategy capacity")
    capacity_run, limits = await run_burst_once(config, settings, "capacity")
    weighted_run = None
    slowdown = None
    if settings.weighted:
        progress(f"burst: {settings.jobs} jobs, strategy weighted (the seed's static weights)")
        weighted_run, _ = await run_burst_once(config, settings, "weighted")
        if capacity_run.makespan_s > 0:
            slowdown = round(weighted_run.makespan_s / capacity_run.makespan_s, 3)
    met = (
        capacity_run.completed == settings.jobs
        and capacity_run.upstream_429 == 0
        and capacity_run.efficiency >= EFFICIENCY_TARGET
    )
    return BurstReport(
        providers=limits,
        capacity=capacity_run,
        weighted=weighted_run,
        slowdown=slowdown,
        target_met=met,
    )


# -- priority --------------------------------------------------------------------------


def priority_config(config: Config) -> Config:
    """Bulk may use every provider realtime may use, so no provider is idle for realtime."""
    realtime = _class(config, "realtime")
    bulk = _class(config, "bulk")
    widened = list(bulk.providers) + [p for p in realtime.providers if p not in bulk.providers]
    classes = {**config.classes, "bulk": msgspec.structs.replace(bulk, providers=widened)}
    return msgspec.structs.replace(config, classes=classes)


async def run_priority(
    config: Config, settings: BenchSettings, progress: Callable[[str], None]
) -> PriorityReport:
    config = priority_config(config)
    rng = random.Random(settings.seed)
    progress(
        f"priority: {settings.priority_probes} realtime jobs behind "
        f"{settings.priority_bulk} queued bulk jobs"
    )
    async with bench_daemon(config, settings) as bench:
        recorder = bench.recorder
        probes: list[Probe] = []
        async with Client.connect(bench.socket) as flood, Client.connect(bench.socket) as client:
            realtime = await _enabled(client, _class(config, "realtime").providers)
            bulk = await _enabled(client, _class(config, "bulk").providers)
            fastest = min(realtime, key=bench.service_s)
            accepted, accept_s = await _flood_accepted(
                flood, client, settings.priority_bulk, "bulk", "bulk", settings.max_wall_s
            )
            with anyio.move_on_after(settings.max_wall_s):
                for k in range(settings.priority_probes):
                    await anyio.sleep(rng.uniform(0.05, 0.3))  # land at a random phase
                    queued = (await _status(client)).queued
                    request_id = f"realtime-{k}"
                    recorder.watched.add(request_id)
                    reply = await client.call(_chat(request_id, f"realtime probe {k}", "realtime"))
                    probes.append(_probe(bench, reply, queued, recorder.waits.get(request_id)))
        waits = [p.wait_s for p in probes if p.wait_s is not None]
        max_wait = max(waits) if waits else None
        met = (
            len(waits) == settings.priority_probes
            and max_wait is not None
            and max_wait <= bench.service_s(fastest)
        )
        return PriorityReport(
            bulk_jobs=settings.priority_bulk,
            bulk_accepted=accepted,
            bulk_accept_s=_finite(accept_s, 3),
            bulk_providers=bulk,
            realtime_providers=realtime,
            fastest_provider=fastest,
            fastest_service_s=round(bench.service_s(fastest), 4),
            probes=probes,
            max_wait_s=None if max_wait is None else round(max_wait, 4),
            upstream_429=bench.upstream_429(),
            target_met=met,
        )


def _probe(bench: _Bench, reply: Reply, queued: int, wait: float | None) -> Probe:
    if not isinstance(reply, Result):
        message = f"{reply.code}: {reply.message}" if isinstance(reply, Error) else str(reply)
        return Probe(
            queued_ahead=queued,
            provider=None,
            latency_s=None,
            wait_s=None,
            wait_estimate_s=None,
            error=message,
        )
    latency = reply.latency_ms / 1000.0
    return Probe(
        queued_ahead=queued,
        provider=reply.provider,
        latency_s=round(latency, 4),
        wait_s=None if wait is None else round(wait, 4),
        wait_estimate_s=round(latency - bench.service_s(reply.provider), 4),
    )


# -- fairness --------------------------------------------------------------------------


@dataclass(slots=True)
class _Samples:
    """Client B's answers: client-side latency of each, who served it, errors."""

    latencies: list[float] = field(default_factory=list)
    providers: Counter[str] = field(default_factory=Counter)
    errors: int = 0


async def _paced(
    client: Client, settings: BenchSettings, task: str, prefix: str, samples: _Samples
) -> None:
    """B's jobs, one every interval, each timed from its send to its answer."""

    async def one(i: int) -> None:
        sent = time.monotonic()
        reply = await client.call(_chat(f"{prefix}-{i}", f"{prefix} question {i}", task))
        if isinstance(reply, Result):
            samples.latencies.append(time.monotonic() - sent)
            samples.providers[reply.provider] += 1
        else:
            samples.errors += 1

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(settings.fairness_b_jobs):
            await anyio.sleep_until(start + i * settings.fairness_interval_s)
            tg.start_soon(one, i)


async def run_fairness_variant(
    config: Config, settings: BenchSettings, b_class: str, progress: Callable[[str], None]
) -> FairnessVariant:
    """B alone, then B behind A's flood, on one fresh daemon; each phase capped at max_wall_s."""
    _class(config, b_class)
    _class(config, "bulk")
    idle, loaded = _Samples(), _Samples()
    queued_at_end = done_meanwhile = 0
    async with bench_daemon(config, settings) as bench, Client.connect(bench.socket) as b:
        progress(f"fairness ({b_class}): B alone, {settings.fairness_b_jobs} jobs")
        with anyio.move_on_after(settings.max_wall_s):
            await _paced(b, settings, b_class, "idle", idle)
        progress(
            f"fairness ({b_class}): A floods {settings.fairness_jobs} bulk jobs, "
            f"B sends {settings.fairness_b_jobs} {b_class} jobs"
        )
        async with Client.connect(bench.socket) as a:
            accepted, accept_s = await _flood_accepted(
                a, b, settings.fairness_jobs, "bulk", "flood", settings.max_wall_s
            )
            done_before = bench.recorder.done_by_prefix["flood"]
            with anyio.move_on_after(settings.max_wall_s):
                await _paced(b, settings, b_class, "b", loaded)
            done_meanwhile = bench.recorder.done_by_prefix["flood"] - done_before
            queued_at_end = (await _status(b)).queued
        # leaving A's connection cancelled its queued jobs
        upstream_429 = bench.upstream_429()
    ratio_median = _ratio(percentile(loaded.latencies, 0.5), percentile(idle.latencies, 0.5))
    ratio_p95 = _ratio(percentile(loaded.latencies, 0.95), percentile(idle.latencies, 0.95))
    errors = idle.errors + loaded.errors
    met = (
        errors == 0
        and len(loaded.latencies) == settings.fairness_b_jobs
        and ratio_median <= FAIRNESS_TARGET
        and ratio_p95 <= FAIRNESS_TARGET
    )
    return FairnessVariant(
        b_class=b_class,
        flood_jobs=settings.fairness_jobs,
        b_jobs=settings.fairness_b_jobs,
        idle_median_s=_finite(percentile(idle.latencies, 0.5), 4),
        idle_p95_s=_finite(percentile(idle.latencies, 0.95), 4),
        loaded_median_s=_finite(percentile(loaded.latencies, 0.5), 4),
        loaded_p95_s=_finite(percentile(loaded.latencies, 0.95), 4),
        ratio_median=_finite(ratio_median, 3),
        ratio_p95=_finite(ratio_p95, 3),
        b_errors=errors,
        flood_accepted=accepted,
        flood_accept_s=_finite(accept_s, 3),
        flood_done_meanwhile=done_meanwhile,
        flood_queued_at_end=queued_at_end,
        b_providers=dict(loaded.providers),
        upstream_429=upstream_429,
        target_met=met,
    )


def _ratio(loaded: float, idle: float) -> float:
    if math.isnan(loaded) or math.isnan(idle) or idle <= 0:
        return math.inf
    return loaded / idle


async def run_fairness(
    config: Config, settings: BenchSettings, progress: Callable[[str], None]
) -> FairnessReport:
    variants = [
        await run_fairness_variant(config, settings, b_class, progress)
        for b_class in ("default", "bulk")
    ]
    return FairnessReport(variants=variants, target_met=all(v.target_met for v in variants))


# -- the verb --------------------------------------------------------------------------


async def run_bench(
    config: Config,
    settings: BenchSettings,
    scenarios: Sequence[Scenario],
    *,
    config_name: str = "built-in",
    progress: Callable[[str], None] = lambda _: None,
) -> BenchReport:
    report = BenchReport(time_scale=settings.time_scale, seed=settings.seed, config=config_name)
    if "burst" in scenarios:
        report.burst = await run_burst(config, settings, progress)
    if "priority" in scenarios:
        report.priority = await run_priority(config, settings, progress)
    if "fairness" in scenarios:
        report.fairness = await run_fairness(config, settings, progress)
    return report


def add_bench_arguments(
    parser: argparse.ArgumentParser, *, more_scenarios: Sequence[str] = ()
) -> None:
    """The scheduling scenarios' options; ``more_scenarios`` run only when named."""
    more = f"; {' and '.join(more_scenarios)} run only when named" if more_scenarios else ""
    parser.add_argument(
        "--scenario",
        choices=[*SCENARIOS, *more_scenarios, "all"],
        default="all",
        help=f"default: all ({', '.join(SCENARIOS)}){more}",
    )
    parser.add_argument(
        "--jobs", type=int, default=400, help="burst: jobs submitted at once (default 400)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.1,
        help="multiply the fakes' latencies (default 0.1); RPM windows stay 60 s",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds routing draws (default 0)")
    parser.add_argument(
        "--max-wall-s",
        type=float,
        default=150.0,
        help="cap on each run's wall time; unanswered jobs are reported (default 150)",
    )
    parser.add_argument(
        "--no-weighted", action="store_true", help="burst: skip the weighted comparison run"
    )
    parser.add_argument(
        "--priority-bulk", type=int, default=1000, help="priority: bulk jobs queued first"
    )
    parser.add_argument(
        "--priority-probes", type=int, default=5, help="priority: realtime jobs sent behind them"
    )
    parser.add_argument(
        "--fairness-jobs", type=int, default=10_000, help="fairness: client A's bulk jobs"
    )
    parser.add_argument(
        "--fairness-b-jobs", type=int, default=10, help="fairness: client B's jobs (default 10)"
    )
    parser.add_argument(
        "--fairness-interval-s",
        type=float,
        default=1.0,
        help="fairness: seconds between client B's jobs (default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON report")
    parser.add_argument("--log", help="write the daemons' JSON logs (level info) to this file")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a scenario misses its target"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = 160  # pipes and files: room for every column instead of 80
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.jobs < 1 or args.time_scale <= 0 or args.max_wall_s <= 0:
        err.print("[red]error:[/] --jobs, --time-scale and --max-wall-s must be positive")
        return 2
    config = load_config(Path(args.config)) if args.config else builtin_config()
    settings = BenchSettings(
        jobs=args.jobs,
        time_scale=args.time_scale,
        seed=args.seed,
        max_wall_s=args.max_wall_s,
        weighted=not args.no_weighted,
        priority_bulk=args.priority_bulk,
        priority_probes=args.priority_probes,
        fairness_jobs=args.fairness_jobs,
        fairness_b_jobs=args.fairness_b_jobs,
        fairness_interval_s=args.fairness_interval_s,
    )
    scenarios: Sequence[Scenario] = SCENARIOS if args.scenario == "all" else (args.scenario,)

    progress = progress_printer(err)

    async def main() -> BenchReport:
        return await run_bench(
            config,
            settings,
            scenarios,
            config_name=args.config or "built-in",
            progress=progress,
        )

    report = run_scenario(
        main, log=args.log, err=err, as_json=args.json, render=lambda r: render(r, out)
    )
    if report is None:
        return 1
    missed = [
        name
        for name, part in (
            ("burst", report.burst),
            ("priority", report.priority),
            ("fairness", report.fairness),
        )
        if part is not None and not part.target_met
    ]
    if missed and not args.json:
        err.print(f"[yellow]target missed:[/] {', '.join(missed)}")
    return 1 if missed and args.check else 0


# -- rendering -------------------------------------------------------------------------


def _s(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _verdict(met: bool) -> str:
    return "[green]met[/]" if met else "[red]missed[/]"


def render(report: BenchReport, console: Console) -> None:
    console.print(
        f"[bold]dispatcher bench[/]  config {report.config}, time scale {report.time_scale:g} "
        f"(latencies scaled, RPM windows 60 s), seed {report.seed}"
    )
    parts: list[tuple[Table, list[str]]] = []
    if report.burst is not None:
        parts.append(render_burst(report.burst))
    if report.priority is not None:
        parts.append(render_priority(report.priority))
    if report.fairness is not None:
        parts.append(render_fairness(report.fairness))
    print_parts(console, parts)


def run_scenario(
    main: Callable[[], Awaitable[R]],
    *,
    log: str | None,
    err: Console,
    as_json: bool,
    render: Callable[[R], None],
) -> R | None:
    """Run a scenario's ``main`` on uvloop with the bench's log set-up, then print its
    report as JSON or with ``render``; None (after one line saying why) on a BenchError."""
    with contextlib.ExitStack() as stack:
        bench_logs(stack, log)
        try:
            report = anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
        except BenchError as exc:
            err.print(f"[red]error:[/] {exc}")
            return None
    if as_json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        render(report)
    return report


def progress_printer(err: Console) -> Callable[[str], None]:
    """What a scenario calls to say what it is doing, dimmed on stderr."""

    def progress(text: str) -> None:
        err.print(f"[dim]{text} ...[/]")

    return progress


def bench_logs(stack: contextlib.ExitStack, path: str | None) -> None:
    """The daemons' JSON logs go to ``path`` (level info), or nowhere (errors only)."""
    from dispatcher import logs  # structlog loads only when a benchmark runs

    if path:
        logs.configure("info", stack.enter_context(open(path, "a")), json=True)  # noqa: SIM115  # the caller's stack closes it
    else:
        logs.configure("error", stack.enter_context(open(os.devnull, "w")), json=True)  # noqa: SIM115


def print_parts(console: Console, parts: list[tuple[Table, list[str]]]) -> None:
    """Each scenario's table with its notes under it."""
    for table, notes in parts:
        console.print()
        console.print(table)
        for note in notes:
            console.print(f"  {note}")


def render_burst(report: BurstReport) -> tuple[Table, list[str]]:
    """The burst table and the notes printed under it."""
    names = list(report.providers)
    table = Table(title="burst: N default jobs at once", title_justify="left")
    for column in ("strategy", "completed", "429s", "makespan s", "bound s", "efficiency"):
        table.add_column(column, justify="right" if column != "strategy" else "left")
    for name in names:
        table.add_column(name, justify="right")
    for run in (report.capacity, report.weighted):
        if run is None:
            continue
        done = f"{run.completed}/{run.jobs}"
        if run.hit_wall_cap:
            done += f" ({run.incomplete} cut at the wall cap)"
        if run.failed:
            done += (
                f" ({run.failed} failed: {', '.join(f'{k} {v}' for k, v in run.errors.items())})"
            )
        makespan = ("≥" if run.hit_wall_cap else "") + _s(run.makespan_s)
        efficiency = ("≤" if run.hit_wall_cap else "") + _s(run.efficiency)
        table.add_row(
            run.strategy,
            done,
            str(run.upstream_429),
            makespan,
            _s(run.lower_bound_s),
            efficiency,
            *(str(run.per_provider.get(name, 0)) for name in names),
        )
    limits = ", ".join(
        f"{name} {c}x{latency:.3g}s{f' {rpm}/min' if rpm else ''}"
        for name, (c, latency, rpm) in report.providers.items()
    )
    notes = [f"providers (slots x mean latency, rpm): {limits}"]
    if report.slowdown is not None:
        notes.append(f"weighted makespan / capacity makespan = {report.slowdown:.2f}x")
    notes.append(
        f"target (capacity): all completed, 0 upstream 429s, efficiency >= {EFFICIENCY_TARGET}: "
        + _verdict(report.target_met)
    )
    return table, notes


def render_priority(report: PriorityReport) -> tuple[Table, list[str]]:
    """The priority table (one row per realtime probe) and the notes printed under it."""
    table = Table(
        title=f"priority: realtime jobs behind {report.bulk_jobs} bulk jobs", title_justify="left"
    )
    for column in (
        "probe",
        "queued ahead",
        "provider",
        "latency s",
        "wait to start s",
        "latency - mean service s",
    ):
        table.add_column(column, justify="right" if column != "provider" else "left")
    for k, probe in enumerate(report.probes):
        table.add_row(
            str(k),
            str(probe.queued_ahead),
            probe.provider or f"[red]{probe.error}[/]",
            _s(probe.latency_s),
            _s(probe.wait_s),
            _s(probe.wait_estimate_s),
        )
    notes = [
        f"bulk may use {', '.join(report.bulk_providers)}; "
        f"realtime may use {', '.join(report.realtime_providers)}",
        f"the daemon accepted {report.bulk_accepted}/{report.bulk_jobs} bulk jobs in "
        f"{_s(report.bulk_accept_s, 2)} s; upstream 429s {report.upstream_429}",
        f"target: every wait <= one service time of {report.fastest_provider} "
        f"({report.fastest_service_s:.3f} s); max wait {_s(report.max_wait_s)} s: "
        + _verdict(report.target_met),
    ]
    return table, notes


def render_fairness(report: FairnessReport) -> tuple[Table, list[str]]:
    """The fairness table (one row per variant) and the notes printed under it."""
    table = Table(
        title="fairness: client A floods bulk jobs, client B sends one job at a time",
        title_justify="left",
    )
    for column in (
        "B's class",
        "idle median s",
        "idle p95 s",
        "loaded median s",
        "loaded p95 s",
        "ratio median",
        "ratio p95",
        "A accepted (s)",
        "A done meanwhile",
        "429s",
        "target",
    ):
        table.add_column(column, justify="left" if column in ("B's class", "target") else "right")
    for v in report.variants:
        table.add_row(
            v.b_class,
            _s(v.idle_median_s),
            _s(v.idle_p95_s),
            _s(v.loaded_median_s),
            _s(v.loaded_p95_s),
            _s(v.ratio_median, 2),
            _s(v.ratio_p95, 2),
            f"{v.flood_accepted} ({_s(v.flood_accept_s, 1)})",
            str(v.flood_done_meanwhile),
            str(v.upstream_429),
            _verdict(v.target_met),
        )
    notes = []
    if report.variants:
        first = report.variants[0]
        notes = [
            f"A: {first.flood_jobs} bulk jobs at once on one connection; B: {first.b_jobs} jobs "
            "on another, one per interval, on the idle daemon, then behind A's flood",
            f"target: B's loaded latency within {FAIRNESS_TARGET - 1:.0%} of idle (median and p95)",
        ]
    return table, notes
