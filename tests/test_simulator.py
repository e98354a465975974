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
    expected = {  # model, latency at scale 1, concurrency, rpm, thinking
        "zhipu": ("glm-4-flash", 1.03, 1, 0, True),
        "hunyuan": ("hunyuan-lite", 1.20, 5, 0, False),
        "nvidia1": ("z-ai/glm4.7", 7.17, 5, 40, True),
        "nvidia2": ("z-ai/glm4.7", 2.68, 5, 40, True),
        "siliconflow": ("BAAI/bge-large-zh-v1.5", 0.10, 0, 5, False),
    }
    for name, (model, latency, concurrency, rpm, thinking) in expected.items():
        b = behaviours[name]
        assert (b.model, b.concurrency, b.rpm, b.thinking) == (model, concurrency, rpm, thinking)
        assert math.isclose(b.latency_s, latency * 0.01)
        assert b.window_s == 60.0
        assert b.api_key == "sk-sim"
        assert SEED_BEHAVIOURS[name].latency_s == latency
    assert behaviours["siliconflow"].kind == "embed"
    assert behaviours["siliconflow"].daily_tokens == 500_000
    assert behaviours["siliconflow"].embed_dims == 1024


# What SEED_BEHAVIOURS held, written out by hand, before it was derived from the
# config's built-in table: `dispatcher bench` results must not move.
SEED_BEHAVIOURS_BEFORE_DERIVATION = {
    "zhipu": Behaviour(
        name="zhipu",
        model="glm-4-flash",
        latency_s=1.03,
        jitter=0.1,
        concurrency=1,
        thinking=True,
        seed=1,
    ),
    "hunyuan": Behaviour(
        name="hunyuan", model="hunyuan-lite", latency_s=1.20, jitter=0.1, concurrency=5, seed=2
    ),
    "nvidia1": Behaviour(
        name="nvidia1",
        model="z-ai/glm4.7",
        latency_s=7.17,
        jitter=0.1,
        concurrency=5,
        rpm=40,
        thinking=True,
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
