"""``dispatcher bench --scenario learn|fleet``: a key's limits, unpublished and shared by hosts.

The targets are issue 10's. Unlike the scheduling scenarios of
:mod:`dispatcher.tools.bench`, these run in real time (``--time-scale`` does not
apply: RPM windows are 60 s and the latencies below are what the fakes sleep),
and each builds its own one-key configuration (``--config`` is not used). Every
daemon talks to a real :class:`~dispatcher.testing.simulator.FakeProvider` on
127.0.0.1 that enforces its limits exactly, and is driven over its Unix socket.

* **learn**: a fake allows 30 requests a minute (sliding 60 s window, 5 at once,
  about 1 s each with the seed fakes' jitter) while the daemon's config says
  ``rpm = 0``. 60 jobs pinned to it: succeeded, upstream 429s, makespan against the
  ideal (:func:`learn_ideal_s`: 30 at concurrency pace, the rest once the window
  frees, 66 s). The fake's ``x-ratelimit-*`` headers are stripped for that run,
  so learning from 429s is what is measured (``Behaviour`` has no switch for
  them; :func:`_fake` overrides the fake's header method instead); a second run
  with the headers on is reported beside it.
* **fleet**: three daemons sharing one key through Redis, each part under its own
  ``key_prefix``, deleted afterwards:

  - *shared*: 16 closed-loop clients per daemon against a key of 5 slots and
    60 rpm at 5 s a request (both limits bind), for 90 s: upstream 429s, the
    most requests the fake saw at once, and the answers against the physical
    bound (:func:`~dispatcher.tools.bench.capacity`) of that time;
  - *host-dies*: the third daemon runs as ``python -m dispatcher serve`` and is
    SIGKILLed while it holds leases; how long until its leases are gone from
    Redis and until the survivors use every slot again (target: ``lease_s``);
  - *redis-down*: the fleet on a private ``redis-server`` on a free port, stopped
    for 30 s mid-run and started again: failed and hung jobs, 429s while
    degraded, and how long until every daemon's ``status`` says "shared" again;
  - *latency*: one job at a time against a zero-latency fake, through a local
    daemon and a shared one with the same configuration, interleaved: the
    median and p99 that shared mode adds.

Resource handling: every daemon, subprocess, private redis-server, client,
socket and temporary directory is closed when its part ends, also on Ctrl-C;
the key prefixes are deleted from Redis. Every loop is bounded in count and in
time, every wait has a deadline, every address is loopback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit

import anyio
from rich.console import Console
from rich.table import Table

from dispatcher.client.connection import Client, ConnectionLost, DaemonNotRunning, answers_ping
from dispatcher.contract.config import Config, parse_config
from dispatcher.contract.protocol import Error, Result, Status
from dispatcher.tools.bench import (
    BenchError,
    _finite,
    _Report,
    _s,
    _status,
    _verdict,
    capacity,
    percentile,
    print_parts,
    progress_printer,
    run_scenario,
)

if TYPE_CHECKING:  # aiohttp, redis and the daemon load only when a scenario runs
    from anyio.abc import Process, TaskGroup
    from redis.asyncio import Redis

    from dispatcher.app import Daemon
    from dispatcher.testing.simulator import Behaviour, FakeProvider

LimitScenario = Literal["learn", "fleet"]
LIMIT_SCENARIOS: Final[tuple[LimitScenario, ...]] = ("learn", "fleet")
FleetPart = Literal["shared", "host-dies", "redis-down", "latency"]
FLEET_PARTS: Final[tuple[FleetPart, ...]] = ("shared", "host-dies", "redis-down", "latency")

# -- targets (issue 10) ----------------------------------------------------------------
LEARN_MAX_429: Final = 3
LEARN_MAKESPAN_RATIO: Final = 1.1
FLEET_SHARE_TARGET: Final = 0.90
RESUME_TARGET_S: Final = 5.0
ADDED_MEDIAN_TARGET_S: Final = 0.001

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})
KEY: Final = "bench-limits-key-not-a-secret"
KEY_ENV: Final = "DISPATCHER_BENCH_KEY"
PROVIDER: Final = "k"
START_DEADLINE_S: Final = 20.0  # a daemon (in-process or subprocess) answers ping by then
SHARED_DEADLINE_S: Final = 10.0  # every daemon of a fleet reports "shared" by then
POLL_S: Final = 0.02
STATUS_POLL_S: Final = 0.05
MAX_JOBS_PER_CLIENT: Final = 100_000  # a bound on every closed-loop client
_SERVER: Final = ("redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """The knobs of the learn and fleet scenarios (the verb's options); times in seconds."""

    seed: int = 0
    max_wall_s: float = 150.0  # cap on a learn run
    # learn
    learn_jobs: int = 60
    learn_rpm: int = 30
    learn_concurrency: int = 5
    learn_latency_s: float = 1.0
    learn_headers_run: bool = True
    # fleet: the key every part shares
    fleet_daemons: int = 3
    fleet_clients: int = 16
    fleet_concurrency: int = 5
    fleet_rpm: int = 60
    fleet_latency_s: float = 5.0
    fleet_duration_s: float = 90.0
    lease_s: float = 3.0
    fleet_parts: tuple[FleetPart, ...] = FLEET_PARTS
    redis_url: str = DEFAULT_REDIS_URL
    # host-dies
    kill_min_held: int = 2  # kill once the victim holds this many leases (or at the deadline)
    kill_deadline_s: float = 30.0
    after_kill_s: float = 5.0  # keep the survivors busy this long after the slots are back
    # redis-down
    redis_before_s: float = 15.0
    redis_down_s: float = 30.0
    redis_after_s: float = 15.0
    drain_s: float = 120.0  # every job still open when the offer stops is answered by then
    # latency
    latency_jobs: int = 1000
    latency_warmup: int = 50


# -- reports ---------------------------------------------------------------------------


class LearnRun(_Report, kw_only=True):
    """One run of N jobs pinned to a key whose limit the config does not say."""

    rate_headers: bool  # the fake sent x-ratelimit-* headers
    jobs: int
    succeeded: int
    failed: int
    incomplete: int  # still unanswered at the wall cap
    errors: dict[str, int]
    upstream_requests: int
    upstream_429: int
    makespan_s: float
    ideal_s: float
    ratio: float | None
    learned: str | None  # the daemon's own account: "30/min from a 429 at 12:01:07"
    learned_rpm: float | None
    hit_wall_cap: bool
    target_met: bool


class LearnReport(_Report, kw_only=True):
    rpm: int
    window_s: float
    concurrency: int
    latency_s: float
    jitter: float
    without_headers: LearnRun
    with_headers: LearnRun | None = None  # reported, not part of the target
    target_met: bool


class SharedLimitsRun(_Report, kw_only=True):
    """Closed-loop clients on every daemon of the fleet for a while."""

    daemons: int
    clients_per_daemon: int
    concurrency: int
    rpm: int
    latency_s: float
    elapsed_s: float  # from the key's first request to the end of the offer
    succeeded: int  # answered 200 by the fake within elapsed_s
    errors: dict[str, int]
    upstream_429: int
    max_in_flight: int  # the most requests the fake held at once
    bound_jobs: float  # the most the fake allows in elapsed_s
    share: float
    modes: list[str]  # each daemon's ledger mode at the end
    instances: list[int]
    target_met: bool


class HostDiesRun(_Report, kw_only=True):
    """A daemon SIGKILLed while it holds leases on the fleet's slots."""

    lease_s: float
    held_at_kill: int  # the victim's live leases in Redis when it was killed
    leases_gone_s: float | None  # until none of them is live in Redis
    slots_back_s: float | None  # until the fake serves the key's concurrency again
    upstream_429: int
    survivor_errors: dict[str, int]
    survivor_ok: int
    lost_with_host: int  # calls of the victim's own clients that lost their connection
    target_met: bool


class RedisDownRun(_Report, kw_only=True):
    """The fleet while its Redis stops and comes back."""

    down_s: float  # from stopping Redis to it answering PING again
    degraded_after_s: float | None  # until every daemon's status said "degraded"
    ok: int
    failed: int
    errors: dict[str, int]
    hung: int  # jobs still unanswered drain_s after the offer stopped
    upstream_429_degraded: int  # from stopping Redis to every daemon shared again
    upstream_429: int  # over the whole run
    resume_s: float | None  # from Redis answering PING to every daemon's status "shared"
    resume_per_daemon_s: list[float | None]
    target_met: bool


class AddedLatencyRun(_Report, kw_only=True):
    """One job at a time, local daemon and shared daemon interleaved, same config."""

    jobs: int
    errors: int
    local_median_ms: float | None
    local_p99_ms: float | None
    shared_median_ms: float | None
    shared_p99_ms: float | None
    added_median_ms: float | None
    added_p99_ms: float | None
    target_met: bool


class FleetReport(_Report, kw_only=True):
    redis_url: str
    lease_s: float
    shared: SharedLimitsRun | None = None
    host_dies: HostDiesRun | None = None
    redis_down: RedisDownRun | None = None
    latency: AddedLatencyRun | None = None
    target_met: bool


class LimitsBenchReport(_Report, kw_only=True):
    """What ``--json`` prints for the learn and fleet scenarios."""

    seed: int
    learn: LearnReport | None = None
    fleet: FleetReport | None = None


# -- pure helpers ----------------------------------------------------------------------


def learn_ideal_s(
    jobs: int, *, limit: int, concurrency: int, latency_s: float, window_s: float = 60.0
) -> float:
    """The least makespan of ``jobs`` against ``limit`` per sliding window at ``concurrency``.

    Each window's ``limit`` requests go at concurrency pace; the next window's
    first request can start only when the window's first one leaves it
    (``window_s`` later). Assumes one window's share finishes within the window.
    """
    if jobs <= 0:
        return 0.0
    if limit <= 0:
        return math.ceil(jobs / concurrency) * latency_s
    windows = math.ceil(jobs / limit)
    last = jobs - (windows - 1) * limit
    return (windows - 1) * window_s + math.ceil(last / concurrency) * latency_s


def loopback_redis_url(url: str) -> str:
    """``url`` if it names a Redis on a loopback address; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "unix") or (
        parts.scheme == "redis" and parts.hostname not in LOOPBACK
    ):
        raise ValueError(f"--redis-url must be redis://127.0.0.1[:port][/db], got {url!r}")
    return url


def _ms(seconds: float) -> float | None:
    return _finite(seconds * 1000.0, 3)


def _toml(raw: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML text of two levels of tables (``[a]`` or ``[a.b]``) of scalars and lists."""
    lines: list[str] = []

    def table(name: str, values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        if scalars:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in values.items():
            if isinstance(v, Mapping):
                table(f"{name}.{k}", v)

    for name, values in raw.items():
        table(name, values)
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- fakes, configs, daemons -----------------------------------------------------------


def _fake(behaviour: Behaviour, *, rate_headers: bool = True) -> FakeProvider:
    """A fake provider; without ``rate_headers`` it never sends ``x-ratelimit-*``.

    The simulator sends them whenever ``rpm`` is set and ``Behaviour`` has no
    switch to turn them off, so the header method is overridden here.
    """
    from dispatcher.testing.simulator import FakeProvider

    if rate_headers:
        return FakeProvider(behaviour)

    class WithoutRateHeaders(FakeProvider):
        def _rate_headers(self, now: float) -> dict[str, str]:
            return {}

    return WithoutRateHeaders(behaviour)


def _raw_config(
    fake: FakeProvider,
    state_dir: Path,
    socket_path: str,
    *,
    concurrency: int,
    rpm: int,
    latency_s: float,
    cluster: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """One provider (``k``) pointing at ``fake``, every class on it, and maybe [cluster]."""
    raw: dict[str, dict[str, Any]] = {
        "daemon": {"socket": socket_path, "state_dir": str(state_dir), "log_level": "warning"},
        "providers": {
            PROVIDER: {
                "url": fake.url,
                "model": fake.behaviour.model,
                "api_key_env": KEY_ENV,
                "concurrency": concurrency,
                "rpm": rpm,
                "latency_s": max(latency_s, 0.001),
                "timeout_s": max(30.0, 6 * latency_s),
            }
        },
        "classes": {
            name: {"providers": [PROVIDER]} for name in ("realtime", "complex", "default", "bulk")
        },
    }
    if cluster is not None:
        raw["cluster"] = dict(cluster)
    return raw


def _job(request_id: str) -> dict[str, Any]:
    return {
        "op": "chat",
        "id": request_id,
        "messages": [{"role": "user", "content": f"{request_id}: summarise this"}],
        "providers": [PROVIDER],
        "cache": False,
    }


@asynccontextmanager
async def in_process_daemon(
    raw: Mapping[str, Mapping[str, Any]], seed: int
) -> AsyncIterator[Daemon]:
    """An in-process daemon on ``raw``'s socket, stopped (without a drain) on the way out."""
    from dispatcher.app import Daemon, Options

    config: Config = parse_config(raw, source="bench")
    options = Options(
        config_path=None,
        socket=config.daemon.socket,
        handle_signals=False,
        environ={KEY_ENV: KEY},
    )
    daemon = Daemon(config, options)
    daemon.scheduler.rng = random.Random(seed)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(START_DEADLINE_S):
            await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()
            daemon.request_stop()  # a second request skips the drain


@asynccontextmanager
async def _subprocess_daemon(
    raw: Mapping[str, Mapping[str, Any]], directory: Path
) -> AsyncIterator[Process]:
    """``python -m dispatcher serve --config`` on ``raw``; killed on the way out if alive."""
    path = directory / "config.toml"
    path.write_text(_toml(raw), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env[KEY_ENV] = KEY
    log_path = directory / "serve.log"
    with log_path.open("wb") as log_file:
        process = await anyio.open_process(
            [sys.executable, "-m", "dispatcher", "serve", "--config", str(path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        socket_path = str(raw["daemon"]["socket"])
        with anyio.move_on_after(START_DEADLINE_S):
            while process.returncode is None and not await answers_ping(socket_path):  # noqa: ASYNC110  # a subprocess: no event
                await anyio.sleep(STATUS_POLL_S)
        if not await answers_ping(socket_path):
            tail = log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"the subprocess daemon did not answer ping: {tail}")
        yield process
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(10):
                await process.wait()
            await process.aclose()


@asynccontextmanager
async def _key_prefix(url: str, part: str) -> AsyncIterator[str]:
    """A fresh key prefix in the Redis at ``url``; its keys are deleted on the way out."""
    from redis.asyncio import Redis

    prefix = f"bench-{part}-{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            client = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
                if keys:
                    await client.delete(*keys)
            except (OSError, TimeoutError):
                pass  # a private Redis that is gone took its keys with it
            finally:
                await client.aclose()


async def _start_redis(port: int, directory: Path) -> Process:
    """A private redis-server on 127.0.0.1:``port``, answering PING when this returns."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    process = await anyio.open_process(
        [*_SERVER, "--port", str(port), "--dir", str(directory)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.1, socket_timeout=0.5)
    try:
        with anyio.fail_after(10):
            while True:
                try:
                    await client.ping()
                    return process
                except (RedisError, OSError):
                    if process.returncode is not None:
                        raise BenchError(f"redis-server on port {port} exited") from None
                    await anyio.sleep(POLL_S)
    except BaseException:
        await _stop_redis(process)
        raise
    finally:
        await client.aclose()


async def _stop_redis(process: Process) -> None:
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
        with anyio.move_on_after(5) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            with anyio.move_on_after(5):
                await process.wait()
        await process.aclose()


async def _modes(sockets: Sequence[str]) -> list[Status]:
    statuses = []
    for path in sockets:
        async with Client.connect(path) as client:
            statuses.append(await _status(client))
    return statuses


def _mode(status: Status) -> str:
    return status.ledger.mode if status.ledger is not None else "local"


async def _wait_modes(sockets: Sequence[str], mode: str, deadline_s: float) -> float | None:
    """Seconds until every daemon's status says ``mode``; None at the deadline."""
    started = time.monotonic()
    with anyio.move_on_after(deadline_s):
        while True:
            if all(_mode(s) == mode for s in await _modes(sockets)):
                return time.monotonic() - started
            await anyio.sleep(STATUS_POLL_S)
    return None


# -- closed-loop clients ---------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """What a group of closed-loop clients got back."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lost: int = 0  # calls whose connection the daemon dropped (it died)
    open: int = 0  # calls sent and not answered yet


async def _closed_loop(
    path: str, name: str, tally: _Tally, stop: anyio.Event, jobs: int = MAX_JOBS_PER_CLIENT
) -> None:
    """One client: send a job, wait for its answer, again, until ``stop`` or ``jobs`` sent."""
    try:
        async with Client.connect(path) as client:
            for j in range(jobs):
                if stop.is_set():
                    return
                tally.open += 1
                try:
                    reply = await client.call(_job(f"{name}-{j}"))
                finally:
                    tally.open -= 1
                match reply:
                    case Result():
                        tally.ok += 1
                    case Error():
                        tally.errors[reply.code] += 1
                    case _:
                        tally.errors[type(reply).__name__] += 1
    except* (ConnectionLost, DaemonNotRunning, OSError, anyio.BrokenResourceError):
        tally.lost += 1  # the daemon died: the client's reader task may raise it in a group


def _start_clients(
    tg: TaskGroup,
    sockets: Sequence[str],
    clients: int,
    tallies: Sequence[_Tally],
    stop: anyio.Event,
) -> None:
    for d, path in enumerate(sockets):
        for c in range(clients):
            tg.start_soon(_closed_loop, path, f"d{d + 1}c{c}", tallies[d], stop)


@asynccontextmanager
async def _fleet(
    raws: Sequence[Mapping[str, Mapping[str, Any]]], seed: int
) -> AsyncIterator[list[Daemon]]:
    async with AsyncExitStack() as stack:
        daemons = [
            await stack.enter_async_context(in_process_daemon(raw, seed + i))
            for i, raw in enumerate(raws)
        ]
        yield daemons


def _cluster(url: str, prefix: str, name: str, settings: LimitsSettings) -> dict[str, Any]:
    return {
        "redis_url": url,
        "key_prefix": prefix,
        "instance_name": name,
        "lease_s": settings.lease_s,
        "expected_instances": settings.fleet_daemons,
    }


def _key_behaviour(settings: LimitsSettings, *, seed: int = 0) -> Behaviour:
    from dispatcher.testing.simulator import SEED_JITTER, Behaviour

    return Behaviour(
        name=PROVIDER,
        concurrency=settings.fleet_concurrency,
        rpm=settings.fleet_rpm,
        latency_s=settings.fleet_latency_s,
        jitter=SEED_JITTER,
        seed=seed,
    )


def _fleet_raws(
    fake: FakeProvider, tmp: Path, url: str, prefix: str, settings: LimitsSettings
) -> list[dict[str, dict[str, Any]]]:
    return [
        _raw_config(
            fake,
            tmp / f"d{i}" / "state",
            str(tmp / f"d{i}.sock"),
            concurrency=settings.fleet_concurrency,
            rpm=settings.fleet_rpm,
            latency_s=settings.fleet_latency_s,
            cluster=_cluster(url, prefix, f"d{i}", settings),
        )
        for i in range(1, settings.fleet_daemons + 1)
    ]


# -- learn -----------------------------------------------------------------------------


async def run_learn_once(settings: LimitsSettings, *, rate_headers: bool) -> LearnRun:
    """N jobs pinned to a key that allows ``learn_rpm`` a minute; the config says ``rpm = 0``."""
    from dispatcher.testing.simulator import SEED_JITTER, SEED_RANDOM_SEEDS, Behaviour

    behaviour = Behaviour(
        name=PROVIDER,
        rpm=settings.learn_rpm,
        window_s=60.0,
        concurrency=settings.learn_concurrency,
        latency_s=settings.learn_latency_s,
        jitter=SEED_JITTER,
        seed=SEED_RANDOM_SEEDS["zhipu"] + settings.seed,
    )
    ideal = learn_ideal_s(
        settings.learn_jobs,
        limit=settings.learn_rpm,
        concurrency=settings.learn_concurrency,
        latency_s=settings.learn_latency_s,
    )
    errors: Counter[str] = Counter()
    succeeded = 0
    first_submit = last_answer = 0.0
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-learn-") as tmp:
        async with _fake(behaviour, rate_headers=rate_headers) as fake:
            raw = _raw_config(
                fake,
                Path(tmp) / "state",
                str(Path(tmp) / "d.sock"),
                concurrency=settings.learn_concurrency,
                rpm=0,  # the limit nobody published
                latency_s=settings.learn_latency_s,
            )
            async with (
                in_process_daemon(raw, settings.seed),
                Client.connect(str(raw["daemon"]["socket"])) as client,
            ):

                async def one(i: int) -> None:
                    nonlocal succeeded, last_answer
                    reply = await client.call(_job(f"learn-{i}"))
                    last_answer = time.monotonic()
                    if isinstance(reply, Result):
                        succeeded += 1
                    elif isinstance(reply, Error):
                        errors[reply.code] += 1
                    else:
                        errors[type(reply).__name__] += 1

                first_submit = time.monotonic()
                with anyio.move_on_after(settings.max_wall_s) as cap:
                    async with anyio.create_task_group() as tg:
                        for i in range(settings.learn_jobs):
                            tg.start_soon(one, i)
                if cap.cancelled_caught:
                    last_answer = time.monotonic()
                status = await _status(client)
            stats = fake.stats
            upstream_requests, upstream_429 = stats.requests, stats.rate_limited
    provider = status.providers.get(PROVIDER)
    failed = sum(errors.values())
    makespan = max(0.0, last_answer - first_submit)
    ratio = makespan / ideal if ideal > 0 else math.nan
    met = (
        succeeded == settings.learn_jobs
        and upstream_429 <= LEARN_MAX_429
        and makespan <= LEARN_MAKESPAN_RATIO * ideal
    )
    return LearnRun(
        rate_headers=rate_headers,
        jobs=settings.learn_jobs,
        succeeded=succeeded,
        failed=failed,
        incomplete=settings.learn_jobs - succeeded - failed,
        errors=dict(errors),
        upstream_requests=upstream_requests,
        upstream_429=upstream_429,
        makespan_s=round(makespan, 3),
        ideal_s=round(ideal, 3),
        ratio=_finite(ratio, 3),
        learned=provider.learned if provider is not None else None,
        learned_rpm=provider.learned_rpm if provider is not None else None,
        hit_wall_cap=cap.cancelled_caught,
        target_met=met,
    )


async def run_learn(settings: LimitsSettings, progress: Callable[[str], None]) -> LearnReport:
    from dispatcher.testing.simulator import SEED_JITTER

    progress(
        f"learn: {settings.learn_jobs} jobs, the fake allows {settings.learn_rpm}/min, "
        "config rpm = 0, no x-ratelimit headers"
    )
    without = await run_learn_once(settings, rate_headers=False)
    with_headers = None
    if settings.learn_headers_run:
        progress(f"learn: {settings.learn_jobs} jobs again, with x-ratelimit headers")
        with_headers = await run_learn_once(settings, rate_headers=True)
    return LearnReport(
        rpm=settings.learn_rpm,
        window_s=60.0,
        concurrency=settings.learn_concurrency,
        latency_s=settings.learn_latency_s,
        jitter=SEED_JITTER,
        without_headers=without,
        with_headers=with_headers,
        target_met=without.target_met,
    )


# -- fleet: shared limits --------------------------------------------------------------


async def run_fleet_shared(settings: LimitsSettings) -> SharedLimitsRun:
    """Closed-loop clients on every daemon for ``fleet_duration_s``: 429s, concurrency, share."""
    url = settings.redis_url
    tallies = [_Tally() for _ in range(settings.fleet_daemons)]
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-fleet-") as tmp:
        async with (
            _key_prefix(url, "shared") as prefix,
            _fake(_key_behaviour(settings, seed=settings.seed)) as fake,
        ):
            raws = _fleet_raws(fake, Path(tmp), url, prefix, settings)
            sockets = [str(raw["daemon"]["socket"]) for raw in raws]
            async with _fleet(raws, settings.seed):
                if await _wait_modes(sockets, "shared", SHARED_DEADLINE_S) is None:
                    raise BenchError(f"the fleet did not reach shared mode on {url}")
                stop = anyio.Event()
                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    _start_clients(tg, sockets, settings.fleet_clients, tallies, stop)
                    await anyio.sleep(settings.fleet_duration_s)
                    ended = time.monotonic()
                    succeeded = fake.stats.ok  # the fake's count at the cut, not the clients'
                    tg.cancel_scope.cancel()
                statuses = await _modes(sockets)
            stats = fake.stats
            first = stats.times[0] if stats.times else started
            upstream_429, max_in_flight = stats.rate_limited, stats.max_in_flight
    elapsed = max(0.0, ended - first)
    bound = capacity(
        [(settings.fleet_concurrency, settings.fleet_latency_s, settings.fleet_rpm)], elapsed
    )
    share = succeeded / bound if bound > 0 else math.nan
    errors: Counter[str] = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    met = (
        upstream_429 == 0
        and max_in_flight <= settings.fleet_concurrency
        and share >= FLEET_SHARE_TARGET
        and not errors
    )
    return SharedLimitsRun(
        daemons=settings.fleet_daemons,
        clients_per_daemon=settings.fleet_clients,
        concurrency=settings.fleet_concurrency,
        rpm=settings.fleet_rpm,
        latency_s=settings.fleet_latency_s,
        elapsed_s=round(elapsed, 3),
        succeeded=succeeded,
        errors=dict(errors),
        upstream_429=upstream_429,
        max_in_flight=max_in_flight,
        bound_jobs=round(bound, 3),
        share=_finite(share, 4) or 0.0,
        modes=[_mode(s) for s in statuses],
        instances=[s.ledger.instances if s.ledger is not None else 1 for s in statuses],
        target_met=met,
    )


# -- fleet: a host dies ----------------------------------------------------------------


async def _live_leases(redis: Redis, slots_key: str, instance: str) -> int:
    """How many of ``instance``'s leases on the key are live by the Redis server's clock."""
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    members = await redis.zrangebyscore(slots_key, f"({now_ms}", "+inf")
    mark = f"{instance}/".encode()
    return len([m for m in members if isinstance(m, bytes) and m.startswith(mark)])


async def run_fleet_host_dies(settings: LimitsSettings) -> HostDiesRun:
    """The last daemon of the fleet runs as a subprocess and is SIGKILLed holding leases."""
    from redis.asyncio import Redis

    url = settings.redis_url
    tallies = [_Tally() for _ in range(settings.fleet_daemons)]
    victim = f"d{settings.fleet_daemons}"
    held_at_kill = 0
    leases_gone = slots_back = None
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-kill-") as tmp:
        async with (
            _key_prefix(url, "kill") as prefix,
            _fake(_key_behaviour(settings, seed=settings.seed + 1)) as fake,
        ):
            raws = _fleet_raws(fake, Path(tmp), url, prefix, settings)
            sockets = [str(raw["daemon"]["socket"]) for raw in raws]
            slots_key = f"{prefix}:{{{PROVIDER}}}:slots"
            redis = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            async with AsyncExitStack() as stack:
                stack.push_async_callback(redis.aclose)
                await stack.enter_async_context(_fleet(raws[:-1], settings.seed))
                process = await stack.enter_async_context(_subprocess_daemon(raws[-1], Path(tmp)))
                if await _wait_modes(sockets, "shared", SHARED_DEADLINE_S) is None:
                    raise BenchError(f"the fleet did not reach shared mode on {url}")
                stop = anyio.Event()
                async with anyio.create_task_group() as tg:
                    _start_clients(tg, sockets, settings.fleet_clients, tallies, stop)
                    with anyio.move_on_after(settings.kill_deadline_s):
                        while held_at_kill < settings.kill_min_held:
                            await anyio.sleep(POLL_S)
                            held_at_kill = await _live_leases(redis, slots_key, victim)
                    held_at_kill = await _live_leases(redis, slots_key, victim)
                    process.send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    deadline = killed + 4 * settings.lease_s + 10

                    async def leases_expire() -> None:
                        nonlocal leases_gone
                        while await _live_leases(redis, slots_key, victim):  # noqa: ASYNC110  # state in Redis
                            await anyio.sleep(POLL_S)
                        leases_gone = time.monotonic() - killed

                    async def slots_refill() -> None:
                        # The fake drops the dead host's requests as its sockets close, then
                        # serves the full concurrency again once the survivors may take it.
                        nonlocal slots_back
                        full = settings.fleet_concurrency
                        await fake.wait_until(lambda stats: stats.serving < full)
                        await fake.wait_until(lambda stats: stats.serving >= full)
                        slots_back = time.monotonic() - killed

                    with anyio.move_on_after(deadline - time.monotonic()):
                        async with anyio.create_task_group() as watchers:
                            watchers.start_soon(leases_expire)
                            watchers.start_soon(slots_refill)
                    await anyio.sleep(settings.after_kill_s)
                    tg.cancel_scope.cancel()
            upstream_429 = fake.stats.rate_limited
    survivors = tallies[:-1]
    survivor_errors: Counter[str] = Counter()
    for tally in survivors:
        survivor_errors.update(tally.errors)
    met = (
        held_at_kill > 0
        and leases_gone is not None
        and leases_gone <= settings.lease_s
        and slots_back is not None
        and slots_back <= settings.lease_s
        and upstream_429 == 0
        and not survivor_errors
    )
    return HostDiesRun(
        lease_s=settings.lease_s,
        held_at_kill=held_at_kill,
        leases_gone_s=None if leases_gone is None else round(leases_gone, 3),
        slots_back_s=None if slots_back is None else round(slots_back, 3),
        upstream_429=upstream_429,
        survivor_errors=dict(survivor_errors),
        survivor_ok=sum(t.ok for t in survivors),
        lost_with_host=tallies[-1].lost,
        target_met=met,
    )


# -- fleet: Redis down -----------------------------------------------------------------


async def _resumed(path: str, deadline_s: float) -> float | None:
    """Seconds until the daemon on ``path`` says "shared"; None at the deadline."""
    started = time.monotonic()
    with anyio.move_on_after(deadline_s):
        async with Client.connect(path) as client:
            while _mode(await _status(client)) != "shared":  # noqa: ASYNC110  # another daemon's state: no event
                await anyio.sleep(POLL_S)
            return time.monotonic() - started
    return None


async def run_fleet_redis_down(settings: LimitsSettings) -> RedisDownRun:
    """The fleet on a private redis-server that stops for ``redis_down_s`` and comes back."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    tallies = [_Tally() for _ in range(settings.fleet_daemons)]
    degraded_after: float | None = None
    resumed: list[float | None] = []
    hung = rate_limited_degraded = upstream_429 = 0
    down_s = math.nan
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-redis-") as tmp:
        server = await _start_redis(port, Path(tmp))
        try:
            async with _fake(_key_behaviour(settings, seed=settings.seed + 2)) as fake:
                raws = _fleet_raws(fake, Path(tmp), url, "bench-redis-down", settings)
                sockets = [str(raw["daemon"]["socket"]) for raw in raws]
                async with _fleet(raws, settings.seed):
                    if await _wait_modes(sockets, "shared", SHARED_DEADLINE_S) is None:
                        raise BenchError(f"the fleet did not reach shared mode on {url}")
                    stop = anyio.Event()
                    async with anyio.create_task_group() as tg:
                        _start_clients(tg, sockets, settings.fleet_clients, tallies, stop)
                        await anyio.sleep(settings.redis_before_s)
                        await _stop_redis(server)
                        stopped = time.monotonic()
                        rate_limited_at_stop = fake.stats.rate_limited
                        degraded_after = await _wait_modes(
                            sockets, "degraded", settings.redis_down_s
                        )
                        await anyio.sleep_until(stopped + settings.redis_down_s)
                        server = await _start_redis(port, Path(tmp))
                        back = time.monotonic()
                        resumed = [None] * len(sockets)

                        async def watch(d: int) -> None:
                            resumed[d] = await _resumed(sockets[d], 4 * RESUME_TARGET_S)

                        async with anyio.create_task_group() as watchers:
                            for d in range(len(sockets)):
                                watchers.start_soon(watch, d)
                        rate_limited_degraded = fake.stats.rate_limited - rate_limited_at_stop
                        down_s = back - stopped
                        await anyio.sleep(settings.redis_after_s)
                        stop.set()  # no new jobs; the open ones must all be answered
                        with anyio.move_on_after(settings.drain_s) as drain:
                            while any(t.open for t in tallies):  # noqa: ASYNC110  # many clients' counters
                                await anyio.sleep(STATUS_POLL_S)
                        if drain.cancelled_caught:
                            hung = sum(t.open for t in tallies)
                        tg.cancel_scope.cancel()
                upstream_429 = fake.stats.rate_limited
        finally:
            await _stop_redis(server)
    errors: Counter[str] = Counter()
    for tally in tallies:
        errors.update(tally.errors)
    resume = None if not resumed or None in resumed else max(r for r in resumed if r is not None)
    met = (
        not errors
        and hung == 0
        and not any(t.lost for t in tallies)
        and degraded_after is not None
        and rate_limited_degraded == 0
        and resume is not None
        and resume <= RESUME_TARGET_S
    )
    return RedisDownRun(
        down_s=round(down_s, 3),
        degraded_after_s=None if degraded_after is None else round(degraded_after, 3),
        ok=sum(t.ok for t in tallies),
        failed=sum(errors.values()),
        errors=dict(errors),
        hung=hung,
        upstream_429_degraded=rate_limited_degraded,
        upstream_429=upstream_429,
        resume_s=None if resume is None else round(resume, 3),
        resume_per_daemon_s=[None if r is None else round(r, 3) for r in resumed],
        target_met=met,
    )


# -- fleet: added latency --------------------------------------------------------------


async def run_fleet_latency(settings: LimitsSettings) -> AddedLatencyRun:
    """One job at a time through a local and a shared daemon of one config, interleaved;
    the daemons run in processes of their own."""
    from dispatcher.testing.simulator import Behaviour

    url = settings.redis_url
    local: list[float] = []
    shared: list[float] = []
    errors = 0
    rpm = 1_000_000  # the token path runs in both modes and never binds
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-latency-") as tmp:
        async with (
            _key_prefix(url, "latency") as prefix,
            _fake(Behaviour(name=PROVIDER, latency_s=0.0)) as fake,
        ):
            same = functools.partial(
                _raw_config, fake, concurrency=settings.fleet_concurrency, rpm=rpm, latency_s=0.0
            )
            local_raw = same(Path(tmp) / "local", str(Path(tmp) / "local.sock"))
            shared_raw = same(
                Path(tmp) / "shared",
                str(Path(tmp) / "shared.sock"),
                cluster=_cluster(url, prefix, "latency", settings),
            )
            # Each daemon in its own process, as in use: in this one they would share the
            # event loop with the client and the fake, and each other's turns would count.
            for name in ("local", "shared"):
                (Path(tmp) / name).mkdir()
            async with (
                _subprocess_daemon(local_raw, Path(tmp) / "local"),
                _subprocess_daemon(shared_raw, Path(tmp) / "shared"),
            ):
                shared_socket = str(shared_raw["daemon"]["socket"])
                if await _wait_modes([shared_socket], "shared", SHARED_DEADLINE_S) is None:
                    raise BenchError(f"the shared daemon did not reach shared mode on {url}")
                async with (
                    Client.connect(str(local_raw["daemon"]["socket"])) as a,
                    Client.connect(shared_socket) as b,
                ):
                    total = settings.latency_warmup + settings.latency_jobs
                    with anyio.fail_after(max(60.0, total * 0.1)):
                        for i in range(total):
                            for client, samples, name in (
                                (a, local, "local"),
                                (b, shared, "shared"),
                            ):
                                started = time.perf_counter()
                                reply = await client.call(_job(f"{name}-{i}"))
                                took = time.perf_counter() - started
                                if not isinstance(reply, Result):
                                    errors += 1
                                elif i >= settings.latency_warmup:
                                    samples.append(took)
    local_median, local_p99 = percentile(local, 0.5), percentile(local, 0.99)
    shared_median, shared_p99 = percentile(shared, 0.5), percentile(shared, 0.99)
    added_median = shared_median - local_median
    met = (
        errors == 0
        and len(shared) == settings.latency_jobs
        and added_median < ADDED_MEDIAN_TARGET_S
    )
    return AddedLatencyRun(
        jobs=settings.latency_jobs,
        errors=errors,
        local_median_ms=_ms(local_median),
        local_p99_ms=_ms(local_p99),
        shared_median_ms=_ms(shared_median),
        shared_p99_ms=_ms(shared_p99),
        added_median_ms=_ms(added_median),
        added_p99_ms=_ms(shared_p99 - local_p99),
        target_met=met,
    )


async def run_fleet(settings: LimitsSettings, progress: Callable[[str], None]) -> FleetReport:
    report = FleetReport(redis_url=settings.redis_url, lease_s=settings.lease_s, target_met=False)
    parts = settings.fleet_parts
    d, c = settings.fleet_daemons, settings.fleet_clients
    key = (
        f"{settings.fleet_concurrency} at once, {settings.fleet_rpm}/min, "
        f"{settings.fleet_latency_s:g} s a request"
    )
    if "shared" in parts:
        progress(
            f"fleet: {d} daemons x {c} clients on one key ({key}), {settings.fleet_duration_s:g} s"
        )
        report.shared = await run_fleet_shared(settings)
    if "host-dies" in parts:
        progress(f"fleet: a host dies (SIGKILL), lease_s {settings.lease_s:g}")
        report.host_dies = await run_fleet_host_dies(settings)
    if "redis-down" in parts:
        progress(f"fleet: a private Redis stops for {settings.redis_down_s:g} s mid-run")
        report.redis_down = await run_fleet_redis_down(settings)
    if "latency" in parts:
        progress(f"fleet: {settings.latency_jobs} jobs one at a time, local and shared")
        report.latency = await run_fleet_latency(settings)
    runs = (report.shared, report.host_dies, report.redis_down, report.latency)
    report.target_met = all(run.target_met for run in runs if run is not None)
    return report


async def run_limits(
    settings: LimitsSettings,
    scenarios: Sequence[LimitScenario],
    progress: Callable[[str], None] = lambda _: None,
) -> LimitsBenchReport:
    report = LimitsBenchReport(seed=settings.seed)
    if "learn" in scenarios:
        report.learn = await run_learn(settings, progress)
    if "fleet" in scenarios:
        report.fleet = await run_fleet(settings, progress)
    return report


# -- the verb's part -------------------------------------------------------------------


def add_limits_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--scenario learn`` and ``--scenario fleet``."""
    defaults = LimitsSettings()
    parser.add_argument(
        "--learn-jobs", type=int, default=defaults.learn_jobs, help="learn: jobs pinned (60)"
    )
    parser.add_argument(
        "--no-learn-headers",
        action="store_true",
        help="learn: skip the second run, with the fake's x-ratelimit headers on",
    )
    parser.add_argument(
        "--fleet-part",
        action="append",
        choices=FLEET_PARTS,
        help="fleet: run only this part (repeatable; default: all four)",
    )
    parser.add_argument(
        "--fleet-clients",
        type=int,
        default=defaults.fleet_clients,
        help="fleet: concurrent clients per daemon (16)",
    )
    parser.add_argument(
        "--fleet-duration-s",
        type=float,
        default=defaults.fleet_duration_s,
        help="fleet shared: seconds of offered load (90)",
    )
    parser.add_argument(
        "--lease-s", type=float, default=defaults.lease_s, help="fleet: [cluster] lease_s (3)"
    )
    parser.add_argument(
        "--redis-down-s",
        type=float,
        default=defaults.redis_down_s,
        help="fleet redis-down: seconds the private Redis is stopped (30)",
    )
    parser.add_argument(
        "--latency-jobs",
        type=int,
        default=defaults.latency_jobs,
        help="fleet latency: timed jobs per mode (1000)",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"fleet: the shared Redis, loopback only ({DEFAULT_REDIS_URL})",
    )


def limits_settings(args: argparse.Namespace) -> LimitsSettings:
    """The settings of ``args``; ValueError names a bad option."""
    for name in ("learn_jobs", "fleet_clients", "latency_jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("fleet_duration_s", "lease_s", "redis_down_s"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    return LimitsSettings(
        seed=args.seed,
        max_wall_s=args.max_wall_s,
        learn_jobs=args.learn_jobs,
        learn_headers_run=not args.no_learn_headers,
        fleet_clients=args.fleet_clients,
        fleet_duration_s=args.fleet_duration_s,
        lease_s=args.lease_s,
        fleet_parts=tuple(args.fleet_part) if args.fleet_part else FLEET_PARTS,
        redis_url=loopback_redis_url(args.redis_url),
        redis_down_s=args.redis_down_s,
        latency_jobs=args.latency_jobs,
    )


def cmd_limits(args: argparse.Namespace, out: Console, err: Console) -> int:
    """``dispatcher bench --scenario learn|fleet``: run, print, and exit 1 on a miss with --check."""
    try:
        settings = limits_settings(args)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    if args.config:
        err.print("[dim]--config is not used by learn and fleet: they build one-key configs[/]")
    scenarios: tuple[LimitScenario, ...] = (args.scenario,)

    progress = progress_printer(err)

    async def main() -> LimitsBenchReport:
        return await run_limits(settings, scenarios, progress)

    render = functools.partial(render_limits, console=out)
    report = run_scenario(main, log=args.log, err=err, as_json=args.json, render=render)
    if report is None:
        return 1
    missed = [
        name
        for name, part in (("learn", report.learn), ("fleet", report.fleet))
        if part is not None and not part.target_met
    ]
    if missed and not args.json:
        err.print(f"[yellow]target missed:[/] {', '.join(missed)}")
    return 1 if missed and args.check else 0


# -- rendering -------------------------------------------------------------------------


def render_limits(report: LimitsBenchReport, console: Console) -> None:
    console.print(
        f"[bold]dispatcher bench[/]  limits scenarios in real time (RPM windows 60 s), "
        f"seed {report.seed}"
    )
    parts: list[tuple[Table, list[str]]] = []
    if report.learn is not None:
        parts.append(render_learn(report.learn))
    if report.fleet is not None:
        parts.append(render_fleet(report.fleet))
    print_parts(console, parts)


def render_learn(report: LearnReport) -> tuple[Table, list[str]]:
    run0 = report.without_headers
    table = Table(
        title=f"learn: {run0.jobs} jobs pinned to a key that allows {report.rpm}/min, "
        "config rpm = 0",
        title_justify="left",
    )
    for column in ("run", "succeeded", "429s", "makespan s", "ideal s", "ratio", "learned"):
        table.add_column(column, justify="left" if column in ("run", "learned") else "right")
    for run in (report.without_headers, report.with_headers):
        if run is None:
            continue
        done = f"{run.succeeded}/{run.jobs}"
        if run.failed:
            done += (
                f" ({run.failed} failed: {', '.join(f'{k} {v}' for k, v in run.errors.items())})"
            )
        if run.hit_wall_cap:
            done += f" ({run.incomplete} cut at the wall cap)"
        table.add_row(
            "x-ratelimit headers" if run.rate_headers else "no rate headers (429s only)",
            done,
            f"{run.upstream_429} of {run.upstream_requests}",
            ("≥" if run.hit_wall_cap else "") + _s(run.makespan_s, 2),
            _s(run.ideal_s, 1),
            _s(run.ratio, 3),
            run.learned or "-",
        )
    notes = [
        f"fake: {report.rpm} per {report.window_s:g} s sliding, {report.concurrency} at once, "
        f"{report.latency_s:g} s ±{report.jitter:.0%}; ideal = {report.rpm} at concurrency pace, "
        f"the rest once the window frees ({run0.ideal_s:g} s)",
        "the header-less run strips the fake's x-ratelimit-* headers "
        "(the simulator's Behaviour has no switch for them)",
        f"target (no headers): all {run0.jobs} succeed, <= {LEARN_MAX_429} upstream 429s, "
        f"makespan <= {LEARN_MAKESPAN_RATIO}x ideal: " + _verdict(report.target_met),
    ]
    return table, notes


def _row(table: Table, part: str, figure: str, measured: str, target: str, met: bool) -> None:
    table.add_row(part, figure, measured, target, _verdict(met))


def render_fleet(report: FleetReport) -> tuple[Table, list[str]]:
    table = Table(title="fleet: daemons sharing one key through Redis", title_justify="left")
    for column in ("part", "figure", "measured", "target", ""):
        table.add_column(column, justify="right" if column == "measured" else "left")
    notes: list[str] = []
    if (a := report.shared) is not None:
        part = f"shared ({a.daemons}x{a.clients_per_daemon} clients)"
        _row(table, part, "upstream 429s", str(a.upstream_429), "0", a.upstream_429 == 0)
        _row(
            table,
            part,
            "most in flight at the fake",
            str(a.max_in_flight),
            f"<= {a.concurrency}",
            a.max_in_flight <= a.concurrency,
        )
        _row(
            table,
            part,
            "share of the key's limit",
            f"{a.share:.3f} ({a.succeeded} of {a.bound_jobs:g} in {a.elapsed_s:.1f} s)",
            f">= {FLEET_SHARE_TARGET}",
            a.share >= FLEET_SHARE_TARGET,
        )
        if a.errors:
            _row(table, part, "failed jobs", _counts(a.errors), "0", False)
        notes.append(
            f"shared: key {a.concurrency} at once, {a.rpm}/min, {a.latency_s:g} s a request "
            f"(both bind); modes at the end {', '.join(a.modes)}, instances {a.instances}"
        )
    if (b := report.host_dies) is not None:
        part = "host dies (SIGKILL)"
        lease = f"<= {b.lease_s:g} s (lease_s)"
        _row(
            table,
            part,
            f"its {b.held_at_kill} leases gone from Redis",
            _s(b.leases_gone_s, 2) + " s",
            lease,
            b.leases_gone_s is not None and b.leases_gone_s <= b.lease_s,
        )
        _row(
            table,
            part,
            "survivors fill every slot again",
            _s(b.slots_back_s, 2) + " s",
            lease,
            b.slots_back_s is not None and b.slots_back_s <= b.lease_s,
        )
        _row(table, part, "upstream 429s", str(b.upstream_429), "0", b.upstream_429 == 0)
        _row(
            table,
            part,
            "survivors' failed jobs",
            _counts(b.survivor_errors) or "0",
            "0",
            not b.survivor_errors,
        )
        notes.append(
            f"host dies: survivors answered {b.survivor_ok}; the victim's clients lost "
            f"{b.lost_with_host} connections with it"
        )
    if (c := report.redis_down) is not None:
        part = f"Redis down {c.down_s:.0f} s"
        _row(
            table,
            part,
            "failed / hung jobs",
            f"{c.failed} / {c.hung}" + (f" ({_counts(c.errors)})" if c.errors else ""),
            "0 / 0",
            c.failed == 0 and c.hung == 0,
        )
        _row(
            table,
            part,
            "upstream 429s while degraded",
            str(c.upstream_429_degraded),
            "0",
            c.upstream_429_degraded == 0,
        )
        _row(
            table,
            part,
            "shared again after Redis returned",
            _s(c.resume_s, 2) + " s",
            f"<= {RESUME_TARGET_S:g} s",
            c.resume_s is not None and c.resume_s <= RESUME_TARGET_S,
        )
        notes.append(
            f"Redis down: every daemon degraded {_s(c.degraded_after_s, 2)} s after the stop; "
            f"resumed per daemon {[_s(r, 2) for r in c.resume_per_daemon_s]} s; "
            f"{c.ok} jobs answered, {c.upstream_429} upstream 429s in the whole run"
        )
    if (d := report.latency) is not None:
        part = f"added latency ({d.jobs} jobs)"
        _row(
            table,
            part,
            "shared - local, median",
            _s(d.added_median_ms, 3) + " ms",
            f"< {ADDED_MEDIAN_TARGET_S * 1000:g} ms",
            d.target_met,
        )
        table.add_row(part, "shared - local, p99", _s(d.added_p99_ms, 3) + " ms", "-", "")
        notes.append(
            f"latency: local median {_s(d.local_median_ms)} ms p99 {_s(d.local_p99_ms)} ms; "
            f"shared median {_s(d.shared_median_ms)} ms p99 {_s(d.shared_p99_ms)} ms; "
            f"{d.errors} errors"
        )
    notes.append(
        f"Redis {report.redis_url}, lease_s {report.lease_s:g}: " + _verdict(report.target_met)
    )
    return table, notes


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
