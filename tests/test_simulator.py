"""The fake providers: OpenAI wire format, hard limits answered with 429, scripted faults."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest

from dispatcher.contract.config import BUILTIN_PROVIDERS
from dispatcher.testing.simulator import (
    SEED_BEHAVIOURS,
    SEED_OVERRIDES,
    Behaviour,
    FakeProvider,
    Fault,
    Simulator,
    behaviour_from_config,
    estimate_tokens,
    seed_behaviours,
)

CHAT: dict[str, Any] = {
    "model": "fake-model",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the capital of France and why is it Paris"},
    ],
}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def sse_events(raw: str) -> list[str]:
    """The payloads of the ``data:`` lines of an SSE body, in order."""
    return [line.removeprefix("data: ") for line in raw.split("\n\n") if line.startswith("data: ")]


@pytest.mark.anyio
async def test_chat_answer_has_openai_shape_and_usage(session: aiohttp.ClientSession) -> None:
    """A plain chat request gets an OpenAI chat.completion echoing the last user message."""
    async with FakeProvider(Behaviour(name="p", model="m1")) as fake:
        assert fake.url.endswith("/v1/chat/completions")
        async with session.post(fake.url, json=CHAT) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["object"] == "chat.completion"
    assert answer["id"]
    assert answer["model"] == "fake-model"
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == (
        "[p] m1 answers: what is the capital of France and why is it Paris"
    )
    assert "reasoning_content" not in choice["message"]
    prompt = math.ceil(len("be brief") / 4) + math.ceil(len(CHAT["messages"][1]["content"]) / 4)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == prompt
    assert usage["completion_tokens"] == estimate_tokens(choice["message"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert fake.stats.bodies == [CHAT]
    assert (fake.stats.requests, fake.stats.ok, fake.stats.errors) == (1, 1, 0)


def test_token_estimate_counts_cjk_characters_one_each() -> None:
    """Tokens are one per CJK character plus a quarter of the other characters, rounded up."""
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("你好 abc") == 3


@pytest.mark.anyio
async def test_max_tokens_truncates_content_to_that_many_words(
    session: aiohttp.ClientSession,
) -> None:
    """max_tokens caps the answer at that many whitespace-separated words."""
    async with (
        FakeProvider(Behaviour(name="p")) as fake,
        session.post(fake.url, json={**CHAT, "max_tokens": 3}) as resp,
    ):
        answer = await resp.json()
    assert answer["choices"][0]["message"]["content"] == "[p] fake-model answers:"
    assert answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "ask",
    [
        pytest.param({"thinking": {"type": "enabled"}}, id="zhipu"),
        pytest.param(
            {"chat_template_kwargs": {"enable_thinking": True, "clear_thinking": False}},
            id="nvidia",
        ),
    ],
)
async def test_thinking_request_returns_reasoning_content(
    session: aiohttp.ClientSession, ask: dict[str, Any]
) -> None:
    """Either style of thinking request gets message.reasoning_content from a thinking provider."""
    async with (
        FakeProvider(Behaviour(name="deep", thinking=True)) as deep,
        FakeProvider(Behaviour(name="flat")) as flat,
    ):
        async with session.post(deep.url, json={**CHAT, **ask}) as resp:
            deep_message = (await resp.json())["choices"][0]["message"]
        async with session.post(flat.url, json={**CHAT, **ask}) as resp:
            flat_message = (await resp.json())["choices"][0]["message"]
    assert deep_message["reasoning_content"].startswith("[deep] ")
    assert deep_message["content"].startswith("[deep] ")
    assert "reasoning_content" not in flat_message


@pytest.mark.anyio
async def test_stream_sends_chunks_that_reassemble_and_end_with_done(
    session: aiohttp.ClientSession,
) -> None:
    """A streamed answer is role, reasoning and content deltas, a usage chunk, then [DONE]."""
    behaviour = Behaviour(name="p", thinking=True, latency_s=0.05)
    body = {**CHAT, "stream": True, "thinking": {"type": "enabled"}}
    async with FakeProvider(behaviour) as fake:
        async with session.post(fake.url, json={**CHAT, "thinking": {"type": "enabled"}}) as resp:
            plain = (await resp.json())["choices"][0]
        async with session.post(fake.url, json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant"
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert content == plain["message"]["content"]
    assert reasoning == plain["message"]["reasoning_content"]
    assert len([d for d in deltas if d.get("content")]) > 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert fake.stats.ok == 2


@pytest.mark.anyio
async def test_embeddings_are_unit_vectors_deterministic_per_text(
    session: aiohttp.ClientSession,
) -> None:
    """Embeddings have embed_dims unit-length floats, the same for the same text."""
    behaviour = Behaviour(name="e", kind="embed", model="bge", embed_dims=64)
    body = {"model": "bge", "input": ["你好", "hello", "你好"], "encoding_format": "float"}
    async with FakeProvider(behaviour) as fake:
        assert fake.url.endswith("/v1/embeddings")
        async with session.post(fake.url, json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
        async with session.post(fake.url, json={"model": "bge", "input": "hello"}) as resp:
            single = await resp.json()
    assert answer["object"] == "list"
    vectors = [item["embedding"] for item in answer["data"]]
    assert [item["index"] for item in answer["data"]] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0) for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert single["data"][0]["embedding"] == vectors[1]
    assert answer["usage"] == {"prompt_tokens": 2 + 2 + 2, "total_tokens": 6}


@pytest.mark.anyio
async def test_daily_token_budget_answers_429_once_spent(session: aiohttp.ClientSession) -> None:
    """An embedding request that would pass daily_tokens gets 429 and spends nothing."""
    behaviour = Behaviour(name="e", kind="embed", embed_dims=8, daily_tokens=10)
    async with FakeProvider(behaviour) as fake:
        statuses = []
        for text in ["a" * 32, "b" * 12, "c" * 8]:  # 8 tokens, then 3 (too many), then 2
            async with session.post(fake.url, json={"model": "m", "input": text}) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [200, 429, 200]


@pytest.mark.anyio
async def test_concurrency_limit_answers_429_with_retry_after(
    session: aiohttp.ClientSession,
) -> None:
    """A request beyond the concurrency limit gets 429 at once with Retry-After."""
    async with FakeProvider(Behaviour(name="p", concurrency=1, latency_s=0.3)) as fake:
        statuses: list[int] = []

        async def first() -> None:
            async with session.post(fake.url, json=CHAT) as resp:
                statuses.append(resp.status)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await fake.wait_until(lambda stats: stats.serving == 1)
                async with session.post(fake.url, json=CHAT) as resp:
                    assert resp.status == 429
                    assert resp.headers["Retry-After"] == "1"
                    error = (await resp.json())["error"]
                assert fake.stats.serving == 1
    assert statuses == [200]
    assert error["type"] == "rate_limit_error"
    assert error["message"]
    assert (fake.stats.ok, fake.stats.rate_limited, fake.stats.max_in_flight) == (1, 1, 2)


@pytest.mark.anyio
async def test_rpm_is_a_sliding_window_of_accepted_requests(
    session: aiohttp.ClientSession,
) -> None:
    """More than rpm accepted requests in any window_s gets 429; rejected ones do not count."""
    window = 0.5
    async with FakeProvider(Behaviour(name="p", rpm=2, window_s=window)) as fake:

        async def status_at(offset: float) -> tuple[int, dict[str, str]]:
            await anyio.sleep(max(0.0, start + offset - time.monotonic()))
            async with session.post(fake.url, json=CHAT) as resp:
                return resp.status, dict(resp.headers)

        start = time.monotonic()
        assert (await status_at(0.0))[0] == 200  # A, in the window until 0.5
        assert (await status_at(0.3))[0] == 200  # B, in the window until 0.8
        assert (await status_at(0.6))[0] == 200  # C: A has left the window
        status, headers = await status_at(0.6)  # D: B and C fill it
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert (await status_at(0.85))[0] == 200  # E: B left; D was never counted
    assert (fake.stats.ok, fake.stats.rate_limited, fake.stats.requests) == (4, 1, 5)


@pytest.mark.anyio
async def test_wrong_or_missing_api_key_gets_401(session: aiohttp.ClientSession) -> None:
    """With api_key set, a request without the right bearer token gets 401."""
    async with FakeProvider(Behaviour(name="p", api_key="sk-right")) as fake:
        async with session.post(
            fake.url, json=CHAT, headers={"Authorization": "Bearer sk-wrong"}
        ) as resp:
            assert resp.status == 401
            error = (await resp.json())["error"]
        async with session.post(fake.url, json=CHAT) as resp:
            assert resp.status == 401
        async with session.post(
            fake.url, json=CHAT, headers={"Authorization": "Bearer sk-right"}
        ) as resp:
            assert resp.status == 200
    assert error["type"] == "invalid_request_error"
    assert fake.stats.headers[-1]["Authorization"] == "Bearer sk-right"
    assert (fake.stats.errors, fake.stats.ok) == (2, 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"model": "m", "messages": []}, id="no-messages"),
        pytest.param({"messages": CHAT["messages"]}, id="no-model"),
        pytest.param({**CHAT, "max_tokens": 0}, id="bad-max-tokens"),
        pytest.param([1, 2], id="not-an-object"),
    ],
)
async def test_invalid_chat_body_gets_400(session: aiohttp.ClientSession, body: object) -> None:
    """A chat body without model or non-empty messages gets 400 invalid_request_error."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        async with session.post(fake.url, json=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert fake.stats.errors == 1
    assert error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.mark.anyio
