"""Per-provider request bodies, answer parsing, the SSE decoder and header helpers."""

from __future__ import annotations

import itertools
from email.utils import formatdate
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from dispatcher.contract.chat import CallAssembler
from dispatcher.contract.protocol import ChatRequest, Usage
from dispatcher.providers.adapters import build_chat_body, build_embed_body, encode_body, refusal
from dispatcher.providers.adapters import chat_body as adapter_chat_body
from dispatcher.providers.headers import (
    RateLimitInfo,
    parse_error_message,
    rate_limit_headers,
    retry_after_seconds,
)
from dispatcher.providers.sse import SSEDecoder
from dispatcher.providers.wire import (
    AnswerFormatError,
    ChatAnswer,
    StreamDelta,
    parse_chat_answer,
    parse_embed_answer,
)

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "你好"}]
NOW = 1_771_200_000.0  # 2026-02-16, an explicit clock for Retry-After dates


def chat_body(adapter: Any, **overrides: Any) -> dict[str, Any]:
    """A chat body with quiet defaults, overridable per test."""
    kwargs: dict[str, Any] = {
        "model": "m",
        "messages": MESSAGES,
        "max_tokens": None,
        "temperature": None,
        "stream": False,
        "thinking": False,
    }
    kwargs.update(overrides)
    return build_chat_body(adapter, **kwargs)


def answer(message: dict[str, Any], **top: Any) -> bytes:
    """A chat-completions answer body with one choice carrying *message*."""
    body = {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }
    body.update(top)
    return msgspec.json.encode(body)


def chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> bytes:
    """One SSE `data:` line holding a chat-completion chunk."""
    body: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "model": "m"}
    body["choices"] = (
        [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}] if choices else []
    )
    body["usage"] = usage
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def joined(deltas: list[StreamDelta]) -> tuple[str, str]:
    """The concatenated content and reasoning of a list of deltas."""
    return "".join(d.content for d in deltas), "".join(d.reasoning for d in deltas)


# --------------------------------------------------------------------------- request bodies


def test_openai_body_is_plain() -> None:
    """An openai body holds only model, messages and stream when nothing optional is set."""
    assert chat_body("openai") == {"model": "m", "messages": MESSAGES, "stream": False}


def test_optional_fields_sent_only_when_set() -> None:
    """max_tokens and temperature appear exactly when they are not None, zero included."""
    body = chat_body("openai", max_tokens=64, temperature=0.0)
    assert body["max_tokens"] == 64
    assert body["temperature"] == 0.0


def test_openai_stream_asks_for_usage() -> None:
    """A streamed openai request asks for usage on the final chunk."""
    body = chat_body("openai", stream=True)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_openai_ignores_thinking() -> None:
    """The thinking flag adds nothing to an openai body."""
    assert chat_body("openai", thinking=True) == chat_body("openai")


def test_zhipu_thinking_enabled() -> None:
    """Zhipu thinking is a top-level `thinking: {type: enabled}` field."""
    assert chat_body("zhipu", thinking=True)["thinking"] == {"type": "enabled"}


def test_zhipu_without_thinking_sends_nothing_extra() -> None:
    """Zhipu without thinking sends no thinking field at all (not `disabled`)."""
    assert chat_body("zhipu") == {"model": "m", "messages": MESSAGES, "stream": False}


def test_hunyuan_always_enables_enhancement() -> None:
    """Hunyuan bodies always carry a top-level enable_enhancement: true."""
    assert chat_body("hunyuan")["enable_enhancement"] is True


def test_hunyuan_ignores_thinking() -> None:
    """Hunyuan has no thinking, so the flag changes nothing."""
    assert chat_body("hunyuan", thinking=True) == chat_body("hunyuan")


def test_nvidia_thinking_is_top_level_chat_template_kwargs() -> None:
    """NVIDIA thinking goes in a top-level chat_template_kwargs, never inside extra_body."""
    body = chat_body("nvidia", thinking=True)
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "clear_thinking": False}
    assert "extra_body" not in body


def test_nvidia_without_thinking_is_plain() -> None:
    """NVIDIA without thinking sends no chat_template_kwargs."""
    assert "chat_template_kwargs" not in chat_body("nvidia")


