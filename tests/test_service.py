"""Runs like a service: sd_notify states on a real datagram socket, reload under load."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from dispatcher.contract.config import load_config
from dispatcher.contract.protocol import Result, Status
from dispatcher.testing.simulator import Behaviour
from tests.helpers import TEST_KEY, chat, fakes

pytestmark = pytest.mark.anyio


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def wait_for(self, state: str) -> None:
        with anyio.fail_after(5):
            while not any(state in message.split("\n") for message in self.seen):
                await anyio.wait_readable(self.sock)
                self.seen.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


def _toml(url: str, concurrency: int, *, extra: str = "") -> str:
    return f"""
[daemon]
drain_s = 5

[providers.a]
url = "{url}"
model = "m"
api_key_env = "KEY_A"
concurrency = {concurrency}
latency_s = 0.05
{extra}

[classes.default]
providers = ["a"]

[retry]
backoff_base_s = 0.01
"""


async def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    start_daemon: Any, tmp_path: Path
) -> None:
    """READY=1 once serving, WATCHDOG=1 while the loop turns, STOPPING=1 on the way out."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000", "KEY_A": TEST_KEY}
    try:
        async with fakes(a=Behaviour(name="a")) as f:
            path = tmp_path / "c.toml"
            path.write_text(_toml(f["a"].url, 2))
            async with start_daemon(load_config(path), environ=env) as running:
                await notify.wait_for("READY=1")
                async with running.client() as client:
                    assert isinstance(await client.call(chat("up?")), Result)
                await notify.wait_for("WATCHDOG=1")
            await notify.wait_for("STOPPING=1")
    finally:
        notify.close()


async def test_reload_applies_new_limits_without_failing_a_job(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A reload in the middle of a burst changes the limits and every job still succeeds."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(notify.path), "KEY_A": TEST_KEY}
    try:
        async with fakes(a=Behaviour(name="a", latency_s=0.05)) as f:
            path = tmp_path / "c.toml"
            path.write_text(_toml(f["a"].url, 1))
            async with start_daemon(load_config(path), environ=env) as running:
                running.daemon.options.config_path = path
                replies: list[Any] = []
                async with running.client() as client, anyio.create_task_group() as tg:

                    async def one(i: int) -> None:
                        replies.append(await client.call(chat(f"job {i}")))

                    for i in range(30):
                        tg.start_soon(one, i)
                    with anyio.fail_after(5):
                        await f["a"].wait_until(lambda s: s.ok >= 3)
                    path.write_text(_toml(f["a"].url, 4))
                    await running.daemon.reload()
                async with running.client() as client:
                    status = await client.call({"op": "status"})
                await notify.wait_for("RELOADING=1")
        assert len(replies) == 30
        assert all(isinstance(r, Result) for r in replies)
        assert isinstance(status, Status)
        assert status.providers["a"].concurrency == 4
        assert f["a"].stats.max_in_flight == 4
    finally:
        notify.close()


async def test_a_bad_config_on_reload_keeps_the_old_one(
    start_daemon: Any, tmp_path: Path, log_output: Any
) -> None:
    """A reload of an invalid file is refused, logged, and the daemon keeps serving as before."""
    async with fakes(a=Behaviour(name="a")) as f:
        path = tmp_path / "c.toml"
        path.write_text(_toml(f["a"].url, 2))
        async with start_daemon(load_config(path), environ={"KEY_A": TEST_KEY}) as running:
            running.daemon.options.config_path = path
            path.write_text(_toml(f["a"].url, 2, extra="concurency = 9"))
            await running.daemon.reload()
            async with running.client() as client:
                reply = await client.call(chat("still here?"))
                status = await client.call({"op": "status"})
    assert isinstance(reply, Result)
    assert isinstance(status, Status)
    assert status.providers["a"].concurrency == 2
    assert "config.reload_rejected" in log_output.getvalue()
    assert "concurency" in log_output.getvalue()


async def test_reload_adds_and_removes_providers(start_daemon: Any, tmp_path: Path) -> None:
    """A provider added by a reload takes jobs; a removed one takes no new jobs."""
    async with fakes(a=Behaviour(name="a"), b=Behaviour(name="b")) as f:
        path = tmp_path / "c.toml"
        path.write_text(_toml(f["a"].url, 2))
        env = {"KEY_A": TEST_KEY, "KEY_B": TEST_KEY}
        async with start_daemon(load_config(path), environ=env) as running:
            running.daemon.options.config_path = path
            swapped = _toml(f["a"].url, 2).replace("[providers.a]", "[providers.b]")
            swapped = swapped.replace(f["a"].url, f["b"].url).replace("KEY_A", "KEY_B")
            path.write_text(swapped.replace('providers = ["a"]', 'providers = ["b"]'))
            await running.daemon.reload()
            async with running.client() as client:
                reply = await client.call(chat("who answers?"))
                status = await client.call({"op": "status"})
    assert isinstance(reply, Result)
    assert reply.provider == "b"
    assert isinstance(status, Status)
    assert status.providers["a"].state == "disabled"