async def test_scripted_status_faults_apply_once_each_in_order(
    session: aiohttp.ClientSession,
) -> None:
    """Scripted status faults answer the next requests one each, with Retry-After if given."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        fake.script(
            Fault(kind="status", status=503), Fault(kind="status", status=429, retry_after=2)
        )
        seen = []
        for _ in range(3):
            async with session.post(fake.url, json=CHAT) as resp:
                seen.append((resp.status, resp.headers.get("Retry-After")))
    assert seen == [(503, None), (429, "2"), (200, None)]
    assert (fake.stats.errors, fake.stats.rate_limited, fake.stats.ok) == (1, 1, 1)


@pytest.mark.anyio
async def test_hang_fault_is_ended_by_the_client_timeout(session: aiohttp.ClientSession) -> None:
    """A hung request never answers; the client's timeout ends it and frees the handler."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        fake.script(Fault(kind="hang"))
        with pytest.raises(TimeoutError):
            await session.post(fake.url, json=CHAT, timeout=aiohttp.ClientTimeout(total=0.2))
        with anyio.fail_after(5):
            await fake.wait_until(lambda stats: stats.in_flight == 0)
        async with session.post(fake.url, json=CHAT) as resp:
            assert resp.status == 200
    assert fake.stats.dropped == 1


