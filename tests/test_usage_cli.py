"""`dispatcher usage`, as a user runs it: `python -m dispatcher usage --config FILE ...`
on a usage file filled by the store the daemon uses (and still holds open)."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.store.usage import USAGE_FILE, UsageStore

COMMAND_TIMEOUT_S = 20.0
OLD_DAY = datetime.date(2025, 3, 10)
OLDER_DAY = datetime.date(2025, 3, 8)
KEYS = {"client", "provider", "class", "day"}
COUNTS = {"jobs", "prompt_tokens", "completion_tokens", "total_tokens", "cached"}


def utc_today() -> datetime.date:
    return datetime.datetime.now(tz=datetime.UTC).date()


def noon(day: datetime.date) -> float:
    return datetime.datetime(day.year, day.month, day.day, 12, tzinfo=datetime.UTC).timestamp()


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(COLUMNS="200", NO_COLOR="1")
    return env


def run_usage(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "usage", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def record(
    store: UsageStore, client: str, provider: str, klass: str, tokens: int, **kw: Any
) -> None:
    store.record(
        client=client,
        provider=provider,
        klass=klass,
        prompt_tokens=tokens // 4,
        completion_tokens=tokens - tokens // 4,
        total_tokens=tokens,
        cached=kw.get("cached", False),
        attempts=kw.get("attempts", 1),
        latency_ms=kw.get("latency_ms", 100.0),
    )


async def _commit(store: UsageStore) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        tg.cancel_scope.cancel()  # run's last commit, shielded


def commit(store: UsageStore) -> None:
    """What a running daemon does every second: commit, with the file kept open."""
    anyio.run(_commit, store)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        "[clients.alice]\nuids = [1001]\ndaily_tokens = 1000\n"
        "[clients.bob]\nuids = [1002]\n"
        "[clients.carol]\nuids = [1003]\ndaily_tokens = 50\n"
        "[usage]\nkeep_days = 36500\n"
    )
    return path


@pytest.fixture
def today(config: Path) -> Iterator[datetime.date]:
    """Fill the usage file: two old days at fixed times, today's jobs at the real time.

    Today's numbers: alice 300 tokens (2 jobs, one cached), uid:1004 40; carol none.
    The store stays open, as a daemon's would, while the test runs the command.
    """
    path = config.parent / "state" / USAGE_FILE
    day = utc_today()
    old = UsageStore(path, keep_days=36500, wall=lambda: noon(OLDER_DAY))
    old.open()
    record(old, "alice", "hunyuan", "bulk", 1000)
    old.close()
    old = UsageStore(path, keep_days=36500, wall=lambda: noon(OLD_DAY))
    old.open()
    record(old, "alice", "zhipu", "default", 2000, attempts=2)
    record(old, "bob", "zhipu", "realtime", 500)
    old.close()
    store = UsageStore(path, keep_days=36500)
    store.open()
    record(store, "alice", "zhipu", "default", 200)
    record(store, "alice", "zhipu", "default", 100, cached=True)
    record(store, "uid:1004", "hunyuan", "bulk", 40)
    commit(store)
    yield day
    store.close()


def run_today(config: Path, today: datetime.date, *args: str) -> subprocess.CompletedProcess[str]:
    """run_usage, on the UTC day the file was filled (a test that straddles midnight is skipped)."""
    done = run_usage(config, *args)
    if utc_today() != today:
        pytest.skip("the UTC day changed during the test; today's numbers moved with it")
    return done


def test_table_has_every_client_a_totals_row_and_what_is_left(
    config: Path, today: datetime.date
) -> None:
    """The default table groups by client, adds a totals row and each client's allowance left today."""
    done = run_today(config, today)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    # client jobs prompt completion total cached tries ms/job left-today
    assert lines["alice"][1:5] == ["4", "825", "2,475", "3,300"]
    assert lines["alice"][-1] == "700"  # 1,000 a day, 300 spent today
    assert lines["bob"][-2:] == ["no", "limit"]
    assert lines["carol"][1] == "0"
    assert lines["carol"][-1] == "50"  # configured, nothing spent
    assert lines["uid:1004"][-2:] == ["no", "limit"]
    assert lines["total"][1:5] == ["6", "960", "2,880", "3,840"]


def test_json_has_the_documented_shape(config: Path, today: datetime.date) -> None:
    """--json prints {"rows", "since", "until"}; a row has the --by keys, the counts, left_today."""
    done = run_today(config, today, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"rows", "since", "until"}
    assert report["until"] == today.isoformat()
    assert report["since"] == (today - datetime.timedelta(days=36500)).isoformat()
    rows = {row["client"]: row for row in report["rows"]}
    assert all(set(row) == {"client", *COUNTS, "left_today"} for row in rows.values())
    assert rows["alice"] == {
        "client": "alice",
        "jobs": 4,
        "prompt_tokens": 825,
        "completion_tokens": 2475,
        "total_tokens": 3300,
        "cached": 1,
        "left_today": 700,
    }
    assert rows["bob"]["left_today"] is None  # no daily_tokens: no limit
    assert rows["carol"]["left_today"] == 50
    assert rows["uid:1004"]["total_tokens"] == 40


