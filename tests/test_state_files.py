"""The daemon's files are its own: another user cannot read queued prompts from the WAL."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.contract.protocol import Accepted
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio


@pytest.fixture
def careless_umask() -> Iterator[None]:
    """A umask that leaves new files world-readable, as a shell's default does."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_state_files_are_private_whatever_the_umask(
    start_daemon: Any, tmp_path: Path, careless_umask: None
) -> None:
    """state_dir is 0700 and the journal and ledger files, -wal and -shm included, 0600."""
    async with fakes(a=Behaviour(name="a", latency_s=5.0)) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("a private prompt", detach=True))
            assert isinstance(reply, Accepted)
            state = tmp_path / "state"
            files = sorted(p for p in state.iterdir() if p.is_file())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
            assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {"journal.sqlite3-wal", "journal.sqlite3-shm", "limits.sqlite3"} <= set(modes)
    assert {name: mode & 0o077 for name, mode in modes.items()} == dict.fromkeys(modes, 0)