@pytest.mark.parametrize("adapter", ["openai", "zhipu", "hunyuan", "nvidia", "siliconflow"])
def test_no_adapter_sends_extra_body(adapter: str) -> None:
    """No adapter ever puts the SDK-only `extra_body` key into an HTTP body."""
    body = chat_body(adapter, stream=True, thinking=True, max_tokens=8, temperature=0.5)
    assert "extra_body" not in body


def test_unknown_adapter_rejected() -> None:
    """An adapter name outside the known set is a ValueError naming it."""
    with pytest.raises(ValueError, match="mistral"):
        chat_body("mistral")


def test_empty_messages_rejected() -> None:
    """A chat request without messages is refused before it reaches a provider."""
    with pytest.raises(ValueError, match="message"):
        chat_body("openai", messages=[])


def test_body_does_not_alias_callers_messages() -> None:
    """Mutating the built body's messages list leaves the caller's list alone."""
    messages = [{"role": "user", "content": "hi"}]
    body = chat_body("openai", messages=messages)
    body["messages"].append({"role": "user", "content": "more"})
    assert len(messages) == 1


def test_siliconflow_embed_body() -> None:
    """The embeddings body is model, a list input and float encoding."""
    body = build_embed_body("siliconflow", model="BAAI/bge-large-zh-v1.5", inputs=["a", "b"])
    assert body == {
        "model": "BAAI/bge-large-zh-v1.5",
        "input": ["a", "b"],
        "encoding_format": "float",
    }


def test_embed_body_rejects_empty_inputs() -> None:
    """An embeddings request without inputs is refused."""
    with pytest.raises(ValueError, match="input"):
        build_embed_body("siliconflow", model="m", inputs=[])


def test_encode_body_is_compact_utf8_json() -> None:
    """encode_body gives compact JSON bytes with non-ASCII text kept as UTF-8."""
    encoded = encode_body({"a": "你好", "b": [1, True]})
    assert encoded == '{"a":"你好","b":[1,true]}'.encode()


# --------------------------------------------------------------------------- chat answers


def test_parse_chat_answer_reads_everything() -> None:
    """A normal answer gives content, usage, model and finish reason."""
    parsed = parse_chat_answer("hunyuan", answer({"role": "assistant", "content": "hello"}))
    assert parsed == ChatAnswer(
        content="hello",
        reasoning=None,
        usage=Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8),
        model="m",
        finish_reason="stop",
    )


@pytest.mark.parametrize("adapter", ["nvidia", "zhipu", "openai"])
def test_reasoning_content_extracted(adapter: Any) -> None:
    """Reasoning is read from message.reasoning_content for every adapter."""
    payload = answer({"content": "42", "reasoning_content": "think hard"})
    assert parse_chat_answer(adapter, payload).reasoning == "think hard"


def test_reasoning_alias_accepted() -> None:
    """message.reasoning is accepted as an alias of reasoning_content."""
    payload = answer({"content": "42", "reasoning": "thought"})
    assert parse_chat_answer("nvidia", payload).reasoning == "thought"


def test_empty_reasoning_is_none() -> None:
    """An empty reasoning_content reads as None."""
    payload = answer({"content": "42", "reasoning_content": ""})
    assert parse_chat_answer("nvidia", payload).reasoning is None


def test_null_content_reads_as_empty() -> None:
    """A null content (e.g. all output went to reasoning) reads as an empty string."""
    payload = answer({"content": None, "reasoning_content": "only thoughts"})
    parsed = parse_chat_answer("nvidia", payload)
    assert parsed.content == ""
    assert parsed.reasoning == "only thoughts"


def test_missing_usage_reads_as_zero() -> None:
    """An answer without usage gives zero counts rather than failing."""
    payload = msgspec.json.encode({"choices": [{"message": {"content": "x"}}]})
    parsed = parse_chat_answer("openai", payload)
    assert parsed.usage == Usage()
    assert parsed.model is None
    assert parsed.finish_reason is None


def test_missing_total_tokens_is_summed() -> None:
    """When total_tokens is absent it is the sum of prompt and completion tokens."""
    payload = answer({"content": "x"}, usage={"prompt_tokens": 2, "completion_tokens": 3})
    assert parse_chat_answer("zhipu", payload).usage.total_tokens == 5


