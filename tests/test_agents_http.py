"""Agents on the OpenAI-compatible front: tools, JSON modes and every sampling field, end to end.

Each test drives a real daemon through its HTTP front with the official ``openai``
package (or LangChain on top of it), unchanged. The daemon routes over two fakes in
one class: ``hunyuan``, which like hunyuan-lite has neither tools nor a JSON mode
(``capabilities = []``, and the fake answers such requests with 400), listed first,
and ``capable``, which has all three. :func:`agent_front` checks on the way out of
every test that ``hunyuan`` never received a request with tools or JSON mode.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import anyio
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
)
from pydantic import BaseModel, SecretStr

from dispatcher.contract.chat import FunctionCall, ToolCall
from dispatcher.contract.config import HttpConfig
from dispatcher.contract.protocol import Result
from dispatcher.ingress.http_front import HttpFront
from dispatcher.ingress.openai_wire import whole_delta
from dispatcher.testing.simulator import Behaviour, FakeProvider, Fault
from tests.helpers import Running, build_config, fakes, provider_entry

pytestmark = pytest.mark.anyio

WEATHER: Final[ChatCompletionFunctionToolParam] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME: Final[ChatCompletionFunctionToolParam] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "hours24": {"type": "boolean"}},
            "required": ["city", "hours24"],
        },
    },
}
QUESTION: Final = "Paris: what is the weather like?"
ASK: Final[list[ChatCompletionMessageParam]] = [{"role": "user", "content": QUESTION}]


class Weather(BaseModel):
    city: str
    temperature_c: int


class Answer(BaseModel):
    answer: str


@dataclass
class Agents:
    """A daemon behind its HTTP front, an SDK client on it, and the two fakes it routes to."""

    client: AsyncOpenAI
    base: str
    hunyuan: FakeProvider
    capable: FakeProvider

    def body_at(self, provider: str) -> dict[str, Any]:
        """The last request body the named fake received."""
        fake = self.hunyuan if provider == "hunyuan" else self.capable
        return fake.stats.bodies[-1]


@asynccontextmanager
async def serve_front(running: Running) -> AsyncIterator[str]:
    """An HTTP front on the running daemon's scheduler; yields its base URL."""
    http = HttpFront(
        running.daemon.scheduler, HttpConfig(listen="127.0.0.1:0", allow_anonymous=True)
    )
    async with anyio.create_task_group() as tg:
        [base] = await tg.start(http.run)
        try:
            yield base
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def agent_front(start_daemon: Any, *, max_retries: int = 0) -> AsyncIterator[Agents]:
    """The two-fake daemon and its front; on exit, hunyuan must have seen no tools or JSON."""
    async with fakes(
        hunyuan=Behaviour(name="hunyuan", model="hunyuan-lite", capabilities=()),
        capable=Behaviour(name="capable", model="glm-fake"),
    ) as f:
        config = build_config(
            {
                "hunyuan": provider_entry(f["hunyuan"], adapter="hunyuan", capabilities=[]),
                "capable": provider_entry(
                    f["capable"], capabilities=["tools", "json_object", "json_schema"]
                ),
            }
        )
        async with (
            start_daemon(config) as running,
            serve_front(running) as base,
            AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=max_retries) as client,
        ):
            yield Agents(client, base, f["hunyuan"], f["capable"])
        stats = f["hunyuan"].stats
        assert (stats.tool_requests, stats.json_requests) == (0, 0)