@pytest.mark.anyio
async def test_close_drops_hung_requests_promptly(session: aiohttp.ClientSession) -> None:
    """Closing the provider ends a hung request at once with a disconnect."""
    fake = FakeProvider(Behaviour(name="p"))
    await fake.start()
    fake.script(Fault(kind="hang"))
    outcome: list[BaseException] = []

    async def hung() -> None:
        try:
            await session.post(fake.url, json=CHAT)
        except aiohttp.ClientError as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hung)
            await fake.wait_until(lambda stats: stats.in_flight == 1 and stats.bodies != [])
            await fake.aclose()
    assert isinstance(outcome[0], aiohttp.ServerDisconnectedError)
    assert fake.stats.dropped == 1


@pytest.mark.anyio
async def test_reset_fault_closes_the_connection_without_answer(
    session: aiohttp.ClientSession,
) -> None:
    """A reset fault drops the connection without any response."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        fake.script(Fault(kind="reset"))
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(fake.url, json=CHAT)
    assert (fake.stats.requests, fake.stats.dropped, fake.stats.ok) == (1, 1, 0)


@pytest.mark.anyio
async def test_drop_midstream_cuts_the_stream_after_some_content_chunks(
    session: aiohttp.ClientSession,
) -> None:
    """drop_midstream sends after_chunks content chunks, then cuts the connection."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        fake.script(Fault(kind="drop_midstream", after_chunks=2))
        events: list[str] = []

        async def read_events(resp: aiohttp.ClientResponse) -> None:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line.decode().removeprefix("data: ").strip())  # noqa: PERF401 -- keep what came before the cut

        async with session.post(fake.url, json={**CHAT, "stream": True}) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_events(resp)
    deltas = [msgspec.json.decode(event)["choices"][0]["delta"] for event in events]
    assert [d for d in deltas if d.get("content")] == deltas[1:]
    assert len(deltas) == 3
    assert fake.stats.dropped == 1


