"""Builders shared by the tests: configs pointing at fakes, the fakes themselves, raw wires.

Fixtures live in ``tests/conftest.py``; everything a test module imports lives here,
so no test imports ``conftest`` or another test module.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from dispatcher.app import Daemon
from dispatcher.client.connection import Client
from dispatcher.contract.config import Config, parse_config
from dispatcher.core.provider_state import ProviderLimits
from dispatcher.scheduler.job import Job
from dispatcher.testing.simulator import Behaviour, FakeProvider

__all__ = [
    "ASYNCIO",
    "BACKENDS",
    "REPLY_WAIT_S",
    "TEST_KEY",
    "UVLOOP",
    "FakeClock",
    "FakeHandle",
    "Running",
    "Wire",
    "build_config",
    "chat",
    "fakes",
    "keys_for",
    "provider_entry",
    "until",
    "uvloop_only",
    "wire",
]

TEST_KEY: Final = "test-key-not-a-secret-0001"

REPLY_WAIT_S: Final = 5.0
"""How long a raw :class:`Wire` waits for one reply line."""

# -- event loops -----------------------------------------------------------------------

ASYNCIO: Final = "asyncio"
UVLOOP: Final = ("asyncio", {"use_uvloop": True})
"""The production loop: ``anyio.run(..., backend_options={"use_uvloop": True})``."""

BACKENDS: Final = (pytest.param(ASYNCIO, id="asyncio"), pytest.param(UVLOOP, id="uvloop"))
"""Every end-to-end async test runs on both: plain asyncio and asyncio on uvloop."""

uvloop_only: Final = pytest.mark.parametrize("anyio_backend", [pytest.param(UVLOOP, id="uvloop")])
"""For a slow scenario: run it on the production loop only, not twice."""


# -- configs and fakes -----------------------------------------------------------------


def provider_entry(fake: FakeProvider, **overrides: Any) -> dict[str, Any]:
    """A config entry pointing at a running fake, with limits copied from its behaviour."""
    b = fake.behaviour
    entry: dict[str, Any] = {
        "url": fake.url,
        "model": b.model,
        "kind": b.kind,
        "adapter": "siliconflow" if b.kind == "embed" else "openai",
        "api_key_env": f"KEY_{b.name.upper()}",
        "concurrency": b.concurrency or 8,
        "rpm": b.rpm,
        "thinking": b.thinking,
        "latency_s": max(b.latency_s, 0.001),
        "timeout_s": 10.0,
    }
    entry.update(overrides)
    return entry


def build_config(
    providers: Mapping[str, dict[str, Any]],
    *,
    classes: Mapping[str, list[str]] | None = None,
    **sections: dict[str, Any],
) -> Config:
    """A parsed config of ``providers``, every class on the chat ones, with short backoffs."""
    raw: dict[str, Any] = {"providers": dict(providers)}
    chat_providers = [n for n, p in providers.items() if p.get("kind", "chat") == "chat"]
    raw["classes"] = {
        name: {"providers": list(members)}
        for name, members in (
            classes or dict.fromkeys(("realtime", "bulk", "complex", "default"), chat_providers)
        ).items()
    }
    raw["retry"] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw, source="test")


def keys_for(config: Config) -> dict[str, str]:
    """An environment giving every provider of ``config`` the test key."""
    return {p.api_key_env: TEST_KEY for p in config.providers.values() if p.api_key_env}


@asynccontextmanager
async def fakes(**behaviours: Behaviour) -> AsyncIterator[dict[str, FakeProvider]]:
    """Start one fake provider per keyword; all stop on exit."""
    started: dict[str, FakeProvider] = {}
    try:
        for name, behaviour in behaviours.items():
            fake = FakeProvider(behaviour)
            await fake.start()
            started[name] = fake
        yield started
    finally:
        for fake in started.values():
            await fake.aclose()


def chat(text: str, **fields: Any) -> dict[str, Any]:
    """A chat request of one user message, with any extra request fields."""
    return {"op": "chat", "messages": [{"role": "user", "content": text}], **fields}


@dataclass
class Running:
    """A daemon started by the ``start_daemon`` fixture, serving on ``socket``."""

    daemon: Daemon
    socket: str
    environ: dict[str, str] = field(default_factory=dict)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        """A client connected to the daemon's socket."""
        async with Client.connect(self.socket) as client:
            yield client


# -- a raw connection ------------------------------------------------------------------


class Wire:
    """One raw connection: write any bytes, read reply lines as dicts."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as it is, framing and all."""
        await self.stream.send(data)

    async def send(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` as one JSON line."""
        await self.stream.send(json.dumps(payload).encode() + b"\n")

    async def recv(self) -> dict[str, Any]:
        """The next reply line, decoded; fails after :data:`REPLY_WAIT_S`."""
        with anyio.fail_after(REPLY_WAIT_S):
            line = await self.reader.receive_until(b"\n", 1 << 24)
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    async def recv_until_final(self, request_id: str) -> list[dict[str, Any]]:
        """Replies for ``request_id`` up to its final one (anything but chunk/accepted)."""
        seen: list[dict[str, Any]] = []
        while True:
            reply = await self.recv()
            if reply.get("id") != request_id:
                continue
            seen.append(reply)
            if reply["event"] not in ("chunk", "accepted"):
                return seen

    async def closed_by_peer(self) -> bool:
        """True once the daemon has closed its side (EOF or reset), within the reply wait."""
        with anyio.fail_after(REPLY_WAIT_S):
            try:
                await self.reader.receive_until(b"\n", 1 << 24)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return True
        return False

    async def ping(self, request_id: str = "ping-1") -> dict[str, Any]:
        """Send a ping and return the next reply."""
        await self.send({"op": "ping", "id": request_id})
        return await self.recv()


@asynccontextmanager
async def wire(path: str) -> AsyncIterator[Wire]:
    """A raw :class:`Wire` on the Unix socket at ``path``."""
    async with await anyio.connect_unix(path) as stream:
        yield Wire(stream)


async def until(
    predicate: Callable[[], bool], *, timeout_s: float = 5.0, every_s: float = 0.02
) -> None:
    """Wait, at most ``timeout_s``, for state that has no event of its own to wait on
    (another process's file, a subprocess, a counter in a fake)."""
    with anyio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110  # nothing to wait on but the state itself
            await anyio.sleep(every_s)


# -- the scheduler shell on its own -------------------------------------------------------


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeHandle:
    """A provider actor that records what it is handed and runs nothing."""

    name: str
    limits: ProviderLimits
    delivered: list[Job] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def deliver(self, job: Job) -> bool:
        self.delivered.append(job)
        return True

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
