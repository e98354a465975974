"""A key's spent minute survives a restart: the daemon never sends into a window it spent.

Against a fake that enforces 40 requests a minute exactly: 40 requests, a restart
(a clean stop, or SIGKILL), then 20 more. The restarted daemon must see the
minute as spent and hold the 20, so the fake answers 0 429s.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.client.connection import Client, answers_ping
from dispatcher.contract.protocol import Status
from dispatcher.testing.simulator import Behaviour, FakeProvider
from tests.helpers import (
    TEST_KEY,
    build_config,
    chat,
    fakes,
    provider_entry,
    until,
    uvloop_only,
)

pytestmark = pytest.mark.anyio

LIMITED = Behaviour(name="n", rpm=40, concurrency=5)  # the fake refuses the 41st in 60 s
START_DEADLINE_S = 15.0


async def _spend_the_minute(client: Client) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(client.call, chat(f"spend {i}", providers=["n"]))


async def _held_after_restart(client: Client, fake: FakeProvider) -> Status:
    """Send 20 jobs to the restarted daemon and return its status once it has planned them."""
    for i in range(20):
        await client.send(chat(f"after {i}", providers=["n"], id=f"after-{i}"))
    with anyio.fail_after(5):
        while True:
            status = await client.call({"op": "status"})
            assert isinstance(status, Status)
            if status.queued == 20:
                return status
            await anyio.sleep(0.05)


async def test_a_clean_restart_remembers_the_spent_minute(start_daemon: Any) -> None:
    """After 40 of 40 requests and a stop, the next daemon holds new jobs: 0 upstream 429s."""
    async with fakes(n=LIMITED) as f:
        config = build_config({"n": provider_entry(f["n"], rpm=40, concurrency=5)})
        async with start_daemon(config) as running, running.client() as client:
            await _spend_the_minute(client)
        assert f["n"].stats.ok == 40
        async with start_daemon(config) as running, running.client() as client:
            turns = running.daemon.scheduler.turns
            status = await _held_after_restart(client, f["n"])
            scheduler = running.daemon.scheduler
            await until(lambda: scheduler.turns >= turns + 2)  # it planned twice since
            assert f["n"].stats.requests == 40
    assert status.providers["n"].tokens == 0
    assert f["n"].stats.rate_limited == 0


def _write_config(tmp_path: Path, fake: FakeProvider) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
socket = "{tmp_path / "d.sock"}"
state_dir = "{tmp_path / "state"}"

[providers.n]
url = "{fake.url}"
model = "{fake.behaviour.model}"
api_key_env = "KEY_N"
concurrency = 5
rpm = 40
latency_s = 0.01

[classes.default]
providers = ["n"]
"""
    )
    return path


@contextmanager
def _serve(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["KEY_N"] = TEST_KEY
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def _wait_ready(socket: str) -> None:
    with anyio.fail_after(START_DEADLINE_S):
        while not await answers_ping(socket):  # noqa: ASYNC110  # a subprocess: no event
            await anyio.sleep(0.05)


def _spends_on_disk(state: Path) -> int:
    with sqlite3.connect(state / "limits.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM spends").fetchone()[0])


# A daemon in a subprocess, killed: the production loop only.
@uvloop_only
async def test_sigkill_mid_minute_still_remembers_the_spend(tmp_path: Path) -> None:
    """A daemon SIGKILLed after spending the minute: its successor holds new jobs, 0 429s."""
    async with fakes(n=LIMITED) as f:
        config = _write_config(tmp_path, f["n"])
        socket = str(tmp_path / "d.sock")
        with _serve(config) as first:
            await _wait_ready(socket)
            async with Client.connect(socket) as client:
                await _spend_the_minute(client)
            # group commit: at most one interval behind
            await until(lambda: _spends_on_disk(tmp_path / "state") >= 40)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        with _serve(config):
            await _wait_ready(socket)
            async with Client.connect(socket) as client:
                status = await _held_after_restart(client, f["n"])
                again = await client.call({"op": "status"})
        assert f["n"].stats.ok == 40
        assert f["n"].stats.requests == 40
        assert f["n"].stats.rate_limited == 0
    assert status.providers["n"].tokens == 0
    assert isinstance(again, Status)
    assert again.providers["n"].in_flight == 0
