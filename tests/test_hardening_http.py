"""Issue 13 on the HTTP front: tokens, /metrics access, connection and time limits, no leaks.

Each test replays one attack from the issue against a real front on 127.0.0.1 (or
a Unix socket under tmp_path), with raw sockets where an HTTP client would be too
polite to misbehave.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from anyio.abc import SocketStream

from dispatcher import logs
from dispatcher.contract.config import ClientConfig, ConfigError, HttpConfig, MetricsConfig
from dispatcher.contract.protocol import Error
from dispatcher.ingress import tokens as ingress_tokens
from dispatcher.ingress import web as ingress_web
from dispatcher.ingress.http_front import HttpFront
from dispatcher.ingress.metrics import serve_metrics
from dispatcher.testing.simulator import Behaviour
from tests.helpers import Running, build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio

ALICE = "alice-token-7Hq2Lm9Xw4Rt8Vk3"
BOB = "bob-token-Zp5Nc1Jd6Fy0Gs2Ue"
# Not key-shaped: only the daemon's knowledge of its own key can hide it, or its base64.
CANARY = "canaryB64w9Zr2Lm4Xp8Kd3Vn"
CHAT = {"model": "dispatcher/default", "messages": [{"role": "user", "content": "hi"}]}


def tokens(**names: str) -> Any:
    """Client tokens loaded as the daemon loads them, from the environment."""
    clients = {name: ClientConfig(token_env=f"TOKEN_{name.upper()}") for name in names}
    environ = {f"TOKEN_{name.upper()}": token for name, token in names.items()}
    return ingress_web.ClientTokens.load(clients, environ)


@asynccontextmanager
async def serve(
    running: Running,
    *,
    client_tokens: Any = None,
    max_body_bytes: int = 1024 * 1024,
    **config: Any,
) -> AsyncIterator[tuple[HttpFront, str]]:
    """An HTTP front with ``config`` on the running daemon; yields it and its first address."""
    extra = {"tokens": client_tokens} if client_tokens is not None else {}
    http = HttpFront(
        running.daemon.scheduler,
        HttpConfig(**({"listen": "127.0.0.1:0"} | config)),
        max_body_bytes=max_body_bytes,
        **extra,
    )
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(http.run)
        try:
            yield http, addresses[0]
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def daemon(start_daemon: Any) -> AsyncIterator[Running]:
    async with (
        fakes(a=Behaviour(name="a", latency_s=0.01)) as f,
        start_daemon(build_config({"a": provider_entry(f["a"])})) as running,
    ):
        yield running


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def read_all(stream: SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


async def read_response(stream: SocketStream) -> bytes:
    """One whole response with a Content-Length body; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive()
    return head


async def keep_sending(stream: SocketStream, chunks: Any, pause_s: float) -> None:
    """Send ``chunks`` one by one until the server hangs up."""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        for chunk in chunks:
            await stream.send(chunk)
            await anyio.sleep(pause_s)


def endless(chunk: bytes) -> Any:
    while True:
        yield chunk