def function_calls(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    """The message's tool calls, each a function call (the only kind the daemon answers)."""
    calls = message.tool_calls or []
    functions = [c for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert functions == calls
    return functions


def provider_of(completion: Any) -> str:
    """The provider that answered, from the completion's ``dispatcher`` extension."""
    provider: str = (completion.model_extra or {})["dispatcher"]["provider"]
    return provider


# -- tools ------------------------------------------------------------------------------


async def test_tool_call(start_daemon: Any) -> None:
    """A request with tools comes back with OpenAI's tool_calls, null content and finish tool_calls."""
    async with agent_front(start_daemon) as agents:
        completion = await agents.client.chat.completions.create(
            model="dispatcher/realtime", messages=ASK, tools=[WEATHER]
        )
    choice = completion.choices[0]
    [call] = function_calls(choice.message)
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None
    assert choice.finish_reason == "tool_calls"
    assert provider_of(completion) == "capable"


async def test_tool_result_turn_gets_the_answer(start_daemon: Any) -> None:
    """A follow-up turn with the assistant's call, a role "tool" result and the tools resent gets text."""
    async with agent_front(start_daemon) as agents:
        first = await agents.client.chat.completions.create(
            model="dispatcher/realtime", messages=ASK, tools=[WEATHER]
        )
        [call] = function_calls(first.choices[0].message)
        asked: ChatCompletionAssistantMessageParam = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        }
        second = await agents.client.chat.completions.create(
            model="dispatcher/realtime",
            messages=[
                *ASK,
                asked,
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
            ],
            tools=[WEATHER],
        )
        sent = agents.body_at(provider_of(second))
    assert "the tool said sunny, 21 C" in (second.choices[0].message.content or "")
    assert second.choices[0].finish_reason == "stop"
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent["messages"][2] == {
        "role": "tool",
        "tool_call_id": call.id,
        "content": "sunny, 21 C",
    }


async def test_streamed_tool_calls_are_reassembled_by_the_sdk(start_daemon: Any) -> None:
    """Two parallel calls streamed in pieces come out of the SDK's stream helper whole."""
    async with (
        agent_front(start_daemon) as agents,
        agents.client.chat.completions.stream(
            model="dispatcher/realtime", messages=ASK, tools=[WEATHER, TIME]
        ) as stream,
    ):
        final = await stream.get_final_completion()
    choice = final.choices[0]
    calls = function_calls(choice.message)
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"city": "Paris"},
        {"city": "Paris", "hours24": True},
    ]
    assert len({c.id for c in calls}) == 2
    assert choice.finish_reason == "tool_calls"


async def test_streamed_tool_call_pieces_have_openai_shape(start_daemon: Any) -> None:
    """The first piece of a streamed call carries id, type and name; the pieces after only arguments."""
    async with agent_front(start_daemon) as agents:
        stream = await agents.client.chat.completions.create(
            model="dispatcher/realtime", messages=ASK, tools=[WEATHER], stream=True
        )
        chunks = [chunk async for chunk in stream]
    pieces = [
        piece
        for chunk in chunks
        if chunk.choices
        for piece in chunk.choices[0].delta.tool_calls or ()
    ]
    first, *rest = pieces
    assert (first.index, first.type) == (0, "function")
    assert first.id
    assert first.function is not None
    assert first.function.name == "get_weather"
    assert rest
    assert all(p.index == 0 and p.id is None and p.type is None for p in rest)
    assert all(p.function is not None and p.function.name is None for p in rest)
    arguments = "".join((p.function.arguments or "") for p in pieces if p.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_pydantic_tool_is_parsed_by_the_sdk(start_daemon: Any) -> None:
    """A strict tool from a pydantic model comes back with the SDK's parsed_arguments."""
    async with agent_front(start_daemon) as agents:
        completion = await agents.client.chat.completions.parse(
            model="dispatcher/realtime",
            messages=ASK,
            tools=[openai.pydantic_function_tool(Weather)],
        )
    [call] = completion.choices[0].message.tool_calls or []
    assert call.function.name == "Weather"
    assert call.function.parsed_arguments == Weather(city="Paris", temperature_c=1)


async def test_named_tool_choice_calls_that_tool(start_daemon: Any) -> None:
    """A tool_choice naming one function reaches the provider as named and that one is called."""
    choice: ChatCompletionNamedToolChoiceParam = {
        "type": "function",
        "function": {"name": "get_time"},
    }
    async with agent_front(start_daemon) as agents:
        completion = await agents.client.chat.completions.create(
            model="dispatcher/realtime", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice
        )
        sent = agents.capable.stats.bodies[-1]
    assert [c.function.name for c in function_calls(completion.choices[0].message)] == ["get_time"]
    assert sent["tool_choice"] == choice
    assert sent["tools"] == [WEATHER, TIME]


async def test_pinned_provider_without_tools_is_refused(start_daemon: Any) -> None:
    """Tools sent to a pinned provider that lacks them get 400 no_provider naming the capability."""
    async with agent_front(start_daemon) as agents:
        with pytest.raises(openai.BadRequestError) as caught:
            await agents.client.chat.completions.create(
                model="hunyuan", messages=ASK, tools=[WEATHER]
            )
    assert caught.value.code == "no_provider"
    assert "tools" in caught.value.message
    assert agents.hunyuan.stats.requests == 0


async def test_legacy_functions_are_refused_with_the_way_to_tools(start_daemon: Any) -> None:
    """The deprecated functions field gets a 400 that says to send tools, and reaches no provider."""
    async with agent_front(start_daemon) as agents:
        with pytest.raises(openai.BadRequestError) as caught:
            await agents.client.chat.completions.create(
                model="dispatcher/realtime",
                messages=ASK,
                functions=[WEATHER["function"]],
            )
    assert "tools=" in caught.value.message
    assert agents.hunyuan.stats.requests == agents.capable.stats.requests == 0


@pytest.mark.parametrize(
    ("option", "advice"),
    [
        ({"n": 2}, "send several requests"),
        ({"logprobs": True, "top_logprobs": 2}, "leave them out"),
        ({"modalities": ["text", "audio"]}, "modalities=['text']"),
    ],
    ids=["n", "logprobs", "audio"],
)
async def test_options_the_daemon_cannot_honour_are_refused(
    start_daemon: Any, option: dict[str, Any], advice: str
) -> None:
    """An OpenAI option the daemon cannot honour gets a 400 saying what to do, not a silent drop."""
    async with agent_front(start_daemon) as agents:
        with pytest.raises(openai.BadRequestError) as caught:
            await agents.client.chat.completions.create(
                model="dispatcher/realtime", messages=ASK, extra_body=option
            )
    assert advice in caught.value.message
    assert agents.hunyuan.stats.requests == agents.capable.stats.requests == 0


def test_a_whole_answer_streams_as_one_complete_delta() -> None:
    """An answer that arrives whole streams as one delta with each call's id, type, name and arguments."""
    result = Result(
        job="j",
        provider="capable",
        model="m",
        class_="realtime",
        content="",
        tool_calls=[ToolCall(id="call_1", function=FunctionCall(name="f", arguments="{}"))],
    )
    assert whole_delta(result) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            }
        ],
    }


