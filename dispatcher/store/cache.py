"""The response cache: successful answers kept for ``ttl_s``, bounded by bytes, LRU.

The key is everything that shapes an answer: the whole request but the fields
that only say how to deliver it (id, key, detach, priority, timeout_s, cache),
and the task class. So messages, max_tokens, temperature, thinking, tools,
tool_choice, response_format, seed, stop, the penalties, extra and any pinned
providers all count (the seed's cache keyed only provider and prompt, so a
10-token answer came back for a 2,000-token request).

What is cached: chat answers that are deterministic
(``temperature = 0``, or a ``seed``); any other chat job only when it asks
with ``cache: true``, since a second sample is a different answer. ``cache: false``
never touches it. Failures are never cached. Streamed requests are not served
from the cache: their client wants chunks as they are made. Embeddings are cached
per text instead, on disk (:mod:`dispatcher.store.embed_cache`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from dispatcher.contract.protocol import EmbedRequest, JobRequest, Result

_encoder = msgspec.json.Encoder(order="deterministic")


class CacheKey(msgspec.Struct, frozen=True, array_like=True):
    klass: str
    request: JobRequest
    owner: str | None = None


def cache_key(request: JobRequest, klass: str, *, owner: str | None = None) -> str | None:
    """The request's cache key, or None when it must not be served from the cache.

    ``owner`` partitions the cache (a Unix user, a client): a hit must never tell one
    user what another asked. None shares it (``[cache] shared = true``).
    """
    if request.cache is False or not cacheable(request):
        return None
    return _digest(request, klass, owner)


def flight_key(request: JobRequest, klass: str, *, owner: str | None = None) -> str | None:
    """The key under which identical requests in flight share one call: the cache key,
    streamed requests included (the stream flag is part of it), or None."""
    if request.cache is False or isinstance(request, EmbedRequest):
        return None
    if not (request.cache is True or request.temperature == 0 or request.seed is not None):
        return None
    return _digest(request, klass, owner)


def _digest(request: JobRequest, klass: str, owner: str | None) -> str:
    shaping = msgspec.structs.replace(
        request, id="-", key=None, detach=False, priority=0, timeout_s=None, cache=None
    )
    return hashlib.sha256(_encoder.encode(CacheKey(klass, shaping, owner))).hexdigest()


def cacheable(request: JobRequest) -> bool:
    """Whether the answer may be reused: asked for, or the same request gives the same answer."""
    if isinstance(request, EmbedRequest):
        return True
    if request.stream:
        return False
    return request.cache is True or request.temperature == 0 or request.seed is not None


def _size(result: Result) -> int:
    size = 256 + len(result.content or "") + len(result.reasoning or "")
    if result.embeddings:
        size += sum(len(vector) for vector in result.embeddings) * 8
    for call in result.tool_calls or ():
        size += 64 + len(call.id) + len(call.function.name) + len(call.function.arguments)
    return size


class ResponseCache:
    """``get``/``put`` by key; entries expire after ``ttl_s``; the total stays under ``max_bytes``."""

    def __init__(
        self, *, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, int, Result]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"<ResponseCache {len(self._entries)} entries {self.bytes}/{self.max_bytes} bytes>"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Result | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[2]

    def put(self, key: str, result: Result) -> None:
        size = _size(result)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self.ttl_s, size, result)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, size, _ = self._entries.pop(key)
        self.bytes -= size
