"""Token counts: the engine's `usage` object in every answer shape, and the prompt-size estimate
made before the answer (routing, the energy meter, and billing when no usage ever arrives).

Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

#: Tokens allowed for one image, audio clip or file in a prompt estimate. Engines tokenise media
#: by resolution or duration, not by their bytes: a 336 px image is 576 tokens to LLaVA-style
#: models (24 x 24 patches), OpenAI charges 85 (low detail) to ~1100 (high detail, large); one
#: fixed middle value keeps the estimate in the right order of magnitude without decoding
#: anything, where counting a base64 data URL as text overshoots 50 to 100 times.
MEDIA_PART_TOKENS = 576
#: Per chat message or Responses input item: role and template tokens.
MESSAGE_OVERHEAD_TOKENS = 3
_CHARS_PER_TOKEN = 4
#: Content-part types that carry media, never counted as text.
_MEDIA_PARTS = frozenset({"image_url", "input_image", "input_audio", "audio_url", "video_url", "file",
                          "input_file"})


class Usage(NamedTuple):
    """The engine's counts for one answer."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int  # part of completion_tokens, when the engine says so


def count(value: object) -> int:
    """A token count from upstream JSON: a non-negative int, else 0 (never trust its type)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def read_usage(usage: object) -> Usage | None:
    """Chat/completions/embeddings `usage` (`prompt_tokens`, `completion_tokens`,
    `completion_tokens_details.reasoning_tokens`) or the Responses API's (`input_tokens`,
    `output_tokens`, `output_tokens_details.reasoning_tokens`); None when it is not an object."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage or "output_tokens" in usage:
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        details = usage.get("output_tokens_details")
    else:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(count(prompt), count(completion), count(reasoning))


def answer_usage(obj: object) -> Usage | None:
    """The usage of a whole JSON answer, or of a Responses stream's final event (whose
    `response` holds it); None when there is none."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")
    return read_usage(usage)


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """About four characters a token over the prompt's text parts (`messages`, `prompt` or
    `input`), plus MEDIA_PART_TOKENS per image, audio or file part and a few tokens per message.
    Token-id prompts count one per id. Replaced by the engine's count whenever it gives one."""
    chars = media = items = 0
    for key in ("messages", "prompt", "input", "instructions"):
        value = payload.get(key)
        if value is None:
            continue
        c, m, n = _walk(value, 0)
        chars, media, items = chars + c, media + m, items + n
    return math.ceil(chars / _CHARS_PER_TOKEN) + media * MEDIA_PART_TOKENS + items * MESSAGE_OVERHEAD_TOKENS


def _walk(value: Any, depth: int) -> tuple[int, int, int]:
    """(text characters, media parts, messages) in a prompt value; ids count 4 chars each."""
    if isinstance(value, str):
        return len(value), 0, 0
    if isinstance(value, int) and not isinstance(value, bool):
        return _CHARS_PER_TOKEN, 0, 0  # a token id
    if depth > 8:  # prompts are shallow; a deep body is not worth walking
        return 0, 0, 0
    chars = media = items = 0
    if isinstance(value, list):
        for item in value:
            c, m, n = _walk(item, depth + 1)
            chars, media, items = chars + c, media + m, items + n
        return chars, media, items
    if not isinstance(value, dict):
        return 0, 0, 0
    kind = value.get("type")
    if isinstance(kind, str) and kind in _MEDIA_PARTS:  # any JSON may come: a list is unhashable
        return 0, 1, 0
    if "role" in value:
        items = 1
    # Text lives in these fields across chat messages, content parts, tool calls and Responses items.
    for key in ("content", "text", "arguments", "output", "refusal", "function", "tool_calls", "input"):
        sub = value.get(key)
        if sub is not None:
            c, m, n = _walk(sub, depth + 1)
            chars, media, items = chars + c, media + m, items + n
    return chars, media, items


def requested_max_tokens(payload: dict[str, Any]) -> int | None:
    """The request's own limit on generated tokens per choice (`max_tokens`,
    `max_completion_tokens`, or the Responses API's `max_output_tokens`); None: it gives none."""
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = payload.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def max_output_tokens(payload: dict[str, Any], kind: str) -> int | None:
    """The most tokens this request may generate, all choices together (a budget hold is sized
    from it); None: it does not say."""
    if kind == "embedding":
        return 0
    value = requested_max_tokens(payload)
    n = payload.get("n")
    if value is not None and isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return value * n
    return value
