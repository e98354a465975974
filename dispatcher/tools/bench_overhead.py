"""``dispatcher bench --scenario overhead``: what the daemon itself costs a job (issue 14).

Everything is measured in one run and reported against issue 14's targets:

* **latency**: a zero-latency OpenAI-compatible upstream runs in its own process
  (:class:`~dispatcher.testing.simulator.FakeProvider` under ``python -m
  dispatcher.tools.bench_overhead upstream``); the same chat requests go (a) to it
  straight from the raw aiohttp client and (b) through a ``dispatcher serve``
  subprocess from :class:`~dispatcher.client.connection.Client`, one at a time, in
  alternating blocks so drift on the machine hits both alike. Added p50 and p99 are
  (b) minus (a).
* **rate**: the sustained job rate of each path with ``in_flight`` (64) jobs open,
  alternating rounds; the ratio of the medians. The daemon's CPU per job comes from
  ``/proc/<pid>/stat`` (utime + stime) over those rounds, beside the raw client's own
  and the upstream's, so the share each side costs is visible.
* **memory**: VmRSS of the daemon idle (just READY), after the latency and rate work,
  over a closed-loop soak (``--soak-s``), and with ``queued_jobs`` (100,000) chat jobs
  held against a provider whose one slot the upstream never answers (sent on as many
  connections as ``max_in_flight_per_connection`` needs), then once they are cancelled.
* **start**: spawn to ``READY=1`` on a ``NOTIFY_SOCKET`` the bench owns (and to the
  first ``pong``), with an empty journal and with ``journal_jobs`` (10,000) unfinished
  jobs written by :func:`~dispatcher.testing.journal_fill.write_unfinished`; beside it,
  how long the interpreter takes to import the daemon at all.
* **planning**: the pure planner (:func:`dispatcher.core.plan.plan` over a
  :class:`~dispatcher.core.fair_queue.FairQueue`) in this process, one planning turn
  at a time while a queue of 100, 10,000 and 100,000 jobs stays full: a slot frees,
  the planner decides, the queue gives up the job it chose, a new job arrives. (On a
  short queue a turn may start nothing: a slow provider's free slot stays free while
  the fast ones would finish every queued job sooner.) The target is a cost per turn
  flat within 2x across the sizes.

Requests are sent with ``cache: false``: the response cache is a feature with its own
memory budget, not part of the path measured here. The daemon logs at its default level
(``info``: one ``job.done`` line per job) into a file, as journald would take it.

Resource handling: the upstream and every daemon are subprocesses in a temporary
directory, terminated (then killed) when the scenario ends, also on Ctrl-C; every phase
has a wall-time deadline and every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from dispatcher.client.connection import Client
from dispatcher.contract.protocol import Result, Status
from dispatcher.tools.bench import (
    BenchError,
    _Report,
    _s,
    percentile,
    progress_printer,
    run_scenario,
)

if TYPE_CHECKING:  # aiohttp and the daemon's modules load only when the scenario runs
    import aiohttp
    from anyio.abc import Process

OVERHEAD_SCENARIOS: Final = ("overhead",)

# -- targets (issue 14) ----------------------------------------------------------------
ADDED_P50_TARGET_MS: Final = 0.2
ADDED_P99_TARGET_MS: Final = 1.0
RATE_RATIO_TARGET: Final = 0.70
IDLE_RSS_TARGET_MB: Final = 80.0
QUEUED_RSS_TARGET_MB: Final = 400.0
SOAK_GROWTH_MB: Final = 2.0  # "no growth": within allocator noise, 2 MB or 2%
SOAK_GROWTH_SHARE: Final = 0.02
START_EMPTY_TARGET_S: Final = 0.5
START_JOURNAL_TARGET_S: Final = 1.5
PLAN_FLATNESS_TARGET: Final = 2.0

KEY: Final = "overhead-bench-key-not-a-secret"
KEY_ENV: Final = "DISPATCHER_OVERHEAD_BENCH_KEY"
MODEL: Final = "zero-model"
BLOCK: Final = 100  # sequential requests per alternating block
READY_DEADLINE_S: Final = 60.0  # a daemon spawned on a full journal is READY by then
STOP_DEADLINE_S: Final = 10.0
UPSTREAM_DEADLINE_S: Final = 20.0
STATUS_POLL_S: Final = 0.05
PER_CONNECTION: Final = 10_000  # the default max_in_flight_per_connection
SEND_CHUNK: Final = 1_000  # queued-job lines per write
HOLD_S: Final = 86_400.0  # the hold provider's service time: never, for the bench
PLAN_CLIENTS: Final = 8  # the planner's queue holds jobs of this many clients, served in turn

_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class OverheadSettings:
    """The scenario's sizes (the verb's options); times in seconds."""

    requests: int = 2_000  # sequential requests per path
    rate_jobs: int = 5_000  # jobs per rate round
    rounds: int = 3  # rate rounds per path, alternating
    in_flight: int = 64
    soak_s: float = 10.0
    queued_jobs: int = 100_000
    journal_jobs: int = 10_000
    start_repeats: int = 3
    plan_sizes: tuple[int, ...] = (100, 10_000, 100_000)
    plan_turns: int = 2_000
    log_level: str = "info"
    max_wall_s: float = 300.0  # per phase


QUICK: Final = OverheadSettings(
    requests=40,
    rate_jobs=200,
    rounds=1,
    in_flight=16,
    soak_s=0.5,
    queued_jobs=300,
    journal_jobs=50,
    start_repeats=1,
    plan_sizes=(10, 100, 1_000),
    plan_turns=50,
)


# -- reports ---------------------------------------------------------------------------


class LatencyFigures(_Report, kw_only=True):
    """One job at a time, both paths; milliseconds."""

    requests: int
    answered: int
    raw_p50_ms: float
    raw_p99_ms: float
    via_p50_ms: float
    via_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float


class RateFigures(_Report, kw_only=True):
    """``in_flight`` jobs open, both paths; jobs per second (medians of the rounds)."""

    in_flight: int
    jobs_per_round: int
    answered: int
    raw_rounds: list[float]
    via_rounds: list[float]
    raw_rate: float
    via_rate: float
    ratio: float


class CpuFigures(_Report, kw_only=True):
    """CPU per job in microseconds (utime + stime), over the rate rounds."""

    daemon_us: float  # the daemon, with in_flight jobs open
    daemon_sequential_us: float  # the daemon, one job at a time (its idle turns included)
    raw_client_us: float  # the raw aiohttp client (this process) alone
    socket_client_us: float  # the socket client (this process), through the daemon
    upstream_raw_us: float  # the fake upstream, serving the raw client
    upstream_via_us: float  # the fake upstream, serving the daemon


class MemoryFigures(_Report, kw_only=True):
    """The daemon's resident memory, MB (10^6 bytes)."""

    idle_mb: float  # just READY, no job yet
    warm_mb: float  # after the latency and rate work
    soak_s: float
    soak_jobs: int
    soak_answered: int
    soak_start_mb: float  # median of the soak's first quarter of samples
    soak_end_mb: float  # median of its last quarter
    soak_growth_mb: float
    soak_samples: list[float]
    queued_jobs: int
    queued_held: int  # queued plus running when measured
    queued_accept_s: float
    queued_mb: float
    queued_peak_mb: float  # VmHWM: the most it ever held
    emptied_mb: float  # once those jobs were cancelled


