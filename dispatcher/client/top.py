"""``dispatcher top``: a live terminal view of the daemon, refreshed from the socket.

One connection, one ``status`` request every ``--interval`` seconds, one frame
per answer: the providers (state, slots, rate tokens, queue, latency, success
rate, 429s, circuit), the queue by class, the totals with the throughput
since the previous frame, and the caches (hits and misses per kind, the
embedding cache's texts and bytes, texts per embeddings request, coalesced
jobs). ``--once`` prints a single frame and exits, for scripts, tests and the
README. :func:`render_status` is a pure function of a
:class:`~dispatcher.contract.protocol.Status`, so it is tested without a terminal.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Final

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dispatcher.client.connection import Client
from dispatcher.contract.config import ConfigError, find_config_path, load_config, socket_path
from dispatcher.contract.protocol import CacheHits, CacheStatus, Error, ProviderStatus, Status

EXIT_FAILED: Final = 1
DEFAULT_INTERVAL_S: Final = 1.0
BATCH_WIDTH: Final = 120  # the width of a frame printed to a pipe or a file

STATE_STYLES: Final = {
    "ready": "green",
    "busy": "cyan",
    "rate_limited": "yellow",
    "half_open": "yellow",
    "ramping": "yellow",
    "open": "red",
    "disabled": "red",
}
CIRCUIT_STYLES: Final = {
    "closed": "green",
    "half_open": "yellow",
    "ramping": "yellow",
    "open": "red",
}


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=DEFAULT_INTERVAL_S,
        help=f"seconds between refreshes (default {DEFAULT_INTERVAL_S:g})",
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0.05 and 3600, got {text!r}")
    return value


def cmd_top(args: argparse.Namespace) -> int:
    """Show the live view until Ctrl-C (or one frame with ``--once``); the exit code."""
    path = _client_socket(args)
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = BATCH_WIDTH

    async def go() -> int:
        async with Client.connect(path) as client:
            status = await _status(client)
            if isinstance(status, Error):
                return _fail(console, status)
            if args.once:
                console.print(render_status(status, source=path))
                return 0
            with Live(console=console, auto_refresh=False, screen=console.is_terminal) as live:
                previous, previous_at = status, time.monotonic()
                live.update(
                    render_status(status, source=path, interval_s=args.interval), refresh=True
                )
                while True:
                    await anyio.sleep(args.interval)
                    status = await _status(client)
                    if isinstance(status, Error):
                        live.stop()
                        return _fail(console, status)
                    now = time.monotonic()
                    frame = render_status(
                        status,
                        source=path,
                        interval_s=args.interval,
                        previous=previous,
                        elapsed_s=now - previous_at,
                    )
                    live.update(frame, refresh=True)
                    previous, previous_at = status, now

    try:
        result: int = anyio.run(go, backend="asyncio", backend_options={"use_uvloop": True})
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how one leaves top
    return result


async def _status(client: Client) -> Status | Error:
    reply = await client.call({"op": "status"})
    if isinstance(reply, Status | Error):
        return reply
    return Error(code="internal", message=f"expected a status reply, got {type(reply).__name__}")


def _fail(console: Console, error: Error) -> int:
    console.print(f"[red]error[/] [{error.code}]: {error.message}", markup=True)
    return EXIT_FAILED


def _client_socket(args: argparse.Namespace) -> str:
    """The daemon's socket: --socket, $DISPATCHER_SOCKET, the config's, the default."""
    explicit = getattr(args, "socket", None)
    if explicit or os.environ.get("DISPATCHER_SOCKET"):
        return socket_path(explicit, os.environ, None)
    try:
        config = load_config(find_config_path(getattr(args, "config", None), os.environ))
    except ConfigError:
        config = None
    return socket_path(None, os.environ, config)


# -- rendering (pure) -------------------------------------------------------------------


def render_status(
    status: Status,
    *,
    source: str = "",
    interval_s: float | None = None,
    previous: Status | None = None,
    elapsed_s: float | None = None,
) -> RenderableType:
    """One frame: a header, the providers table, then classes, totals and caches side by side."""
    header = Text.assemble(
        ("dispatcher top", "bold"),
        f"  {source}" if source else "",
        f"  up {format_duration(status.uptime_s)}",
        f"  every {interval_s:g} s" if interval_s is not None else "",
    )
    side = Table.grid(padding=(0, 4))
    beside: list[RenderableType] = [
        classes_table(status),
        totals_table(status, previous, elapsed_s),
    ]
    if status.cache is not None:  # a daemon from before the caches were reported has none
        beside.append(caches_table(status.cache))
    side.add_row(*beside)
    parts: list[RenderableType] = [header, providers_table(status), side]
    if status.recent:
        parts.append(recent_table(status))
    problems = [f"{name}: {p.problem}" for name, p in status.providers.items() if p.problem]
    if problems:
        parts.append(Text("\n".join(problems), style="dim"))
    return Group(*parts)


def providers_table(status: Status) -> Table:
    table = Table(title="providers", title_justify="left", expand=False)
    table.add_column("provider", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for column in ("slots", "tokens", "queue", "latency", "success", "ok", "fail", "429"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("circuit", no_wrap=True)
    for name, p in status.providers.items():
        table.add_row(
            name,
            p.kind,
            Text(p.state, style=STATE_STYLES.get(p.state, "")),
            slots_cell(p),
            tokens_cell(p),
            str(p.queued),
            f"{p.latency_ms:,.0f} ms",
            success_cell(p),
            str(p.ok),
            str(p.failed),
            Text(str(p.rate_limited), style="yellow" if p.rate_limited else ""),
            Text(circuit_cell(p), style=CIRCUIT_STYLES.get(p.circuit, "")),
        )
    return table


def recent_table(status: Status, rows: int = 8) -> Table:
    """The latest finished jobs, newest first."""
    table = Table(title="recent jobs", title_justify="left", expand=False)
    for column in ("job", "class", "outcome", "provider", "latency", "attempts"):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("latency", "attempts") else "left"
        )
    for job in status.recent[:rows]:
        table.add_row(
            job.job,
            job.cls,
            Text(job.outcome, style="green" if job.outcome == "ok" else "red"),
            job.provider or "-",
            f"{job.latency_ms:,.0f} ms" if job.latency_ms is not None else "-",
            str(job.attempts),
        )
    return table


def slots_cell(p: ProviderStatus, width: int = 5) -> Text:
    """``3/5 ■■■··``: slots used over slots, with a small bar."""
    used = min(p.in_flight, p.concurrency)
    filled = round(width * used / p.concurrency) if p.concurrency else 0
    text = Text(f"{p.in_flight}/{p.concurrency} ")
    text.append("■" * filled, style="cyan")
    text.append("·" * (width - filled), style="dim")
    return text


def tokens_cell(p: ProviderStatus) -> str:
    """Rate tokens left of the per-minute budget; ``~N`` for a learned limit, ``-`` for none."""
    if p.tokens is not None and p.rpm:
        return f"{p.tokens}/{p.rpm}"
    if p.tokens is not None and p.learned_rpm:
        return f"{p.tokens}/~{p.learned_rpm:.0f}"
    if p.tokens is not None:
        return str(p.tokens)
    return "-"


def success_cell(p: ProviderStatus) -> Text:
    tried = p.ok + p.failed
    if not tried:
        return Text("-", style="dim")
    rate = p.ok / tried
    style = "green" if rate >= 0.99 else "yellow" if rate >= 0.9 else "red"
    return Text(f"{rate:.1%}", style=style)


def circuit_cell(p: ProviderStatus) -> str:
    if p.blocked_for_s > 0:
        return f"{p.circuit} (wait {p.blocked_for_s:.1f} s)"
    return p.circuit


def classes_table(status: Status) -> Table:
    table = Table(title="queued by class", title_justify="left")
    table.add_column("class", no_wrap=True)
    table.add_column("queued", justify="right", no_wrap=True)
    classes = status.classes or {}
    for name in sorted(classes, key=lambda n: -classes[n]):
        table.add_row(name, f"{classes[name]:,}")
    if not classes:
        table.add_row(Text("(empty)", style="dim"), "0")
    return table


def totals_table(
    status: Status, previous: Status | None = None, elapsed_s: float | None = None
) -> Table:
    table = Table(title="totals", title_justify="left", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    finished = status.jobs_done + status.jobs_failed
    table.add_row("queued", f"{status.queued:,}")
    table.add_row("running", f"{status.running:,}")
    table.add_row("done", f"{status.jobs_done:,}")
    table.add_row(
        "failed",
        Text(
            f"{status.jobs_failed:,}"
            + (f" ({status.jobs_failed / finished:.1%})" if status.jobs_failed else ""),
            style="red" if status.jobs_failed else "",
        ),
    )
    if previous is not None and elapsed_s:
        delta = finished - (previous.jobs_done + previous.jobs_failed)
        table.add_row("throughput", f"{max(0, delta) / elapsed_s:,.1f} jobs/s")
    table.add_row("uptime", format_duration(status.uptime_s))
    return table


def caches_table(cache: CacheStatus) -> Table:
    """Hits and misses per kind (chat: answers; embed: texts), the embedding cache, the batching."""
    table = Table(title="caches", title_justify="left", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    for kind, counts in cache.kinds.items():
        table.add_row(f"{kind} hits/misses", hits_cell(counts))
    table.add_row("embed cache", f"{cache.embed_texts:,} texts, {format_bytes(cache.embed_bytes)}")
    table.add_row(
        "embed requests",
        f"{cache.embed_requests:,}"
        + (f" ({cache.texts_per_request:g} texts each)" if cache.embed_requests else ""),
    )
    table.add_row("coalesced", f"{cache.coalesced:,}")
    return table


def hits_cell(counts: CacheHits) -> Text:
    """``90/10 (90%)``: hits over misses, with the hit rate once anything was looked up."""
    looked_up = counts.hits + counts.misses
    text = Text(f"{counts.hits:,}/{counts.misses:,}")
    if looked_up:
        text.append(f" ({counts.hits / looked_up:.0%})", style="dim")
    return text


def format_bytes(size: int) -> str:
    """``512 B``, ``4.8 KiB``, ``1.2 MiB``, ``3.0 GiB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 m 05 s``, ``2 h 07 m``, ``3 d 04 h``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} m"
    if minutes:
        return f"{minutes} m {secs:02d} s"
    return f"{secs} s"
