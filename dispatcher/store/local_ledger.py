"""The local limits ledger: a key's spends, quota use, blocks and learned limits, kept on disk.

The limits themselves live in memory (``ProviderLimits``, which planning reads);
this ledger writes down what they are made of, so a restart, or a crash loop
under systemd, remembers the minute's spend instead of sending into a spent
window. What it keeps, in ``state_dir/limits.sqlite3`` beside the journal:

- the send times of the trailing rpm window (rows older than two minutes go);
- the daily-quota charges of the trailing day;
- Retry-After blocks still in force;
- learned limits, with where they came from.

Times are wall-clock seconds: a monotonic clock means nothing across a restart.
:meth:`LocalLedger.restore` turns them back into the scheduler's monotonic time
before the daemon reports READY, so replayed and new jobs see the same spend.

Resource handling: one SQLite connection used only from worker threads under a
lock. The ``record_*`` methods only append to a buffer (no I/O on the hot path);
``run`` commits what was buffered every ``COMMIT_EVERY_S`` in one transaction
(group commit), so a crash loses at most that interval. The planner already
counts a token as spent until 61 s after use, and the window kept here is the
same, so the guard holds after a restart too.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from dispatcher.core.limits import LearnedLimit
from dispatcher.core.provider_state import RPM_WINDOW_S, ProviderLimits

log = structlog.get_logger("dispatcher.ledger")

COMMIT_EVERY_S = 0.25
KEEP_SPENDS_S = 2 * RPM_WINDOW_S
DAY_S = 86_400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (provider TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS spends_at ON spends(at);
CREATE TABLE IF NOT EXISTS charges (provider TEXT NOT NULL, at REAL NOT NULL, tokens INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS charges_at ON charges(at);
CREATE TABLE IF NOT EXISTS blocks (provider TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS learned (
    provider TEXT PRIMARY KEY, rpm INTEGER, concurrency INTEGER,
    source TEXT NOT NULL, at REAL NOT NULL, confirmed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(slots=True)
class _Pending:
    spends: list[tuple[str, float]] = field(default_factory=list)
    charges: list[tuple[str, float, int]] = field(default_factory=list)
    blocks: dict[str, float] = field(default_factory=dict)
    learned: dict[str, tuple[int | None, int | None, str, float, int]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.spends or self.charges or self.blocks or self.learned or self.meta)


@dataclass(slots=True)
class Snapshot:
    """What the ledger held at start, in wall-clock seconds."""

    spends: dict[str, list[float]] = field(default_factory=dict)
    charges: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    blocks: dict[str, float] = field(default_factory=dict)
    learned: dict[str, tuple[int | None, int | None, str, float, bool]] = field(
        default_factory=dict
    )
    meta: dict[str, str] = field(default_factory=dict)


class LocalLedger:
    """``__init__`` does no I/O; ``open`` creates or opens the file."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending = _Pending()
        self.commits = 0

    def __repr__(self) -> str:
        return f"<LocalLedger {self.path} commits {self.commits}>"

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._commit_pending()
                self._db.close()
            self._db = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit what was recorded every ``COMMIT_EVERY_S``, until cancelled.

        Error handling: a failed commit (a full or read-only disk) is logged and
        its rows kept for the next try; limits in memory are never affected.
        On cancellation the last rows are committed before the task ends.
        """
        task_status.started()
        try:
            while True:
                await anyio.sleep(COMMIT_EVERY_S)
                if self._pending:
                    await anyio.to_thread.run_sync(self._commit_locked)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._commit_locked)

    # -- what the scheduler records (no I/O) -----------------------------------------------

    def spent(self, provider: str) -> None:
        self._pending.spends.append((provider, self._wall()))

    def charged(self, provider: str, tokens: int) -> None:
        if tokens:
            self._pending.charges.append((provider, self._wall(), tokens))

    def blocked(self, provider: str, for_s: float) -> None:
        if for_s > 0:
            self._pending.blocks[provider] = self._wall() + for_s

    def learned(self, provider: str, learned: LearnedLimit, *, age_s: float) -> None:
        """A learned limit, observed ``age_s`` seconds ago."""
        self._pending.learned[provider] = (
            learned.rpm,
            learned.concurrency,
            learned.source,
            self._wall() - age_s,
            int(learned.confirmed),
        )

    def remember(self, key: str, value: str) -> None:
        self._pending.meta[key] = value

    # -- restart ---------------------------------------------------------------------------

    def load(self) -> Snapshot:
        """What is still in force now (blocking; call from a worker thread)."""
        db = self._require_db()
        now = self._wall()
        snap = Snapshot()
        with self._lock:
            for provider, at in db.execute(
                "SELECT provider, at FROM spends WHERE at > ? ORDER BY at", (now - RPM_WINDOW_S,)
            ):
                snap.spends.setdefault(provider, []).append(at)
            for provider, at, tokens in db.execute(
                "SELECT provider, at, tokens FROM charges WHERE at > ? ORDER BY at", (now - DAY_S,)
            ):
                snap.charges.setdefault(provider, []).append((at, tokens))
            snap.blocks = dict(
                db.execute("SELECT provider, until FROM blocks WHERE until > ?", (now,)).fetchall()
            )
            for provider, rpm, concurrency, source, at, confirmed in db.execute(
                "SELECT provider, rpm, concurrency, source, at, confirmed FROM learned"
            ):
                snap.learned[provider] = (rpm, concurrency, source, at, bool(confirmed))
            snap.meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        return snap

    def restore(
        self, snap: Snapshot, limits: Mapping[str, ProviderLimits], *, now: float
    ) -> dict[str, int]:
        """Put the snapshot back into the live limits, ``now`` being the scheduler's monotonic
        time; returns the sends restored per provider, for the start-up log."""
        offset = now - self._wall()  # monotonic = wall + offset
        restored: dict[str, int] = {}
        for name, state in limits.items():
            # Learned limits first: a bucket with no rate yet would not count the spends.
            if name in snap.learned:
                rpm, concurrency, source, at, confirmed = snap.learned[name]
                state.restore_learned(
                    LearnedLimit(
                        rpm=rpm,
                        concurrency=concurrency,
                        source=source,
                        at=at + offset,
                        confirmed=confirmed,
                    )
                )
            for at, tokens in snap.charges.get(name, ()):
                if state.daily is not None:
                    state.daily.spend(at + offset, tokens)
            for at in snap.spends.get(name, ()):
                state.bucket.take(at + offset)
                state.sent.add(at + offset)
            if name in snap.spends:
                restored[name] = len(snap.spends[name])
            if name in snap.blocks:
                state.block(snap.blocks[name] + offset)
        return restored

    # -- writing ---------------------------------------------------------------------------

    def _commit_locked(self) -> None:
        with self._lock:
            self._commit_pending()

    def _commit_pending(self) -> None:
        if self._db is None or not self._pending:
            return
        pending, self._pending = self._pending, _Pending()
        now = self._wall()
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany("INSERT INTO spends VALUES (?, ?)", pending.spends)
            db.executemany("INSERT INTO charges VALUES (?, ?, ?)", pending.charges)
            db.executemany(
                "INSERT INTO blocks VALUES (?, ?) ON CONFLICT(provider) DO UPDATE SET"
                " until = max(until, excluded.until)",
                pending.blocks.items(),
            )
            db.executemany(
                "INSERT OR REPLACE INTO learned VALUES (?, ?, ?, ?, ?, ?)",
                [(name, *row) for name, row in pending.learned.items()],
            )
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", pending.meta.items())
            db.execute("DELETE FROM spends WHERE at <= ?", (now - KEEP_SPENDS_S,))
            db.execute("DELETE FROM charges WHERE at <= ?", (now - DAY_S,))
            db.execute("DELETE FROM blocks WHERE until <= ?", (now,))
            db.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._requeue(pending)
            log.error("ledger.commit_failed", error=str(exc), path=str(self.path))

    def _requeue(self, pending: _Pending) -> None:
        newer, self._pending = self._pending, pending
        self._pending.spends += newer.spends
        self._pending.charges += newer.charges
        self._pending.blocks.update(newer.blocks)
        self._pending.learned.update(newer.learned)
        self._pending.meta.update(newer.meta)

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the ledger is not open")
        return self._db
