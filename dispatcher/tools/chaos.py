"""The chaos harness: keyed detached jobs from many clients while the daemon is SIGKILLed.

:func:`run_chaos` runs one :class:`ChaosConfig` and returns a :class:`Report`;
``benchmarks/chaos.py`` is its command line and ``tests/test_chaos.py`` a small run::

    .venv/bin/python benchmarks/chaos.py --jobs 5000 --clients 16 --kills 10

The fake upstream providers (:class:`dispatcher.testing.simulator.FakeProvider`) run in
this process, so their counters survive every kill; the daemon is a real
``python -m dispatcher serve`` subprocess whose config file points at them, with
the keys passed through ``api_key_env`` variables. Every start of the daemon gets
keys of its own, so the fakes can tell which daemon life sent each request.

Client tasks submit every job with ``detach: true`` and a unique ``key`` and fetch
its answer with ``result``; whenever the connection dies they reconnect and
resubmit every job they have no answer for, under the same key. At random moments
(spread over the work left, so every kill lands while jobs are open) the daemon
is SIGKILLed, right after a ``status`` snapshot, and restarted on the same state
directory; a share of the kills hits a restart in progress instead (while the
daemon opens and replays its journal).

Checked at the end; any failure is a violation and the exit status is 1:

* 0 lost: every key has a final ``result`` whose content answers that key's prompt;
* exactly once: one job id per key (every ``accepted`` for it carried the same id,
  and so did its result), one final answer per key, no ``unknown_job`` for an id
  the daemon once acknowledged;
* upstream duplicates (requests the fakes received minus jobs) are only jobs that
  were running at a kill: no job reaches the fakes twice from one daemon life, none
  after its answer was delivered, and the duplicates are at most the jobs running
  at the kills (sent upstream by the killed daemon, answer not yet delivered);
* the journal holds exactly one row per key, every one finished;
* after the run, submitting every key again returns the same job id and the same
  answer without a single new upstream request.

Also reported, not checked: ``status``'s running count just before each kill and
the providers' total concurrency times the kills. Both undercount the jobs a kill
can duplicate: a job leaves ``running`` when its upstream answer arrives, but its
answer is only final once the journal has committed it (group commit), so a kill
in between replays it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from aiohttp import web
from anyio.abc import Process

from dispatcher.client.connection import Client, ConnectionLost, DaemonNotRunning, answers_ping
from dispatcher.contract.protocol import Accepted, Error, Result, Status
from dispatcher.testing.simulator import Behaviour, FakeProvider

READY_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 2.0
RECONNECT_PAUSE_S = 0.05
PROMPT_PREFIX = "chaos job "

# What a client may see when the daemon dies under it, at any await point.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    ConnectionLost,
    DaemonNotRunning,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run; the defaults are the issue's heavy version."""

    jobs: int = 5000
    clients: int = 16
    kills: int = 10
    providers: int = 4
    concurrency: int = 8  # per provider, in the daemon's config (the fakes are unlimited)
    latency_s: float = 0.1  # the fakes' mean service time (+-50 % jitter)
    window: int = 64  # jobs each client has in flight at once
    starting_kills: float = 0.2  # share of the kills that land while the daemon is starting
    seed: int | None = None
    timeout_s: float = 240.0  # the whole run, kills and restarts included
    workdir: Path | None = None  # default: a fresh temporary directory
    keep: bool = False  # keep the workdir after a pass (it is always kept after a violation)
    python: str = sys.executable


@dataclass
class Kill:
    at: float  # time.monotonic() of the SIGKILL
    at_s: float  # since the run started
    life: int  # the daemon start it ended (1 = the first)
    starting: bool  # the daemon was still starting (opening and replaying its journal)
    status_running: int  # `status` just before the kill (-1: no answer)
    status_queued: int
    answered: int  # keys answered before the kill
    running: int = 0  # keys the killed life had sent upstream and not answered yet
    in_flight: int = 0  # of which the fakes were still serving at the kill
    replayed_done: int = 0  # duplicated after the kill though the fakes had answered them
    ready_s: float | None = None  # the restart after it: spawn to first pong (None: killed too)
    replayed: int | None = None  # unfinished jobs the restarted daemon replayed