def test_json_by_several_keys_has_only_those(config: Path, today: datetime.date) -> None:
    """--by provider --by day,class: each row carries exactly those keys, and no left_today."""
    done = run_today(config, today, "--json", "--by", "provider", "--by", "day,class")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert all(set(row) == {"provider", "class", "day", *COUNTS} for row in rows)
    found = [(row["day"], row["provider"], row["class"], row["jobs"]) for row in rows]
    assert sorted(found) == [
        ("2025-03-08", "hunyuan", "bulk", 1),
        ("2025-03-10", "zhipu", "default", 1),
        ("2025-03-10", "zhipu", "realtime", 1),
        (today.isoformat(), "hunyuan", "bulk", 1),
        (today.isoformat(), "zhipu", "default", 2),
    ]


def test_csv_has_a_header_and_one_line_per_row(config: Path, today: datetime.date) -> None:
    """--csv --by day prints a header and one parsable line per day."""
    done = run_today(config, today, "--csv", "--by", "day")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [row["day"] for row in rows] == ["2025-03-08", "2025-03-10", today.isoformat()]
    assert [int(row["total_tokens"]) for row in rows] == [1000, 2500, 340]
    assert rows[1]["attempts"] == "3"
    assert "left_today" not in rows[0]


def test_csv_by_client_leaves_no_limit_empty(config: Path, today: datetime.date) -> None:
    """In CSV grouped by client, left_today is a number, or empty for a client with no limit."""
    done = run_today(config, today, "--csv")
    assert done.returncode == 0, done.stderr
    left = {row["client"]: row["left_today"] for row in csv.DictReader(io.StringIO(done.stdout))}
    assert left == {"alice": "700", "bob": "", "carol": "50", "uid:1004": ""}


def test_since_counts_that_day_and_later(config: Path, today: datetime.date) -> None:
    """--since 2025-03-09 leaves the 8th out; what is left today does not depend on --since."""
    done = run_today(config, today, "--json", "--since", "2025-03-09")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["since"] == "2025-03-09"
    rows = {row["client"]: row for row in report["rows"]}
    assert rows["alice"]["total_tokens"] == 2300
    assert rows["alice"]["left_today"] == 700


def test_default_since_is_keep_days_ago(tmp_path: Path) -> None:
    """Without --since the report starts keep_days before today: older rows are not shown."""
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n[usage]\nkeep_days = 2\n')
    store = UsageStore(state / USAGE_FILE, keep_days=36500, wall=lambda: noon(OLD_DAY))
    store.open()
    record(store, "alice", "zhipu", "default", 10)
    store.close()
    done = run_usage(config, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == []
    assert report["since"] == (utc_today() - datetime.timedelta(days=2)).isoformat()
    assert json.loads(run_usage(config, "--json", "--since", "2025-01-01").stdout)["rows"]


@pytest.mark.parametrize("since", ["yesterday", "2025-13-01", "20250310", "2025-3-1"])
def test_a_bad_since_is_one_line_and_exit_2(config: Path, since: str) -> None:
    """A --since that is not a YYYY-MM-DD day gets one line saying what is expected, exit 2."""
    done = run_usage(config, "--since", since)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "--since" in done.stderr
    assert "YYYY-MM-DD" in done.stderr


def test_a_bad_by_is_one_line_and_exit_2(config: Path) -> None:
    """An unknown --by key is named, with the keys allowed, exit 2."""
    done = run_usage(config, "--by", "client,model")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "'model'" in done.stderr
    assert "provider" in done.stderr


def test_no_usage_file_yet(config: Path) -> None:
    """Before the daemon has finished a job there is no file: an empty report, exit 0."""
    done = run_usage(config, "--json", "--by", "provider")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == []
    table = run_usage(config, "--by", "day")
    assert table.returncode == 0, table.stderr
    assert "no jobs recorded" in table.stdout


def test_the_usage_verb_loads_no_daemon(config: Path) -> None:
    """`dispatcher usage` loads the usage reader, but neither aiohttp nor the daemon's actors."""
    code = (
        "from dispatcher import cli\n"
        f"cli.main(['usage', '--config', {str(config)!r}, '--json'])\n"
        "import sys; print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    loaded = set(done.stdout.splitlines()[-1].split())
    assert "aiohttp" not in loaded
    daemon = ("dispatcher.app", "dispatcher.scheduler", "dispatcher.providers", "dispatcher.store")
    allowed = {"dispatcher.store", "dispatcher.store.usage"}
    assert {m for m in loaded if m.startswith(daemon)} == allowed
