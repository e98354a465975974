"""``dispatcher top``: the frame rendered from a status, and ``--once`` against a real daemon."""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import pytest
from rich.console import Console

from dispatcher.client.connection import DaemonNotRunning
from dispatcher.client.top import (
    add_top_arguments,
    cmd_top,
    format_bytes,
    format_duration,
    render_status,
)
from dispatcher.contract.protocol import CacheHits, CacheStatus, ProviderStatus, Result, Status
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry


def provider(**fields: Any) -> ProviderStatus:
    base: dict[str, Any] = {
        "state": "ready",
        "kind": "chat",
        "in_flight": 0,
        "queued": 0,
        "concurrency": 5,
        "rpm": 0,
        "tokens": None,
        "latency_ms": 1200.0,
        "ok": 0,
        "failed": 0,
        "rate_limited": 0,
    }
    return ProviderStatus(**(base | fields))


def text_of(renderable: Any, width: int = 140) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket")
    parser.add_argument("--config")
    add_top_arguments(parser)
    return parser.parse_args(argv)


def test_frame_shows_providers_classes_and_totals() -> None:
    """A frame shows each provider's slots, tokens, success rate, 429s and circuit, and the queue."""
    status = Status(
        providers={
            "nvidia1": provider(
                state="busy", in_flight=5, queued=12, rpm=40, tokens=17, ok=98, failed=2
            ),
            "zhipu": provider(
                state="open",
                concurrency=1,
                circuit="open",
                ok=3,
                failed=7,
                rate_limited=4,
                blocked_for_s=12.5,
                problem="circuit opened after 5 failures",
            ),
        },
        queued=14,
        running=5,
        uptime_s=3725,
        classes={"bulk": 10, "realtime": 4},
        jobs_done=101,
        jobs_failed=9,
    )
    text = text_of(render_status(status, source="/run/dispatcher/dispatcher.sock"))
    nvidia = next(line for line in text.splitlines() if "nvidia1" in line)
    zhipu = next(line for line in text.splitlines() if "zhipu" in line and "│" in line)
    assert "5/5" in nvidia
    assert "17/40" in nvidia
    assert "98.0%" in nvidia
    assert "busy" in nvidia
    assert "30.0%" in zhipu
    assert "open (wait 12.5 s)" in zhipu
    assert " 4 " in zhipu
    assert "bulk" in text
    assert "realtime" in text
    assert "1 h 02 m" in text
    assert "zhipu: circuit opened after 5 failures" in text
    assert "9 (8.2%)" in text


def test_throughput_comes_from_the_previous_frame() -> None:
    """Given the previous status, the totals show jobs finished per second since then."""
    before = Status(providers={}, queued=0, jobs_done=10)
    after = Status(providers={}, queued=0, jobs_done=30, jobs_failed=2)
    text = text_of(render_status(after, previous=before, elapsed_s=2.0))
    assert "11.0 jobs/s" in text


def test_format_duration() -> None:
    """Durations read at a glance."""
    assert format_duration(42) == "42 s"
    assert format_duration(185) == "3 m 05 s"
    assert format_duration(7620) == "2 h 07 m"
    assert format_duration(3 * 86_400 + 4 * 3600) == "3 d 04 h"


def test_frame_shows_the_caches() -> None:
    """Hits and misses per kind, the embedding cache, texts per request and coalesced jobs."""
    cache = CacheStatus(
        kinds={"chat": CacheHits(hits=3, misses=9), "embed": CacheHits(hits=900, misses=100)},
        embed_texts=1234,
        embed_bytes=5 * 1024 * 1024,
        embed_requests=40,
        texts_per_request=31.5,
        coalesced=7,
    )
    text = text_of(render_status(Status(providers={}, queued=0, cache=cache)))
    lines = text.splitlines()

    def line(label: str) -> str:
        return next(line for line in lines if label in line)

    assert "caches" in text
    assert "3/9 (25%)" in line("chat hits/misses")
    assert "900/100 (90%)" in line("embed hits/misses")
    assert "1,234 texts, 5.0 MiB" in line("embed cache")
    assert "40 (31.5 texts each)" in line("embed requests")
    assert "7" in line("coalesced")


def test_frame_without_cache_figures_leaves_the_caches_out() -> None:
    """A status without cache figures (an older daemon) renders without the caches table."""
    text = text_of(render_status(Status(providers={}, queued=0)))
    assert "caches" not in text
    assert "totals" in text


def test_format_bytes() -> None:
    """Sizes read at a glance, in binary units."""
    assert format_bytes(512) == "512 B"
    assert format_bytes(4915) == "4.8 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"


def test_interval_must_be_positive() -> None:
    """--interval rejects zero and nonsense."""
    with pytest.raises(SystemExit):
        parse("--interval", "0")
    assert parse("--interval", "0.5").interval == 0.5
    assert parse().interval == 1.0


@pytest.mark.anyio
async def test_once_prints_one_frame_from_a_real_daemon(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dispatcher top --once` reads the daemon's status over the socket and prints one frame."""
    async with fakes(a=Behaviour(name="a", latency_s=0.01), b=Behaviour(name="b", rpm=40)) as f:
        config = build_config({"a": provider_entry(f["a"]), "b": provider_entry(f["b"])})
        async with start_daemon(config) as running:
            async with running.client() as client:
                await client.call(chat("hi", providers=["b"]))
            args = parse("--socket", running.socket, "--once")
            with anyio.fail_after(10):
                code = await anyio.to_thread.run_sync(cmd_top, args)
    out = capsys.readouterr().out
    assert code == 0
    assert "dispatcher top" in out
    assert running.socket in out
    b_line = next(line for line in out.splitlines() if line.startswith("│ b "))
    assert "39/40" in b_line
    assert "100.0%" in b_line
    assert "providers" in out
    assert "totals" in out


def test_once_without_a_daemon_says_how_to_start_one(tmp_path: Any) -> None:
    """With nothing on the socket, top raises the error the CLI turns into exit 69."""
    with pytest.raises(DaemonNotRunning, match="dispatcher serve"):
        cmd_top(parse("--socket", str(tmp_path / "none.sock"), "--once"))


@pytest.mark.anyio
async def test_top_lists_recent_jobs(start_daemon: Any) -> None:
    """The live view shows the latest finished jobs with their outcome and provider."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            done = await client.call(chat("for the record"))
            status = await client.call({"op": "status"})
    assert isinstance(done, Result)
    assert isinstance(status, Status)
    assert status.recent[0].job == done.job
    console = Console(width=200, record=True)
    console.print(render_status(status))
    text = console.export_text()
    assert "recent jobs" in text
    assert done.job in text


@pytest.mark.anyio
async def test_once_shows_the_caches_of_a_real_daemon(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """After two embed jobs sharing a text, `top --once` shows the embed hits, texts and bytes."""
    async with fakes(e=Behaviour(name="e", kind="embed", embed_dims=4)) as f:
        config = build_config({"e": provider_entry(f["e"])})
        async with start_daemon(config) as running:
            async with running.client() as client:
                await client.call({"op": "embed", "input": ["a", "b"]})
                await client.call({"op": "embed", "input": ["a"]})
            with anyio.fail_after(10):
                code = await anyio.to_thread.run_sync(
                    cmd_top, parse("--socket", running.socket, "--once")
                )
    out = capsys.readouterr().out
    assert code == 0
    assert "1/2 (33%)" in next(line for line in out.splitlines() if "embed hits/misses" in line)
    assert "2 texts, 32 B" in out
    assert "1 (2 texts each)" in next(line for line in out.splitlines() if "embed requests" in line)