def test_missing_choices_is_format_error() -> None:
    """A 200 body without choices raises AnswerFormatError saying so."""
    with pytest.raises(AnswerFormatError, match="no choices"):
        parse_chat_answer("openai", b'{"id": "x"}')


def test_empty_choices_is_format_error() -> None:
    """A 200 body with an empty choices list raises AnswerFormatError."""
    with pytest.raises(AnswerFormatError, match="no choices"):
        parse_chat_answer("openai", b'{"choices": []}')


def test_error_object_is_format_error_with_message() -> None:
    """A 200 body carrying an error object raises with the upstream's message."""
    payload = b'{"error": {"message": "rate limited", "code": "1302"}}'
    with pytest.raises(AnswerFormatError, match="rate limited"):
        parse_chat_answer("zhipu", payload)


def test_non_json_answer_is_format_error() -> None:
    """A body that is not JSON raises AnswerFormatError quoting the start of the body."""
    with pytest.raises(AnswerFormatError, match="not a valid answer") as info:
        parse_chat_answer("openai", b"<html>502 Bad Gateway</html>")
    assert "502 Bad Gateway" in str(info.value)


def test_wrong_shape_is_format_error() -> None:
    """A JSON body of the wrong shape raises AnswerFormatError, not a msgspec error."""
    with pytest.raises(AnswerFormatError):
        parse_chat_answer("openai", b'{"choices": "nope"}')


def test_format_error_excerpt_is_bounded() -> None:
    """The error message quotes at most about 200 characters of a huge body."""
    with pytest.raises(AnswerFormatError) as info:
        parse_chat_answer("openai", b'{"id": "' + b"x" * 10_000 + b'"}')
    assert len(str(info.value)) < 400


def test_choice_without_message_is_format_error() -> None:
    """A first choice lacking a message raises AnswerFormatError."""
    with pytest.raises(AnswerFormatError, match="no message"):
        parse_chat_answer("openai", b'{"choices": [{"index": 0}]}')


def test_unknown_fields_are_ignored() -> None:
    """Extra fields a provider adds (e.g. hunyuan's note) do not break parsing."""
    payload = answer({"content": "ok", "tool_calls": None}, note="以上内容为AI生成", extra=[1])
    assert parse_chat_answer("hunyuan", payload).content == "ok"


# --------------------------------------------------------------------------- embeddings


def test_embeddings_ordered_by_index() -> None:
    """Vectors come back ordered by their index, not by their position in data."""
    payload = msgspec.json.encode(
        {
            "object": "list",
            "model": "BAAI/bge-large-zh-v1.5",
            "data": [
                {"object": "embedding", "index": 2, "embedding": [2.0]},
                {"object": "embedding", "index": 0, "embedding": [0.0]},
                {"object": "embedding", "index": 1, "embedding": [1.0]},
            ],
            "usage": {"prompt_tokens": 6, "total_tokens": 6},
        }
    )
    parsed = parse_embed_answer("siliconflow", payload)
    assert parsed.embeddings == [[0.0], [1.0], [2.0]]
    assert parsed.usage == Usage(prompt_tokens=6, completion_tokens=0, total_tokens=6)
    assert parsed.model == "BAAI/bge-large-zh-v1.5"


def test_embeddings_with_gap_in_index_rejected() -> None:
    """Indexes that are not exactly 0..n-1 raise AnswerFormatError."""
    payload = b'{"data": [{"index": 0, "embedding": [0.1]}, {"index": 2, "embedding": [0.2]}]}'
    with pytest.raises(AnswerFormatError, match="indexes"):
        parse_embed_answer("siliconflow", payload)


def test_embeddings_without_data_rejected() -> None:
    """An embeddings body without data raises AnswerFormatError."""
    with pytest.raises(AnswerFormatError, match="no data"):
        parse_embed_answer("siliconflow", b'{"model": "m"}')


def test_embeddings_error_object_rejected() -> None:
    """An embeddings body carrying an error raises AnswerFormatError with its message."""
    with pytest.raises(AnswerFormatError, match="quota"):
        parse_embed_answer("siliconflow", b'{"error": {"message": "quota exceeded"}}')


