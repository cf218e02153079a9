"""OpenAI chat.completion.chunk SSE stream -> Anthropic messages SSE stream, one event at a time.

Pure module: no aiohttp, no I/O. Text and tool arguments are carried over unchanged, in order;
it never buffers content (each upstream event yields its client events at once).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.protocol.anthropic import error_json as anthropic_error_json
from proxyd.protocol.translate.common import JSON, load_json_object, sse_data
from proxyd.protocol.translate.reasoning import TRANSLATED_SIGNATURE
from proxyd.protocol.translate.response_to_anthropic import (
    STOP_REASONS,
    anthropic_usage_json,
    openai_usage,
)
from proxyd.protocol.usage import Usage, tier_name

_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":%b}}\n\n'
)
_JSON_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"input_json_delta","partial_json":%b}}\n\n'
)
_TEXT_START = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
_THINKING_START = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
    b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
)
_THINKING_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"thinking_delta","thinking":%b}}\n\n'
)
_SIGNATURE = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"signature_delta","signature":"' + TRANSLATED_SIGNATURE.encode() + b'"}}\n\n'
)
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _event(name: bytes, body: JSON) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(body) + b"\n\n"


class OpenAIToAnthropicStream:
    """Feed it each complete upstream SSE event; it returns the client's SSE events (bytes).

    The upstream request must carry `stream_options.include_usage` (the request translator sets
    it). After the stream, `usage` holds the upstream's token counts (None if it sent none),
    `completed` says whether it finished normally, and `upstream_error` holds the error type when
    the upstream sent an error event.
    """

    __slots__ = (
        "_block",
        "_block_is_text",
        "_block_is_thinking",
        "_model",
        "_next_index",
        "_refused",
        "_started",
        "_tools",
        "completed",
        "done",
        "stop_reason",
        "upstream_error",
        "usage",
    )

    def __init__(self, *, model: str) -> None:
        self._model = model
        self._started = False
        self._block = -1  # index of the open content block, -1 when none is open
        self._block_is_text = False
        self._block_is_thinking = False
        self._next_index = 0
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index
        self._refused = False
        self.usage: Usage | None = None
        self.stop_reason: str | None = None
        self.completed = False
        self.done = False
        self.upstream_error: str | None = None

    def feed(self, event: bytes) -> list[bytes]:
        """Translate one complete upstream SSE event (comment events yield nothing)."""
        if self.done:
            return []
        data = sse_data(event)
        if data is None:
            return []
        if data == b"[DONE]":
            return self._close()
        obj = load_json_object(data)
        if obj is None:
            return self.fail("The upstream sent an event that is not JSON.")
        error = obj.get("error")
        if error is not None:
            return self._error(error)
        out = [] if self._started else [self._message_start(obj.get("id"))]
        usage = obj.get("usage")
        if usage is not None:
            self.usage = openai_usage(usage)
            if self.usage is not None and self.usage.service_tier is None:
                self.usage.service_tier = tier_name(obj.get("service_tier"))
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                # DeepSeek and many compatible providers: `reasoning_content`; some `reasoning`.
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning and isinstance(reasoning, str):
                    self._thinking(reasoning, out)
                text = delta.get("content")
                if text:
                    self._text(text, out)
                refusal = delta.get("refusal")
                if refusal:
                    self._refused = True
                    self._text(refusal, out)
                calls = delta.get("tool_calls")
                if calls and not self._tool_calls(calls, out):
                    return [*out, *self.fail("The upstream interleaved two tool calls.")]
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                self.stop_reason = STOP_REASONS.get(finish_reason, "end_turn")
                self._stop_block(out)
        return out

    def finish(self) -> list[bytes]:
        """The closing events once the upstream body ended (an error event if it ended early)."""
        if self.done:
            return []
        if self.stop_reason is not None:  # a provider that omits [DONE]
            return self._close()
        return self.fail("The upstream stream ended before the message was complete.")

    def fail(self, message: str, error_type: str = "api_error") -> list[bytes]:
        """End the client's stream with an Anthropic error event."""
        self.done = True
        return [_event(b"error", anthropic_error_json(message, error_type))]

    def _message_start(self, upstream_id: Any) -> bytes:
        self._started = True
        message: JSON = {
            "id": upstream_id if isinstance(upstream_id, str) else "msg_unknown",
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event(b"message_start", {"type": "message_start", "message": message})

    def _stop_block(self, out: list[bytes]) -> None:
        if self._block >= 0:
            if self._block_is_thinking:  # Anthropic clients expect a signature to close it
                out.append(_SIGNATURE % self._block)
            out.append(_BLOCK_STOP % self._block)
            self._block = -1

    def _open_block(self, out: list[bytes]) -> int:
        self._stop_block(out)
        self._block_is_thinking = False
        self._block = self._next_index
        self._next_index += 1
        return self._block

    def _thinking(self, text: str, out: list[bytes]) -> None:
        if self._block < 0 or not self._block_is_thinking:
            out.append(_THINKING_START % self._open_block(out))
            self._block_is_thinking = True
            self._block_is_text = False
        out.append(_THINKING_DELTA % (self._block, orjson.dumps(text)))

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._block < 0 or not self._block_is_text:
            out.append(_TEXT_START % self._open_block(out))
            self._block_is_text = True
        out.append(_TEXT_DELTA % (self._block, orjson.dumps(text)))

    def _tool_calls(self, calls: Any, out: list[bytes]) -> bool:
        for call in calls if isinstance(calls, list) else ():
            if not isinstance(call, dict):
                continue
            position = call.get("index", 0)
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            block = self._tools.get(position)
            if block is None:
                block = self._tools[position] = self._open_block(out)
                self._block_is_text = False
                tool_id = call.get("id")
                start = {
                    "type": "content_block_start",
                    "index": block,
                    "content_block": {
                        "type": "tool_use",
                        "id": tool_id if isinstance(tool_id, str) else f"toolu_{position}",
                        "name": fn.get("name") or "",
                        "input": {},
                    },
                }
                out.append(_event(b"content_block_start", start))
            elif block != self._block:
                return False
            arguments = fn.get("arguments")
            if arguments:
                out.append(_JSON_DELTA % (block, orjson.dumps(arguments)))
        return True

    def _close(self) -> list[bytes]:
        if self.stop_reason is None:
            return self.fail("The upstream stream ended without a finish reason.")
        out = [] if self._started else [self._message_start(None)]
        self._stop_block(out)
        if self._refused:
            self.stop_reason = "refusal"
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
            "usage": anthropic_usage_json(self.usage or Usage()),
        }
        out.append(_event(b"message_delta", delta))
        out.append(_MESSAGE_STOP)
        self.done = True
        self.completed = True
        return out

    def _error(self, error: Any) -> list[bytes]:
        message = error.get("message") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        self.upstream_error = kind if isinstance(kind, str) else "api_error"
        return self.fail(message if isinstance(message, str) else "The upstream provider failed.")