@pytest.mark.anyio
async def test_slow_fault_adds_latency(session: aiohttp.ClientSession) -> None:
    """A slow fault adds delay_s to the answer's latency."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        fake.script(Fault(kind="slow", delay_s=0.2))
        started = time.monotonic()
        async with session.post(fake.url, json=CHAT) as resp:
            assert resp.status == 200
        assert time.monotonic() - started >= 0.2


@pytest.mark.anyio
async def test_set_down_answers_every_request_with_that_status(
    session: aiohttp.ClientSession,
) -> None:
    """A provider set down answers every request with the given status until set healthy."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        fake.set_down(503)
        statuses = []
        for _ in range(2):
            async with session.post(fake.url, json=CHAT) as resp:
                statuses.append(resp.status)
                assert "error" in await resp.json()
        fake.set_down(None)
        async with session.post(fake.url, json=CHAT) as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 200]


@pytest.mark.anyio
async def test_fault_rates_are_seeded_and_carry_retry_after(
    session: aiohttp.ClientSession,
) -> None:
    """Random faults follow the seed; a random 429 carries the configured Retry-After."""
    outcomes = []
    for _ in range(2):
        async with FakeProvider(Behaviour(name="p", seed=7)) as fake:
            fake.set_fault_rates(status_500=0.3, status_429=0.3, retry_after=3)
            statuses = []
            for _ in range(12):
                async with session.post(fake.url, json=CHAT) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        assert resp.headers["Retry-After"] == "3"
            outcomes.append(statuses)
    assert outcomes[0] == outcomes[1]
    assert {500, 429, 200} <= set(outcomes[0])


@pytest.mark.anyio
async def test_simulator_runs_the_seed_providers_time_scaled(
    session: aiohttp.ClientSession,
) -> None:
    """The simulator serves the five SEED providers with latencies scaled and limits kept."""
    with anyio.fail_after(5):
        async with Simulator(time_scale=0.01, api_key="sk-sim") as sim:
            assert set(sim.urls) == {"zhipu", "hunyuan", "nvidia1", "nvidia2", "siliconflow"}
            auth = {"Authorization": "Bearer sk-sim"}
            async with session.post(sim.urls["zhipu"], json=CHAT, headers=auth) as resp:
                assert resp.status == 200
                answer = await resp.json()
            embed = {"model": "BAAI/bge-large-zh-v1.5", "input": "你好"}
            async with session.post(sim.urls["siliconflow"], json=embed, headers=auth) as resp:
                assert len((await resp.json())["data"][0]["embedding"]) == 1024
        assert sim.urls == {}
    behaviours = {name: fake.behaviour for name, fake in sim.providers.items()}
    assert answer["choices"][0]["message"]["content"].startswith("[zhipu] glm-4-flash answers:")
    agent = ("tools", "json_object")
    expected = {  # model, latency at scale 1, concurrency, rpm, thinking, capabilities
        "zhipu": ("glm-4-flash", 1.03, 1, 0, True, agent),
        "hunyuan": ("hunyuan-lite", 1.20, 5, 0, False, ()),
        "nvidia1": ("z-ai/glm4.7", 7.17, 5, 40, True, agent),
        "nvidia2": ("z-ai/glm4.7", 2.68, 5, 40, True, agent),
        "siliconflow": ("BAAI/bge-large-zh-v1.5", 0.10, 0, 5, False, ()),
    }
    for name, (model, latency, concurrency, rpm, thinking, capabilities) in expected.items():
        b = behaviours[name]
        assert (b.model, b.concurrency, b.rpm, b.thinking) == (model, concurrency, rpm, thinking)
        assert b.capabilities == capabilities
        assert math.isclose(b.latency_s, latency * 0.01)
        assert b.window_s == 60.0
        assert b.api_key == "sk-sim"
        assert SEED_BEHAVIOURS[name].latency_s == latency
    assert behaviours["siliconflow"].kind == "embed"
    assert behaviours["siliconflow"].daily_tokens == 500_000
    assert behaviours["siliconflow"].embed_dims == 1024


# -- agent-grade chat: tools, tool results, JSON mode, capabilities -----------------

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat"],
                },
                "note": {"type": "string"},
            },
            "required": ["city", "days", "metric", "unit", "tags", "where"],
        },
    },
}
WEATHER_ARGUMENTS = {
    "city": "what",  # the first word of CHAT's last user message
    "days": 1,
    "metric": True,
    "unit": "celsius",
    "tags": [],
    "where": {"lat": 1},
}
CLOCK: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
WITH_TOOLS: dict[str, Any] = {**CHAT, "tools": [WEATHER]}


