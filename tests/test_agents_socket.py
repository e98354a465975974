"""Agent-grade chat on the NDJSON socket: every field reaches the provider, capability routing,
tool calls and honest errors."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.contract.protocol import Chunk, Error, Result
from dispatcher.testing.simulator import Behaviour, Fault
from tests.helpers import build_config, chat, fakes, provider_entry

pytestmark = pytest.mark.anyio

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
SAMPLING = {
    "stop": ["\n\n", "END"],
    "top_p": 0.9,
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"1234": -100},
    "user": "agent-7",
}


def _capable_and_plain() -> dict[str, Behaviour]:
    return {
        "smart": Behaviour(name="smart"),
        "plain": Behaviour(name="plain", capabilities=()),
    }


def _config(f: dict[str, Any], **smart: Any) -> Any:
    return build_config(
        {
            "plain": provider_entry(f["plain"], capabilities=[]),
            "smart": provider_entry(
                f["smart"], capabilities=["tools", "json_object", "json_schema"], **smart
            ),
        }
    )


async def test_every_sampling_field_and_extra_reach_the_provider(start_daemon: Any) -> None:
    """stop, top_p, seed, the penalties, logit_bias, user, extra and extra_body are all sent."""
    async with fakes(a=Behaviour(name="a")) as f:
        config = build_config(
            {"a": provider_entry(f["a"], extra_body={"enable_enhancement": True, "top_k": 1})}
        )
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(
                chat("hello", **SAMPLING, extra={"top_k": 5, "repetition_penalty": 1.1})
            )
    assert isinstance(reply, Result), reply
    body = f["a"].stats.bodies[-1]
    for name, value in SAMPLING.items():
        assert body[name] == value, name
    assert body["top_k"] == 5  # the job's own extra wins over the provider's extra_body
    assert body["repetition_penalty"] == 1.1
    assert body["enable_enhancement"] is True


async def test_a_tool_call_comes_back_in_openai_form(start_daemon: Any) -> None:
    """A job with tools gets the model's tool call, finish_reason tool_calls, no text."""
    async with (
        fakes(**_capable_and_plain()) as f,
        start_daemon(_config(f)) as running,
        running.client() as client,
    ):
        reply = await client.call(chat("weather in Paris?", tools=[WEATHER]))
    assert isinstance(reply, Result), reply
    assert reply.provider == "smart"
    assert reply.finish_reason == "tool_calls"
    assert reply.tool_calls is not None
    [call] = reply.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.id
    assert "city" in call.function.arguments
    assert f["plain"].stats.tool_requests == 0


async def test_a_streamed_tool_call_reassembles_to_the_result(start_daemon: Any) -> None:
    """Streamed tool-call pieces, joined by index, equal the calls in the final result."""
    async with (
        fakes(**_capable_and_plain()) as f,
        start_daemon(_config(f)) as running,
        running.client() as client,
    ):
        replies = [
            reply
            async for reply in client.request(
                chat("weather in Paris?", tools=[WEATHER], stream=True)
            )
        ]
    *chunks, final = replies
    assert isinstance(final, Result), final
    assert final.tool_calls is not None
    pieces = [
        call for chunk in chunks if isinstance(chunk, Chunk) for call in chunk.tool_calls or ()
    ]
    assert pieces, chunks
    assert pieces[0].id == final.tool_calls[0].id
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function is not None)
    assert arguments == final.tool_calls[0].function.arguments
    assert final.finish_reason == "tool_calls"


async def test_a_tool_result_turn_gets_the_answer(start_daemon: Any) -> None:
    """The follow-up turn, with the assistant's call and a role tool result, is answered."""
    async with (
        fakes(**_capable_and_plain()) as f,
        start_daemon(_config(f)) as running,
        running.client() as client,
    ):
        first = await client.call(chat("weather in Paris?", tools=[WEATHER]))
        assert isinstance(first, Result)
        assert first.tool_calls is not None
        call = first.tool_calls[0]
        messages = [
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ]
        second = await client.call({"op": "chat", "messages": messages, "tools": [WEATHER]})
    assert isinstance(second, Result), second
    assert second.finish_reason == "stop"
    assert "sunny" in (second.content or "")
    sent = f["smart"].stats.bodies[-1]["messages"]
    assert sent == messages  # passed on unchanged
    assert f["plain"].stats.tool_requests == 0


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
async def test_json_mode_goes_only_where_it_is_accepted(start_daemon: Any, kind: str) -> None:
    """Jobs asking for JSON never reach the provider without a JSON mode."""
    response_format: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        response_format["json_schema"] = {
            "name": "answer",
            "schema": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
            },
        }
    async with (
        fakes(**_capable_and_plain()) as f,
        start_daemon(_config(f)) as running,
        running.client() as client,
    ):
        replies = [
            await client.call(chat(f"question {i}", response_format=response_format))
            for i in range(6)
        ]
    assert all(isinstance(r, Result) and r.provider == "smart" for r in replies), replies
    assert f["plain"].stats.json_requests == 0
    assert f["smart"].stats.json_requests == 6