@dataclass
class Report:
    config: ChaosConfig
    seed: int
    workdir: Path
    duration_s: float = 0.0
    first_ready_s: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    answered: int = 0
    upstream_requests: int = 0
    upstream_after_verify: int = 0
    repeated_keys: int = 0
    resubmits: int = 0
    reconnects: int = 0
    client_errors: Counter[str] = field(default_factory=Counter)
    journal_rows: int = 0
    journal_unfinished: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.upstream_requests - self.config.jobs

    @property
    def running_at_kills(self) -> int:
        return sum(k.running for k in self.kills)

    @property
    def concurrency_x_kills(self) -> int:
        return self.config.providers * self.config.concurrency * len(self.kills)

    def summary(self) -> str:
        c = self.config
        ready = [k.ready_s for k in self.kills if k.ready_s is not None]
        status_running = sum(max(k.status_running, 0) for k in self.kills)
        lines = [
            f"chaos: {c.jobs} jobs, {c.clients} clients, {len(self.kills)}/{c.kills} kills, "
            f"{c.providers} providers x {c.concurrency} slots, latency {c.latency_s:g} s, "
            f"seed {self.seed}",
            f"  answered   {self.answered}/{c.jobs}, {c.jobs - self.answered} lost; "
            f"{self.resubmits} resubmits over {self.reconnects} reconnects",
            "  kills      "
            + ", ".join(
                f"{k.at_s:.1f}s{'*' if k.starting else ''} ({k.answered} answered)"
                for k in self.kills
            )
            + " (* while restarting)",
            f"  running    at each kill (sent upstream, no answer yet): "
            f"{[k.running for k in self.kills]} = {self.running_at_kills}; "
            f"status just before: {[k.status_running for k in self.kills]} = {status_running}",
            f"  upstream   {self.upstream_requests} requests for {c.jobs} jobs: "
            f"{self.duplicates} duplicates over {self.repeated_keys} jobs "
            f"(<= {self.running_at_kills} running at the kills; concurrency x kills = "
            f"{self.concurrency_x_kills}); {self.upstream_after_verify} for the resubmit check",
            f"  duplicated {sum(k.in_flight for k in self.kills)} still in flight upstream at "
            f"the kill {[k.in_flight for k in self.kills]}, "
            f"{sum(k.replayed_done for k in self.kills)} answered upstream but not yet "
            f"committed {[k.replayed_done for k in self.kills]}",
            f"  restarts   first start ready in {self.first_ready_s:.2f} s; after the kills "
            f"median {statistics.median(ready) if ready else 0:.2f} s, "
            f"max {max(ready, default=0):.2f} s, replaying "
            f"{[k.replayed for k in self.kills if k.replayed is not None]} jobs",
            f"  journal    {self.journal_rows} rows, {self.journal_unfinished} unfinished",
            f"  errors     {dict(self.client_errors) or 'none'} seen by the clients",
            f"  duration   {self.duration_s:.1f} s",
        ]
        if self.violations:
            lines.append(f"FAIL: {len(self.violations)} violation(s); workdir {self.workdir}")
            lines.extend(f"  - {v}" for v in self.violations[:40])
        else:
            lines.append("OK: every job answered exactly once, none lost")
        return "\n".join(lines)


def key_of(number: int) -> str:
    return f"chaos-{number:06d}"


def prompt_of(key: str) -> str:
    return f"{PROMPT_PREFIX}{key}"


# -- the upstream side ---------------------------------------------------------------


@dataclass
class Send:
    """One upstream request of a chaos job."""

    life: int  # the daemon start that sent it
    at: float  # time.monotonic() when the fake received it
    ended: float = float("inf")  # when the fake finished answering (or dropped) it


@dataclass
class Upstream:
    """Every chaos job's upstream requests, across the fakes."""

    lives: dict[str, int] = field(default_factory=dict)  # key given to a start -> its number
    sends: dict[str, list[Send]] = field(default_factory=dict)
    strangers: int = 0  # requests with a key no daemon start was given

    def note(self, job_key: str, bearer: str) -> Send | None:
        life = self.lives.get(bearer)
        if life is None:
            self.strangers += 1
            return None
        send = Send(life=life, at=time.monotonic())
        self.sends.setdefault(job_key, []).append(send)
        return send


class TaggedProvider(FakeProvider):
    """A fake that notes, for each chaos job, which daemon life sent it and when."""

    def __init__(self, behaviour: Behaviour, upstream: Upstream) -> None:
        super().__init__(behaviour)
        self.upstream = upstream

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # aiohttp keeps the body: the real handler reads it again
        marker = raw.find(PROMPT_PREFIX.encode())
        send = None
        if marker >= 0:
            start = marker + len(PROMPT_PREFIX)
            job_key = raw[start : start + len(key_of(0))].decode(errors="replace")
            bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
            send = self.upstream.note(job_key, bearer)
        try:
            return await super()._respond(request)
        finally:
            if send is not None:
                send.ended = time.monotonic()