def test_base64_embeddings_rejected() -> None:
    """A base64 string where float vectors were asked for is a format error."""
    with pytest.raises(AnswerFormatError):
        parse_embed_answer("siliconflow", b'{"data": [{"index": 0, "embedding": "AAAA"}]}')


# --------------------------------------------------------------------------- SSE decoding

STREAM = (
    b": keep-alive\n\n"
    + chunk({"role": "assistant"})
    + chunk({"reasoning_content": "先想"})
    + chunk({"reasoning_content": "一想"})
    + chunk({"content": "答"})
    + chunk({"content": "案 ✓"}, finish_reason="stop")
    + chunk(choices=False, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    + b"data: [DONE]\n\n"
)


def test_sse_whole_stream() -> None:
    """A whole stream gives its content, reasoning, finish reason and final usage."""
    decoder = SSEDecoder("nvidia")
    deltas = decoder.feed(STREAM) + decoder.close()
    assert joined(deltas) == ("答案 ✓", "先想一想")
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    assert deltas[-1].usage == Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert deltas[-1].content == ""
    assert decoder.done


def test_sse_skips_role_only_and_keep_alive() -> None:
    """Role-only deltas, comments and blank lines give no deltas."""
    decoder = SSEDecoder("openai")
    assert decoder.feed(b": ping\n\n" + chunk({"role": "assistant"}) + b"\n\n") == []


def test_sse_delta_carries_model() -> None:
    """Each delta reports the chunk's model."""
    deltas = SSEDecoder("openai").feed(chunk({"content": "x"}))
    assert deltas == [StreamDelta(content="x", model="m")]


def test_sse_byte_by_byte() -> None:
    """Feeding one byte at a time, splitting UTF-8 characters, gives the same text."""
    decoder = SSEDecoder("nvidia")
    deltas: list[StreamDelta] = []
    for i in range(len(STREAM)):
        deltas += decoder.feed(STREAM[i : i + 1])
    deltas += decoder.close()
    assert joined(deltas) == ("答案 ✓", "先想一想")
    assert decoder.done


def test_sse_crlf_line_endings() -> None:
    """CRLF line endings, even split between feeds, are handled."""
    stream = STREAM.replace(b"\n", b"\r\n")
    decoder = SSEDecoder("zhipu")
    deltas: list[StreamDelta] = []
    for piece in (stream[i : i + 7] for i in range(0, len(stream), 7)):
        deltas += decoder.feed(piece)
    assert joined(deltas) == ("答案 ✓", "先想一想")
    assert decoder.done


def test_sse_bare_cr_line_endings() -> None:
    """Lines ended by a bare CR are still separate lines."""
    stream = chunk({"content": "a"}).replace(b"\n", b"\r") + b"data: [DONE]\r"
    decoder = SSEDecoder("openai")
    assert joined(decoder.feed(stream)) == ("a", "")
    assert not decoder.done  # a trailing CR may still be the first half of CRLF
    decoder.close()
    assert decoder.done


def test_sse_data_without_space() -> None:
    """`data:{...}` without the optional space after the colon is accepted."""
    decoder = SSEDecoder("openai")
    line = chunk({"content": "tight"}).replace(b"data: ", b"data:")
    assert joined(decoder.feed(line + b"data:[DONE]\n")) == ("tight", "")
    assert decoder.done


def test_sse_data_after_done_is_ignored() -> None:
    """Anything after `data: [DONE]`, even garbage, is ignored."""
    decoder = SSEDecoder("openai")
    deltas = decoder.feed(b"data: [DONE]\n\n" + chunk({"content": "late"}) + b"data: junk\n")
    assert deltas == []
    assert decoder.feed(chunk({"content": "later"})) == []
    assert decoder.close() == []


def test_sse_not_done_without_done_marker() -> None:
    """A stream cut off before `[DONE]` leaves done False so the caller can tell."""
    decoder = SSEDecoder("openai")
    decoder.feed(chunk({"content": "partial"}))
    assert not decoder.done


def test_sse_close_flushes_trailing_line() -> None:
    """close() parses a last data line that had no newline."""
    decoder = SSEDecoder("openai")
    line = chunk({"content": "tail"}).rstrip(b"\n")
    assert decoder.feed(line) == []
    assert joined(decoder.close()) == ("tail", "")


def test_sse_close_flushes_trailing_done() -> None:
    """close() sees a final `data: [DONE]` without a newline."""
    decoder = SSEDecoder("openai")
    decoder.feed(b"data: [DONE]")
    decoder.close()
    assert decoder.done


def test_sse_usage_on_last_chunk_with_empty_choices() -> None:
    """A usage-only final chunk with empty choices gives a usage delta without crashing."""
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    deltas = SSEDecoder("openai").feed(chunk(choices=False, usage=usage))
    assert deltas == [StreamDelta(usage=Usage(**usage), model="m")]


def test_sse_empty_choices_without_usage_skipped() -> None:
    """A chunk with empty choices and no usage gives nothing."""
    assert SSEDecoder("openai").feed(chunk(choices=False)) == []


def test_sse_null_content_skipped() -> None:
    """A delta whose content is null is skipped, not crashed on."""
    assert SSEDecoder("nvidia").feed(chunk({"content": None, "reasoning_content": None})) == []


def test_sse_empty_finish_reason_is_none() -> None:
    """An empty-string finish_reason (some providers) reads as None."""
    deltas = SSEDecoder("hunyuan").feed(chunk({"content": "x"}, finish_reason=""))
    assert deltas[0].finish_reason is None


def test_sse_reasoning_alias() -> None:
    """delta.reasoning is accepted as an alias of delta.reasoning_content."""
    assert joined(SSEDecoder("nvidia").feed(chunk({"reasoning": "hm"}))) == ("", "hm")


def test_sse_ignores_other_fields() -> None:
    """event:, id: and retry: lines do not produce deltas or errors."""
    decoder = SSEDecoder("openai")
    assert decoder.feed(b"event: message\nid: 7\nretry: 1000\n\n") == []


def test_sse_non_json_data_is_format_error() -> None:
    """A data line that is not JSON raises AnswerFormatError quoting it."""
    with pytest.raises(AnswerFormatError, match="not a valid chunk"):
        SSEDecoder("openai").feed(b"data: {oops\n")


def test_sse_in_stream_error_raises() -> None:
    """An in-stream error object raises AnswerFormatError with the upstream message."""
    decoder = SSEDecoder("nvidia")
    decoder.feed(chunk({"content": "start"}))
    with pytest.raises(AnswerFormatError, match="overloaded"):
        decoder.feed(b'data: {"error": {"message": "model overloaded"}}\n\n')


def test_sse_bare_json_error_line_raises() -> None:
    """An error object sent without the `data:` prefix is still reported."""
    with pytest.raises(AnswerFormatError, match="bad key"):
        SSEDecoder("zhipu").feed(b'{"error": {"code": "1000", "message": "bad key"}}\n')


def test_sse_error_is_raised_once() -> None:
    """After an error the bad line is consumed, so later lines decode normally."""
    decoder = SSEDecoder("openai")
    with pytest.raises(AnswerFormatError):
        decoder.feed(b"data: nope\n")
    assert joined(decoder.feed(chunk({"content": "ok"}))) == ("ok", "")


def test_sse_overlong_line_rejected() -> None:
    """A line growing past the size bound without a newline raises AnswerFormatError."""
    decoder = SSEDecoder("openai")
    with pytest.raises(AnswerFormatError, match="longer than"):
        decoder.feed(b"data: " + b"x" * (5 * 1024 * 1024))


pieces = st.lists(
    st.tuples(st.text(max_size=12), st.text(max_size=12)),
    min_size=1,
    max_size=8,
)


@given(
    parts=pieces,
    crlf=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_sse_any_split_gives_same_text(
    parts: list[tuple[str, str]], crlf: bool, cuts: list[int]
) -> None:
    """However a valid stream is split into feeds, the joined content and reasoning are the same."""
    stream = b": keep-alive\n\n" + chunk({"role": "assistant"})
    for content, reasoning in parts:
        stream += chunk({"content": content, "reasoning_content": reasoning})
        stream += b": keep-alive\n\n"
    stream += chunk(choices=False, usage={"total_tokens": 1}) + b"data: [DONE]\n\n"
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = SSEDecoder("nvidia")
    deltas: list[StreamDelta] = []
    for start, end in itertools.pairwise(bounds):
        deltas += decoder.feed(stream[start:end])
    deltas += decoder.close()
    expected = ("".join(c for c, _ in parts), "".join(r for _, r in parts))
    assert joined(deltas) == expected
    assert deltas[-1].usage == Usage(total_tokens=1)
    assert decoder.done


# --------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"error": {"message": "Invalid key", "type": "auth"}}', "Invalid key"),
        (b'{"error": {"code": "1302", "message": "too fast"}}', "too fast (code 1302)"),
        (b'{"error": "plain error"}', "plain error"),
        (b'{"message": "top message"}', "top message"),
        (b'{"msg": "zhipu style", "code": 500}', "zhipu style"),
        (b'{"status": 429, "title": "Too Many Requests", "detail": "slow down"}', "slow down"),
        (b"upstream timed out\n", "upstream timed out"),
        (b"<html><head><title>502 Bad Gateway</title></head></html>", "502 Bad Gateway"),
        (b"", "(empty body)"),
    ],
)
def test_error_message_extraction(payload: bytes, expected: str) -> None:
    """Each common error body shape yields its human message."""
    assert parse_error_message(payload) == expected


