"""The usage store: per-day aggregates recorded in memory, group-committed, kept for keep_days."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.store import usage
from dispatcher.store.usage import UsageRow, UsageStore, read_rows
from tests.helpers import FakeClock, until

DAY_S = 86_400.0
MARCH_10 = datetime.datetime(2025, 3, 10, tzinfo=datetime.UTC).timestamp()


def job(store: UsageStore, client: str = "alice", **overrides: Any) -> None:
    """One finished job of 10 + 20 tokens on zhipu, class default, unless told otherwise."""
    fields: dict[str, Any] = {
        "client": client,
        "provider": "zhipu",
        "klass": "default",
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "total_tokens": 30,
        "cached": False,
        "attempts": 1,
        "latency_ms": 100.0,
    }
    fields.update(overrides)
    store.record(**fields)


def opened(path: Path | None, clock: FakeClock, *, keep_days: int = 90) -> UsageStore:
    store = UsageStore(path, keep_days=keep_days, wall=clock)
    store.open()
    return store


async def commit_now(store: UsageStore) -> None:
    """Start ``run`` and cancel it at once: its shielded last commit writes what is pending."""
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        tg.cancel_scope.cancel()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "usage.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MARCH_10 + 12 * 3600)  # noon UTC


def test_init_does_no_io(path: Path) -> None:
    """Constructing a store creates no file; open does."""
    store = UsageStore(path)
    assert not path.parent.exists()
    store.open()
    store.close()
    assert path.exists()


def test_a_job_is_aggregated_by_day_client_provider_and_class(path: Path, clock: FakeClock) -> None:
    """Jobs of one key add up in one row: jobs, tokens, cached jobs, attempts, latency."""
    store = opened(path, clock)
    job(store)
    job(store, cached=True, attempts=3, latency_ms=50.0, prompt_tokens=1, total_tokens=21)
    assert store.rows(by=("day", "client", "provider", "class")) == [
        UsageRow(
            day="2025-03-10",
            client="alice",
            provider="zhipu",
            class_="default",
            jobs=2,
            prompt_tokens=11,
            completion_tokens=40,
            total_tokens=51,
            cached=1,
            attempts=4,
            latency_ms=150.0,
        )
    ]
    store.close()


def test_committed_aggregates_survive_a_reopen(path: Path, clock: FakeClock) -> None:
    """What close committed is read back by the next store on the same file, spent_today too."""
    store = opened(path, clock)
    job(store)
    job(store, client="bob", total_tokens=7)
    store.close()

    again = opened(path, clock)
    assert again.spent_today("alice") == 30
    assert again.spent_today("bob") == 7
    job(again)
    assert again.spent_today("alice") == 60
    assert [(r.client, r.jobs, r.total_tokens) for r in again.rows()] == [
        ("alice", 2, 60),
        ("bob", 1, 7),
    ]
    again.close()
    assert [(r.client, r.jobs) for r in read_rows(path)] == [("alice", 2), ("bob", 1)]


@pytest.mark.anyio
async def test_rows_count_pending_and_committed_once(path: Path, clock: FakeClock) -> None:
    """Before, across and after a commit, rows() counts every job exactly once."""
    store = opened(path, clock)
    job(store)
    assert store.rows()[0].jobs == 1
    assert read_rows(path) == []  # nothing committed yet
    await commit_now(store)
    assert read_rows(path)[0].jobs == 1
    job(store)
    assert store.rows()[0].jobs == 2
    store.close()


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (("client",), [("alice",), ("bob",)]),
        (("provider",), [("hunyuan",), ("zhipu",)]),
        (("class",), [("bulk",), ("default",)]),
        (("day",), [("2025-03-10",), ("2025-03-11",)]),
        (
            ("day", "client"),
            [("2025-03-10", "alice"), ("2025-03-10", "bob"), ("2025-03-11", "alice")],
        ),
        (("provider", "class"), [("hunyuan", "bulk"), ("zhipu", "default")]),
    ],
)
def test_rows_group_by_each_key(
    path: Path, clock: FakeClock, by: tuple[str, ...], expected: list[tuple[str, ...]]
) -> None:
    """Rows are grouped by the keys asked for, in their order, sorted; the rest are None."""
    store = opened(path, clock)
    job(store)  # 03-10 alice zhipu default
    job(store, client="bob", provider="hunyuan", klass="bulk")
    store.close()
    clock.advance(DAY_S)
    store = opened(path, clock)
    job(store)  # 03-11 alice zhipu default, pending

    rows = store.rows(by=by)
    assert [tuple(keys(row)[key] for key in by) for row in rows] == expected
    assert sum(row.jobs for row in rows) == 3
    ungrouped = {"client", "provider", "class", "day"} - set(by)
    assert all(keys(row)[key] is None for row in rows for key in ungrouped)
    store.close()


def keys(row: UsageRow) -> dict[str, str | None]:
    return {"client": row.client, "provider": row.provider, "class": row.class_, "day": row.day}


def test_by_accepts_only_the_four_keys(clock: FakeClock) -> None:
    """An unknown grouping key is a ValueError that names it."""
    store = opened(None, clock)
    with pytest.raises(ValueError, match="'model'"):
        store.rows(by=("client", "model"))
    store.close()


def test_since_keeps_that_day_and_later(path: Path, clock: FakeClock) -> None:
    """rows(since=D) counts day D and the days after it, committed or pending."""
    store = opened(path, clock)
    job(store)  # 03-10
    clock.advance(DAY_S)
    job(store)  # 03-11, pending
    store.close()
    clock.advance(DAY_S)
    store = opened(path, clock)
    job(store)  # 03-12, pending
    since = datetime.date(2025, 3, 11)
    assert [r.day for r in store.rows(since=since, by=("day",))] == ["2025-03-11", "2025-03-12"]
    assert [r.day for r in read_rows(path, since=since, by=("day",))] == ["2025-03-11"]
    store.close()


def test_spent_today_starts_again_at_the_utc_day_boundary(path: Path) -> None:
    """Tokens spent at 23:59:59 UTC do not count the next day, before or after a reopen."""
    clock = FakeClock(MARCH_10 + DAY_S - 1.0)  # 2025-03-10 23:59:59 UTC
    store = opened(path, clock)
    job(store, total_tokens=100)
    assert store.spent_today("alice") == 100
    clock.advance(1.0)  # 2025-03-11 00:00:00
    assert store.spent_today("alice") == 0
    job(store, total_tokens=5)
    assert store.spent_today("alice") == 5
    store.close()

    assert opened(path, clock).spent_today("alice") == 5
    clock.advance(-1.0)  # a store opened back on the 10th sees that day's spend
    assert opened(path, clock).spent_today("alice") == 100


def test_days_past_keep_days_are_dropped_at_open(path: Path, clock: FakeClock) -> None:
    """A day keep_days before today is kept; one day older is deleted when the store opens."""
    store = opened(path, clock, keep_days=3)
    job(store)  # 03-10
    store.close()
    clock.advance(3 * DAY_S)  # 03-13: 03-10 is 3 days ago
    store = opened(path, clock, keep_days=3)
    assert [r.day for r in store.rows(by=("day",))] == ["2025-03-10"]
    store.close()
    clock.advance(DAY_S)  # 03-14: 4 days ago
    store = opened(path, clock, keep_days=3)
    assert store.rows() == []
    store.close()
    assert read_rows(path) == []


@pytest.mark.anyio
async def test_run_prunes_once_the_day_changes(
    path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running store deletes the day that fell out of keep_days at its first commit of the new day."""
    monkeypatch.setattr(usage, "COMMIT_S", 0.01)
    store = opened(path, clock, keep_days=1)
    job(store)  # 03-10
    await commit_now(store)
    clock.advance(DAY_S)  # 03-11: 03-10 still kept
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        job(store)  # 03-11
        await until(
            lambda: [r.day for r in read_rows(path, by=("day",))] == ["2025-03-10", "2025-03-11"]
        )
        clock.advance(DAY_S)  # 03-12: 03-10 falls out, with no job to commit
        await until(lambda: [r.day for r in read_rows(path, by=("day",))] == ["2025-03-11"])
        tg.cancel_scope.cancel()
    store.close()