async def test_no_capable_provider_is_refused_at_once_naming_the_capability(
    start_daemon: Any,
) -> None:
    """A tool job for a class without tool support is refused, naming who would take it."""
    async with fakes(**_capable_and_plain()) as f:
        config = build_config(
            {
                "plain": provider_entry(f["plain"], capabilities=[]),
                "smart": provider_entry(f["smart"], capabilities=["tools"]),
            },
            classes={"default": ["plain"], "realtime": ["plain", "smart"]},
        )
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("weather?", tools=[WEATHER]))
            schema = await client.call(
                chat(
                    "weather?",
                    task="realtime",
                    response_format={"type": "json_schema", "json_schema": {"name": "x"}},
                )
            )
    assert isinstance(reply, Error)
    assert reply.code == "no_provider"
    assert "tools" in reply.message
    assert "smart" in reply.message
    assert isinstance(schema, Error)
    assert schema.code == "no_provider"
    assert "json_schema" in schema.message
    assert f["plain"].stats.requests == f["smart"].stats.requests == 0


async def test_an_upstream_400_is_final_after_one_attempt(start_daemon: Any) -> None:
    """A provider's 400 comes back as upstream_failed, not retryable, after exactly one request."""
    async with fakes(a=Behaviour(name="a"), b=Behaviour(name="b")) as f:
        config = build_config({"a": provider_entry(f["a"]), "b": provider_entry(f["b"])})
        f["a"].script(Fault(kind="status", status=400))
        f["b"].script(Fault(kind="status", status=400))
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call(chat("bad", providers=["a", "b"]))
    assert isinstance(reply, Error)
    assert reply.code == "upstream_failed"
    assert reply.retryable is False
    assert reply.upstream_status == 400
    assert f["a"].stats.requests + f["b"].stats.requests == 1


async def test_a_job_larger_than_the_whole_quota_says_it_can_never_fit(
    start_daemon: Any,
) -> None:
    """An embed job bigger than the daily budget is refused as too large, not as 'wait'."""
    async with fakes(e=Behaviour(name="e", kind="embed")) as f:
        config = build_config({"e": provider_entry(f["e"], daily_tokens=40)})
        async with start_daemon(config) as running, running.client() as client:
            reply = await client.call({"op": "embed", "input": ["word " * 200]})
    assert isinstance(reply, Error)
    assert reply.code == "quota_exhausted"
    assert reply.retryable is False
    assert "more than the whole daily quota" in reply.message
    assert f["e"].stats.requests == 0


async def test_a_field_zhipu_refuses_routes_the_job_elsewhere(start_daemon: Any) -> None:
    """Zhipu takes tool_choice 'auto' only: a forced tool goes to a provider that can force it."""
    async with fakes(z=Behaviour(name="z"), n=Behaviour(name="n")) as f:
        config = build_config(
            {
                "z": provider_entry(f["z"], adapter="zhipu", capabilities=["tools"]),
                "n": provider_entry(f["n"], adapter="nvidia", capabilities=["tools"]),
            }
        )
        async with start_daemon(config) as running, running.client() as client:
            forced = await client.call(
                chat("weather?", tools=[WEATHER], tool_choice="required", providers=["z", "n"])
            )
            pinned = await client.call(
                chat("weather?", tools=[WEATHER], tool_choice="required", providers=["z"])
            )
    assert isinstance(forced, Result), forced
    assert forced.provider == "n"
    assert isinstance(pinned, Error)
    assert pinned.code == "no_provider"
    assert "tool_choice" in pinned.message
    assert f["z"].stats.requests == 0