def test_error_message_truncated() -> None:
    """A long message is cut to at most 300 characters."""
    message = parse_error_message(b'{"error": {"message": "' + b"y" * 5000 + b'"}}')
    assert len(message) <= 300
    assert message.startswith("yyy")


def test_error_message_code_only() -> None:
    """An error object with only a code still says something."""
    assert parse_error_message(b'{"error": {"code": "1113"}}') == "code 1113"


@given(st.binary(max_size=400))
def test_error_message_never_raises(payload: bytes) -> None:
    """Any bytes at all give a string of at most 300 characters."""
    message = parse_error_message(payload)
    assert isinstance(message, str)
    assert len(message) <= 300


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"RETRY-AFTER": " 3 "}, 3.0),
        ({"Retry-After": "-4"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "junk", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
def test_retry_after_values(headers: dict[str, str], expected: float | None) -> None:
    """Delta-seconds (int or float), milliseconds, negatives and garbage are read as documented."""
    assert retry_after_seconds(headers, NOW) == expected


def test_retry_after_http_date() -> None:
    """An HTTP-date Retry-After gives the seconds from now until then."""
    headers = {"Retry-After": formatdate(NOW + 30, usegmt=True)}
    assert retry_after_seconds(headers, NOW) == pytest.approx(30.0)


def test_retry_after_http_date_in_past_is_zero() -> None:
    """An HTTP-date already past gives zero, not a negative wait."""
    headers = {"Retry-After": formatdate(NOW - 300, usegmt=True)}
    assert retry_after_seconds(headers, NOW) == 0.0


def test_retry_after_reads_multidict() -> None:
    """aiohttp's case-insensitive multidict works like a plain dict."""
    headers = CIMultiDictProxy(CIMultiDict([("Retry-After", "12")]))
    assert retry_after_seconds(headers, NOW) == 12.0


@given(st.text(max_size=40))
def test_retry_after_never_raises(value: str) -> None:
    """Any header text gives a non-negative number or None, never an exception."""
    result = retry_after_seconds({"Retry-After": value}, NOW)
    assert result is None or result >= 0


# --------------------------------------------------------------------------- x-ratelimit


def test_rate_limit_headers_full() -> None:
    """Limit, remaining and a Go-style reset duration are read, whatever the header case."""
    headers = {
        "X-RateLimit-Limit-Requests": "40",
        "x-ratelimit-remaining-requests": "39",
        "X-Ratelimit-Reset-Requests": "6m0s",
    }
    assert rate_limit_headers(headers) == RateLimitInfo(limit=40, remaining=39, reset_s=360.0)


@pytest.mark.parametrize(
    ("reset", "expected"),
    [
        ("1s", 1.0),
        ("0.5s", 0.5),
        ("60", 60.0),
        ("1h2m3.5s", 3723.5),
        ("20ms", 0.02),
        ("1m", 60.0),
        ("soon", None),
        ("5x", None),
        ("-3", None),
    ],
)
def test_rate_limit_reset_durations(reset: str, expected: float | None) -> None:
    """Reset values in seconds, Go durations and garbage are read as documented."""
    info = rate_limit_headers(
        {"x-ratelimit-limit-requests": "1", "x-ratelimit-reset-requests": reset}
    )
    assert info is not None
    assert info.reset_s == (None if expected is None else pytest.approx(expected))


def test_rate_limit_headers_absent() -> None:
    """Without any x-ratelimit request headers the answer is None."""
    assert rate_limit_headers({"content-type": "application/json"}) is None


def test_rate_limit_headers_garbage_counts() -> None:
    """Unreadable counts become None while readable fields are kept."""
    headers = {"x-ratelimit-limit-requests": "many", "x-ratelimit-remaining-requests": "3"}
    assert rate_limit_headers(headers) == RateLimitInfo(limit=None, remaining=3, reset_s=None)


# -- agent fields: tools, JSON mode, sampling, extra -------------------------------------

AGENT_REQUEST: dict[str, Any] = {
    "id": "r",
    "messages": MESSAGES,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
    "stop": "END",
    "top_p": 0.5,
    "seed": 3,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.2,
    "logit_bias": {"42": 5},
    "user": "u",
}


def _request(**fields: Any) -> ChatRequest:
    return msgspec.convert({**AGENT_REQUEST, **fields}, ChatRequest)


@pytest.mark.parametrize("adapter", ["openai", "hunyuan", "nvidia"])
def test_every_openai_field_reaches_the_body_as_sent(adapter: Any) -> None:
    """Tools, JSON mode and every sampling field keep their OpenAI names and values."""
    body = adapter_chat_body(adapter, model="m", request=_request())
    for name, value in AGENT_REQUEST.items():
        if name != "id":
            assert body[name] == value, name


def test_zhipu_names_the_end_user_user_id() -> None:
    """Zhipu's API spells OpenAI's `user` as `user_id`."""
    body = adapter_chat_body("zhipu", model="m", request=_request())
    assert body["user_id"] == "u"
    assert "user" not in body


def test_extra_body_then_the_jobs_extra_are_merged_last() -> None:
    """The provider's extra_body is merged in, and the job's own extra wins over it."""
    body = adapter_chat_body(
        "openai",
        model="m",
        request=_request(extra={"top_k": 5, "min_p": 0.1}),
        extra_body={"top_k": 1, "enable_enhancement": False},
    )
    assert body["top_k"] == 5
    assert body["min_p"] == 0.1
    assert body["enable_enhancement"] is False


def test_zhipu_refuses_a_forced_tool_and_names_the_field() -> None:
    """Zhipu takes tool_choice 'auto' only; other adapters take every choice."""
    forced = _request(tool_choice="required")
    assert refusal("zhipu", forced) is not None
    assert "tool_choice" in (refusal("zhipu", forced) or "")
    assert refusal("zhipu", _request()) is None
    assert refusal("nvidia", forced) is None


def test_tool_calls_are_parsed_in_openai_form() -> None:
    """A non-streamed answer's tool calls come back with ids; object arguments become JSON text."""
    payload = msgspec.json.encode(
        {
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"a": 1}'},
                            },
                            {"function": {"name": "g", "arguments": {"b": 2}}},
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ]
        }
    )
    answer = parse_chat_answer("openai", payload)
    assert answer.finish_reason == "tool_calls"
    assert answer.content == ""
    assert answer.tool_calls is not None
    first, second = answer.tool_calls
    assert (first.id, first.function.name, first.function.arguments) == ("call_1", "f", '{"a": 1}')
    assert second.id  # a call the provider sent without an id gets one
    assert second.id != first.id
    assert msgspec.json.decode(second.function.arguments) == {"b": 2}


def test_streamed_tool_call_pieces_are_deltas_with_their_index() -> None:
    """SSE tool-call pieces decode to deltas that reassemble into the whole call."""
    lines = [
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_9",
                                "type": "function",
                                "function": {"name": "f", "arguments": ""},
                            }
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ]
    data = b"".join(b"data: " + msgspec.json.encode(line) + b"\n\n" for line in lines)
    deltas = SSEDecoder("openai").feed(data + b"data: [DONE]\n\n")
    assembler = CallAssembler()
    for delta in deltas:
        for call in delta.tool_calls or ():
            assembler.add(call)
    assert deltas[-1].finish_reason == "tool_calls"
    calls = assembler.calls()
    assert calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_9", "f", '{"a": 1}')
    ]
