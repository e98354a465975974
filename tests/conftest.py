"""Shared fixtures: a real daemon on a Unix socket under tmp_path, fake upstreams on loopback."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from dispatcher import logs
from dispatcher.app import Daemon, Options
from dispatcher.client import Client
from dispatcher.config import Config, DaemonConfig, parse_config
from dispatcher.simulator import Behaviour, FakeProvider

TEST_KEY = "test-key-not-a-secret-0001"


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (aiohttp needs it), the backend the daemon uses."""
    return "asyncio"


@pytest.fixture
def log_output() -> io.StringIO:
    """Capture the daemon's JSON log lines for the test to read."""
    buffer = io.StringIO()
    logs.configure("debug", buffer, json=True)
    return buffer


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
    raw: dict[str, Any] = {"providers": dict(providers)}
    chat = [n for n, p in providers.items() if p.get("kind", "chat") == "chat"]
    raw["classes"] = {
        name: {"providers": list(members)}
        for name, members in (
            classes or dict.fromkeys(("realtime", "bulk", "complex", "default"), chat)
        ).items()
    }
    raw["retry"] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw, source="test")


@dataclass
class Running:
    daemon: Daemon
    socket: str
    environ: dict[str, str] = field(default_factory=dict)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        async with Client.connect(self.socket) as client:
            yield client


@pytest.fixture
def start_daemon(tmp_path: Path) -> Callable[..., Any]:
    """``async with start_daemon(config) as running:`` a daemon serving on tmp_path/d.sock."""

    @asynccontextmanager
    async def start(
        config: Config, *, environ: Mapping[str, str] | None = None, socket: str | None = None
    ) -> AsyncIterator[Running]:
        env = dict(environ) if environ is not None else _keys_for(config)
        path = socket or str(tmp_path / "d.sock")
        if config.daemon.state_dir == DaemonConfig().state_dir:
            daemon_config = msgspec.structs.replace(
                config.daemon, state_dir=str(tmp_path / "state")
            )
            config = msgspec.structs.replace(config, daemon=daemon_config)
        options = Options(config_path=None, socket=path, environ=env, handle_signals=False)
        daemon = Daemon(config, options)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            try:
                yield Running(daemon=daemon, socket=path, environ=env)
            finally:
                daemon.request_stop()
                daemon.request_stop()  # tests do not wait for a drain unless they ask for one

    return start


def _keys_for(config: Config) -> dict[str, str]:
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
    return {"op": "chat", "messages": [{"role": "user", "content": text}], **fields}
