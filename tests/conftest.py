"""Shared fixtures: a real daemon on a Unix socket under tmp_path, fake upstreams on loopback.

The builders the tests import (configs, fakes, raw wires) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from dispatcher import logs
from dispatcher.app import Daemon, Options
from dispatcher.contract.config import Config, DaemonConfig
from tests.helpers import BACKENDS, Running, keys_for


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Run each async test on plain asyncio and on uvloop, the loop production uses."""
    return request.param


@pytest.fixture
def log_output() -> io.StringIO:
    """Capture the daemon's JSON log lines for the test to read."""
    buffer = io.StringIO()
    logs.configure("debug", buffer, json=True)
    return buffer


@pytest.fixture
def start_daemon(tmp_path: Path) -> Callable[..., Any]:
    """``async with start_daemon(config) as running:`` a daemon serving on tmp_path/d.sock."""

    @asynccontextmanager
    async def start(
        config: Config, *, environ: Mapping[str, str] | None = None, socket: str | None = None
    ) -> AsyncIterator[Running]:
        env = dict(environ) if environ is not None else keys_for(config)
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


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the redaction it would have in a fresh daemon.

    Every simulated daemon registers a random key (and its base64 forms); kept for
    the whole session, they made one redaction regex of thousands of alternatives
    that slowed every log line of the tests that came late in the run.
    """
    monkeypatch.setattr(logs, "_secrets", set(logs._secrets))
    monkeypatch.setattr(logs, "_pattern", logs._pattern)