async def post_json(
    session: aiohttp.ClientSession, url: str, body: object
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` and return the status and the decoded JSON answer."""
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def stream_chunks(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """POST ``body`` streamed; return its chunks, after checking the stream ends with [DONE]."""
    async with session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    return [msgspec.json.decode(event) for event in events[:-1]]


def assemble_calls(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Streamed tool-call deltas put back together, by index, in the plain answer's shape."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(
                delta["index"],
                {"id": None, "type": None, "function": {"name": None, "arguments": ""}},
            )
            for key in ("id", "type"):
                if key in delta:
                    call[key] = delta[key]
            function = delta.get("function", {})
            if "name" in function:
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments", "")
    return calls


@pytest.mark.anyio
async def test_tools_are_answered_with_a_call_filling_the_required_arguments(
    session: aiohttp.ClientSession,
) -> None:
    """A request offering a tool gets a tool call whose arguments fill the schema's required fields."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        status, answer = await post_json(session, fake.url, WITH_TOOLS)
    assert status == 200
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert msgspec.json.decode(call["function"]["arguments"]) == WEATHER_ARGUMENTS
    assert fake.stats.tool_requests == 1
    assert fake.stats.bodies[-1]["tools"] == [WEATHER]


@pytest.mark.anyio
async def test_streamed_tool_call_reassembles_into_the_plain_call(
    session: aiohttp.ClientSession,
) -> None:
    """A streamed tool call is an id-and-name delta then argument pieces that join to the plain call."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        _, plain = await post_json(session, fake.url, WITH_TOOLS)
        chunks = await stream_chunks(session, fake.url, WITH_TOOLS)
    [plain_call] = plain["choices"][0]["message"]["tool_calls"]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}
    pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert pieces[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert pieces[0]["type"] == "function"
    assert all(set(piece) == {"index", "function"} for piece in pieces[1:])
    assert len(pieces) > 2
    [call] = assemble_calls(chunks).values()
    assert call["id"].startswith("call_")
    assert call["id"] != plain_call["id"]  # every call has its own id
    assert {**call, "id": None} == {**plain_call, "id": None}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(d.get("content") is None for d in deltas)


@pytest.mark.anyio
async def test_tool_result_turn_is_answered_with_text_quoting_the_result(
    session: aiohttp.ClientSession,
) -> None:
    """When the last message is a tool result, the answer is text that includes it."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    body = {
        **WITH_TOOLS,
        "messages": [
            *CHAT["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
    }
    async with FakeProvider(Behaviour(name="p", model="m1")) as fake:
        status, answer = await post_json(session, fake.url, body)
    assert status == 200
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "[p] m1 answers: the tool said sunny, 21 C"
    assert "tool_calls" not in choice["message"]


@pytest.mark.anyio
async def test_two_tools_are_called_in_parallel_at_two_indexes(
    session: aiohttp.ClientSession,
) -> None:
    """With two tools and parallel calls allowed, a stream calls both, at indexes 0 and 1."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        chunks = await stream_chunks(session, fake.url, {**CHAT, "tools": [WEATHER, CLOCK]})
    calls = assemble_calls(chunks)
    assert sorted(calls) == [0, 1]
    assert [calls[i]["function"]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert msgspec.json.decode(calls[1]["function"]["arguments"]) == {"zone": "what"}
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.anyio
async def test_parallel_tool_calls_false_calls_only_the_first_tool(
    session: aiohttp.ClientSession,
) -> None:
    """parallel_tool_calls false makes the model call one tool, the first offered."""
    body = {**CHAT, "tools": [WEATHER, CLOCK], "parallel_tool_calls": False}
    async with FakeProvider(Behaviour(name="p")) as fake:
        _, answer = await post_json(session, fake.url, body)
    calls = answer["choices"][0]["message"]["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["get_weather"]


@pytest.mark.anyio
async def test_named_tool_choice_calls_that_tool_only(session: aiohttp.ClientSession) -> None:
    """A tool_choice naming a function makes the model call that one and no other."""
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = {**CHAT, "tools": [WEATHER, CLOCK], "tool_choice": choice}
    async with FakeProvider(Behaviour(name="p")) as fake:
        _, answer = await post_json(session, fake.url, body)
    calls = answer["choices"][0]["message"]["tool_calls"]
    assert [call["function"]["name"] for call in calls] == ["get_time"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.anyio
async def test_tool_choice_none_answers_with_text(session: aiohttp.ClientSession) -> None:
    """tool_choice "none" makes the model answer with text although tools are offered."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        _, answer = await post_json(session, fake.url, {**WITH_TOOLS, "tool_choice": "none"})
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].startswith("[p] fake-model answers: what is")
    assert "tool_calls" not in choice["message"]
    assert fake.stats.tool_requests == 1


@pytest.mark.anyio
async def test_json_object_content_is_a_json_object_plain_and_streamed(
    session: aiohttp.ClientSession,
) -> None:
    """response_format json_object makes the content a JSON object, the same when streamed."""
    body = {**CHAT, "response_format": {"type": "json_object"}}
    async with FakeProvider(Behaviour(name="p")) as fake:
        _, answer = await post_json(session, fake.url, body)
        chunks = await stream_chunks(session, fake.url, body)
    content = answer["choices"][0]["message"]["content"]
    assert msgspec.json.decode(content) == {
        "answer": "[p] fake-model answers: what is the capital of France and why is it Paris"
    }
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == content
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 1
    assert fake.stats.json_requests == 2


@pytest.mark.anyio
async def test_json_schema_content_is_an_instance_with_the_required_keys(
    session: aiohttp.ClientSession,
) -> None:
    """response_format json_schema makes the content JSON holding every required key, typed as asked."""
    schema = {
        "type": "object",
        "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "properties": {
            "capital": {"type": "string", "minLength": 6},
            "population": {"type": "integer", "minimum": 1000},
            "city": {"$ref": "#/$defs/City"},
            "sources": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "confidence": {"anyOf": [{"type": "null"}, {"type": "number", "maximum": 0.5}]},
            "optional": {"type": "string"},
        },
        "required": ["capital", "population", "city", "sources", "confidence"],
        "additionalProperties": False,
    }
    body = {
        **CHAT,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema},
        },
    }
    async with FakeProvider(Behaviour(name="p")) as fake:
        _, answer = await post_json(session, fake.url, body)
    content = msgspec.json.decode(answer["choices"][0]["message"]["content"])
    assert content == {
        "capital": "whatxx",
        "population": 1000,
        "city": {},
        "sources": ["what"],
        "confidence": 0,
    }
    assert answer["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_fake_without_tools_refuses_them_with_400_and_counts_them(
    session: aiohttp.ClientSession,
) -> None:
    """A fake lacking "tools" answers 400 to tools offered or tool turns, and counts both."""
    tool_turn = {
        **CHAT,
        "messages": [
            *CHAT["messages"],
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }
    async with FakeProvider(Behaviour(name="p", capabilities=("json_object",))) as fake:
        answers = [
            await post_json(session, fake.url, body) for body in (WITH_TOOLS, tool_turn, CHAT)
        ]
    assert [status for status, _ in answers] == [400, 400, 200]
    assert answers[0][1]["error"]["type"] == "invalid_request_error"
    assert "tools" in answers[0][1]["error"]["message"]
    assert (fake.stats.tool_requests, fake.stats.json_requests) == (2, 0)
    assert (fake.stats.errors, fake.stats.ok) == (2, 1)


@pytest.mark.anyio
async def test_fake_without_json_schema_refuses_it_and_accepts_json_object(
    session: aiohttp.ClientSession,
) -> None:
    """A fake lacking "json_schema" answers that format 400, json_object 200, counting both."""
    schema_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}
    async with FakeProvider(Behaviour(name="p", capabilities=("tools", "json_object"))) as fake:
        status, error = await post_json(
            session, fake.url, {**CHAT, "response_format": schema_format}
        )
        assert status == 400
        body = {**CHAT, "response_format": {"type": "json_object"}}
        assert (await post_json(session, fake.url, body))[0] == 200
    assert error["error"]["type"] == "invalid_request_error"
    assert "json_schema" in error["error"]["message"]
    assert fake.stats.json_requests == 2


@pytest.mark.anyio
async def test_max_tokens_ends_a_stream_with_finish_reason_length(
    session: aiohttp.ClientSession,
) -> None:
    """A stream cut at max_tokens sends that many words and ends with finish_reason "length"."""
    async with FakeProvider(Behaviour(name="p")) as fake:
        chunks = await stream_chunks(session, fake.url, {**CHAT, "max_tokens": 5})
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content.split() == ["[p]", "fake-model", "answers:", "what", "is"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# What SEED_BEHAVIOURS held, written out by hand, before it was derived from the
# config's built-in table: `dispatcher bench` results must not move.
# capabilities came later, copied from the config's table as well.
SEED_BEHAVIOURS_BEFORE_DERIVATION = {
    "zhipu": Behaviour(
        name="zhipu",
        model="glm-4-flash",
        latency_s=1.03,
        jitter=0.1,
        concurrency=1,
        thinking=True,
        capabilities=("tools", "json_object"),
        seed=1,
    ),
    "hunyuan": Behaviour(
        name="hunyuan",
        model="hunyuan-lite",
        latency_s=1.20,
        jitter=0.1,
        concurrency=5,
        capabilities=(),
        seed=2,
    ),
    "nvidia1": Behaviour(
        name="nvidia1",
        model="z-ai/glm4.7",
        latency_s=7.17,
        jitter=0.1,
        concurrency=5,
        rpm=40,
        thinking=True,
        capabilities=("tools", "json_object"),
        seed=3,
    ),
    "nvidia2": Behaviour(
        name="nvidia2",
        model="z-ai/glm4.7",
        latency_s=2.68,
        jitter=0.1,
        concurrency=5,
        rpm=40,
        thinking=True,
        capabilities=("tools", "json_object"),
        seed=4,
    ),
    "siliconflow": Behaviour(
        name="siliconflow",
        kind="embed",
        model="BAAI/bge-large-zh-v1.5",
        latency_s=0.10,
        jitter=0.1,
        rpm=5,
        daily_tokens=500_000,
        embed_dims=1024,
        capabilities=(),
        seed=5,
    ),
}


@pytest.mark.parametrize("name", sorted(SEED_BEHAVIOURS_BEFORE_DERIVATION))
def test_seed_fakes_derived_from_the_config_equal_the_hand_written_table(name: str) -> None:
    """Each seed fake derived from BUILTIN_PROVIDERS equals, field by field, the one written by hand."""
    derived = msgspec.structs.asdict(SEED_BEHAVIOURS[name])
    before = msgspec.structs.asdict(SEED_BEHAVIOURS_BEFORE_DERIVATION[name])
    assert {k: v for k, v in derived.items() if v != before[k]} == {}


def test_seed_fakes_are_rebuilt_identically_from_an_unchanged_config() -> None:
    """Deriving the fakes again from an untouched copy of the built-in table changes nothing."""
    copy = {name: msgspec.structs.replace(p) for name, p in BUILTIN_PROVIDERS.items()}
    assert seed_behaviours(copy) == SEED_BEHAVIOURS == seed_behaviours()
    assert list(SEED_BEHAVIOURS) == list(SEED_BEHAVIOURS_BEFORE_DERIVATION)  # the same order


def test_a_change_in_the_config_table_reaches_its_fake() -> None:
    """A provider's latency, limits or model changed in the config change its seed fake too."""
    changed = {
        **BUILTIN_PROVIDERS,
        "hunyuan": msgspec.structs.replace(
            BUILTIN_PROVIDERS["hunyuan"], model="hunyuan-turbo", latency_s=0.5, rpm=30
        ),
    }
    fake = seed_behaviours(changed)["hunyuan"]
    assert (fake.model, fake.latency_s, fake.rpm) == ("hunyuan-turbo", 0.5, 30)
    assert (fake.jitter, fake.seed) == (0.1, 2)  # the fake's own fields stay


def test_only_the_listed_overrides_separate_a_seed_fake_from_its_config() -> None:
    """Besides jitter and seed, a seed fake differs from its config entry only where SEED_OVERRIDES says."""
    for name, provider in BUILTIN_PROVIDERS.items():
        fake = SEED_BEHAVIOURS[name]
        plain = msgspec.structs.replace(
            behaviour_from_config(name, provider), jitter=fake.jitter, seed=fake.seed
        )
        differs = {k: v for k, v in msgspec.structs.asdict(fake).items() if v != getattr(plain, k)}
        assert differs == dict(SEED_OVERRIDES.get(name, {})), name
    assert SEED_OVERRIDES == {"siliconflow": {"concurrency": 0}}
