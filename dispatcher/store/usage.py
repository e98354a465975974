"""Usage accounting: per-day aggregates of finished jobs, kept in ``state_dir/usage.sqlite3``.

One row per (UTC day, client, provider, class) holds the jobs, prompt, completion
and total tokens, cached jobs, attempts and summed latency of that day. The
daemon calls :meth:`UsageStore.record` once per finished job; ``dispatcher usage``
reads the same file with :func:`read_rows` while the daemon writes it, and the
client budgets read :meth:`UsageStore.spent_today`.

Days are UTC days of the wall clock (``YYYY-MM-DD``), the same days a client's
``daily_tokens`` is counted in. Days more than ``keep_days`` before today are
deleted at ``open`` and then once a day by ``run``.

Resource handling: one SQLite connection in WAL mode, used only under a lock
(from worker threads once ``run`` is going). ``record`` only adds to an
in-memory dict of pending aggregates (no I/O on the hot path); ``run`` commits
them every ``COMMIT_S`` in one transaction (group commit, one upsert per key),
so a crash loses at most that interval of accounting. ``path=None`` keeps
everything in an in-memory database, for tests and a daemon without a state dir.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Final

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from dispatcher.core.budgets import utc_day

log = structlog.get_logger("dispatcher.usage")

USAGE_FILE: Final = "usage.sqlite3"
"""The file's name in ``state_dir``."""
COMMIT_S: Final = 1.0
DAY_S: Final = 86_400.0
SCHEMA_VERSION: Final = 1
GROUP_KEYS: Final = ("client", "provider", "class", "day")
"""What ``rows`` may group by; ``class`` is the task class the job was routed as."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day               TEXT NOT NULL,      -- the UTC day, YYYY-MM-DD
    client            TEXT NOT NULL,
    provider          TEXT NOT NULL,
    class             TEXT NOT NULL,
    jobs              INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens      INTEGER NOT NULL,
    cached            INTEGER NOT NULL,   -- jobs answered from the cache
    attempts          INTEGER NOT NULL,
    latency_ms        REAL NOT NULL,      -- summed; divide by jobs for the mean
    PRIMARY KEY (day, client, provider, class)
) WITHOUT ROWID;
"""

_UPSERT = (
    "INSERT INTO usage (day, client, provider, class, jobs, prompt_tokens, completion_tokens,"
    " total_tokens, cached, attempts, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT(day, client, provider, class) DO UPDATE SET"
    " jobs = jobs + excluded.jobs,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " total_tokens = total_tokens + excluded.total_tokens,"
    " cached = cached + excluded.cached,"
    " attempts = attempts + excluded.attempts,"
    " latency_ms = latency_ms + excluded.latency_ms"
)

_SUMS = (
    "SUM(jobs), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens),"
    " SUM(cached), SUM(attempts), SUM(latency_ms)"
)

# (day, client, provider, class): the key of one stored aggregate.
_Key = tuple[str, str, str, str]
_KEY_INDEX: Final = {"day": 0, "client": 1, "provider": 2, "class": 3}


class UsageRow(msgspec.Struct, frozen=True, kw_only=True):
    """One group of the usage report; a key not grouped by is None."""

    client: str | None = None
    provider: str | None = None
    class_: str | None = msgspec.field(default=None, name="class")
    day: str | None = None
    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached: int = 0
    attempts: int = 0
    latency_ms: float = 0.0


@dataclass(slots=True)
class _Totals:
    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached: int = 0
    attempts: int = 0
    latency_ms: float = 0.0

    def add(self, other: _Totals) -> None:
        self.jobs += other.jobs
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cached += other.cached
        self.attempts += other.attempts
        self.latency_ms += other.latency_ms


def oldest_kept(today: str, keep_days: int) -> str:
    """The first day still kept: ``keep_days`` before ``today``."""
    return (datetime.date.fromisoformat(today) - datetime.timedelta(days=keep_days)).isoformat()


def check_by(by: Iterable[str]) -> tuple[str, ...]:
    """The grouping keys, in the order given, each once; ValueError names a wrong one."""
    keys: list[str] = []
    for key in by:
        if key not in _KEY_INDEX:
            raise ValueError(
                f"cannot group usage by {key!r}; expected any of {', '.join(GROUP_KEYS)}"
            )
        if key not in keys:
            keys.append(key)
    return tuple(keys)