def log_events(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


# -- client tokens ----------------------------------------------------------------------


async def test_tcp_listen_without_a_token_refuses_to_start(start_daemon: Any) -> None:
    """A TCP listen with no client token and no allow_anonymous refuses to start, saying why."""
    async with daemon(start_daemon) as running:
        http = HttpFront(running.daemon.scheduler, HttpConfig(listen="127.0.0.1:0"))
        with anyio.fail_after(5), pytest.raises(ConfigError) as caught:
            await http.run()
    assert str(caught.value) == (
        "[http] listen on TCP needs at least one [clients.NAME] token, or allow_anonymous = true"
    )


async def test_missing_or_wrong_token_is_401_invalid_api_key(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """Without a client token, or with a wrong one, every path is a 401 that quotes nothing."""
    wrong = "wrong-token-Qm3Vb8Ky1Lp6Xs"
    async with (
        daemon(start_daemon) as running,
        serve(running, client_tokens=tokens(alice=ALICE)) as (_http, base),
        aiohttp.ClientSession() as session,
    ):
        answers = []
        for path, headers in [
            ("/v1/models", {}),
            ("/v1/models", {"Authorization": f"Bearer {wrong}"}),
            ("/v1/chat/completions", {"Authorization": f"Bearer {ALICE}x"}),
            ("/nowhere", {"Authorization": wrong}),
        ]:
            async with session.request(
                "POST" if "chat" in path else "GET", f"{base}{path}", headers=headers, json=CHAT
            ) as response:
                answers.append((response.status, response.headers, await response.text()))
    for status, headers, text in answers:
        assert status == 401
        assert headers["x-should-retry"] == "false"
        error = json.loads(text)["error"]
        assert (error["code"], error["type"]) == ("invalid_api_key", "invalid_request_error")
        assert wrong not in text
        assert ALICE not in text
    assert wrong not in log_output.getvalue()
    assert ALICE not in log_output.getvalue()


async def test_the_token_names_the_jobs_owner(start_daemon: Any, log_output: io.StringIO) -> None:
    """A request with alice's token is alice's job: its fairness key and log line say client:alice."""
    async with (
        daemon(start_daemon) as running,
        serve(running, client_tokens=tokens(alice=ALICE, bob=BOB)) as (_http, base),
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {BOB}"}) as session,
        session.post(f"{base}/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 200
        job_id = response.headers["x-request-id"]
    done = [e for e in log_events(log_output) if e["event"] == "job.done"]
    assert [(e["job"], e["client"]) for e in done] == [(job_id, "client:bob")]
    assert BOB not in log_output.getvalue()


def test_every_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bearer token is compared with hmac.compare_digest against every client token, even after a match."""
    loaded = tokens(alice=ALICE, bob=BOB)
    compared: list[bytes] = []
    real = ingress_tokens.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(ingress_tokens.hmac, "compare_digest", spy)
    assert loaded.match(f"Bearer {ALICE}") == "alice"
    assert sorted(compared) == sorted([ALICE.encode(), BOB.encode()])
    assert loaded.match(f"Basic {ALICE}") is None
    assert loaded.match(None) is None


def test_loaded_tokens_are_redacted_from_logs() -> None:
    """Every client token the daemon loads is masked in log text, as a provider key is."""
    tokens(alice=ALICE)
    assert logs.redact_text(f"saw {ALICE} here") == f"saw {logs.REDACTED} here"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f"{ALICE}\n# a comment\n", "more than one line"),
        ("short\n", "at least 16"),
        ("\n", "empty"),
    ],
)
def test_a_careless_token_file_is_refused_by_name(
    tmp_path: Path, content: str, problem: str
) -> None:
    """A token file with a second line, a short token or nothing is a ConfigError naming it."""
    path = tmp_path / "alice.token"
    path.write_text(content)
    with pytest.raises(ConfigError, match=problem) as caught:
        ingress_web.ClientTokens.load({"alice": ClientConfig(token_file=str(path))}, {})
    assert f"clients.alice.token_file {path}" in str(caught.value)
    assert ALICE not in str(caught.value)


async def test_unix_front_serves_without_tokens(start_daemon: Any, tmp_path: Path) -> None:
    """A Unix-socket front with no client token serves anyone its file mode lets in."""
    path = str(tmp_path / "http.sock")
    async with (
        daemon(start_daemon) as running,
        serve(running, listen=None, socket=path),
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session,
        session.get("http://local/v1/models") as response,
    ):
        assert response.status == 200


async def test_unix_front_checks_tokens_when_some_are_configured(
    start_daemon: Any, tmp_path: Path
) -> None:
    """With client tokens, a Unix-socket front refuses a request without one."""
    path = str(tmp_path / "http.sock")
    async with (
        daemon(start_daemon) as running,
        serve(running, listen=None, socket=path, client_tokens=tokens(alice=ALICE)),
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session,
    ):
        async with session.get("http://local/v1/models") as anonymous:
            assert anonymous.status == 401
        headers = {"Authorization": f"Bearer {ALICE}"}
        async with session.get("http://local/v1/models", headers=headers) as alice:
            assert alice.status == 200


# -- /metrics ---------------------------------------------------------------------------


@asynccontextmanager
async def metrics_on(running: Running, listen: str, **options: Any) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(
            lambda task_status: serve_metrics(
                running.daemon.scheduler,
                MetricsConfig(listen=listen),
                task_status=task_status,
                **options,
            )
        )
        try:
            yield port_of(addresses[0])
        finally:
            tg.cancel_scope.cancel()


async def test_metrics_off_loopback_needs_a_client_token(start_daemon: Any) -> None:
    """/metrics on a non-loopback listen answers a scrape only with a client token."""
    async with (
        daemon(start_daemon) as running,
        metrics_on(running, "0.0.0.0:0", tokens=tokens(alice=ALICE)) as port,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"http://127.0.0.1:{port}/metrics") as anonymous:
            assert anonymous.status == 401
        headers = {"Authorization": f"Bearer {ALICE}"}
        async with session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as alice:
            assert alice.status == 200
            assert "dispatcher_queue_depth" in await alice.text()


async def test_metrics_off_loopback_without_tokens_refuses_to_start(start_daemon: Any) -> None:
    """/metrics on a non-loopback listen with no client token refuses to start, saying why."""
    async with daemon(start_daemon) as running:
        with anyio.fail_after(5), pytest.raises(ConfigError, match=r"\[metrics\] listen"):
            await serve_metrics(running.daemon.scheduler, MetricsConfig(listen="0.0.0.0:0"))


async def test_metrics_on_loopback_is_anonymous_and_says_so(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """/metrics on loopback needs no token, and its listening line says it is anonymous."""
    async with (
        daemon(start_daemon) as running,
        metrics_on(running, "127.0.0.1:0") as port,
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
    [listening] = [e for e in log_events(log_output) if e["event"] == "metrics.listening"]
    assert "anonymous" in listening["access"]
    assert "loopback" in listening["access"]


# -- connections and time limits --------------------------------------------------------

GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: local\r\n\r\n"


async def test_connections_past_the_cap_get_503_and_are_closed(start_daemon: Any) -> None:
    """Past max_connections a new connection gets a 503 with Retry-After and is closed; a freed slot serves again."""
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True, max_connections=2) as (http, base),
    ):
        port = port_of(base)
        with anyio.fail_after(5):
            first = await anyio.connect_tcp("127.0.0.1", port)
            second = await anyio.connect_tcp("127.0.0.1", port)
            for stream in (first, second):  # served: both hold a slot, kept alive
                await stream.send(GET_MODELS)
                assert (await read_response(stream)).startswith(b"HTTP/1.1 200")
            async with await anyio.connect_tcp("127.0.0.1", port) as third:
                refused = await read_all(third)
            await first.aclose()
            assert http.service.cap is not None
            while http.service.cap.open >= 2:  # noqa: ASYNC110  # the server notices the close
                await anyio.sleep(0.01)
            async with await anyio.connect_tcp("127.0.0.1", port) as fourth:
                await fourth.send(GET_MODELS)
                assert (await read_response(fourth)).startswith(b"HTTP/1.1 200")
            await second.aclose()
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"Retry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "overloaded"


async def test_headers_that_never_end_are_dropped(start_daemon: Any) -> None:
    """A connection that sends half its headers and stalls is closed after header_timeout_s."""
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True, header_timeout_s=0.3) as (_http, base),
        await anyio.connect_tcp("127.0.0.1", port_of(base)) as stream,
    ):
        await stream.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: local\r\nContent-")
        with anyio.fail_after(5):
            assert await read_all(stream) == b""


async def test_trickled_headers_are_dropped(start_daemon: Any) -> None:
    """Headers trickled a byte at a time are cut at header_timeout_s, however often bytes come."""
    head = b"GET /v1/models HTTP/1.1\r\nHost: local\r\nX-Slow: " + b"a" * 4000
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True, header_timeout_s=0.3) as (_http, base),
        await anyio.connect_tcp("127.0.0.1", port_of(base)) as stream,
    ):
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_sending, stream, [bytes([b]) for b in head], 0.02)
                answer = await read_all(stream)
                tg.cancel_scope.cancel()
    assert answer == b""


async def test_slow_body_is_answered_408_and_dropped(start_daemon: Any) -> None:
    """A body that stops short of its Content-Length gets a 408 and the connection closes."""
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True, body_timeout_s=0.3) as (_http, base),
        await anyio.connect_tcp("127.0.0.1", port_of(base)) as stream,
    ):
        await stream.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: local\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"model": "dispatcher/default"'
        )
        with anyio.fail_after(5):
            answer = await read_all(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "timeout"


async def test_endless_slow_chunked_body_is_dropped(start_daemon: Any) -> None:
    """A chunked body that never ends, sent slowly, gets a 408 and the connection closes."""
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True, body_timeout_s=0.3) as (_http, base),
        await anyio.connect_tcp("127.0.0.1", port_of(base)) as stream,
    ):
        await stream.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: local\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_sending, stream, endless(b"1\r\n \r\n"), 0.02)
                answer = await read_all(stream)
                tg.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408")


async def test_endless_fast_chunked_body_is_cut_at_the_size_limit(start_daemon: Any) -> None:
    """A chunked body that never ends, sent fast, gets a 413 and the connection closes at once."""
    chunk = b"1000\r\n" + b" " * 0x1000 + b"\r\n"
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True, max_body_bytes=64 * 1024) as (_http, base),
        await anyio.connect_tcp("127.0.0.1", port_of(base)) as stream,
    ):
        await stream.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: local\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_sending, stream, endless(chunk), 0)
                answer = await read_all(stream)
                tg.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 413")


# -- aiohttp's own logs and answers -----------------------------------------------------

KEY_SHAPED = "sk-proj-Mw8Qz1Tx6Rb3Hn9Lc4Vd"


async def test_malformed_request_leaks_its_authorization_nowhere(
    start_daemon: Any, log_output: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    """A malformed request's Authorization line is echoed by neither the 400 nor any log or stderr."""
    async with (
        daemon(start_daemon) as running,
        serve(running, allow_anonymous=True) as (_http, base),
        await anyio.connect_tcp("127.0.0.1", port_of(base)) as stream,
    ):
        await stream.send(
            b"GET /v1/models HTTP/1.1\r\nHost: local\r\n"
            + f"Authorization: Bearer {KEY_SHAPED}\x01\r\n\r\n".encode()
        )
        with anyio.fail_after(5):
            answer = await read_all(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"
    assert KEY_SHAPED.encode() not in answer
    assert b"Authorization" not in body
    assert json.loads(body)["error"]["code"] == "bad_request"
    captured = capfd.readouterr()
    for text in (captured.err, captured.out, log_output.getvalue()):
        assert KEY_SHAPED not in text
        assert KEY_SHAPED[8:] not in text
    assert "http.malformed_request" in log_output.getvalue()


def test_aiohttp_loggers_go_through_the_redaction(
    log_output: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    """A record on aiohttp's loggers becomes a redacted event on the daemon's log, never raw stderr."""
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal"):
        logging.getLogger(name).error(
            "Error handling request: %s", f"Authorization: Bearer {KEY_SHAPED}"
        )
    captured = capfd.readouterr()
    assert KEY_SHAPED[8:] not in captured.err + captured.out
    events = [e for e in log_events(log_output) if e.get("logger", "").startswith("aiohttp.")]
    assert len(events) == 4
    assert all(KEY_SHAPED[8:] not in e["event"] and "[REDACTED]" in e["event"] for e in events)


# -- base64 keys ------------------------------------------------------------------------


def encoded_forms(text: str) -> list[str]:
    """``text`` in base64 as an upstream might send it: standard, urlsafe, padded or not."""
    raw = text.encode()
    std, safe = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    return [std, std.rstrip("="), safe, safe.rstrip("=")]


def test_base64_of_a_loaded_secret_is_masked() -> None:
    """The base64 of a loaded secret, alone or inside a larger blob at any offset, is masked."""
    logs.add_secret(CANARY)
    for prefix in ("", "x", "xy", "Bearer ", '{"api_key": "'):
        for form in encoded_forms(f"{prefix}{CANARY}-tail"):
            masked = logs.redact_text(f"upstream said: {form} (decode it)")
            assert logs.REDACTED in masked, (prefix, form)
            assert base64_leaks(masked) == [], (prefix, masked)
    for form in encoded_forms(CANARY):
        assert logs.redact_text(form) == logs.REDACTED


@asynccontextmanager
async def base64_echoing_upstream() -> AsyncIterator[str]:
    """An OpenAI-style server that refuses every request with 400, quoting the key in base64."""

    async def refuse(request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        std = base64.b64encode(key.encode()).decode()
        safe = base64.urlsafe_b64encode(f"Bearer {key}".encode()).decode().rstrip("=")
        message = f"Incorrect API key provided (b64 {std}; header {safe})"
        return web.json_response({"error": {"message": message, "code": "invalid"}}, status=400)

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


def base64_leaks(text: str) -> list[str]:
    """Any base64 run of the canary's bytes found in ``text``."""
    forms = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + CANARY.encode()).decode()
        core = encoded[-(-8 * offset // 6) : 8 * (offset + len(CANARY)) // 6]
        forms += [core, core.translate(str.maketrans("+/", "-_"))]
    return [form for form in forms if form[4:-4] in text]


async def test_base64_key_in_an_upstream_error_reaches_neither_reply_nor_log(
    start_daemon: Any, log_output: io.StringIO
) -> None:
    """An upstream that quotes the key back in base64 has it masked in the socket reply, the HTTP reply and the log."""
    async with base64_echoing_upstream() as url:
        entry = {"url": url, "model": "m", "api_key_env": "CANARY_KEY", "timeout_s": 5.0}
        async with (
            start_daemon(build_config({"echo": entry}), environ={"CANARY_KEY": CANARY}) as running,
            running.client() as client,
        ):
            with anyio.fail_after(5):
                reply = await client.call(chat("hello"))
            assert isinstance(reply, Error)
            async with (
                serve(running, allow_anonymous=True) as (_http, base),
                aiohttp.ClientSession() as session,
                session.post(f"{base}/v1/chat/completions", json=CHAT) as response,
            ):
                http_reply = await response.text()
    assert "Incorrect API key provided" in reply.message
    assert "Incorrect API key provided" in http_reply
    assert base64_leaks(reply.message) == []
    assert base64_leaks(http_reply) == []
    assert "attempt.failed" in log_output.getvalue()
    assert base64_leaks(log_output.getvalue()) == []
