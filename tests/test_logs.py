"""Logs: events as JSON lines, and no key ever leaves the daemon in logs, replies or status."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
import structlog
from aiohttp import web

from dispatcher import logs
from dispatcher.contract.protocol import Error, Result
from dispatcher.testing.simulator import Behaviour
from tests.helpers import build_config, chat, fakes, provider_entry

# Not key-shaped on purpose: only the daemon's knowledge of its own keys can hide it.
CANARY = "canaryQ7w9Zr2Lm4Xp8Kd3Vn"


def log_events(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


@asynccontextmanager
async def key_echoing_upstream() -> AsyncIterator[str]:
    """An OpenAI-style server that refuses every key with 401, quoting the key back (as some do)."""

    async def refuse(request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = {"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_key"}}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1/chat/completions"
    finally:
        await runner.cleanup()


def echoing_config(url: str) -> Any:
    entry = {"url": url, "model": "m", "api_key_env": "CANARY_KEY", "timeout_s": 5.0}
    return build_config({"echo": entry})


async def refused_by_echoing_upstream(
    start_daemon: Any,
) -> tuple[Any, Any]:
    """Run one chat against the key-echoing upstream; the reply and a status snapshot."""
    async with key_echoing_upstream() as url:
        config = echoing_config(url)
        async with (
            start_daemon(config, environ={"CANARY_KEY": CANARY}) as running,
            running.client() as client,
        ):
            with anyio.fail_after(5):
                reply = await client.call(chat("hello"))
                status = await client.call({"op": "status"})
    return reply, status


# -- the canary key ------------------------------------------------------------------


@pytest.mark.anyio
async def test_key_never_logged_when_a_provider_refuses_it(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """A key refused with 401 is sent upstream but never written to the log."""
    async with fakes(a=Behaviour(name="a", api_key="the-right-key")) as f:
        config = build_config({"a": provider_entry(f["a"], api_key_env="CANARY_KEY")})
        async with (
            start_daemon(config, environ={"CANARY_KEY": CANARY}) as running,
            running.client() as client,
        ):
            reply = await client.call(chat("hello"))
    assert isinstance(reply, Error)
    assert f["a"].stats.headers[-1]["Authorization"] == f"Bearer {CANARY}"
    assert any(e["event"] == "provider.disabled" for e in log_events(log_output))
    assert CANARY not in log_output.getvalue()


@pytest.mark.anyio
async def test_key_quoted_back_by_the_upstream_is_redacted_from_logs(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """An upstream error that quotes the key back is logged with the key masked."""
    reply, _status = await refused_by_echoing_upstream(start_daemon)
    text = log_output.getvalue()
    assert isinstance(reply, Error)
    assert "attempt.failed" in text
    assert "Incorrect API key provided" in text
    assert CANARY not in text


@pytest.mark.anyio
async def test_key_quoted_back_by_the_upstream_never_reaches_the_client(
    start_daemon: Any,
) -> None:
    """The error reply for a refused key does not carry the key, even when the upstream quotes it."""
    reply, _status = await refused_by_echoing_upstream(start_daemon)
    assert isinstance(reply, Error)
    assert "401" in reply.message
    assert CANARY not in reply.message


@pytest.mark.anyio
async def test_key_never_appears_in_status(start_daemon: Any) -> None:
    """status after a refused key names the variable to check but not the key."""
    _reply, status = await refused_by_echoing_upstream(start_daemon)
    encoded = msgspec.json.encode(status).decode()
    assert "CANARY_KEY" in encoded
    assert CANARY not in encoded


@pytest.mark.anyio
async def test_key_never_logged_on_success(start_daemon: Any, log_output: io.StringIO) -> None:
    """A normal day of successful jobs logs nothing of the key, at debug level."""
    async with fakes(a=Behaviour(name="a", api_key=CANARY)) as f:
        config = build_config({"a": provider_entry(f["a"], api_key_env="CANARY_KEY")})
        async with (
            start_daemon(config, environ={"CANARY_KEY": CANARY}) as running,
            running.client() as client,
        ):
            reply = await client.call(chat("hello"))
            await client.call({"op": "status"})
    assert isinstance(reply, Result)
    assert CANARY not in log_output.getvalue()


@pytest.mark.anyio
async def test_every_job_logs_one_summary_line(start_daemon: Any, log_output: io.StringIO) -> None:
    """Each finished job writes one job.done line with its id, class, provider, attempts and tokens."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config({"a": provider_entry(f["a"])})
        async with start_daemon(config) as running, running.client() as client:
            replies = [await client.call(chat(f"q{i}", cache=False)) for i in range(3)]
    done = [e for e in log_events(log_output) if e["event"] == "job.done"]
    assert len(done) == 3
    assert {e["job"] for e in done} == {r.job for r in replies if isinstance(r, Result)}
    for event in done:
        assert event["cls"] == "default"
        assert event["provider"] == "a"
        assert event["attempts"] == 1
        assert event["tokens"] > 0
        assert "latency_ms" in event
        assert event["level"] == "info"


