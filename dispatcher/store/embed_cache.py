"""The per-text embedding cache: one vector per (provider model, owner, text), kept on disk.

Indexing is mostly texts seen before, so a job's texts are answered from here one by
one and only the unknown ones go upstream (:mod:`dispatcher.scheduler.batches`). It
lives in ``state_dir/embeddings.sqlite3`` beside the journal and survives restarts.

The key is a SHA-256 of the model, the owner and the text: the text itself is not
stored. Owners partition it like the response cache: an embedding is not a private
answer the way a chat reply is (it is a fixed function of the text), but a hit still
tells its asker that someone embedded the same text before, so with
``[cache] shared = false`` (the default) each Unix user or client has its own
entries; ``shared = true`` keys by model and text alone. A request with
``cache: false`` neither reads nor writes it. Vectors are stored as float32 bytes
(4 bytes a dimension, a quarter of JSON's size); vectors a cacheable job gets from
upstream are rounded the same way (:func:`as_stored`), so its answer does not depend on
whether a text was a hit.

Size: bounded by ``[cache] embed_max_bytes`` (the vectors' bytes); past it, the least
recently used entries go at the next commit.

Resource handling: one SQLite connection under a lock. ``get`` reads on the caller's
thread (one indexed ``SELECT`` per job, well under a millisecond for a hundred
texts); ``put`` and the recency of hits only go to a buffer, which ``run`` commits
every ``COMMIT_EVERY_S`` in one transaction from a worker thread (group commit), and
once more when it ends. Buffered vectors are read from the buffer, so a text is a hit
as soon as its answer came back. Error handling: a cache that cannot be opened, read
or written is a miss, never a failed job; failures are logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

log = structlog.get_logger("dispatcher.embed_cache")

COMMIT_EVERY_S = 0.25
_MAX_VARIABLES = 500  # keys per SELECT, under SQLite's variable limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    key BLOB PRIMARY KEY, vector BLOB NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_used ON vectors(used);
"""


def text_key(model: str, owner: str | None, text: str) -> bytes:
    """The cache key of one text: a hash of the model, the owner ("" when shared), the text."""
    digest = hashlib.sha256()
    for part in (model, owner or "", text):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.digest()


def as_stored(vector: Sequence[float]) -> list[float]:
    """``vector`` as the cache gives it back (float32 precision): a job answered in part from
    the cache and in part upstream gets the same numbers either way."""
    return unpack_vector(pack_vector(vector))


def pack_vector(vector: Sequence[float]) -> bytes:
    """A vector as float32 bytes, as both the embedding caches store it."""
    return array("f", vector).tobytes()


def unpack_vector(blob: bytes) -> list[float]:
    values = array("f")
    values.frombytes(blob)
    return values.tolist()


class EmbedCache:
    """``get``/``put`` by :func:`text_key`. ``__init__`` does no I/O; ``open`` opens the file
    (None: an in-memory database, which forgets on restart)."""

    def __init__(
        self, path: Path | None, *, max_bytes: int, wall: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._wall = wall
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._puts: dict[bytes, bytes] = {}
        self._touched: dict[bytes, float] = {}
        self.bytes = 0  # vector bytes on disk after the last commit
        self.entries = 0
        self.hits = 0  # texts answered from the cache
        self.misses = 0  # texts looked up and not found
        self.commits = 0

    def __repr__(self) -> str:
        return (
            f"<EmbedCache {self.entries} entries {self.bytes}/{self.max_bytes} bytes "
            f"pending {len(self._puts)}>"
        )

    @property
    def texts(self) -> int:
        """Vectors held, the ones still waiting for their commit included."""
        return self.entries + len(self._puts)

    @property
    def held_bytes(self) -> int:
        """Their bytes, the buffered ones included."""
        return self.bytes + sum(len(blob) for blob in self._puts.values())

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        target = ":memory:"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target = str(self.path)
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db
        self._count()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._commit_pending()
                self._db.close()
            self._db = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit what was buffered every ``COMMIT_EVERY_S``, and once more when cancelled."""
        task_status.started()
        try:
            while True:
                await anyio.sleep(COMMIT_EVERY_S)
                if self._puts or self._touched:
                    await anyio.to_thread.run_sync(self._commit_locked)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._commit_locked)

    # -- reading and writing -----------------------------------------------------------

    def get(self, keys: Sequence[bytes]) -> dict[bytes, list[float]]:
        """The vectors known for ``keys`` (a missing key is a miss); hits count as used now."""
        found: dict[bytes, list[float]] = {}
        wanted = []
        for key in dict.fromkeys(keys):
            blob = self._puts.get(key)
            if blob is not None:
                found[key] = unpack_vector(blob)
            else:
                wanted.append(key)
        if wanted and self._db is not None:
            try:
                with self._lock:
                    for start in range(0, len(wanted), _MAX_VARIABLES):
                        chunk = wanted[start : start + _MAX_VARIABLES]
                        marks = ",".join("?" * len(chunk))
                        rows = self._db.execute(
                            f"SELECT key, vector FROM vectors WHERE key IN ({marks})",
                            chunk,
                        )
                        for key, blob in rows:
                            found[key] = unpack_vector(blob)
            except sqlite3.Error as exc:
                log.error("embed_cache.read_failed", error=str(exc))
        now = self._wall()
        for key in found:
            self._touched[key] = now
        hits = sum(1 for key in keys if key in found)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    def put(self, key: bytes, vector: Sequence[float]) -> None:
        blob = pack_vector(vector)
        if len(blob) <= self.max_bytes:
            self._puts[key] = blob

    # -- committing --------------------------------------------------------------------

    def _commit_locked(self) -> None:
        with self._lock:
            self._commit_pending()

    def _commit_pending(self) -> None:
        if self._db is None or not (self._puts or self._touched):
            return
        puts, self._puts = self._puts, {}
        touched, self._touched = self._touched, {}
        now = self._wall()
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
                [(key, blob, len(blob), now) for key, blob in puts.items()],
            )
            db.executemany(
                "UPDATE vectors SET used = ? WHERE key = ?",
                [(at, key) for key, at in touched.items() if key not in puts],
            )
            self._count()
            if self.bytes > self.max_bytes:
                self._evict()
            db.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._puts = {**puts, **self._puts}
            log.error("embed_cache.commit_failed", error=str(exc), path=str(self.path))

    def _evict(self) -> None:
        """Drop the least recently used entries until the vectors fit ``max_bytes``."""
        assert self._db is not None
        excess = self.bytes - self.max_bytes
        doomed = []
        for key, size in self._db.execute("SELECT key, size FROM vectors ORDER BY used"):
            if excess <= 0:
                break
            doomed.append((key,))
            excess -= size
        self._db.executemany("DELETE FROM vectors WHERE key = ?", doomed)
        self._count()

    def _count(self) -> None:
        assert self._db is not None
        entries, size = self._db.execute("SELECT count(*), total(size) FROM vectors").fetchone()
        self.entries, self.bytes = int(entries), int(size)
