"""The OpenAI-compatible front, driven by the official ``openai`` package, unchanged."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import openai
import pytest
from openai import AsyncOpenAI

from dispatcher.contract.config import HttpConfig, parse_listen
from dispatcher.ingress.http_front import HttpFront
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import Running, build_config, fakes, provider_entry

pytestmark = pytest.mark.anyio

SECRET = "sk-this-must-never-reach-the-log-0123456789"


@asynccontextmanager
async def front(running: Running, **config: Any) -> AsyncIterator[str]:
    """An anonymous HTTP front on the running daemon's scheduler; yields its first address."""
    defaults = {"listen": "127.0.0.1:0", "allow_anonymous": True}
    http = HttpFront(running.daemon.scheduler, HttpConfig(**(defaults | config)))
    async with anyio.create_task_group() as tg:
        addresses = await tg.start(http.run)
        try:
            yield addresses[0]
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def openai_client(base: str, api_key: str = "unused") -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0) as client:
        yield client


def chat_and_embed(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"a": provider_entry(f["a"]), "e": provider_entry(f["e"])}


async def test_chat_completion(start_daemon: Any) -> None:
    """A plain chat completion comes back as a chat.completion with content and usage."""
    async with fakes(
        a=Behaviour(name="a", model="m-a", latency_s=0.01), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            completion = await client.chat.completions.create(
                model="dispatcher/realtime",
                messages=[{"role": "user", "content": "hello there"}],
                max_tokens=50,
            )
    assert completion.object == "chat.completion"
    assert completion.model == "m-a"
    assert "hello there" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    extra = completion.model_extra or {}
    assert extra["dispatcher"]["class"] == "realtime"
    assert f["a"].stats.bodies[-1]["max_tokens"] == 50


async def test_streaming_chat(start_daemon: Any) -> None:
    """A streamed completion arrives as chunks that join into the answer, then usage and [DONE]."""
    async with fakes(
        a=Behaviour(name="a", latency_s=0.02), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            stream = await client.chat.completions.create(
                model="dispatcher/default",
                messages=[{"role": "user", "content": "one two three four five six seven"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert len(with_choices) >= 3
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "one two three" in text
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0
    assert len({c.id for c in chunks}) == 1


async def test_reasoning_effort_asks_for_thinking(start_daemon: Any) -> None:
    """reasoning_effort turns thinking on, and the reasoning comes back as reasoning_content."""
    async with fakes(
        n=Behaviour(name="n", thinking=True), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config(
            {
                "n": provider_entry(f["n"], adapter="nvidia", thinking=True),
                "e": provider_entry(f["e"]),
            }
        )
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            completion = await client.chat.completions.create(
                model="n",
                messages=[{"role": "user", "content": "why?"}],
                reasoning_effort="high",
            )
    message = completion.choices[0].message
    assert (message.model_extra or {}).get("reasoning_content")
    assert f["n"].stats.bodies[-1]["chat_template_kwargs"]["enable_thinking"] is True


async def test_model_name_pins_a_provider(start_daemon: Any) -> None:
    """A provider's own name as the model sends the job to that provider only."""
    async with fakes(
        a=Behaviour(name="a"), b=Behaviour(name="b"), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config({**chat_and_embed(f), "b": provider_entry(f["b"])})
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            for i in range(3):
                await client.chat.completions.create(
                    model="b", messages=[{"role": "user", "content": f"hi {i}"}]
                )
    assert f["b"].stats.ok == 3
    assert f["a"].stats.requests == 0


async def test_embeddings(start_daemon: Any) -> None:
    """Embeddings come back in input order, as floats or (the client's default) base64."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed", embed_dims=8)) as f:
        config = build_config(chat_and_embed(f))
        async with start_daemon(config) as running, front(running) as base:
            async with running.client() as socket_client:
                direct = await socket_client.call({"op": "embed", "input": ["x", "y"]})
            async with openai_client(base) as client:
                packed = await client.embeddings.create(model="dispatcher/embed", input=["x", "y"])
                floats = await client.embeddings.create(
                    model="e", input="y", encoding_format="float"
                )
    assert [d.index for d in packed.data] == [0, 1]
    expected = getattr(direct, "embeddings", None)
    assert expected is not None
    assert packed.data[0].embedding == pytest.approx(expected[0], rel=1e-6)
    assert packed.data[1].embedding == pytest.approx(expected[1], rel=1e-6)
    assert floats.data[0].embedding == expected[1]
    assert packed.usage.total_tokens > 0


async def test_models_list(start_daemon: Any) -> None:
    """/v1/models lists our classes, dispatcher/embed and every enabled provider."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            ids = [model.id async for model in client.models.list()]
            one = await client.models.retrieve("dispatcher/bulk")
    assert ids[:5] == [
        "dispatcher/realtime",
        "dispatcher/bulk",
        "dispatcher/complex",
        "dispatcher/default",
        "dispatcher/embed",
    ]
    assert set(ids[5:]) == {"a", "e"}
    assert one.owned_by == "dispatcher"


async def test_unknown_model_is_404_model_not_found(start_daemon: Any) -> None:
    """An unknown model gets OpenAI's 404 with code model_not_found."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
    assert caught.value.code == "model_not_found"
    assert "dispatcher/default" in caught.value.message


async def test_context_too_long_is_400_context_length_exceeded(start_daemon: Any) -> None:
    """A prompt over every window gets 400 with OpenAI's context_length_exceeded code."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        config = build_config(
            {"a": provider_entry(f["a"], context_window=100), "e": provider_entry(f["e"])}
        )
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="dispatcher/default",
                    messages=[{"role": "user", "content": "word " * 2000}],
                )
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.type == "invalid_request_error"


async def test_upstream_failure_is_502_and_retryable(start_daemon: Any) -> None:
    """A job every provider failed with 5xx is a 502 upstream_failed the client may retry."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        f["a"].set_down(500)
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(
                    model="a", messages=[{"role": "user", "content": "hi"}]
                )
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert caught.value.type == "api_error"
    assert caught.value.response.headers["x-should-retry"] == "true"


async def test_upstream_refusal_is_400_and_not_retried(start_daemon: Any) -> None:
    """A request the provider refused with 400 is a 400 the client must not retry."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        f["a"].script(Fault(kind="status", status=400))
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="a", messages=[{"role": "user", "content": "hi"}]
                )
    assert caught.value.code == "upstream_failed"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert f["a"].stats.requests == 1


async def test_streamed_failure_before_any_chunk_keeps_its_status(start_daemon: Any) -> None:
    """A streamed job that fails before its first chunk still gets an HTTP error status."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        f["a"].script(Fault(kind="status", status=400))
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
        ):
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(
                    model="a", messages=[{"role": "user", "content": "hi"}], stream=True
                )
    assert caught.value.status_code == 400
    assert caught.value.response.headers["x-should-retry"] == "false"


async def test_overloaded_is_429_with_retry_after(start_daemon: Any) -> None:
    """Past max_queued the front answers 429 with Retry-After, which the client can honour."""
    async with fakes(
        a=Behaviour(name="a", latency_s=30.0), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config(chat_and_embed(f), daemon={"max_queued": 1})
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(
                lambda: client.chat.completions.create(
                    model="a", messages=[{"role": "user", "content": "slow"}]
                )
            )
            with anyio.fail_after(5):
                await f["a"].wait_until(lambda s: s.in_flight == 1)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model="a", messages=[{"role": "user", "content": "one too many"}]
                )
            tg.cancel_scope.cancel()
    assert caught.value.code == "overloaded"
    assert int(caught.value.response.headers["Retry-After"]) >= 1


async def test_client_disconnect_cancels_the_job(start_daemon: Any) -> None:
    """A client that hangs up mid-request gets its job cancelled and the slot freed."""
    async with fakes(
        a=Behaviour(name="a", latency_s=30.0), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config(chat_and_embed(f))
        async with start_daemon(config) as running, front(running) as base:
            scheduler = running.daemon.scheduler
            async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:

                async def post() -> None:
                    body = {"model": "a", "messages": [{"role": "user", "content": "slow"}]}
                    async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                        await response.read()

                tg.start_soon(post)
                with anyio.fail_after(5):
                    await f["a"].wait_until(lambda s: s.in_flight == 1)
                jobs = list(scheduler.active.values())
                tg.cancel_scope.cancel()
            with anyio.fail_after(5):
                await f["a"].wait_until(lambda s: s.in_flight == 0)
                await jobs[0].done.wait()
    outcome = jobs[0].outcome
    assert getattr(outcome, "code", None) == "cancelled"


async def test_authorization_is_ignored_and_never_logged(
    start_daemon: Any, log_output: Any
) -> None:
    """A bearer key is accepted, ignored, and appears in no log line."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            openai_client(base, api_key=SECRET) as client,
        ):
            completion = await client.chat.completions.create(
                model="dispatcher/default", messages=[{"role": "user", "content": "hi"}]
            )
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("nope")
    assert completion.choices[0].message.content
    logged = log_output.getvalue()
    assert "job.done" in logged
    assert SECRET not in logged
    assert all(SECRET not in str(h) for h in f["a"].stats.headers)


async def test_unknown_path_and_bad_json_get_openai_errors(start_daemon: Any) -> None:
    """Unknown endpoints and broken bodies still answer in OpenAI's error format."""
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        config = build_config(chat_and_embed(f))
        async with (
            start_daemon(config) as running,
            front(running) as base,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(f"{base}/v1/nothing") as response:
                missing = (response.status, await response.json())
            async with session.post(f"{base}/v1/chat/completions", data=b"{not json") as response:
                broken = (response.status, await response.json())
            async with session.post(
                f"{base}/v1/chat/completions", json={"model": "a", "messages": []}
            ) as response:
                empty = (response.status, await response.json())
    assert missing[0] == 404
    assert missing[1]["error"]["type"] == "invalid_request_error"
    assert broken[0] == 400
    assert "not valid JSON" in broken[1]["error"]["message"]
    assert empty[0] == 400
    assert "'messages' is empty" in empty[1]["error"]["message"]


async def test_serves_on_a_unix_socket(start_daemon: Any, tmp_path: Path) -> None:
    """With [http] socket the front answers over a Unix socket and removes it on exit."""
    path = tmp_path / "openai.sock"
    async with fakes(a=Behaviour(name="a"), e=Behaviour(name="e", kind="embed")) as f:
        config = build_config(chat_and_embed(f))
        async with start_daemon(config) as running, front(running, listen=None, socket=str(path)):
            connector = aiohttp.UnixConnector(path=str(path))
            async with aiohttp.ClientSession(connector=connector) as session:
                body = {"model": "a", "messages": [{"role": "user", "content": "over unix"}]}
                async with session.post("http://front/v1/chat/completions", json=body) as response:
                    answer = await response.json()
            assert path.exists()
            job = running.daemon.scheduler.lookup(answer["dispatcher"]["job"])
    assert "over unix" in answer["choices"][0]["message"]["content"]
    assert not path.exists()
    assert job is not None
    assert job.uid == os.getuid()
    assert job.client.startswith(f"http:{os.getuid()}:")


async def test_stop_accepting_closes_the_listener_but_answers_open_requests(
    start_daemon: Any,
) -> None:
    """During a drain new connections are refused while a request in flight is still answered."""
    async with fakes(
        a=Behaviour(name="a", latency_s=0.3), e=Behaviour(name="e", kind="embed")
    ) as f:
        config = build_config(chat_and_embed(f))
        async with start_daemon(config) as running, anyio.create_task_group() as tg:
            http = HttpFront(
                running.daemon.scheduler, HttpConfig(listen="127.0.0.1:0", allow_anonymous=True)
            )
            [base] = await tg.start(http.run)
            answers: list[int] = []

            async def post() -> None:
                body = {"model": "a", "messages": [{"role": "user", "content": "in flight"}]}
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(f"{base}/v1/chat/completions", json=body) as response,
                ):
                    answers.append(response.status)

            async with anyio.create_task_group() as requests:
                requests.start_soon(post)
                with anyio.fail_after(5):
                    await f["a"].wait_until(lambda s: s.in_flight == 1)
                with anyio.fail_after(5):
                    await http.stop_accepting()
                with pytest.raises(aiohttp.ClientConnectorError):
                    async with aiohttp.ClientSession() as session:
                        await session.get(f"{base}/v1/models")
            tg.cancel_scope.cancel()
    assert answers == [200]


def test_parse_listen() -> None:
    """HOST:PORT parses, IPv6 in brackets too; anything else is a config error naming the key."""
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen(":80") == ("127.0.0.1", 80)
    with pytest.raises(Exception, match=r"http.listen: expected HOST:PORT"):
        parse_listen("localhost", key="http.listen")
