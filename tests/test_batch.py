"""`dispatcher batch`: input order, one answer per line, resumable after the daemon dies."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from dispatcher.client.batch import line_key, parse_line, run_batch
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, fakes, provider_entry

pytestmark = pytest.mark.anyio


def _write_input(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"prompt": f"line {i}"}) + "\n" for i in range(1, n + 1)))


def _run(socket: str, src: Path, out: Path) -> int:
    return run_batch(
        socket=socket,
        input_path=src,
        output_path=out,
        window=8,
        task=None,
        console=Console(file=io.StringIO()),
    )


async def test_batch_writes_answers_in_input_order(start_daemon: Any, tmp_path: Path) -> None:
    """Every input line gets one output line, in input order, tagged with its line number."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 25)
    async with fakes(a=Behaviour(name="a", latency_s=0.01, jitter=0.9, concurrency=4)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=4)})
        async with start_daemon(config) as running:
            code = await anyio.to_thread.run_sync(_run, running.socket, src, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0
    assert [r["line"] for r in records] == list(range(1, 26))
    assert all(f"line {r['line']}" in r["content"] for r in records)
    assert not (tmp_path / "out.jsonl.partial").exists()


async def test_batch_resumes_after_the_daemon_dies(start_daemon: Any, tmp_path: Path) -> None:
    """A batch cut short by a dying daemon finishes on a rerun, each line answered once,
    with no upstream call repeated beyond the jobs that were running at the stop."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 20)
    async with fakes(a=Behaviour(name="a", latency_s=0.05, concurrency=2)) as f:
        config = build_config({"a": provider_entry(f["a"], concurrency=2)})
        async with start_daemon(config) as running, anyio.create_task_group() as tg:
            codes: list[int] = []

            async def first_run() -> None:
                codes.append(await anyio.to_thread.run_sync(_run, running.socket, src, out))

            tg.start_soon(first_run)
            with anyio.fail_after(10):
                await f["a"].wait_until(lambda s: s.ok >= 6)
            running.daemon.request_stop()
            running.daemon.request_stop()
        assert codes == [75]
        calls_before = f["a"].stats.requests
        async with start_daemon(config) as running:
            code = await anyio.to_thread.run_sync(_run, running.socket, src, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0
    assert [r["line"] for r in records] == list(range(1, 21))
    assert len({r["job"] for r in records}) == 20
    assert f["a"].stats.requests - calls_before <= 20 - 6 + 2


def test_line_shorthands() -> None:
    """A bare prompt becomes a chat request; an `input` line becomes an embed request."""
    assert parse_line('{"prompt": "hi"}', 1, "bulk") == {
        "op": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "task": "bulk",
    }
    assert parse_line('{"input": ["a", "b"]}', 2, None)["op"] == "embed"


def test_line_key_changes_with_the_text(tmp_path: Path) -> None:
    """Editing a line gives it a new key, so it is not refused as a key clash."""
    path = tmp_path / "x.jsonl"
    assert line_key(path, 3, "a") == line_key(path, 3, "a")
    assert line_key(path, 3, "a") != line_key(path, 3, "b")
    assert line_key(path, 3, "a") != line_key(path, 4, "a")