class UsageStore:
    """``__init__`` does no I/O; ``open`` creates or opens the file (memory only when
    ``path`` is None)."""

    def __init__(
        self,
        path: Path | None,
        *,
        keep_days: int = 90,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.keep_days = keep_days
        self._wall = wall
        self._db: sqlite3.Connection | None = None
        # _db_lock: the connection, held across I/O. _mem_lock: the dicts below, held
        # only for a few dict operations, so ``record`` never waits on the disk.
        self._db_lock = threading.Lock()
        self._mem_lock = threading.Lock()
        self._pending: dict[_Key, _Totals] = {}
        self._inflight: dict[_Key, _Totals] = {}  # taken by a commit, not yet in the file
        self._today = ""  # the day _today_tokens counts
        self._today_tokens: dict[str, int] = {}  # client -> total_tokens, committed + pending
        self._day_cache = (0.0, "")  # (its first second, the UTC day) of the latest _day_for
        self._pruned_day = ""  # the day of the last pruning
        self.commits = 0

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "memory"
        return f"<UsageStore {where} pending {len(self._pending)} commits {self.commits}>"

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Create or migrate the schema, drop days past ``keep_days``, load today's totals."""
        if self.path is None:
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
        _migrate(db)
        today = self._day_for(self._wall())
        with self._db_lock:
            self._prune(db, today)
            committed = db.execute(
                "SELECT client, SUM(total_tokens) FROM usage WHERE day = ? GROUP BY client",
                (today,),
            ).fetchall()
        with self._mem_lock:
            tokens: dict[str, int] = {str(client): int(total) for client, total in committed}
            for (day, client, _, _), totals in self._pending.items():
                if day == today:
                    tokens[client] = tokens.get(client, 0) + totals.total_tokens
            self._today, self._today_tokens = today, tokens
        self._db = db
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)

    def close(self) -> None:
        """Commit what is pending, then close the file."""
        if self._db is not None:
            self._commit()
            with self._db_lock:
                self._db.close()
            self._db = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit the pending aggregates every ``COMMIT_S``, until cancelled.

        Days past ``keep_days`` are deleted with the first commit of each new day.

        Error handling: a failed commit (a full or read-only disk) is logged and its
        aggregates kept for the next try; what ``spent_today`` answers is never affected.
        On cancellation what is pending is committed (shielded) before the task ends.
        """
        task_status.started()
        try:
            while True:
                await anyio.sleep(COMMIT_S)
                if self._pending or self._day_for(self._wall()) != self._pruned_day:
                    await anyio.to_thread.run_sync(self._commit)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._commit)

    # -- what the daemon records (no I/O) ------------------------------------------------

    def record(
        self,
        *,
        client: str,
        provider: str,
        klass: str,
        prompt_tokens: int,
        completion_tokens: int,
        total_tokens: int,
        cached: bool,
        attempts: int,
        latency_ms: float,
    ) -> None:
        """Add one finished job to its day's aggregate (the UTC day of now)."""
        day = self._day_for(self._wall())
        key = (day, client, provider, klass)
        with self._mem_lock:
            totals = self._pending.get(key)
            if totals is None:
                totals = self._pending[key] = _Totals()
            totals.jobs += 1
            totals.prompt_tokens += prompt_tokens
            totals.completion_tokens += completion_tokens
            totals.total_tokens += total_tokens
            totals.cached += cached
            totals.attempts += attempts
            totals.latency_ms += latency_ms
            if day != self._today:
                self._today, self._today_tokens = day, {}
            self._today_tokens[client] = self._today_tokens.get(client, 0) + total_tokens

    def spent_today(self, client: str) -> int:
        """The client's total tokens of today's UTC day: committed (restored on open) and pending."""
        day = self._day_for(self._wall())
        with self._mem_lock:
            return self._today_tokens.get(client, 0) if day == self._today else 0

    # -- the report ------------------------------------------------------------------------

    def rows(
        self, *, since: datetime.date | None = None, by: Sequence[str] = ("client",)
    ) -> list[UsageRow]:
        """Committed and pending aggregates from ``since`` (a UTC day, inclusive) on,
        grouped by ``by`` (any of :data:`GROUP_KEYS`) and sorted by them.

        Blocking when the store has a file (it reads it): in the daemon, call it from a
        worker thread.
        """
        keys = check_by(by)
        first = since.isoformat() if since is not None else None
        with self._db_lock:
            grouped = _select(self._db, first, keys) if self._db is not None else {}
            with self._mem_lock:
                unsaved = [
                    (key, _Totals(*astuple(totals)))
                    for source in (self._inflight, self._pending)
                    for key, totals in source.items()
                ]
        for key, totals in unsaved:
            if first is None or key[0] >= first:
                group = tuple(key[_KEY_INDEX[name]] for name in keys)
                grouped.setdefault(group, _Totals()).add(totals)
        return _to_rows(grouped, keys)

    # -- writing ---------------------------------------------------------------------------

    def _commit(self) -> None:
        """Write what is pending in one transaction, and prune once a day (blocking)."""
        with self._db_lock:
            db = self._db
            if db is None:
                return
            with self._mem_lock:
                batch, self._pending = self._pending, {}
                self._inflight = batch
            today = self._day_for(self._wall())
            if not batch and today == self._pruned_day:
                return
            try:
                db.execute("BEGIN")
                db.executemany(_UPSERT, [(*key, *astuple(t)) for key, t in batch.items()])
                self._prune(db, today)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                self._pruned_day = ""
                with self._mem_lock:
                    self._inflight = {}
                    for key, totals in batch.items():
                        self._pending.setdefault(key, _Totals()).add(totals)
                log.error("usage.commit_failed", error=str(exc), path=str(self.path))
                return
            with self._mem_lock:
                self._inflight = {}
            self.commits += 1

    def _prune(self, db: sqlite3.Connection, today: str) -> None:
        """Delete the days before ``keep_days`` ago (under ``_db_lock``)."""
        if today == self._pruned_day:
            return
        deleted = db.execute(
            "DELETE FROM usage WHERE day < ?", (oldest_kept(today, self.keep_days),)
        ).rowcount
        self._pruned_day = today
        if deleted:
            log.info("usage.pruned", rows=deleted, keep_days=self.keep_days)

    def _day_for(self, wall: float) -> str:
        """The UTC day of ``wall``, recomputed only when the day changes."""
        start, day = self._day_cache  # one tuple: read and replaced atomically across threads
        if not start <= wall < start + DAY_S:
            day = utc_day(wall)
            self._day_cache = ((wall // DAY_S) * DAY_S, day)  # POSIX days are 86,400 s exactly
        return day


# -- reading -------------------------------------------------------------------------------


def read_rows(
    path: Path, *, since: datetime.date | None = None, by: Sequence[str] = ("client",)
) -> list[UsageRow]:
    """The committed aggregates of a usage file, as :meth:`UsageStore.rows` groups them.

    Opens the file read-only, so it is safe while a daemon writes it; a missing file
    has no rows. ``sqlite3.Error`` or ``OSError`` (a file this user may not read, or
    not a database) is the caller's to report.
    """
    keys = check_by(by)
    if not path.exists():
        return []
    uri = f"{path.resolve().as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
        ).fetchone()
        if exists is None:  # created by a daemon that has not written its schema yet
            return []
        grouped = _select(db, since.isoformat() if since is not None else None, keys)
    finally:
        db.close()
    return _to_rows(grouped, keys)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`; later versions only ever add columns."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version < SCHEMA_VERSION:
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _select(
    db: sqlite3.Connection, since: str | None, keys: tuple[str, ...]
) -> dict[tuple[str, ...], _Totals]:
    columns = ", ".join(f'"{key}"' for key in keys)
    select = f"SELECT {columns}, {_SUMS}" if keys else f"SELECT {_SUMS}"
    where, args = ("WHERE day >= ?", (since,)) if since is not None else ("", ())
    group = f"GROUP BY {columns}" if keys else ""
    grouped: dict[tuple[str, ...], _Totals] = {}
    for row in db.execute(f"{select} FROM usage {where} {group}", args):
        *names, jobs, prompt, completion, total, cached, attempts, latency = row
        if jobs is None:  # no keys and no rows: SUM over nothing
            continue
        grouped[tuple(str(name) for name in names)] = _Totals(
            int(jobs),
            int(prompt),
            int(completion),
            int(total),
            int(cached),
            int(attempts),
            float(latency),
        )
    return grouped


def _to_rows(grouped: Mapping[tuple[str, ...], _Totals], keys: tuple[str, ...]) -> list[UsageRow]:
    rows = []
    for group in sorted(grouped):
        t = grouped[group]
        names = dict(zip(keys, group, strict=True))
        rows.append(
            UsageRow(
                client=names.get("client"),
                provider=names.get("provider"),
                class_=names.get("class"),
                day=names.get("day"),
                jobs=t.jobs,
                prompt_tokens=t.prompt_tokens,
                completion_tokens=t.completion_tokens,
                total_tokens=t.total_tokens,
                cached=t.cached,
                attempts=t.attempts,
                latency_ms=t.latency_ms,
            )
        )
    return rows