def env_name(provider: str) -> str:
    return f"CHAOS_KEY_{provider.upper()}"


def write_config(workdir: Path, fakes: list[FakeProvider], config: ChaosConfig) -> None:
    names = [fake.behaviour.name for fake in fakes]
    lines = [
        "[daemon]",
        "max_queued = 1000000",
        "drain_s = 5.0",
        "",
        "[retry]",
        "backoff_base_s = 0.05",
        "backoff_max_s = 0.5",
        "",
    ]
    for fake in fakes:
        b = fake.behaviour
        lines += [
            f"[providers.{b.name}]",
            f'url = "{fake.url}"',
            f'model = "{b.model}"',
            'adapter = "openai"',
            f'api_key_env = "{env_name(b.name)}"',
            f"concurrency = {config.concurrency}",
            f"latency_s = {max(config.latency_s, 0.001)}",
            "timeout_s = 60.0",
            "",
        ]
    for klass in ("realtime", "bulk", "complex", "default"):
        lines += [f"[classes.{klass}]", f"providers = {json.dumps(names)}", ""]
    (workdir / "config.toml").write_text("\n".join(lines))


# -- the daemon under test -----------------------------------------------------------


class DaemonProcess:
    """``python -m dispatcher serve`` as a subprocess: start until it pongs, SIGKILL, stop.

    Each start gets fresh provider keys, registered with ``upstream`` under the
    start's number, so every upstream request names the daemon life that sent it.
    """

    def __init__(
        self, python: str, workdir: Path, env: dict[str, str], providers: list[str], up: Upstream
    ) -> None:
        self.socket = str(workdir / "d.sock")
        self.command = [
            python,
            "-m",
            "dispatcher",
            "serve",
            "--config",
            str(workdir / "config.toml"),
            "--socket",
            self.socket,
            "--state-dir",
            str(workdir / "state"),
        ]
        self.env = env
        self.providers = providers
        self.upstream = up
        self.log_path = workdir / "daemon.log"
        self.process: Process | None = None
        self.life = 0

    async def start(self) -> float:
        """Spawn the daemon; return the seconds until it answered ``ping``."""
        started = time.monotonic()
        await self.spawn()
        return await self.wait_ready(started)

    async def spawn(self) -> None:
        """Start the process (with fresh keys), without waiting for it to serve."""
        self.life += 1
        env = dict(self.env)
        for name in self.providers:
            key = f"chaos-{self.life}-{secrets.token_hex(12)}"
            self.upstream.lives[key] = self.life
            env[env_name(name)] = key
        with self.log_path.open("ab") as log:
            log.write(f"--- life {self.life} ---\n".encode())
            log.flush()
            self.process = await anyio.open_process(
                self.command, stdin=None, stdout=log, stderr=log, env=env
            )

    async def wait_ready(self, started: float) -> float:
        """Seconds from ``started`` until the daemon answered ``ping``."""
        assert self.process is not None
        with anyio.fail_after(READY_TIMEOUT_S):
            while not await answers_ping(self.socket):
                if self.process.returncode is not None:
                    raise RuntimeError(
                        f"the daemon exited with {self.process.returncode} while starting; "
                        f"see {self.log_path}:\n{self.log_tail()}"
                    )
                await anyio.sleep(0.01)
        return time.monotonic() - started

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def reap(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        await self.process.aclose()
        self.process = None
        return code

    async def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after 15 s); None when it was not running."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.terminate()
            with anyio.move_on_after(15):
                return await self.reap()
            self.kill()
        return await self.reap()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def replayed(self) -> int:
        """The ``journal.replayed`` count the current life logged (0 when none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        for line in text.rsplit(f"--- life {self.life} ---", 1)[-1].splitlines():
            if '"journal.replayed"' in line:
                with contextlib.suppress(ValueError):
                    return int(json.loads(line).get("jobs", 0))
        return 0


async def fetch_status(socket: str) -> Status | None:
    try:
        with anyio.fail_after(STATUS_TIMEOUT_S):
            async with Client.connect(socket, timeout_s=1.0) as client:
                reply = await client.call({"op": "status"})
    except CONNECTION_ERRORS:
        return None
    return reply if isinstance(reply, Status) else None


# -- the clients ---------------------------------------------------------------------


@dataclass
class Ledger:
    """What the clients learned, shared by all of them (one event loop: no locks)."""

    ids: dict[str, str] = field(default_factory=dict)  # key -> the job id the daemon gave
    answers: dict[str, Result] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    submits: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)

    def note_id(self, key: str, job: str) -> None:
        known = self.ids.setdefault(key, job)
        if known != job:
            self.violations.append(f"{key}: accepted as job {job} after {known}: a second job")

    def note_answer(self, key: str, result: Result) -> None:
        if key in self.answers:
            self.violations.append(f"{key}: a second final answer (job {result.job})")
            return
        if result.job != self.ids.get(key):
            self.violations.append(
                f"{key}: result of job {result.job}, accepted as {self.ids[key]}"
            )
        if prompt_of(key) not in (result.content or ""):
            self.violations.append(f"{key}: the answer {result.content!r} is not for this job")
        self.answers[key] = result
        self.answered_at[key] = time.monotonic()
        self.changed.set()
        self.changed = anyio.Event()


def chat_request(key: str) -> dict[str, object]:
    return {
        "op": "chat",
        "messages": [{"role": "user", "content": prompt_of(key)}],
        "task": "bulk",
        "key": key,
        "detach": True,
    }


async def run_client(socket: str, keys: list[str], ledger: Ledger, window: int) -> None:
    """Submit every key detached and fetch its answer; after any break, reconnect and
    resubmit every key that has no answer yet."""
    while any(key not in ledger.answers for key in keys):
        try:
            async with Client.connect(socket, timeout_s=2.0) as client:
                limiter = anyio.Semaphore(window)
                async with anyio.create_task_group() as tg:
                    for key in keys:
                        if key in ledger.answers:
                            continue
                        await limiter.acquire()
                        tg.start_soon(_one_job, client, key, ledger, limiter)
        except* CONNECTION_ERRORS:
            ledger.reconnects += 1
            await anyio.sleep(RECONNECT_PAUSE_S)


async def _one_job(client: Client, key: str, ledger: Ledger, limiter: anyio.Semaphore) -> None:
    try:
        ledger.submits[key] += 1
        with anyio.fail_after(CALL_TIMEOUT_S):
            reply = await client.call(chat_request(key))
        if isinstance(reply, Error):
            ledger.errors[f"submit:{reply.code}"] += 1
            if reply.retryable:
                await anyio.sleep(reply.retry_after_s or 0.5)
                return  # still unanswered: the next session resubmits it
            ledger.violations.append(f"{key}: submit refused: {reply.code}: {reply.message}")
            return
        if not isinstance(reply, Accepted):
            ledger.violations.append(f"{key}: unexpected reply to the submit: {reply!r}")
            return
        ledger.note_id(key, reply.job)
        with anyio.fail_after(CALL_TIMEOUT_S):
            answer = await client.call({"op": "result", "job": reply.job})
        if isinstance(answer, Result):
            ledger.note_answer(key, answer)
        elif isinstance(answer, Error):
            ledger.errors[f"result:{answer.code}"] += 1
            if answer.code == "unknown_job":
                ledger.violations.append(f"{key}: the daemon forgot job {reply.job} (unknown_job)")
            elif not answer.retryable:
                ledger.violations.append(f"{key}: final error {answer.code}: {answer.message}")
        else:
            ledger.violations.append(f"{key}: unexpected reply to result: {answer!r}")
    finally:
        limiter.release()


# -- the run -------------------------------------------------------------------------


async def run_chaos(config: ChaosConfig) -> Report:
    """Run one chaos scenario; ``report.violations`` is empty when every invariant held."""
    seed = config.seed if config.seed is not None else secrets.randbelow(1 << 30)
    rng = random.Random(seed)
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="dispatcher-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report(config=config, seed=seed, workdir=workdir)
    keys = [key_of(i) for i in range(config.jobs)]
    ledger = Ledger()
    upstream = Upstream()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "CHAOS_"))}
    async with contextlib.AsyncExitStack() as stack:
        fakes: list[FakeProvider] = []
        for i in range(config.providers):
            behaviour = Behaviour(
                name=f"p{i}", model=f"chaos-p{i}", latency_s=config.latency_s, jitter=0.5
            )
            fakes.append(await stack.enter_async_context(TaggedProvider(behaviour, upstream)))
        write_config(workdir, fakes, config)
        names = [fake.behaviour.name for fake in fakes]
        daemon = DaemonProcess(config.python, workdir, env, names, upstream)
        stack.push_async_callback(daemon.stop)
        started = time.monotonic()
        report.first_ready_s = await daemon.start()
        try:
            with anyio.fail_after(config.timeout_s):
                async with anyio.create_task_group() as tg:
                    clients_done = anyio.Event()

                    async def clients() -> None:
                        async with anyio.create_task_group() as inner:
                            for i in range(config.clients):
                                share = keys[i :: config.clients]
                                inner.start_soon(
                                    run_client, daemon.socket, share, ledger, config.window
                                )
                        clients_done.set()

                    tg.start_soon(clients)
                    await _kill_loop(config, rng, daemon, ledger, report, started)
                    await clients_done.wait()
        except TimeoutError:
            report.violations.append(
                f"the run did not finish within {config.timeout_s:g} s "
                f"({len(ledger.answers)}/{config.jobs} answered); see {daemon.log_path}"
            )
        report.duration_s = time.monotonic() - started
        report.upstream_requests = sum(f.stats.requests for f in fakes)
        if not report.violations:
            await _verify_resubmits(daemon.socket, ledger, report)
            report.upstream_after_verify = sum(f.stats.requests for f in fakes) - (
                report.upstream_requests
            )
        code = await daemon.stop()
        if code not in (0, None):
            report.violations.append(f"the daemon exited {code} on SIGTERM; see {daemon.log_path}")
    _check(config, ledger, upstream, report, workdir / "state" / "journal.sqlite3")
    _write_trace(workdir / "trace.json", started, report, ledger, upstream)
    if not report.violations and not config.keep and config.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


async def _kill_loop(
    config: ChaosConfig,
    rng: random.Random,
    daemon: DaemonProcess,
    ledger: Ledger,
    report: Report,
    started: float,
) -> None:
    """Kill at random moments spread over the work left, now and then during a restart;
    restart after each kill."""
    throughput = config.providers * config.concurrency / max(config.latency_s, 1e-3)
    spawned: float | None = None  # the daemon was spawned then and has not answered ping yet
    for done in range(config.kills):
        starting = spawned is not None and rng.random() < config.starting_kills
        status: Status | None = None
        if starting:
            await anyio.sleep(rng.uniform(0.0, report.first_ready_s))
        else:
            if spawned is not None:
                await _restarted(daemon, report, spawned)
                spawned = None
            left = config.jobs - len(ledger.answers)
            mean_gap = left / throughput / (config.kills - done + 1)
            deadline = time.monotonic() + rng.uniform(0.2 * mean_gap, 1.8 * mean_gap)
            while time.monotonic() < deadline and len(ledger.answers) < config.jobs:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    await ledger.changed.wait()
            if len(ledger.answers) >= config.jobs:
                break
            status = await fetch_status(daemon.socket)
        daemon.kill()
        now = time.monotonic()
        report.kills.append(
            Kill(
                at=now,
                at_s=now - started,
                life=daemon.life,
                starting=starting,
                status_running=status.running if status is not None else -1,
                status_queued=status.queued if status is not None else -1,
                answered=len(ledger.answers),
            )
        )
        await daemon.reap()
        spawned = time.monotonic()
        await daemon.spawn()
    if spawned is not None:
        await _restarted(daemon, report, spawned)
    if len(report.kills) < config.kills:
        report.violations.append(
            f"only {len(report.kills)} of {config.kills} kills landed before the jobs were done; "
            "give the run more jobs or a higher latency"
        )


async def _restarted(daemon: DaemonProcess, report: Report, spawned: float) -> None:
    kill = report.kills[-1]
    kill.ready_s = await daemon.wait_ready(spawned)
    kill.replayed = daemon.replayed()


async def _verify_resubmits(socket: str, ledger: Ledger, report: Report) -> None:
    """Every key submitted again: the same job id and the same answer, no new upstream work."""
    mismatches: list[str] = []
    async with Client.connect(socket) as client:
        limiter = anyio.Semaphore(256)

        async def again(key: str) -> None:
            async with limiter:
                accepted = await client.call(chat_request(key))
                if not isinstance(accepted, Accepted) or accepted.job != ledger.ids.get(key):
                    mismatches.append(f"{key}: resubmitted after the run: {accepted!r}")
                    return
                answer = await client.call({"op": "result", "job": accepted.job})
                first = ledger.answers[key]
                if not isinstance(answer, Result) or answer.content != first.content:
                    mismatches.append(f"{key}: result after the run: {answer!r}")

        with anyio.fail_after(CALL_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for key in sorted(ledger.answers):
                    tg.start_soon(again, key)
    report.violations.extend(mismatches[:10])
    if len(mismatches) > 10:
        report.violations.append(f"... {len(mismatches)} resubmit mismatches in all")


def _check(
    config: ChaosConfig, ledger: Ledger, upstream: Upstream, report: Report, journal: Path
) -> None:
    report.answered = len(ledger.answers)
    report.client_errors = ledger.errors
    report.reconnects = ledger.reconnects
    report.resubmits = sum(ledger.submits.values()) - len(ledger.submits)
    report.repeated_keys = sum(1 for sends in upstream.sends.values() if len(sends) > 1)
    violations = report.violations
    violations.extend(ledger.violations[:20])
    if len(ledger.violations) > 20:
        violations.append(f"... {len(ledger.violations)} client-side violations in all")
    lost = [key_of(i) for i in range(config.jobs) if key_of(i) not in ledger.answers]
    if lost:
        violations.append(f"{len(lost)} job(s) lost (no answer): {lost[:10]}")
    if len(set(ledger.ids.values())) != len(ledger.ids):
        violations.append("two keys were given the same job id")
    if upstream.strangers:
        violations.append(f"{upstream.strangers} upstream requests carried a key never issued")

    never = float("inf")
    for kill in report.kills:
        kill.running = sum(
            1
            for key, sends in upstream.sends.items()
            if any(send.life == kill.life for send in sends)
            and ledger.answered_at.get(key, never) > kill.at
        )
        for sends in upstream.sends.values():
            last = [send for send in sends if send.life == kill.life]
            if last and any(send.life > kill.life for send in sends):
                kill.in_flight += last[-1].ended > kill.at
                kill.replayed_done += last[-1].ended <= kill.at
    for key, sends in sorted(upstream.sends.items()):
        lives = [send.life for send in sends]
        if len(set(lives)) != len(lives):
            violations.append(f"{key}: sent upstream twice by one daemon life ({lives})")
        answered = ledger.answered_at.get(key, never)
        late = [send.life for send in sends if send.at > answered]
        if late:
            violations.append(f"{key}: sent upstream again after its answer was delivered {late}")
    if report.duplicates > report.running_at_kills:
        violations.append(
            f"{report.duplicates} upstream duplicates, more than the {report.running_at_kills} "
            "jobs running at the kills"
        )
    if report.upstream_after_verify:
        violations.append(
            f"resubmitting answered keys cost {report.upstream_after_verify} upstream requests"
        )
    for _key, state in _journal_rows(journal):
        report.journal_rows += 1
        report.journal_unfinished += state != "done"
    if report.journal_rows != config.jobs:
        violations.append(f"the journal holds {report.journal_rows} rows for {config.jobs} keys")
    if report.journal_unfinished:
        violations.append(f"{report.journal_unfinished} journal rows are not done")


def _journal_rows(path: Path) -> Iterator[tuple[str, str]]:
    if not path.exists():
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield from db.execute("SELECT key, state FROM jobs WHERE key LIKE 'chaos-%'")
    finally:
        db.close()


def _write_trace(
    path: Path, started: float, report: Report, ledger: Ledger, upstream: Upstream
) -> None:
    """For a post-mortem: the kills, and every job that reached the fakes more than once."""
    trace = {
        "seed": report.seed,
        "kills": [
            {
                "at_s": round(k.at_s, 3),
                "life": k.life,
                "running": k.running,
                "in_flight": k.in_flight,
                "replayed_done": k.replayed_done,
                "status_running": k.status_running,
                "starting": k.starting,
            }
            for k in report.kills
        ],
        "repeated": {
            key: {
                "job": ledger.ids.get(key),
                "sends": [
                    (send.life, round(send.at - started, 3), round(send.ended - started, 3))
                    for send in sends
                ],
                "answered_s": round(ledger.answered_at[key] - started, 3)
                if key in ledger.answered_at
                else None,
            }
            for key, sends in sorted(upstream.sends.items())
            if len(sends) > 1
        },
        "violations": report.violations,
    }
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(trace, indent=1))
