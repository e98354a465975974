"""The durable job journal: SQLite in WAL mode, written by one task with group commit.

What is journaled: jobs that must outlive their connection, that is detached
jobs and jobs submitted with an idempotency ``key``. A job row is committed
before ``accepted`` is sent; its final answer is committed before it is
delivered. On start the daemon replays unfinished rows before it reports ready.

Resource handling: one SQLite connection, used only from worker threads under
a lock; ``run`` owns the writer loop: it takes every pending write from a
bounded stream, commits them in one transaction in a thread, then releases
their waiters. Finished rows older than ``keep_s`` are deleted and the WAL
checkpointed every ``COMPACT_EVERY_S``, so the file never grows without bound.

Durability: with ``synchronous = "normal"`` (the default) a committed job
survives a crash or SIGKILL of the daemon; a power loss may lose the last
transactions before the OS flushed them (never corrupting the file). With
``"full"`` every commit is flushed to the disk before ``accepted`` goes out.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from dispatcher.contract.protocol import ChatRequest, EmbedRequest, Error, JobRequest, Result
from dispatcher.scheduler.job import Job

log = structlog.get_logger("dispatcher.journal")

BATCH_MAX = 2048  # writes per transaction at most
PENDING_MAX = 65_536  # writes waiting for the writer; past it submitters wait
COMPACT_EVERY_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    uid         INTEGER NOT NULL,
    key         TEXT,
    digest      TEXT NOT NULL,
    request     BLOB NOT NULL,
    state       TEXT NOT NULL,          -- accepted | done | failed
    outcome     BLOB,
    accepted_at REAL NOT NULL,          -- epoch seconds
    finished_at REAL,
    client      TEXT                    -- "client:NAME" when a [clients] entry sent it
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs(uid, key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(state) WHERE state = 'accepted';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
"""

_request_decoder = msgspec.json.Decoder(ChatRequest | EmbedRequest)
_outcome_decoder = msgspec.json.Decoder(Result | Error)
_encoder = msgspec.json.Encoder()


