"""The chat vocabulary agents speak, in OpenAI's shapes: tools, tool calls, response formats.

These Structs are what the `chat` op and the HTTP front accept and what results
and chunks carry. They keep OpenAI's field names exactly, so a body built by an
OpenAI client passes through the daemon to the provider unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# The `chat` op's OpenAI fields beyond messages, max_tokens and temperature: each reaches
# the provider's body under its own name.
OPENAI_CHAT_FIELDS: tuple[str, ...] = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stop",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
)

Capability = Literal["tools", "json_object", "json_schema"]
CAPABILITIES: tuple[Capability, ...] = ("tools", "json_object", "json_schema")

# OpenAI: a function name is 1-64 of a-z, A-Z, 0-9, _ and -.
FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Shape(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


class FunctionDef(_Shape, kw_only=True, omit_defaults=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(_Shape, kw_only=True, omit_defaults=False):
    type: Literal["function"] = "function"  # always sent: providers require it
    function: FunctionDef


class NamedFunction(_Shape, kw_only=True, omit_defaults=True):
    name: FunctionName


class NamedToolChoice(_Shape, kw_only=True, omit_defaults=False):
    """Force one tool: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Shape, kw_only=True, omit_defaults=False):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Shape, kw_only=True, omit_defaults=False):
    """A complete call the model asks for, as in ``choices[0].message.tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(_Shape, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Shape, kw_only=True, omit_defaults=True):
    """A piece of a streamed call: the first piece of each ``index`` carries id and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class JsonSchema(_Shape, kw_only=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextFormat(_Shape, tag_field="type", tag="text", kw_only=True, omit_defaults=True):
    pass


class JsonObjectFormat(
    _Shape, tag_field="type", tag="json_object", kw_only=True, omit_defaults=True
):
    pass


class JsonSchemaFormat(
    _Shape, tag_field="type", tag="json_schema", kw_only=True, omit_defaults=True
):
    json_schema: JsonSchema


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class Message(msgspec.Struct, kw_only=True):
    """What a chat message must look like; the message itself travels as sent.

    Unknown fields are allowed (providers add their own); this shape only checks
    the fields the daemon and every provider rely on.
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class CallAssembler:
    """Rebuilds complete tool calls from streamed deltas, keyed by ``index``."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[
            int, tuple[str, str, list[str]]
        ] = {}  # index -> id, name, argument pieces

    def __repr__(self) -> str:
        return f"<CallAssembler {len(self._calls)} calls>"

    def add(self, delta: ToolCallDelta) -> None:
        call_id, name, arguments = self._calls.get(delta.index, ("", "", []))
        function = delta.function
        if delta.id:
            call_id = delta.id
        if function is not None:
            if function.name:
                name = function.name
            if function.arguments:
                arguments.append(function.arguments)
        self._calls[delta.index] = (call_id, name, arguments)

    def calls(self) -> list[ToolCall] | None:
        if not self._calls:
            return None
        return [
            ToolCall(id=call_id, function=FunctionCall(name=name, arguments="".join(arguments)))
            for _, (call_id, name, arguments) in sorted(self._calls.items())
        ]