# -- JSON modes -------------------------------------------------------------------------


async def test_json_object_mode(start_daemon: Any) -> None:
    """response_format json_object is answered with JSON content by a provider that has the mode."""
    async with agent_front(start_daemon) as agents:
        completion = await agents.client.chat.completions.create(
            model="dispatcher/realtime",
            messages=[{"role": "user", "content": "Reply in JSON: hello"}],
            response_format={"type": "json_object"},
        )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
    assert provider_of(completion) == "capable"
    assert agents.capable.stats.bodies[-1]["response_format"] == {"type": "json_object"}


async def test_json_schema_is_parsed_into_the_pydantic_model(start_daemon: Any) -> None:
    """The SDK's parse() with a pydantic model sends a json_schema and gets the model back."""
    async with agent_front(start_daemon) as agents:
        completion = await agents.client.chat.completions.parse(
            model="dispatcher/realtime", messages=ASK, response_format=Weather
        )
        sent = agents.capable.stats.bodies[-1]["response_format"]
    assert completion.choices[0].message.parsed == Weather(city="Paris", temperature_c=1)
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "Weather"
    assert sent["json_schema"]["strict"] is True


# -- sampling fields and provider extras ------------------------------------------------


async def test_sampling_fields_and_extra_body_reach_the_upstream(start_daemon: Any) -> None:
    """stop, top_p, seed, both penalties, logit_bias, user and extra_body fields reach the provider."""
    async with agent_front(start_daemon) as agents:
        completion = await agents.client.chat.completions.create(
            model="dispatcher/realtime",
            messages=[{"role": "user", "content": "hello"}],
            stop=["\n\n", "END"],
            top_p=0.9,
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            logit_bias={"50256": -100},
            user="agent-7",
            max_completion_tokens=64,
            temperature=0.3,
            extra_body={"top_k": 5, "repetition_penalty": 1.1},
        )
        sent = agents.body_at(provider_of(completion))
    expected = {
        "stop": ["\n\n", "END"],
        "top_p": 0.9,
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"50256": -100},
        "user": "agent-7",
        "max_tokens": 64,
        "temperature": 0.3,
        "top_k": 5,
        "repetition_penalty": 1.1,
    }
    assert {key: sent.get(key) for key in expected} == expected


