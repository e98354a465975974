"""``dispatcher usage``: who spent what, from the daemon's per-day aggregates.

It reads ``state_dir/usage.sqlite3`` read-only (the daemon may be writing it; its
last second of jobs may not be committed yet), groups the rows by ``--by``
(client, provider, class, day; repeated or comma-separated) from ``--since`` on,
and prints a table with a totals row, ``--json`` (DESIGN.md's shape) or ``--csv``.
Grouped by client alone (the default), every configured client is listed with
what it has left today: its ``daily_tokens`` minus today's total tokens, or "no
limit". Days are UTC days, the days ``daily_tokens`` is counted in.

No socket and no daemon: the module loads only the config, and the usage store's
reader when the verb runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dispatcher.contract.config import Config, find_config_path, load_config

if TYPE_CHECKING:
    from dispatcher.store.usage import UsageRow

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2  # a bad argument, as argparse exits
EXIT_NOPERM: Final = 77  # EX_NOPERM: the file is the daemon's user's
DEFAULT_BY: Final = ("client",)
KEY_ORDER: Final = ("client", "provider", "class", "day")  # the order of keys in --json
NO_LIMIT: Final = "no limit"
BATCH_WIDTH: Final = 120  # the table's width in a pipe or a file

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class _BadArgument(ValueError):
    """An argument the user must fix; the message says how."""


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since",
        metavar="DATE",
        help="the first UTC day to count, YYYY-MM-DD (default: [usage] keep_days ago)",
    )
    parser.add_argument(
        "--by",
        action="append",
        metavar="KEY",
        help="group by client, provider, class or day; repeat it or separate with commas "
        "(default: client)",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the rows as JSON")
    form.add_argument("--csv", action="store_true", help="print the rows as CSV")


def cmd_usage(args: argparse.Namespace) -> int:
    """Print the usage report; the exit code."""
    from dispatcher.store.usage import USAGE_FILE, read_rows

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    today = datetime.datetime.fromtimestamp(time.time(), tz=datetime.UTC).date()
    try:
        since = parse_since(args.since)
        by = parse_by(args.by)
    except ValueError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return EXIT_USAGE
    config = load_config(find_config_path(args.config, os.environ))
    if since is None:
        since = today - datetime.timedelta(days=config.usage.keep_days)
    path = Path(config.daemon.state_dir) / USAGE_FILE
    try:
        rows = read_rows(path, since=since, by=by)
        spent = (
            {row.client or "": row.total_tokens for row in read_rows(path, since=today)}
            if by == DEFAULT_BY
            else None
        )
    except PermissionError:
        err.print(
            f"[red]error:[/] cannot read {escape(str(path))}: permission denied; it belongs to "
            "the daemon's user: run this as that user or as root"
        )
        return EXIT_NOPERM
    except (sqlite3.Error, OSError) as exc:
        err.print(f"[red]error:[/] cannot read {escape(str(path))}: {escape(str(exc))}")
        return EXIT_FAILED
    left: dict[str, int | None] | None = None
    if spent is not None:
        rows = _with_configured_clients(rows, config)
        left = {row.client or "": left_today(config, row.client or "", spent) for row in rows}
    if args.json:
        _write(report_json(rows, by, since=since, until=today, left=left))
    elif args.csv:
        write_csv(rows, by, left=left)
    else:
        out = Console(highlight=False)
        if not out.is_terminal and "COLUMNS" not in os.environ:
            out.width = BATCH_WIDTH
        out.print(report_table(rows, by, since=since, until=today, left=left, path=path))
    return 0


# -- arguments -------------------------------------------------------------------------


def parse_since(text: str | None) -> datetime.date | None:
    """``--since YYYY-MM-DD``; a ValueError that says what is expected."""
    if text is None:
        return None
    problem = _BadArgument(
        f"--since: expected a UTC day as YYYY-MM-DD (e.g. 2025-01-31), got {text!r}"
    )
    if not _DATE.fullmatch(text):
        raise problem
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise problem from None


def parse_by(values: Sequence[str] | None) -> tuple[str, ...]:
    """``--by``, repeated or comma-separated; a ValueError names a wrong key."""
    from dispatcher.store.usage import check_by

    parts = [part.strip() for value in values or DEFAULT_BY for part in value.split(",")]
    by = check_by(part for part in parts if part)
    if not by:
        raise _BadArgument("--by: name at least one of client, provider, class, day")
    return by


# -- budgets -----------------------------------------------------------------------------


def left_today(config: Config, client: str, spent: dict[str, int]) -> int | None:
    """What the client may still spend today; None when it has no ``daily_tokens``."""
    entry = config.clients.get(client)
    if entry is None or not entry.daily_tokens:
        return None
    return max(0, entry.daily_tokens - spent.get(client, 0))


def _with_configured_clients(rows: list[UsageRow], config: Config) -> list[UsageRow]:
    """Rows by client, with a zero row for each configured client that used nothing."""
    from dispatcher.store.usage import UsageRow

    seen = {row.client for row in rows}
    idle = [UsageRow(client=name) for name in config.clients if name not in seen]
    return sorted([*rows, *idle], key=lambda row: row.client or "")


# -- output ------------------------------------------------------------------------------


def _key(row: UsageRow, key: str) -> str | None:
    return row.class_ if key == "class" else getattr(row, key)


def report_json(
    rows: Sequence[UsageRow],
    by: Sequence[str],
    *,
    since: datetime.date | None,
    until: datetime.date,
    left: dict[str, int | None] | None,
) -> str:
    """DESIGN.md's shape: ``{"rows": [...], "since", "until"}``, only the ``by`` keys
    in each row (and ``left_today``, null for no limit, when grouped by client)."""
    keys = [key for key in KEY_ORDER if key in by]
    listed: list[dict[str, Any]] = []
    for row in rows:
        item: dict[str, Any] = {key: _key(row, key) for key in keys}
        item.update(
            jobs=row.jobs,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.total_tokens,
            cached=row.cached,
        )
        if left is not None:
            item["left_today"] = left.get(row.client or "")
        listed.append(item)
    payload = {
        "rows": listed,
        "since": since.isoformat() if since is not None else None,
        "until": until.isoformat(),
    }
    return msgspec.json.encode(payload).decode() + "\n"


CSV_COLUMNS: Final = (
    "jobs",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached",
    "attempts",
    "latency_ms",
)


def write_csv(
    rows: Sequence[UsageRow], by: Sequence[str], *, left: dict[str, int | None] | None
) -> None:
    """A header, then one line per row; ``left_today`` empty for no limit."""
    writer = csv.writer(sys.stdout, lineterminator="\n")
    extra = ["left_today"] if left is not None else []
    writer.writerow([*by, *CSV_COLUMNS, *extra])
    for row in rows:
        values: list[object] = [_key(row, key) for key in by]
        values += [getattr(row, column) for column in CSV_COLUMNS[:-1]]
        values.append(round(row.latency_ms, 3))
        if left is not None:
            remaining = left.get(row.client or "")
            values.append("" if remaining is None else remaining)
        writer.writerow(values)
    sys.stdout.flush()


def report_table(
    rows: Sequence[UsageRow],
    by: Sequence[str],
    *,
    since: datetime.date | None,
    until: datetime.date,
    left: dict[str, int | None] | None,
    path: Path,
) -> Table:
    """The rows, a totals row and, grouped by client, what each has left today."""
    from dispatcher.store.usage import UsageRow

    first = since.isoformat() if since is not None else "the first day"
    table = Table(
        title=f"usage from {first} to {until.isoformat()} (UTC days)",
        title_justify="left",
        # No vertical rules and no edge: a grouping by two keys fits 80 columns.
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for key in by:
        longest = max((len(_key(row, key) or "") for row in rows), default=0)
        # A name wraps past 20 characters rather than losing its end; it never vanishes.
        table.add_column(key, no_wrap=True, min_width=max(len(key), min(longest, 20)))
    for column in ("jobs", "prompt", "completion", "total", "cached", "tries", "ms/job"):
        table.add_column(column, justify="right", no_wrap=True)
    if left is not None:
        table.add_column("left today", justify="right", no_wrap=True)
    for row in rows:
        cells = [escape(_key(row, key) or "") for key in by]
        if left is not None:
            remaining = left.get(row.client or "")
            cells_left = [NO_LIMIT if remaining is None else f"{remaining:,}"]
        else:
            cells_left = []
        table.add_row(*cells, *_numbers(row), *cells_left)
    total = UsageRow(
        jobs=sum(row.jobs for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        total_tokens=sum(row.total_tokens for row in rows),
        cached=sum(row.cached for row in rows),
        attempts=sum(row.attempts for row in rows),
        latency_ms=sum(row.latency_ms for row in rows),
    )
    table.add_section()
    key_blanks = [""] * (len(by) - 1)
    left_blank = [""] if left is not None else []
    table.add_row("total", *key_blanks, *_numbers(total), *left_blank, style="bold")
    if not any(row.jobs for row in rows):
        table.caption = f"no jobs recorded in {escape(str(path))} for these days"
        table.caption_justify = "left"
    return table


def _numbers(row: UsageRow) -> list[str]:
    mean = f"{row.latency_ms / row.jobs:,.0f}" if row.jobs else "-"
    counts = (
        row.jobs,
        row.prompt_tokens,
        row.completion_tokens,
        row.total_tokens,
        row.cached,
        row.attempts,
    )
    return [*(f"{n:,}" for n in counts), mean]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