class StartFigures(_Report, kw_only=True):
    """Spawn to READY=1 (and to the first pong); seconds, medians of the repeats."""

    repeats: int
    import_s: float  # `python -c "import dispatcher.cli, dispatcher.app"`, spawn to exit
    empty_ready_s: float
    empty_pong_s: float
    journal_jobs: int
    journal_replayed: int  # jobs the daemon held after the replay (queued + running)
    journal_ready_s: float
    journal_pong_s: float
    empty_runs: list[float]
    journal_runs: list[float]


class PlanningFigures(_Report, kw_only=True):
    """Microseconds per planning turn at each queue length."""

    sizes: list[int]
    turns: int
    decisions: list[int]  # turns that assigned a job, per size
    median_us: list[float]
    p99_us: list[float]
    flatness: float  # the largest median over the smallest


class Target(_Report, kw_only=True):
    """One figure against its target; ``met`` None: reported, no target."""

    figure: str
    value: str
    target: str
    met: bool | None


class OverheadReport(_Report, kw_only=True):
    settings: dict[str, Any]
    latency: LatencyFigures
    rate: RateFigures
    cpu: CpuFigures
    memory: MemoryFigures
    start: StartFigures
    planning: PlanningFigures
    targets: list[Target]
    target_met: bool


# -- /proc -----------------------------------------------------------------------------

_TICK_S: Final = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    after_name = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
    return (int(after_name[11]) + int(after_name[12])) * _TICK_S


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The resident memory of ``pid`` (``field`` of /proc/<pid>/status) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchError(f"/proc/{pid}/status has no {field}")


# -- the upstream ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upstream:
    zero: str  # answers at once
    hold: str  # never answers
    pid: int


async def _serve_upstream() -> None:
    """The child's side: two fakes on loopback, their URLs on stdout, until stdin closes."""
    from dispatcher.testing.simulator import Behaviour, FakeProvider

    zero = FakeProvider(Behaviour(name="zero", model=MODEL, api_key=KEY))
    hold = FakeProvider(Behaviour(name="hold", model=MODEL, api_key=KEY, latency_s=HOLD_S))
    async with zero, hold:
        sys.stdout.write(f"{zero.url} {hold.url}\n")
        sys.stdout.flush()
        # The parent closes our stdin (or dies): that is the end, whatever else happens.
        await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)


@asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    """The fake upstreams in a child process of their own, as a real upstream would be."""
    process = await anyio.open_process(
        [sys.executable, "-m", "dispatcher.tools.bench_overhead", "upstream"], stderr=None
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(UPSTREAM_DEADLINE_S):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive()
        zero, hold = line.decode().split()
        yield Upstream(zero=zero, hold=hold, pid=process.pid)
    finally:
        await _stop(process)


async def _stop(process: Process, sig: signal.Signals = signal.SIGTERM) -> None:
    """End a child: ``sig``, then SIGKILL past the deadline; never waits forever."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            with anyio.move_on_after(STOP_DEADLINE_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                with anyio.move_on_after(STOP_DEADLINE_S):
                    await process.wait()
        with anyio.move_on_after(STOP_DEADLINE_S):
            await process.aclose()


# -- the daemon ------------------------------------------------------------------------


def daemon_config(up: Upstream, state_dir: Path, settings: OverheadSettings) -> str:
    """A config: ``zero`` serves every class but bulk, ``hold`` (one slot) serves bulk."""
    max_queued = max(100_000, settings.queued_jobs + 1_000)
    return f"""
[daemon]
state_dir = "{state_dir}"
log_level = "{settings.log_level}"
max_queued = {max_queued}
drain_s = 2.0

[providers.zero]
url = "{up.zero}"
model = "{MODEL}"
api_key_env = "{KEY_ENV}"
concurrency = 256
latency_s = 0.001

[providers.hold]
url = "{up.hold}"
model = "{MODEL}"
api_key_env = "{KEY_ENV}"
concurrency = 1
latency_s = 1.0
timeout_s = {HOLD_S}

[classes.realtime]
providers = ["zero"]
[classes.default]
providers = ["zero"]
[classes.complex]
providers = ["zero"]
[classes.bulk]
providers = ["hold"]
"""


@dataclass(slots=True)
class DaemonProcess:
    process: Process
    socket: str
    ready_s: float  # spawn to READY=1
    pong_s: float  # spawn to the first pong

    @property
    def pid(self) -> int:
        return self.process.pid


def _environment(notify: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "LISTEN_"))}
    env.pop("WATCHDOG_USEC", None)
    env[KEY_ENV] = KEY
    env["NOTIFY_SOCKET"] = notify
    return env


def _write_config(workdir: Path, config: str, notify: str) -> str:
    """The daemon's config file, written in ``workdir``, and no stale notify socket."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.toml"
    path.write_text(config)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(notify)
    return str(path)


async def _first_pong(sock: str, process: Process) -> None:
    from dispatcher.client.connection import answers_ping

    while not await answers_ping(sock):
        if process.returncode is not None:
            raise BenchError(f"the daemon exited {process.returncode}; see its log")
        await anyio.sleep(0.001)


@asynccontextmanager
async def spawn_daemon(
    workdir: Path, config: str, *, stop: signal.Signals = signal.SIGTERM
) -> AsyncIterator[DaemonProcess]:
    """``python -m dispatcher serve`` on ``config``, timed from spawn to READY=1 and pong.

    READY=1 arrives on a datagram socket the bench binds as ``$NOTIFY_SOCKET``, as
    systemd would; the daemon sends it once every actor and the socket serve.
    """
    sock, notify = str(workdir / "d.sock"), str(workdir / "notify.sock")
    command = [
        sys.executable,
        "-m",
        "dispatcher",
        "serve",
        "--config",
        _write_config(workdir, config, notify),
        "--socket",
        sock,
    ]
    async with await anyio.create_unix_datagram_socket(local_path=notify) as listener:
        with (workdir / "daemon.log").open("ab") as log:
            started = time.perf_counter()
            process = await anyio.open_process(
                command, stdout=log, stderr=log, env=_environment(notify)
            )
        try:
            with anyio.fail_after(READY_DEADLINE_S):
                while b"READY=1" not in (await listener.receive())[0]:
                    pass
                ready_s = time.perf_counter() - started
                await _first_pong(sock, process)
                pong_s = time.perf_counter() - started
        except TimeoutError:
            await _stop(process, signal.SIGKILL)
            raise BenchError(
                f"the daemon was not READY within {READY_DEADLINE_S:g} s; "
                f"see {workdir / 'daemon.log'}"
            ) from None
        except BaseException:
            await _stop(process, signal.SIGKILL)
            raise
    try:
        yield DaemonProcess(process=process, socket=sock, ready_s=ready_s, pong_s=pong_s)
    finally:
        await _stop(process, stop)


# -- the two paths ---------------------------------------------------------------------


class _WireMessage(msgspec.Struct):
    content: str | None = None


class _WireChoice(msgspec.Struct):
    message: _WireMessage


class _WireAnswer(msgspec.Struct):
    choices: list[_WireChoice]


_answer_decoder: Final = msgspec.json.Decoder(_WireAnswer)


class RawClient:
    """The baseline: aiohttp alone, used as well as a program would use it.

    One session, a connector without a connection cap, a prebuilt header dict, the
    body encoded by msgspec, the answer read and decoded.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session = session
        self._url = url
        self._headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    async def one(self, text: str) -> None:
        body = _encoder.encode({"model": MODEL, "messages": [{"role": "user", "content": text}]})
        async with self._session.post(self._url, data=body, headers=self._headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise BenchError(f"the upstream answered {response.status}: {payload[:200]!r}")
        if not _answer_decoder.decode(payload).choices:
            raise BenchError("the upstream's answer has no choices")


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[RawClient]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield RawClient(session, url)


class SocketClient:
    """The measured path: the same requests through the daemon's socket."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def one(self, text: str) -> None:
        reply = await self._client.call(
            {"op": "chat", "cache": False, "messages": [{"role": "user", "content": text}]}
        )
        if not isinstance(reply, Result):
            raise BenchError(f"the daemon answered {reply!r}")


async def sequential(path: RawClient | SocketClient, n: int, prefix: str) -> list[float]:
    """``n`` requests one after another; each one's seconds."""
    out: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        await path.one(f"{prefix} {i}: what is a token bucket?")
        out.append(time.perf_counter() - started)
    return out


async def closed_loop(
    path: RawClient | SocketClient,
    *,
    jobs: int | None,
    in_flight: int,
    prefix: str,
    until: float = math.inf,
) -> tuple[int, float]:
    """``in_flight`` workers, each sending its next request once its last is answered,
    until ``jobs`` are answered (None: until ``until``, a perf_counter time). Returns
    (answered, seconds)."""
    numbers = iter(range(jobs if jobs is not None else sys.maxsize))
    answered = 0

    async def worker() -> None:
        nonlocal answered
        for i in numbers:  # one iterator shared by every worker: each number once
            if time.perf_counter() >= until:
                return
            await path.one(f"{prefix} {i}: what is a token bucket?")
            answered += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(in_flight):
            tg.start_soon(worker)
    return answered, time.perf_counter() - started


# -- phases ----------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


async def measure_latency(
    raw: RawClient, via: SocketClient, settings: OverheadSettings
) -> LatencyFigures:
    """Alternating blocks of sequential requests, after a warm-up of each path."""
    warm = max(20, settings.requests // 10)
    await sequential(raw, warm, "warm")
    await sequential(via, warm, "warm")
    raw_times: list[float] = []
    via_times: list[float] = []
    left = settings.requests
    while left > 0:
        block = min(BLOCK, left)
        raw_times += await sequential(raw, block, "seq")
        via_times += await sequential(via, block, "seq")
        left -= block
    raw50, raw99 = percentile(raw_times, 0.5), percentile(raw_times, 0.99)
    via50, via99 = percentile(via_times, 0.5), percentile(via_times, 0.99)
    return LatencyFigures(
        requests=settings.requests,
        answered=len(via_times),
        raw_p50_ms=_ms(raw50),
        raw_p99_ms=_ms(raw99),
        via_p50_ms=_ms(via50),
        via_p99_ms=_ms(via99),
        added_p50_ms=_ms(via50 - raw50),
        added_p99_ms=_ms(via99 - raw99),
    )


@dataclass(slots=True)
class _Cpu:
    """CPU seconds of the three processes, read at the start of a stretch."""

    pids: tuple[int, int]  # daemon, upstream
    start: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __enter__(self) -> _Cpu:
        daemon, upstream = self.pids
        self.start = (cpu_s(daemon), cpu_s(upstream), time.process_time())
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def spent(self) -> tuple[float, float, float]:
        """(daemon, upstream, this process) CPU seconds since ``__enter__``."""
        daemon, upstream = self.pids
        now = (cpu_s(daemon), cpu_s(upstream), time.process_time())
        return (now[0] - self.start[0], now[1] - self.start[1], now[2] - self.start[2])


async def measure_rate(
    raw: RawClient,
    via: SocketClient,
    daemon_pid: int,
    upstream_pid: int,
    settings: OverheadSettings,
    sequential_cpu_us: float,
) -> tuple[RateFigures, CpuFigures]:
    """Alternating rounds of ``rate_jobs`` with ``in_flight`` open; CPU per job of each side."""
    raw_rates: list[float] = []
    via_rates: list[float] = []
    raw_cpu = [0.0, 0.0, 0.0]
    via_cpu = [0.0, 0.0, 0.0]
    answered = 0
    n = settings.rate_jobs
    for r in range(settings.rounds):
        for path, rates, spent in ((raw, raw_rates, raw_cpu), (via, via_rates, via_cpu)):
            with _Cpu((daemon_pid, upstream_pid)) as meter:
                done, seconds = await closed_loop(
                    path, jobs=n, in_flight=settings.in_flight, prefix=f"rate{r}"
                )
                used = meter.spent()
            if done != n:
                raise BenchError(f"{done} of {n} jobs answered in a rate round")
            rates.append(round(n / seconds, 1))
            for k in range(3):
                spent[k] += used[k]
            answered += done if path is via else 0
    total = n * settings.rounds
    raw_rate, via_rate = statistics.median(raw_rates), statistics.median(via_rates)
    rate = RateFigures(
        in_flight=settings.in_flight,
        jobs_per_round=n,
        answered=answered,
        raw_rounds=raw_rates,
        via_rounds=via_rates,
        raw_rate=raw_rate,
        via_rate=via_rate,
        ratio=round(via_rate / raw_rate, 3),
    )
    us = 1e6 / total
    cpu = CpuFigures(
        daemon_us=round(via_cpu[0] * us, 1),
        daemon_sequential_us=round(sequential_cpu_us, 1),
        raw_client_us=round(raw_cpu[2] * us, 1),
        socket_client_us=round(via_cpu[2] * us, 1),
        upstream_raw_us=round(raw_cpu[1] * us, 1),
        upstream_via_us=round(via_cpu[1] * us, 1),
    )
    return rate, cpu


async def soak(via: SocketClient, pid: int, settings: OverheadSettings) -> tuple[int, list[float]]:
    """A closed loop of ``in_flight`` jobs for ``soak_s``, sampling the RSS meanwhile."""
    samples: list[float] = []
    interval = max(0.1, min(1.0, settings.soak_s / 20))
    answered = 0
    end = time.perf_counter() + settings.soak_s

    async def sample() -> None:
        while time.perf_counter() < end:
            samples.append(rss_mb(pid))
            await anyio.sleep(interval)

    async def load() -> None:
        nonlocal answered
        answered, _ = await closed_loop(
            via, jobs=None, in_flight=settings.in_flight, prefix="soak", until=end
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        tg.start_soon(load)
    samples.append(rss_mb(pid))
    return answered, samples


async def _daemon_status(client: Client) -> Status:
    reply = await client.call({"op": "status"})
    if not isinstance(reply, Status):
        raise BenchError(f"status answered {reply!r}")
    return reply


async def _held_at_least(client: Client, n: int) -> int:
    """Poll status until the daemon holds ``n`` jobs (queued or running); how many it holds."""
    while True:
        status = await _daemon_status(client)
        held = status.queued + status.running
        if held >= n:
            return held
        await anyio.sleep(STATUS_POLL_S)


async def _held_at_most(client: Client, n: int) -> None:
    while True:
        status = await _daemon_status(client)
        if status.queued + status.running <= n:
            return
        await anyio.sleep(STATUS_POLL_S)


def _queued_line(i: int) -> bytes:
    request = {
        "op": "chat",
        "id": f"q{i}",
        "task": "bulk",
        "cache": False,
        "messages": [{"role": "user", "content": f"queued job {i}: summarise this"}],
    }
    return _encoder.encode(request) + b"\n"


async def queue_jobs(
    daemon: DaemonProcess, watcher: Client, n: int, deadline_s: float
) -> tuple[int, float, float, float, float]:
    """Hold ``n`` jobs against the never-answering provider; (held, accept s, RSS, peak RSS,
    RSS once cancelled). The jobs come on raw connections, ``PER_CONNECTION`` each, whose
    replies nobody reads until the connections close and the daemon cancels the jobs."""
    async with AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(await anyio.connect_unix(daemon.socket))
            for _ in range(max(1, math.ceil(n / PER_CONNECTION)))
        ]
        started = time.perf_counter()
        with anyio.fail_after(deadline_s):
            for first in range(0, n, SEND_CHUNK):
                lines = b"".join(_queued_line(i) for i in range(first, min(n, first + SEND_CHUNK)))
                await streams[first // PER_CONNECTION].send(lines)
            held = await _held_at_least(watcher, n)
        accept_s = time.perf_counter() - started
        queued, peak = rss_mb(daemon.pid), rss_mb(daemon.pid, "VmHWM")
    with anyio.fail_after(deadline_s):  # the connections closed: every job is cancelled
        await _held_at_most(watcher, 0)
    return held, accept_s, queued, peak, rss_mb(daemon.pid)


async def measure_daemon(
    up: Upstream, workdir: Path, settings: OverheadSettings, progress: Callable[[str], None]
) -> tuple[LatencyFigures, RateFigures, CpuFigures, MemoryFigures]:
    """Latency, rate, CPU, soak and queued memory on one daemon, in that order."""
    config = daemon_config(up, workdir / "state", settings)
    async with (
        spawn_daemon(workdir, config) as daemon,
        raw_client(up.zero) as raw,
        Client.connect(daemon.socket) as client,
        Client.connect(daemon.socket) as watcher,
    ):
        progress(f"daemon pid {daemon.pid} READY in {daemon.ready_s:.3f} s; latency")
        idle = rss_mb(daemon.pid)
        via = SocketClient(client)
        with anyio.fail_after(settings.max_wall_s):
            latency = await measure_latency(raw, via, settings)
        with anyio.fail_after(settings.max_wall_s):  # the daemon's CPU at one job at a time
            cpu_before = cpu_s(daemon.pid)
            await sequential(via, settings.requests, "cpu")
            sequential_us = (cpu_s(daemon.pid) - cpu_before) * 1e6 / settings.requests
        progress(f"rate: {settings.rounds} rounds of {settings.rate_jobs} jobs per path")
        with anyio.fail_after(settings.max_wall_s):
            rate, cpu = await measure_rate(
                raw, via, daemon.pid, up.pid, settings, sequential_cpu_us=sequential_us
            )
        warm = rss_mb(daemon.pid)
        progress(f"soak: {settings.soak_s:g} s at {settings.in_flight} in flight")
        with anyio.fail_after(settings.soak_s + settings.max_wall_s):
            soak_answered, samples = await soak(via, daemon.pid, settings)
        quarter = max(1, len(samples) // 4)
        start_mb = statistics.median(samples[:quarter])
        end_mb = statistics.median(samples[-quarter:])
        progress(f"memory with {settings.queued_jobs:,} queued jobs")
        held, accept_s, queued_mb, peak_mb, emptied_mb = await queue_jobs(
            daemon, watcher, settings.queued_jobs, settings.max_wall_s
        )
    memory = MemoryFigures(
        idle_mb=round(idle, 1),
        warm_mb=round(warm, 1),
        soak_s=settings.soak_s,
        soak_jobs=soak_answered,
        soak_answered=soak_answered,
        soak_start_mb=round(start_mb, 1),
        soak_end_mb=round(end_mb, 1),
        soak_growth_mb=round(end_mb - start_mb, 1),
        soak_samples=[round(s, 1) for s in samples],
        queued_jobs=settings.queued_jobs,
        queued_held=held,
        queued_accept_s=round(accept_s, 2),
        queued_mb=round(queued_mb, 1),
        queued_peak_mb=round(peak_mb, 1),
        emptied_mb=round(emptied_mb, 1),
    )
    return latency, rate, cpu, memory


async def _import_s() -> float:
    """Spawn to exit of an interpreter that only imports the daemon."""
    code = "import dispatcher.cli, dispatcher.app"
    started = time.perf_counter()
    with anyio.fail_after(READY_DEADLINE_S):
        await anyio.run_process([sys.executable, "-c", code])
    return time.perf_counter() - started


async def measure_start(
    up: Upstream, workdir: Path, settings: OverheadSettings, progress: Callable[[str], None]
) -> StartFigures:
    """Spawn to READY on an empty journal and on ``journal_jobs`` unfinished jobs."""
    from dispatcher.testing.journal_fill import write_unfinished

    template = workdir / "full.sqlite3"
    progress(f"start-up: writing {settings.journal_jobs:,} unfinished jobs")
    await write_unfinished(template, settings.journal_jobs)
    imports = [await _import_s() for _ in range(settings.start_repeats)]
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    replayed = 0
    for k in range(settings.start_repeats):
        for full in (False, True):
            where = workdir / f"start-{k}-{'full' if full else 'empty'}"
            state = where / "state"
            state.mkdir(parents=True)
            if full:
                shutil.copy(template, state / "journal.sqlite3")
            config = daemon_config(up, state, settings)
            async with spawn_daemon(where, config, stop=signal.SIGKILL) as daemon:
                runs[full].append((daemon.ready_s, daemon.pong_s))
                if full:
                    async with Client.connect(daemon.socket) as client:
                        status = await _daemon_status(client)
                    replayed = status.queued + status.running
            shutil.rmtree(where, ignore_errors=True)
    empty, journal = runs[False], runs[True]
    return StartFigures(
        repeats=settings.start_repeats,
        import_s=round(statistics.median(imports), 3),
        empty_ready_s=round(statistics.median(r for r, _ in empty), 3),
        empty_pong_s=round(statistics.median(p for _, p in empty), 3),
        journal_jobs=settings.journal_jobs,
        journal_replayed=replayed,
        journal_ready_s=round(statistics.median(r for r, _ in journal), 3),
        journal_pong_s=round(statistics.median(p for _, p in journal), 3),
        empty_runs=[round(r, 3) for r, _ in empty],
        journal_runs=[round(r, 3) for r, _ in journal],
    )


# -- the planner -----------------------------------------------------------------------


def measure_planning(settings: OverheadSettings) -> PlanningFigures:
    """Time planning turns on a full queue of each size (see the module docstring).

    The providers are the built-in table's four chat providers with their slots and
    latencies, their rate limits lifted so that only slots bind. Every slot is busy;
    each turn frees one (the providers in turn, oldest attempt first), plans, and
    carries the plan out as the scheduler would: each chosen job leaves the queue and
    takes its slot, and as many new jobs arrive, so the queue keeps its length. The
    jobs belong to ``PLAN_CLIENTS`` clients, served in turn. Runs inside an event loop
    (a Job holds anyio events) but awaits nothing.
    """
    from dispatcher.contract.config import builtin_config
    from dispatcher.contract.protocol import ChatRequest
    from dispatcher.core.fair_queue import FairQueue
    from dispatcher.core.plan import plan
    from dispatcher.core.provider_state import ProviderLimits
    from dispatcher.scheduler.job import Job

    config = builtin_config()
    chat = [name for name in config.classes["default"].providers if name in config.providers]
    request = ChatRequest(id="p", messages=[{"role": "user", "content": "plan me"}], task="bulk")
    clients = [f"0:{c}" for c in range(PLAN_CLIENTS)]
    medians, p99s, decisions = [], [], []
    for size in settings.plan_sizes:
        limits = {
            name: ProviderLimits.from_config(
                name, msgspec.structs.replace(config.providers[name], rpm=0)
            )
            for name in chat
        }
        serial = 0
        now = 1_000.0

        def job(now: float) -> Job:
            nonlocal serial
            serial += 1
            return Job(
                id=f"j{serial}",
                request=request,
                kind="chat",
                klass="bulk",
                eligible=tuple(chat),
                client=clients[serial % len(clients)],
                uid=0,
                prompt_tokens=8,
                accepted_at=now,
                deadline=now + 600.0,
            )

        queue = FairQueue()
        for _ in range(size):
            queue.push(job(now))
        running: dict[str, list[str]] = {name: [] for name in chat}
        for name, state in limits.items():
            for _ in range(state.concurrency):
                busy = f"busy-{name}-{len(running[name])}"
                state.reserve(busy, now)
                running[name].append(busy)
        times: list[float] = []
        decided = 0
        for turn in range(settings.plan_turns):
            now += 0.001
            name = chat[turn % len(chat)]
            if running[name]:
                limits[name].release(running[name].pop(0))
            started = time.perf_counter()
            result = plan(queue, limits, now, per_provider=3, wanted=set(chat), expiry_scan=0)
            for chosen, where in result.assign:
                queue.remove(chosen, served=True)
                limits[where].reserve(chosen.id, now)
            times.append(time.perf_counter() - started)
            for chosen, where in result.assign:
                running[where].append(chosen.id)
                queue.push(job(now))
            decided += len(result.assign)
        decisions.append(decided)
        medians.append(round(statistics.median(times) * 1e6, 2))
        p99s.append(round(percentile(times, 0.99) * 1e6, 2))
    return PlanningFigures(
        sizes=list(settings.plan_sizes),
        turns=settings.plan_turns,
        decisions=decisions,
        median_us=medians,
        p99_us=p99s,
        flatness=round(max(medians) / max(min(medians), 1e-9), 2),
    )


# -- the scenario ----------------------------------------------------------------------


def targets(
    latency: LatencyFigures,
    rate: RateFigures,
    cpu: CpuFigures,
    memory: MemoryFigures,
    start: StartFigures,
    planning: PlanningFigures,
) -> list[Target]:
    growth_cap = max(SOAK_GROWTH_MB, SOAK_GROWTH_SHARE * memory.soak_start_mb)
    sizes = " / ".join(f"{n:,}" for n in planning.sizes)
    return [
        Target(
            figure="added latency p50 (one job at a time)",
            value=f"{latency.added_p50_ms:+.3f} ms",
            target=f"<= {ADDED_P50_TARGET_MS} ms",
            met=latency.added_p50_ms <= ADDED_P50_TARGET_MS,
        ),
        Target(
            figure="added latency p99 (one job at a time)",
            value=f"{latency.added_p99_ms:+.3f} ms",
            target=f"<= {ADDED_P99_TARGET_MS} ms",
            met=latency.added_p99_ms <= ADDED_P99_TARGET_MS,
        ),
        Target(
            figure=f"job rate, {rate.in_flight} in flight, of the raw client's",
            value=f"{rate.ratio:.2f} ({rate.via_rate:,.0f} / {rate.raw_rate:,.0f} jobs/s)",
            target=f">= {RATE_RATIO_TARGET}",
            met=rate.ratio >= RATE_RATIO_TARGET,
        ),
        Target(
            figure="daemon CPU per job",
            value=f"{cpu.daemon_us:.0f} us ({cpu.daemon_sequential_us:.0f} us one at a time)",
            target="-",
            met=None,
        ),
        Target(
            figure="idle RSS",
            value=f"{memory.idle_mb:.1f} MB",
            target=f"< {IDLE_RSS_TARGET_MB:g} MB",
            met=memory.idle_mb < IDLE_RSS_TARGET_MB,
        ),
        Target(
            figure=f"RSS with {memory.queued_jobs:,} queued jobs",
            value=f"{memory.queued_mb:.1f} MB",
            target=f"< {QUEUED_RSS_TARGET_MB:g} MB",
            met=memory.queued_mb < QUEUED_RSS_TARGET_MB
            and memory.queued_held >= memory.queued_jobs,
        ),
        Target(
            figure=f"RSS growth over a {memory.soak_s:g} s soak ({memory.soak_jobs:,} jobs)",
            value=f"{memory.soak_growth_mb:+.1f} MB ({memory.soak_start_mb:.1f} -> "
            f"{memory.soak_end_mb:.1f})",
            target=f"<= {growth_cap:.1f} MB",
            met=memory.soak_growth_mb <= growth_cap,
        ),
        Target(
            figure="start to READY, empty journal",
            value=f"{start.empty_ready_s:.3f} s (imports alone {start.import_s:.3f} s)",
            target=f"< {START_EMPTY_TARGET_S} s",
            met=start.empty_ready_s < START_EMPTY_TARGET_S,
        ),
        Target(
            figure=f"start to READY, {start.journal_jobs:,} journaled jobs",
            value=f"{start.journal_ready_s:.3f} s ({start.journal_replayed:,} replayed)",
            target=f"< {START_JOURNAL_TARGET_S} s",
            met=start.journal_ready_s < START_JOURNAL_TARGET_S
            and start.journal_replayed == start.journal_jobs,
        ),
        Target(
            figure=f"planning per turn, {sizes} queued",
            value=" / ".join(f"{us:.1f}" for us in planning.median_us)
            + f" us ({planning.flatness:.2f}x)",
            target=f"flat within {PLAN_FLATNESS_TARGET:g}x",
            met=planning.flatness <= PLAN_FLATNESS_TARGET,
        ),
    ]


async def run_overhead(
    settings: OverheadSettings, progress: Callable[[str], None] = lambda _: None
) -> OverheadReport:
    """Every phase, in one run; raises :class:`BenchError` when a phase cannot go on."""
    progress(f"planning: queues of {', '.join(f'{n:,}' for n in settings.plan_sizes)}")
    planning = measure_planning(settings)
    with tempfile.TemporaryDirectory(prefix="dispatcher-overhead-") as tmp:
        workdir = Path(tmp)
        async with upstream() as up:
            progress(f"upstream pid {up.pid} at {up.zero}")
            start = await measure_start(up, workdir / "start", settings, progress)
            latency, rate, cpu, memory = await measure_daemon(
                up, workdir / "daemon", settings, progress
            )
    found = targets(latency, rate, cpu, memory, start, planning)
    return OverheadReport(
        settings={f.name: getattr(settings, f.name) for f in fields(settings)},
        latency=latency,
        rate=rate,
        cpu=cpu,
        memory=memory,
        start=start,
        planning=planning,
        targets=found,
        target_met=all(t.met is not False for t in found),
    )


# -- the verb --------------------------------------------------------------------------


def add_overhead_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--scenario overhead``; each one overrides ``--quick``'s size."""
    full = OverheadSettings()
    parser.add_argument(
        "--quick", action="store_true", help="overhead: tiny sizes, a smoke run of seconds"
    )
    parser.add_argument(
        "--soak-s", type=float, help=f"overhead: seconds of closed-loop soak ({full.soak_s:g})"
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"overhead: sequential requests per path ({full.requests:,})",
    )
    parser.add_argument(
        "--rate-jobs", type=int, help=f"overhead: jobs per rate round ({full.rate_jobs:,})"
    )
    parser.add_argument(
        "--queued-jobs", type=int, help=f"overhead: jobs held for the RSS ({full.queued_jobs:,})"
    )
    parser.add_argument(
        "--journal-jobs",
        type=int,
        help=f"overhead: unfinished jobs in the start-up journal ({full.journal_jobs:,})",
    )
    parser.add_argument(
        "--plan-sizes",
        help="overhead: queue lengths for the planner, comma-separated (100,10000,100000)",
    )


def overhead_settings(args: argparse.Namespace) -> OverheadSettings:
    """The settings the options ask for; raises ValueError for a size that is not positive."""
    settings = QUICK if getattr(args, "quick", False) else OverheadSettings()
    changes: dict[str, Any] = {}
    for name in ("soak_s", "requests", "rate_jobs", "queued_jobs", "journal_jobs"):
        value = getattr(args, name, None)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
            changes[name] = value
    sizes = getattr(args, "plan_sizes", None)
    if sizes:
        try:
            changes["plan_sizes"] = tuple(int(s) for s in sizes.split(","))
        except ValueError:
            raise ValueError(f"--plan-sizes takes whole numbers, got {sizes!r}") from None
        if min(changes["plan_sizes"]) < 1:
            raise ValueError("--plan-sizes must be positive")
    return replace(settings, **changes)


def cmd_overhead(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Run the scenario, print it, exit 1 on a missed target with ``--check``."""
    try:
        settings = overhead_settings(args)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2

    progress = progress_printer(err)

    async def main() -> OverheadReport:
        return await run_overhead(settings, progress)

    render = functools.partial(render_overhead, console=out)
    report = run_scenario(main, log=args.log, err=err, as_json=args.json, render=render)
    if report is None:
        return 1
    if not report.target_met and not args.json:
        missed = [t.figure for t in report.targets if t.met is False]
        err.print(f"[yellow]targets missed:[/] {'; '.join(missed)}")
    return 1 if not report.target_met and args.check else 0


# -- rendering -------------------------------------------------------------------------


def _verdict(met: bool | None) -> str:
    if met is None:
        return "[dim]report[/]"
    return "[green]pass[/]" if met else "[red]fail[/]"


def render_overhead(report: OverheadReport, console: Console) -> None:
    """The targets table, then the figures behind them."""
    s = report.settings
    console.print(
        f"[bold]dispatcher bench --scenario overhead[/]  {os.cpu_count()} CPUs, "
        f"zero-latency upstream in its own process, daemon log level {s['log_level']}"
    )
    table = Table(title="overhead: the daemon against the raw client", title_justify="left")
    for column in ("figure", "value", "target", "verdict"):
        table.add_column(column, justify="left")
    for t in report.targets:
        table.add_row(t.figure, t.value, t.target, _verdict(t.met))
    console.print()
    console.print(table)

    lat, rate, cpu, mem = report.latency, report.rate, report.cpu, report.memory
    detail = Table(title="the figures behind them", title_justify="left")
    detail.add_column("what", justify="left")
    detail.add_column("raw aiohttp", justify="right")
    detail.add_column("through the daemon", justify="right")
    detail.add_column("added / ratio", justify="right")
    detail.add_row(
        f"p50 ms ({lat.requests:,} one at a time)",
        _s(lat.raw_p50_ms),
        _s(lat.via_p50_ms),
        f"{lat.added_p50_ms:+.3f}",
    )
    detail.add_row("p99 ms", _s(lat.raw_p99_ms), _s(lat.via_p99_ms), f"{lat.added_p99_ms:+.3f}")
    detail.add_row(
        f"jobs/s ({rate.in_flight} in flight, rounds of {rate.jobs_per_round:,})",
        ", ".join(f"{r:,.0f}" for r in rate.raw_rounds),
        ", ".join(f"{r:,.0f}" for r in rate.via_rounds),
        f"{rate.ratio:.2f}",
    )
    detail.add_row(
        "CPU us/job: client process",
        _s(cpu.raw_client_us, 0),
        _s(cpu.socket_client_us, 0),
        "",
    )
    detail.add_row("CPU us/job: daemon", "-", _s(cpu.daemon_us, 0), "")
    detail.add_row(
        "CPU us/job: upstream", _s(cpu.upstream_raw_us, 0), _s(cpu.upstream_via_us, 0), ""
    )
    console.print()
    console.print(detail)
    st, plan = report.start, report.planning
    notes = [
        f"RSS MB: idle {mem.idle_mb:.1f}, after the latency and rate work {mem.warm_mb:.1f}, "
        f"soak {mem.soak_start_mb:.1f} -> {mem.soak_end_mb:.1f} over {mem.soak_s:g} s "
        f"({mem.soak_answered:,} jobs answered)",
        f"{mem.queued_held:,} jobs held (accepted in {mem.queued_accept_s:.2f} s): "
        f"{mem.queued_mb:.1f} MB, peak {mem.queued_peak_mb:.1f}; once cancelled "
        f"{mem.emptied_mb:.1f}",
        f"start (median of {st.repeats}): READY {st.empty_ready_s:.3f} s, pong "
        f"{st.empty_pong_s:.3f} s empty {st.empty_runs}; READY {st.journal_ready_s:.3f} s, pong "
        f"{st.journal_pong_s:.3f} s with {st.journal_jobs:,} journaled {st.journal_runs}; "
        f"importing the daemon alone {st.import_s:.3f} s",
        "planning us per turn (median / p99): "
        + ", ".join(
            f"{n:,} queued {m:.1f} / {p:.1f}"
            for n, m, p in zip(plan.sizes, plan.median_us, plan.p99_us, strict=True)
        )
        + f" over {plan.turns:,} turns",
    ]
    for note in notes:
        console.print(f"  {note}")


def _main(argv: Sequence[str]) -> int:
    """``python -m dispatcher.tools.bench_overhead upstream``: the upstream's process."""
    if list(argv) != ["upstream"]:
        sys.stderr.write("usage: python -m dispatcher.tools.bench_overhead upstream\n")
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve_upstream, backend="asyncio", backend_options={"use_uvloop": True})
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
