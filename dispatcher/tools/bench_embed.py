"""``dispatcher bench --scenario embed``: single-text embed jobs at the 5-rpm wall (issue 12).

A memory indexer embeds one note per job. This scenario submits ``--texts`` distinct
texts that way (default 10,000), all at once, to an in-process
:class:`~dispatcher.app.Daemon` through its Unix socket, as any other program would
(:class:`~dispatcher.client.connection.Client`, several connections: one holds at
most ``max_in_flight_per_connection`` requests). The daemon's one provider is
SiliconFlow's built-in entry pointed at a real
:class:`~dispatcher.testing.simulator.FakeProvider` on 127.0.0.1 that allows
``rpm`` requests in any 60 s window and answers 413 to a request of more than
``--max-batch`` inputs.

Reported: the makespan (first submit to last answer) against the bound
:func:`embed_bound_s`, ``ceil(texts / max_batch / rpm)`` minutes; the requests the
fake received and the texts each carried; the fake's 429s and 413s; jobs failed; and
whether every job got its own vector (checked against the fake's deterministic
vectors after the clock stops). It runs in real time: the RPM window is 60 s whatever
``--time-scale`` says (that only scales the fake's latency), so the default size takes
about an hour. ``--config`` is not used: the scenario builds its one-provider config.

Resource handling: the fake, the daemon, every connection and the temporary directory
are closed when the scenario ends, also on Ctrl-C or at the wall-time cap; every wait
has a deadline (the cap, or :data:`START_DEADLINE_S` / :data:`STATUS_DEADLINE_S`).
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from dispatcher.client.connection import Client
from dispatcher.contract.config import BUILTIN_PROVIDERS
from dispatcher.contract.protocol import Error, Result, Status
from dispatcher.tools.bench import (
    _finite,
    _Report,
    _s,
    _status,
    _verdict,
    print_parts,
    progress_printer,
    run_scenario,
)
from dispatcher.tools.bench_limits import KEY_ENV, in_process_daemon

if TYPE_CHECKING:  # aiohttp and the daemon load only when the scenario runs
    from dispatcher.testing.simulator import Behaviour, FakeProvider

EmbedScenario = Literal["embed"]
EMBED_SCENARIOS: Final[tuple[EmbedScenario, ...]] = ("embed",)

# The target: makespan <= MAKESPAN_RATIO x bound + one window. The bound counts whole
# windows, so a perfect daemon ends about one window *under* it (the last window's
# requests start at (windows - 1) x 60 s). The ratio covers costs that grow with the
# run: per window, the daemon counts each spent token for 61 s (the request's transit
# to the fake, which counts 60 s from the arrival), about 2% of a window, and a request
# may linger (batch_linger_ms) to fill. The one window covers what does not grow: while the
# jobs are still being submitted, a request may leave with a part of a batch (the
# linger is 50 ms, submitting 10,000 jobs takes longer), and one request spent short
# can push the last texts into one more window.
MAKESPAN_RATIO: Final = 1.1
WINDOW_S: Final = 60.0  # the fake's and the daemon's RPM window; not scaled
PROVIDER: Final = "siliconflow"
STATUS_DEADLINE_S: Final = 10.0  # a status request is answered by then
PROGRESS_EVERY_S: Final = 60.0  # one progress line a window: the full run takes an hour
VECTOR_PREFIX: Final = 4  # floats kept per answer for the check; a whole vector is 1024
VECTOR_TOLERANCE: Final = 1e-5  # the embedding cache keeps float32


@dataclass(frozen=True, slots=True)
class EmbedSettings:
    """The knobs of the embed scenario (the verb's options)."""

    texts: int = 10_000
    max_batch: int = 32
    rpm: int = 5
    connections: int = 8
    time_scale: float = 0.1
    seed: int = 0
    max_wall_s: float | None = None  # None: twice the bound plus two windows
    job_timeout_s: float | None = None  # each job's timeout_s; None: the cap plus one window


class EmbedReport(_Report, kw_only=True):
    """What ``--json`` prints for ``--scenario embed``; times in seconds."""

    texts: int
    max_batch: int
    rpm: int
    window_s: float
    connections: int
    job_timeout_s: float  # every job's timeout_s
    answered: int  # results, with or without the right vector
    failed: int  # error replies
    incomplete: int  # still unanswered at the wall cap
    errors: dict[str, int]
    first_errors: dict[str, str]  # each error code's first message, to say why
    wrong_vectors: int  # answers whose vector is not the fake's for the job's own text
    requests_sent: int  # HTTP requests the fake received, refused ones included
    requests_ideal: int  # ceil(texts / max_batch)
    requests_ok: int
    texts_sent: int  # texts the fake embedded (the inputs of its 2xx answers)
    texts_per_request: float | None  # texts_sent / requests_ok
    daemon_texts_per_request: float  # the daemon's own account (status cache)
    upstream_429: int
    upstream_413: int
    upstream_other_errors: int
    makespan_s: float
    bound_s: float
    target_s: float
    ratio: float | None  # makespan / bound
    hit_wall_cap: bool
    target_met: bool


class EmbedBenchReport(_Report, kw_only=True):
    seed: int
    time_scale: float
    embed: EmbedReport | None = None


# -- pure helpers ----------------------------------------------------------------------


def embed_requests_ideal(texts: int, max_batch: int) -> int:
    """The fewest upstream requests that carry ``texts``: ``ceil(texts / max_batch)``."""
    return -(-texts // max_batch)


def embed_bound_s(texts: int, *, max_batch: int, rpm: int, window_s: float = WINDOW_S) -> float:
    """The issue's bound: ``ceil(texts / max_batch / rpm)`` windows, in seconds."""
    if texts <= 0:
        return 0.0
    return -(-embed_requests_ideal(texts, max_batch) // rpm) * window_s


def embed_target_s(bound_s: float, window_s: float = WINDOW_S) -> float:
    """The makespan the scenario accepts: :data:`MAKESPAN_RATIO` x the bound + one window."""
    return MAKESPAN_RATIO * bound_s + window_s


def wall_cap_s(settings: EmbedSettings) -> float:
    """How long the run may take before the unanswered jobs are reported as incomplete."""
    if settings.max_wall_s is not None:
        return settings.max_wall_s
    bound = embed_bound_s(settings.texts, max_batch=settings.max_batch, rpm=settings.rpm)
    return 2 * bound + 2 * WINDOW_S


def note_text(i: int) -> str:
    """The ``i``-th note of the indexer: distinct, short, far under 512 tokens."""
    return f"note {i}: what the meeting decided about the index, and who follows it up"


def vector_matches(got: Sequence[float], expected: Sequence[float]) -> bool:
    """Whether ``got`` starts like ``expected``, within float32 rounding."""
    return len(got) >= len(expected) and all(
        abs(a - b) <= VECTOR_TOLERANCE for a, b in zip(got, expected, strict=False)
    )


# -- the fake, the config, the daemon --------------------------------------------------


def _behaviour(settings: EmbedSettings) -> Behaviour:
    """SiliconFlow's seed fake at ``rpm`` a minute, refusing more than ``max_batch`` inputs.

    Its day's token budget is switched off here and in the config: that limit has its
    own tests, and a larger ``--texts`` should meet the RPM wall, not the day's quota.
    """
    from dispatcher.testing.simulator import SEED_BEHAVIOURS

    seed = SEED_BEHAVIOURS[PROVIDER]
    return msgspec.structs.replace(
        seed,
        rpm=settings.rpm,
        window_s=WINDOW_S,
        max_inputs=settings.max_batch,
        daily_tokens=0,
        latency_s=seed.latency_s * settings.time_scale,
        seed=seed.seed + settings.seed,
    )


def _fake(behaviour: Behaviour) -> tuple[FakeProvider, Counter[int]]:
    """A fake provider and a tally of the statuses it answered (413s included)."""
    from dispatcher.testing.simulator import FakeProvider

    statuses: Counter[int] = Counter()

    class CountingStatuses(FakeProvider):
        # ProviderStats folds every non-429 refusal into ``errors``; the 413 is the
        # figure this scenario is about, so every answer's status is counted here.
        def _count(self, status: int) -> None:
            super()._count(status)
            statuses[status] += 1

    return CountingStatuses(behaviour), statuses


def _raw_config(
    fake: FakeProvider, settings: EmbedSettings, state_dir: Path, socket_path: str
) -> dict[str, dict[str, Any]]:
    """The built-in SiliconFlow entry pointed at ``fake``, at ``rpm`` and ``max_batch``."""
    entry: dict[str, Any] = msgspec.to_builtins(BUILTIN_PROVIDERS[PROVIDER])
    entry.update(
        url=fake.url,
        api_key_env=KEY_ENV,
        rpm=settings.rpm,
        max_batch=settings.max_batch,
        daily_tokens=0,
        latency_s=max(fake.behaviour.latency_s, 0.001),
    )
    return {
        "daemon": {"socket": socket_path, "state_dir": str(state_dir), "log_level": "warning"},
        "providers": {PROVIDER: entry},
    }


def _connections(settings: EmbedSettings, per_connection_limit: int) -> int:
    """Enough connections that none holds more than half the daemon's per-connection cap."""
    return max(settings.connections, math.ceil(settings.texts / max(1, per_connection_limit // 2)))


# -- the run ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """What the clients saw: answers, errors, and a prefix of each job's vector."""

    answered: int = 0
    malformed: int = 0  # a result without exactly one vector
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)  # code -> its first message
    prefixes: dict[int, list[float]] = field(default_factory=dict)
    last_answer: float = 0.0


async def run_embed(
    settings: EmbedSettings, progress: Callable[[str], None] = lambda _: None
) -> EmbedReport:
    """Submit ``settings.texts`` single-text embed jobs at once and measure them."""
    from dispatcher.testing.simulator import _embedding  # the fake's own vectors, to check

    behaviour = _behaviour(settings)
    bound = embed_bound_s(settings.texts, max_batch=settings.max_batch, rpm=settings.rpm)
    cap_s = wall_cap_s(settings)
    progress(
        f"embed: {settings.texts:,} single-text jobs, the fake allows {settings.rpm}/min and "
        f"{settings.max_batch} inputs a request; bound {bound / 60:g} min, cap {cap_s:g} s"
    )
    # The jobs wait in the queue for up to the whole run: without their own timeout the
    # daemon's default (600 s) would fail the last ones, as it would an indexer's.
    timeout_s = settings.job_timeout_s or min(86_400.0, cap_s + WINDOW_S)
    tally = _Tally()
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-embed-") as tmp:
        fake, statuses = _fake(behaviour)
        async with fake:
            raw = _raw_config(fake, settings, Path(tmp) / "state", str(Path(tmp) / "d.sock"))
            async with in_process_daemon(raw, settings.seed) as daemon, AsyncExitStack() as stack:
                socket_path = str(raw["daemon"]["socket"])
                count = _connections(settings, daemon.config.daemon.max_in_flight_per_connection)
                clients = [
                    await stack.enter_async_context(Client.connect(socket_path))
                    for _ in range(count)
                ]
                started, hit_cap = await _submit_all(
                    settings, clients, tally, timeout_s, cap_s, progress
                )
                # A connection of its own, opened now: one opened at the start would have
                # sat idle past the daemon's idle_timeout_s (an hour) in a full-size run.
                with anyio.fail_after(STATUS_DEADLINE_S):
                    async with Client.connect(socket_path) as watcher:
                        status = await _status(watcher)
        stats = fake.stats
    ended = time.monotonic() if hit_cap else tally.last_answer
    makespan = max(0.0, ended - started)
    wrong = tally.malformed + sum(
        not vector_matches(
            prefix, _embedding(note_text(i), behaviour.embed_dims, behaviour.seed)[:VECTOR_PREFIX]
        )
        for i, prefix in tally.prefixes.items()
    )
    failed = sum(tally.errors.values())
    upstream_429 = stats.rate_limited
    upstream_413 = statuses[413]
    target = embed_target_s(bound)
    met = (
        tally.answered == settings.texts
        and wrong == 0
        and upstream_429 == 0
        and upstream_413 == 0
        and not hit_cap
        and makespan <= target
    )
    return EmbedReport(
        texts=settings.texts,
        max_batch=settings.max_batch,
        rpm=settings.rpm,
        window_s=WINDOW_S,
        connections=count,
        job_timeout_s=timeout_s,
        answered=tally.answered,
        failed=failed,
        incomplete=settings.texts - tally.answered - failed,
        errors=dict(tally.errors),
        first_errors=tally.first_errors,
        wrong_vectors=wrong,
        requests_sent=stats.requests,
        requests_ideal=embed_requests_ideal(settings.texts, settings.max_batch),
        requests_ok=stats.ok,
        texts_sent=stats.texts,
        texts_per_request=_finite(stats.texts / stats.ok, 2) if stats.ok else None,
        daemon_texts_per_request=_daemon_texts_per_request(status),
        upstream_429=upstream_429,
        upstream_413=upstream_413,
        upstream_other_errors=stats.errors - upstream_413,
        makespan_s=round(makespan, 3),
        bound_s=bound,
        target_s=round(target, 3),
        ratio=_finite(makespan / bound, 3) if bound > 0 else None,
        hit_wall_cap=hit_cap,
        target_met=met,
    )


async def _submit_all(
    settings: EmbedSettings,
    clients: Sequence[Client],
    tally: _Tally,
    timeout_s: float,
    cap_s: float,
    progress: Callable[[str], None],
) -> tuple[float, bool]:
    """Every job at once, spread over ``clients``; when the first went, whether the cap hit."""

    async def one(i: int) -> None:
        reply = await clients[i % len(clients)].call(
            {"op": "embed", "id": f"note-{i}", "input": note_text(i), "timeout_s": timeout_s}
        )
        tally.last_answer = time.monotonic()
        match reply:
            case Result(embeddings=[vector]):
                tally.answered += 1
                tally.prefixes[i] = list(vector[:VECTOR_PREFIX])
            case Result():
                tally.answered += 1
                tally.malformed += 1
            case Error(code=code, message=message):
                tally.errors[code] += 1
                tally.first_errors.setdefault(code, message)
            case _:
                tally.errors[type(reply).__name__] += 1

    async def report_progress(started: float) -> None:
        while True:
            await anyio.sleep(PROGRESS_EVERY_S)
            done = tally.answered + sum(tally.errors.values())
            progress(
                f"embed: {done:,}/{settings.texts:,} answered after {time.monotonic() - started:.0f} s"
            )

    started = time.monotonic()
    with anyio.move_on_after(cap_s) as cap:
        async with anyio.create_task_group() as tg:
            tg.start_soon(report_progress, started)
            async with anyio.create_task_group() as jobs:
                for i in range(settings.texts):
                    jobs.start_soon(one, i)
            tg.cancel_scope.cancel()  # every job is answered: no more progress lines
    return started, cap.cancelled_caught


def _daemon_texts_per_request(status: Status) -> float:
    return status.cache.texts_per_request if status.cache is not None else 0.0


# -- the verb's part -------------------------------------------------------------------


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--scenario embed`` (it shares --time-scale, --seed, --json, --check)."""
    defaults = EmbedSettings()
    parser.add_argument(
        "--texts",
        type=int,
        default=defaults.texts,
        help=f"embed: distinct single-text jobs submitted at once ({defaults.texts:,})",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help=f"embed: texts per request; the fake refuses more with 413 ({defaults.max_batch})",
    )
    parser.add_argument(
        "--embed-max-wall-s",
        type=float,
        default=None,
        help="embed: cap on the run's wall time (default: twice the bound plus two minutes)",
    )
    parser.add_argument(
        "--embed-job-timeout-s",
        type=float,
        default=None,
        help="embed: each job's timeout_s, at most 86400 (default: the cap plus one minute)",
    )


def embed_settings(args: argparse.Namespace) -> EmbedSettings:
    """The settings of ``args``; ValueError names a bad option."""
    for name in ("texts", "max_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.time_scale <= 0:
        raise ValueError("--time-scale must be positive")
    if args.embed_max_wall_s is not None and args.embed_max_wall_s <= 0:
        raise ValueError("--embed-max-wall-s must be positive")
    if args.embed_job_timeout_s is not None and not 0 < args.embed_job_timeout_s <= 86_400:
        raise ValueError("--embed-job-timeout-s must be in (0, 86400]")
    return EmbedSettings(
        texts=args.texts,
        max_batch=args.max_batch,
        time_scale=args.time_scale,
        seed=args.seed,
        max_wall_s=args.embed_max_wall_s,
        job_timeout_s=args.embed_job_timeout_s,
    )


def cmd_embed(args: argparse.Namespace, out: Console, err: Console) -> int:
    """``dispatcher bench --scenario embed``: run, print, and exit 1 on a miss with --check."""
    try:
        settings = embed_settings(args)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    if args.config:
        err.print("[dim]--config is not used by embed: it builds a one-provider config[/]")

    progress = progress_printer(err)

    async def main() -> EmbedBenchReport:
        report = EmbedBenchReport(seed=settings.seed, time_scale=settings.time_scale)
        report.embed = await run_embed(settings, progress)
        return report

    render = functools.partial(render_embed_bench, console=out)
    report = run_scenario(main, log=args.log, err=err, as_json=args.json, render=render)
    if report is None:
        return 1
    missed = report.embed is not None and not report.embed.target_met
    if missed and not args.json:
        err.print("[yellow]target missed:[/] embed")
    return 1 if missed and args.check else 0


# -- rendering -------------------------------------------------------------------------


def render_embed_bench(report: EmbedBenchReport, console: Console) -> None:
    console.print(
        f"[bold]dispatcher bench[/]  embed in real time (RPM window {WINDOW_S:g} s, fake "
        f"latency x {report.time_scale:g}), seed {report.seed}"
    )
    if report.embed is not None:
        print_parts(console, [render_embed(report.embed)])


def render_embed(report: EmbedReport) -> tuple[Table, list[str]]:
    """The embed table (one row per figure, with its target) and the notes under it."""
    table = Table(
        title=f"embed: {report.texts:,} single-text jobs against a {report.rpm}/min fake "
        f"that refuses more than {report.max_batch} inputs a request",
        title_justify="left",
    )
    for column in ("figure", "measured", "target", ""):
        table.add_column(column, justify="right" if column == "measured" else "left")
    done = f"{report.answered:,}/{report.texts:,}"
    if report.hit_wall_cap:
        done += f" ({report.incomplete:,} cut at the wall cap)"
    _row(table, "jobs answered", done, "all", report.answered == report.texts)
    errors = ", ".join(f"{k} {v}" for k, v in report.errors.items())
    failed = f"{report.failed:,}" + (f" ({errors})" if errors else "")
    _row(table, "jobs failed", failed, "0", report.failed == 0)
    _row(table, "wrong vectors", f"{report.wrong_vectors:,}", "0", report.wrong_vectors == 0)
    makespan = ("≥" if report.hit_wall_cap else "") + _s(report.makespan_s, 1) + " s"
    _row(
        table,
        "makespan",
        makespan,
        f"<= {MAKESPAN_RATIO:g} x {report.bound_s:g} + {report.window_s:g} = {report.target_s:g} s",
        not report.hit_wall_cap and report.makespan_s <= report.target_s,
    )
    # Requests and texts per request explain the makespan; they are not targets themselves.
    _row(table, "makespan / bound", _s(report.ratio, 3), "", None)
    _row(
        table,
        "requests sent",
        f"{report.requests_sent:,} ({report.requests_ok:,} answered 2xx)",
        f"ideal {report.requests_ideal:,}",
        None,
    )
    _row(
        table,
        "texts per request",
        f"{_s(report.texts_per_request, 2)} (daemon: {report.daemon_texts_per_request:g})",
        f"max_batch {report.max_batch}",
        None,
    )
    _row(table, "upstream 429s", f"{report.upstream_429:,}", "0", report.upstream_429 == 0)
    _row(table, "upstream 413s", f"{report.upstream_413:,}", "0", report.upstream_413 == 0)
    notes = [
        f"bound: ceil({report.texts:,} / {report.max_batch} / {report.rpm}) windows of "
        f"{report.window_s:g} s = {report.bound_s:g} s; a perfect daemon ends about one "
        "window under it (the last window's requests start at (windows - 1) x 60 s)",
        f"{report.connections} client connections, every job with timeout_s "
        f"{report.job_timeout_s:g}; texts sent upstream {report.texts_sent:,}, "
        f"other upstream errors {report.upstream_other_errors:,}",
        *(f"first {code}: {message}" for code, message in report.first_errors.items()),
        "target: every job answered with its own vector, 0 upstream 429s and 413s, makespan "
        f"<= {MAKESPAN_RATIO:g} x bound + one window: " + _verdict(report.target_met),
    ]
    return table, notes


def _row(table: Table, figure: str, measured: str, target: str, met: bool | None) -> None:
    table.add_row(figure, measured, target, "" if met is None else _verdict(met))
