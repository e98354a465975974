"""Prompt size estimates without a tokenizer download.

CJK text costs about one token per character with the GLM and Hunyuan
tokenizers; other text about one per four characters. The estimate errs high
so a job is never sent to a provider whose window it would overflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# CJK Unified Ideographs (+ extension A), kana, hangul, CJK punctuation and full-width forms.
_WIDE_RANGES = (
    (0x3000, 0x303F),
    (0x3040, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),
)
_PER_MESSAGE = 4  # role and separators


def _is_wide(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in _WIDE_RANGES)


def estimate_text(text: str) -> int:
    if text.isascii():
        return math.ceil(len(text) / 4)
    wide = sum(1 for ch in text if ord(ch) >= 0x3000 and _is_wide(ord(ch)))
    return wide + math.ceil((len(text) - wide) / 4)


def _content_text(content: Any) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def estimate_messages(messages: list[dict[str, Any]]) -> int:
    """Estimated prompt tokens of an OpenAI ``messages`` list."""
    total = 0
    for message in messages:
        total += _PER_MESSAGE
        for text in _content_text(message.get("content")):
            total += estimate_text(text)
    return total