# -- the redaction processor ---------------------------------------------------------


@pytest.fixture
def captured() -> io.StringIO:
    buffer = io.StringIO()
    logs.configure("debug", buffer, json=True)
    return buffer


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6", id="openai-style"),
        pytest.param("sk-proj-" + "Zz9_Yy8-Xx7Ww6Vv5Uu4Tt3", id="openai-project"),
        pytest.param("nvapi-" + "Qw3rTy_uI0pAsDfGhJkL-zXcVbNm1234567890abcd", id="nvidia"),
        pytest.param("0123456789abcdef" * 2 + "." + "AbCdEfGhIjKlMnOp", id="zhipu"),
    ],
)
def test_key_shaped_strings_are_masked(captured: io.StringIO, secret: str) -> None:
    """A provider-key-shaped string anywhere in a log event is replaced by [REDACTED]."""
    structlog.get_logger("t").info("upstream.said", reason=f"bad key {secret} given")
    event = json.loads(captured.getvalue())
    assert secret not in captured.getvalue()
    assert event["reason"] == f"bad key {logs.REDACTED} given"


def test_bearer_tokens_are_masked(captured: io.StringIO) -> None:
    """Whatever follows "Bearer " in a logged header is masked."""
    structlog.get_logger("t").info("request.headers", auth="Authorization: Bearer abc.DEF-123_456")
    assert "abc.DEF-123_456" not in captured.getvalue()
    assert logs.REDACTED in captured.getvalue()


def test_api_key_assignments_are_masked(captured: io.StringIO) -> None:
    """api_key=... and "token": "..." shapes are masked."""
    log = structlog.get_logger("t")
    log.info("config.dump", text='api_key="plainvalue123", other')
    log.info("config.dump", text='{"token": "tok_plainvalue456"}')
    assert "plainvalue123" not in captured.getvalue()
    assert "tok_plainvalue456" not in captured.getvalue()


def test_secrets_inside_nested_values_are_masked(captured: io.StringIO) -> None:
    """Keys inside dicts, lists and tuples in an event are masked too."""
    secret = "sk-" + "n3st3dS3cr3tV4lu3xyz"
    structlog.get_logger("t").info(
        "nested", data={"headers": [("Authorization", f"Bearer {secret}")], "k": [secret]}
    )
    assert secret not in captured.getvalue()


def test_secrets_in_exceptions_are_masked(captured: io.StringIO) -> None:
    """An exception whose text or traceback carries a key is logged with the key masked."""
    secret = "nvapi-" + "Exc3pti0nK3yV4lu3abcdefgh"
    try:
        raise RuntimeError(f"upstream refused {secret}")
    except RuntimeError as exc:
        structlog.get_logger("t").error("actor.crashed", error=exc, exc_info=exc)
    assert secret not in captured.getvalue()
    assert "RuntimeError" in captured.getvalue()


def test_loaded_secret_is_masked_whatever_its_shape(captured: io.StringIO) -> None:
    """A key the daemon loaded is masked even when it looks like nothing in particular."""
    secret = "plainLookingKeyWithNoPrefix42"
    logs.add_secret(secret)
    structlog.get_logger("t").warning("odd", note=f"someone said {secret}")
    assert secret not in captured.getvalue()
    assert logs.REDACTED in captured.getvalue()


def test_ordinary_text_is_left_alone(captured: io.StringIO) -> None:
    """Job ids, provider names and prompts without key shapes are logged as they are."""
    structlog.get_logger("t").info(
        "job.done", job="0123456789abcdef", provider="nvidia2", text="the token count was 12"
    )
    event = json.loads(captured.getvalue())
    assert event["job"] == "0123456789abcdef"
    assert event["provider"] == "nvidia2"
    assert event["text"] == "the token count was 12"


def test_words_that_merely_contain_a_key_prefix_are_left_alone(captured: io.StringIO) -> None:
    """A hyphenated name such as task-queue-processing-system is not mistaken for an sk- key."""
    structlog.get_logger("t").info("route", target="task-queue-processing-system")
    assert json.loads(captured.getvalue())["target"] == "task-queue-processing-system"
