"""Answers shared across hosts: the response and embedding caches behind Redis.

With ``[cache] redis_url``, each daemon keeps its local caches in front (memory for
chat answers, ``state_dir/embeddings.sqlite3`` for vectors) and Redis behind them: a
job the local caches miss is looked up in Redis before it is queued
(:meth:`RedisCache.lookup`, one round trip for all its keys, at most ``timeout_s``),
and every answer a daemon caches locally is also written to Redis
(:meth:`RedisCache.put`, buffered and sent in one pipeline per ``FLUSH_S`` by
:meth:`RedisCache.run`, never on a job's path).

Keys: ``{prefix}:answer:<cache key>`` holds a chat Result as JSON with the response
cache's ``ttl_s``; ``{prefix}:vector:<text key hex>`` a vector as float32 bytes with
``embed_ttl_s``. Both keys already carry the owner partition, so ``[cache] shared =
false`` holds across hosts too.

Error handling: Redis unreachable, slow or confused is a miss, never a failed job and
never a hang: every lookup has a deadline, after a failure lookups are skipped for
``RETRY_S`` (so a frozen Redis costs one timeout a second, not one a job), and a
write that fails is dropped (the answer is still in the local cache). The first failure after a success is logged
once; ``mode`` says whether the last call reached Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from dispatcher.contract.protocol import Result
from dispatcher.store.embed_cache import pack_vector, unpack_vector

log = structlog.get_logger("dispatcher.redis_cache")

FLUSH_S = 0.1  # buffered writes go to Redis this often
RETRY_S = 1.0  # after a failed call, lookups are skipped (misses) this long
MAX_PENDING = 10_000  # buffered writes at most; past it the oldest are dropped (a cache)
_UNAVAILABLE = (RedisError, OSError, TimeoutError)

_result_decoder = msgspec.json.Decoder(Result)
_encoder = msgspec.json.Encoder()


class RedisCache:
    """The shared tier of both caches. ``__init__`` does no I/O; :meth:`run` owns the client."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "dispatcher",
        ttl_s: float = 3600.0,
        embed_ttl_s: float = 30 * 86_400.0,
        timeout_s: float = 0.1,
    ) -> None:
        self._url = url
        self._prefix = key_prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._embed_ttl_ms = max(1, int(embed_ttl_s * 1000))
        self._timeout_s = timeout_s
        self._client: Redis | None = None
        self._pending: dict[str, tuple[bytes, int]] = {}  # key -> (value, ttl ms)
        self._wake = anyio.Event()
        self.mode: Literal["shared", "unavailable"] = "unavailable"
        self._failed_logged = False
        self._retry_at = -1.0  # anyio time before which lookups are not tried
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"<RedisCache {self.mode} pending {len(self._pending)} hits {self.hits}>"

    @property
    def paused_until(self) -> float:
        """The anyio time until which lookups skip Redis after a failure."""
        return self._retry_at

    # -- keys --------------------------------------------------------------------------

    def answer_key(self, cache_key: str) -> str:
        return f"{self._prefix}:answer:{cache_key}"

    def vector_key(self, text_key: bytes) -> str:
        return f"{self._prefix}:vector:{text_key.hex()}"

    # -- the contract ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write buffered answers to Redis until cancelled; report started at once.

        Resource handling: the Redis client (a pool) is created here and closed on the
        way out, after a last flush of what is buffered, each with a short shielded
        deadline. Error handling: a failed write drops that batch
        and logs once; only a malformed ``url`` raises (before started).
        """
        client = Redis.from_url(
            self._url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = client
        try:
            task_status.started()
            while True:
                with anyio.move_on_after(FLUSH_S * 10):
                    await self._wake.wait()
                self._wake = anyio.Event()
                await anyio.sleep(FLUSH_S)  # let a burst of answers share one pipeline
                await self._flush(client)
        finally:
            self._client = None
            with anyio.CancelScope(shield=True):
                await self._flush(client)  # bounded by its own deadline
                with anyio.move_on_after(self._timeout_s):
                    await client.aclose()

    async def lookup(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values Redis holds for ``keys`` (one MGET), within ``timeout_s``; {} on any trouble."""
        client = self._client
        if client is None or not keys:
            return {}
        if anyio.current_time() < self._retry_at:  # a frozen Redis costs a timeout a second
            self.misses += len(keys)
            return {}
        try:
            with anyio.fail_after(self._timeout_s):
                values = await client.mget(list(keys))
        except _UNAVAILABLE as exc:
            self._failed(exc)
            return {}
        self._reached()
        found = {
            key: value if isinstance(value, bytes) else str(value).encode()
            for key, value in zip(keys, values, strict=True)
            if value
        }
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_answer(self, cache_key: str, result: Result) -> None:
        self._put(self.answer_key(cache_key), _encoder.encode(result), self._ttl_ms)

    def put_vector(self, text_key: bytes, vector: Sequence[float]) -> None:
        self._put(self.vector_key(text_key), pack_vector(vector), self._embed_ttl_ms)

    @staticmethod
    def answer(value: bytes) -> Result | None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            return _result_decoder.decode(value)
        return None  # another version's shape, or junk: a miss

    @staticmethod
    def vector(value: bytes) -> list[float] | None:
        if len(value) % 4:
            return None
        return unpack_vector(value)

    # -- inside ----------------------------------------------------------------------

    def _put(self, key: str, value: bytes, ttl_ms: int) -> None:
        pending = self._pending
        pending.pop(key, None)
        pending[key] = (value, ttl_ms)
        while len(pending) > MAX_PENDING:
            del pending[next(iter(pending))]
        self._wake.set()

    async def _flush(self, client: Redis) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        pipe = client.pipeline(transaction=False)
        for key, (value, ttl_ms) in batch.items():
            pipe.set(key, value, px=ttl_ms)
        try:
            with anyio.fail_after(self._timeout_s * 5):
                await pipe.execute()
        except _UNAVAILABLE as exc:
            self._failed(exc)
            return
        self._reached()

    def _failed(self, exc: BaseException) -> None:
        self.mode = "unavailable"
        self._retry_at = anyio.current_time() + RETRY_S
        if not self._failed_logged:
            self._failed_logged = True
            reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            log.warning("redis_cache.unavailable", reason=reason, detail="a miss, not a failure")

    def _reached(self) -> None:
        if self.mode != "shared":
            self.mode = "shared"
            if self._failed_logged:
                log.info("redis_cache.shared")
            self._failed_logged = False