class StoredJob(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    uid: int
    key: str | None
    digest: str
    request: JobRequest
    state: str
    outcome: Result | Error | None
    client: str | None = None  # the named client that sent it, so a replay is still its job


_COLUMNS = "id, uid, key, digest, request, state, outcome, accepted_at, finished_at, client"
_VALUES = "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ACCEPT = f"INSERT INTO jobs ({_COLUMNS}) {_VALUES} ON CONFLICT(id) DO NOTHING"
# An upsert: an answer found at once (a cache hit) may reach the writer before its
# accept did; that later accept then does nothing.
_FINISH = (
    f"INSERT INTO jobs ({_COLUMNS}) {_VALUES}"
    " ON CONFLICT(id) DO UPDATE SET state = excluded.state,"
    " outcome = excluded.outcome, finished_at = excluded.finished_at, key = excluded.key"
)


def _row(job: Job, now: float) -> tuple[object, ...]:
    """The job's row as it stands: accepted, or finished with its answer."""
    outcome = job.outcome
    if outcome is None:
        state, blob, finished = "accepted", None, None
    else:
        state = "done" if isinstance(outcome, Result) else "failed"
        blob, finished = _encoder.encode(job.reply(job.request.id)), now
    key = None if job.key_released else job.request.key
    request = _encoder.encode(job.request)
    client = job.client if job.client.startswith("client:") else None
    return (job.id, job.uid, key, job.digest, request, state, blob, now, finished, client)


@dataclass(slots=True)
class _Write:
    kind: Literal["accept", "finish"]
    job: Job
    done: Callable[[], None]


class Journal:
    """``__init__`` does no I/O; ``open`` creates or opens the file."""

    def __init__(
        self,
        path: Path,
        *,
        keep_s: float = 86_400.0,
        synchronous: Literal["normal", "full"] = "normal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.keep_s = keep_s
        self.synchronous = synchronous
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._send, self._receive = anyio.create_memory_object_stream[_Write](PENDING_MAX)
        self.commits = 0
        self.rows_written = 0

    def __repr__(self) -> str:
        pending = self._send.statistics().current_buffer_used
        return f"<Journal {self.path} pending {pending} commits {self.commits}>"

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if "client" not in columns:  # a journal written before clients were kept
            db.execute("ALTER TABLE jobs ADD COLUMN client TEXT")
        self._db = db
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)  # requests may be private; only the daemon reads them

    def close(self) -> None:
        self._send.close()
        self._receive.close()
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer loop: group commit of everything pending, then compaction now and then."""
        task_status.started()
        last_compact = self._clock()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_loop)
            while True:
                await anyio.sleep(COMPACT_EVERY_S)
                if self._clock() - last_compact >= COMPACT_EVERY_S:
                    deleted = await anyio.to_thread.run_sync(self.compact)
                    last_compact = self._clock()
                    if deleted:
                        log.info("journal.compacted", deleted=deleted)

    async def _write_loop(self) -> None:
        async for first in self._receive:
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            # Shielded: a batch that reached SQLite is finished and its waiters told,
            # even when shutdown cancels the loop meanwhile.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._commit, batch)
                for write in batch:
                    write.done()

    # -- writes ------------------------------------------------------------------------

    async def accept(self, job: Job) -> None:
        """Queue the job's row; returns once it is committed (``job.persisted`` is set then).

        A caller cancelled before the row is queued leaves no trace; once queued, the
        row is committed and ``persisted`` set whether or not the caller still waits.
        """
        await self._send.send(_Write("accept", job, job.persisted.set))
        await job.persisted.wait()

    def finish(self, job: Job) -> None:
        """Queue the final answer; the job is delivered (``done`` set) once it is committed."""
        try:
            self._send.send_nowait(_Write("finish", job, job.done.set))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Never hold an answer back: deliver it, the row stays "accepted" and is
            # replayed after a restart (an upstream duplicate, not a lost job).
            log.warning("journal.finish_unrecorded", job=job.id)
            job.done.set()

    def _commit(self, batch: list[_Write]) -> None:
        """One transaction for the whole batch, its writes applied in the order queued
        (a key freed by one job's failure may be taken by the next job in the batch)."""
        now = self._clock()
        db = self._require_db()
        with self._lock:
            db.execute("BEGIN")
            try:
                for kind, writes in itertools.groupby(batch, key=lambda w: w.kind):
                    rows = [_row(write.job, now) for write in writes]
                    db.executemany(_ACCEPT if kind == "accept" else _FINISH, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.commits += 1
        self.rows_written += len(batch)

    def compact(self) -> int:
        """Delete finished rows older than ``keep_s`` and truncate the WAL."""
        db = self._require_db()
        with self._lock:
            cursor = db.execute(
                "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                (self._clock() - self.keep_s,),
            )
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return cursor.rowcount

    # -- reads -------------------------------------------------------------------------

    def unfinished(self) -> list[StoredJob]:
        """Every accepted job without a final answer, oldest first (replay on start)."""
        return self._select("WHERE state = 'accepted' ORDER BY accepted_at", ())

    def keyed(self) -> list[tuple[int, str, str, str]]:
        """(uid, key, digest, job id) of every keyed job still in the journal."""
        db = self._require_db()
        with self._lock:
            rows = db.execute(
                "SELECT uid, key, digest, id FROM jobs WHERE key IS NOT NULL"
            ).fetchall()
        return [(int(u), str(k), str(d), str(i)) for u, k, d, i in rows]

    def lookup(self, job_id: str) -> StoredJob | None:
        found = self._select("WHERE id = ?", (job_id,))
        return found[0] if found else None

    def _select(self, where: str, args: tuple[object, ...]) -> list[StoredJob]:
        db = self._require_db()
        with self._lock:
            rows = db.execute(
                f"SELECT id, uid, key, digest, request, state, outcome, client FROM jobs {where}",
                args,
            ).fetchall()
        return [
            StoredJob(
                id=row[0],
                uid=row[1],
                key=row[2],
                digest=row[3],
                request=_request_decoder.decode(row[4]),
                state=row[5],
                outcome=_outcome_decoder.decode(row[6]) if row[6] is not None else None,
                client=row[7],
            )
            for row in rows
        ]

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the journal is not open")
        return self._db