async def test_streamed_finish_reason_is_the_providers(start_daemon: Any) -> None:
    """A streamed answer cut by max_tokens ends with finish_reason "length", not "stop"."""
    async with agent_front(start_daemon) as agents:
        stream = await agents.client.chat.completions.create(
            model="dispatcher/realtime",
            messages=[{"role": "user", "content": "tell me a long story about the sea"}],
            max_tokens=2,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert set(finishes[:-1]) == {None}


# -- an upstream refusal ----------------------------------------------------------------


async def test_upstream_400_is_a_400_sent_once_and_not_retried(start_daemon: Any) -> None:
    """An upstream 400 reaches the client as a 400 with x-should-retry false after one upstream request."""
    async with agent_front(start_daemon, max_retries=2) as agents:
        agents.hunyuan.script(Fault(kind="status", status=400))
        agents.capable.script(Fault(kind="status", status=400))
        with pytest.raises(openai.BadRequestError) as caught:
            await agents.client.chat.completions.create(
                model="dispatcher/realtime", messages=[{"role": "user", "content": "hi"}]
            )
    assert agents.hunyuan.stats.requests + agents.capable.stats.requests == 1
    assert caught.value.status_code == 400
    assert caught.value.code == "upstream_failed"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "refused the request" in caught.value.message


async def test_upstream_4xx_status_is_kept(start_daemon: Any) -> None:
    """An upstream 422 reaches the client as a 422, not as a gateway error."""
    async with agent_front(start_daemon) as agents:
        agents.capable.script(Fault(kind="status", status=422))
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await agents.client.chat.completions.create(
                model="capable", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.status_code == 422
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert agents.capable.stats.requests == 1


# -- LangChain --------------------------------------------------------------------------


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


@asynccontextmanager
async def langchain_model(agents: Agents) -> AsyncIterator[ChatOpenAI]:
    """LangChain's ChatOpenAI on the front, on an HTTP client closed on exit."""
    async with openai.DefaultAsyncHttpxClient() as http:
        yield ChatOpenAI(
            model="dispatcher/realtime",
            base_url=f"{agents.base}/v1",
            api_key=SecretStr("unused"),
            max_retries=0,
            http_async_client=http,
        )


async def test_langchain_bind_tools_makes_a_tool_call(start_daemon: Any) -> None:
    """LangChain's ChatOpenAI with bind_tools gets the call back as an AIMessage tool call."""
    async with agent_front(start_daemon) as agents, langchain_model(agents) as model:
        message = await model.bind_tools([get_weather]).ainvoke(QUESTION)
    assert isinstance(message, AIMessage)
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    assert call["args"] == {"city": "Paris"}


async def test_langchain_reassembles_a_streamed_tool_call(start_daemon: Any) -> None:
    """LangChain's streamed AIMessageChunks add up to the whole tool call."""
    async with agent_front(start_daemon) as agents, langchain_model(agents) as model:
        whole: AIMessageChunk | None = None
        async for piece in model.bind_tools([get_weather]).astream(QUESTION):
            assert isinstance(piece, AIMessageChunk)
            whole = piece if whole is None else whole + piece
    assert whole is not None
    [call] = whole.tool_calls
    assert call["name"] == "get_weather"
    assert call["args"] == {"city": "Paris"}
    assert whole.response_metadata.get("finish_reason") == "tool_calls"


async def test_langchain_structured_output_in_json_mode(start_daemon: Any) -> None:
    """LangChain's with_structured_output(method="json_mode") parses the JSON answer into the model."""
    async with agent_front(start_daemon) as agents, langchain_model(agents) as model:
        structured = model.with_structured_output(Answer, method="json_mode")
        answer = await structured.ainvoke("Reply in JSON with the key answer: hello")
        sent = agents.capable.stats.bodies[-1]
    assert isinstance(answer, Answer)
    assert "hello" in answer.answer
    assert sent["response_format"] == {"type": "json_object"}
