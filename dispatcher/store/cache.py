"""The response cache: successful answers kept for ``ttl_s``, bounded by bytes, LRU.

The key is everything that shapes an answer: the kind, the messages or inputs,
max_tokens, temperature, thinking, the task class and any pinned providers
(the seed's cache keyed only provider and prompt, so a 10-token answer came
back for a 2,000-token request). Failures are never cached. Streamed requests
are not served from the cache: their client wants chunks as they are made.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from dispatcher.contract.protocol import ChatRequest, EmbedRequest, JobRequest, Result

_encoder = msgspec.json.Encoder(order="deterministic")


class CacheKey(msgspec.Struct, frozen=True, array_like=True):
    kind: str
    klass: str
    providers: list[str] | None
    body: str | list[str] | list[dict[str, object]]
    max_tokens: int | None = None
    temperature: float | None = None
    thinking: bool = False


def cache_key(request: JobRequest, klass: str) -> str | None:
    """The request's cache key, or None when it must not be served from the cache."""
    if not request.cache:
        return None
    key: CacheKey
    if isinstance(request, ChatRequest):
        if request.stream:
            return None
        key = CacheKey(
            kind="chat",
            klass=klass,
            providers=request.providers,
            body=request.messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            thinking=request.thinking,
        )
    else:
        assert isinstance(request, EmbedRequest)
        key = CacheKey(kind="embed", klass=klass, providers=request.providers, body=request.input)
    return hashlib.sha256(_encoder.encode(key)).hexdigest()


def _size(result: Result) -> int:
    size = 256 + len(result.content or "") + len(result.reasoning or "")
    if result.embeddings:
        size += sum(len(vector) for vector in result.embeddings) * 8
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