@pytest.mark.anyio
async def test_run_commits_while_the_daemon_runs(
    path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded jobs reach the file within a commit interval, readable by another connection."""
    monkeypatch.setattr(usage, "COMMIT_S", 0.01)
    store = opened(path, clock)
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        for _ in range(5):
            job(store)
        await until(lambda: [r.jobs for r in read_rows(path)] == [5])
        assert store.commits >= 1
        tg.cancel_scope.cancel()
    store.close()


@pytest.mark.anyio
async def test_cancelling_run_commits_what_is_pending(path: Path, clock: FakeClock) -> None:
    """Shutdown cancels run() before its next commit is due; the pending jobs are written anyway."""
    store = opened(path, clock)
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)  # the first commit is COMMIT_S away
        job(store)
        job(store, client="bob")
        tg.cancel_scope.cancel()
    assert [(r.client, r.jobs) for r in read_rows(path)] == [("alice", 1), ("bob", 1)]
    store.close()


def test_a_failed_commit_keeps_the_aggregates(path: Path, clock: FakeClock) -> None:
    """A commit the disk refuses loses nothing: rows and spent_today still count it, the next commit writes it."""
    store = opened(path, clock)
    job(store)
    assert store._db is not None
    store._db.execute("PRAGMA query_only = ON")  # every write now fails, like a read-only disk
    store._commit()
    assert store.commits == 0
    job(store)
    assert store.rows()[0].jobs == 2
    assert store.spent_today("alice") == 60
    store._db.execute("PRAGMA query_only = OFF")
    store.close()
    assert [(r.jobs, r.total_tokens) for r in read_rows(path)] == [(2, 60)]


def test_a_memory_store_needs_no_file(clock: FakeClock) -> None:
    """path=None keeps the aggregates in memory: rows and spent_today work the same."""
    store = opened(None, clock)
    job(store)
    store.close()  # a no-op commit into memory
    store = opened(None, clock)
    assert store.rows() == []
    job(store, total_tokens=9)
    assert store.spent_today("alice") == 9
    assert store.rows()[0].total_tokens == 9
    store.close()


def test_read_rows_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    """The CLI on a host whose daemon never finished a job prints no rows, not an error."""
    assert read_rows(tmp_path / "none.sqlite3", by=("client", "day")) == []
