"""Anthropic messages SSE stream -> OpenAI chat.completion.chunk SSE stream, one event at a time.

Pure module: no aiohttp, no I/O. Text and tool arguments are carried over unchanged, in order;
it never buffers content (each upstream event yields its client events at once).
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.protocol.openai import error_json as openai_error_json
from proxyd.protocol.translate.common import JSON, load_json_object, sse_data
from proxyd.protocol.translate.response_to_openai import (
    ERROR_TYPES,
    FINISH_REASONS,
    anthropic_usage,
    openai_usage_json,
)
from proxyd.protocol.usage import Usage

DONE = b"data: [DONE]\n\n"
_OPEN_SUFFIX = b',"logprobs":null,"finish_reason":null}]}\n\n'


class AnthropicToOpenAIStream:
    """Feed it each complete upstream SSE event; it returns the client's SSE events (bytes).

    After the stream, `usage` holds the upstream's token counts (None if it never sent any),
    `completed` says whether the upstream reached message_stop, and `upstream_error` holds the
    Anthropic error type when the upstream sent an error event.
    """

    __slots__ = (
        "_created",
        "_include_usage",
        "_model",
        "_prefix",
        "_tools",
        "_usage",
        "completed",
        "done",
        "finish_reason",
        "upstream_error",
    )

    def __init__(self, *, model: str, created: int, include_usage: bool) -> None:
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._prefix = b""
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._usage: JSON | None = None
        self.completed = False
        self.done = False
        self.finish_reason: str | None = None
        self.upstream_error: str | None = None

    @property
    def usage(self) -> Usage | None:
        """Token counts so far in billing terms, or None when the upstream sent none."""
        return None if self._usage is None else anthropic_usage(self._usage)

    def feed(self, event: bytes) -> list[bytes]:
        """Translate one complete upstream SSE event (ping and comment events yield nothing)."""
        if self.done:
            return []
        data = sse_data(event)
        if data is None:
            return []
        obj = load_json_object(data)
        if obj is None:
            return self.fail("The upstream sent an event that is not JSON.")
        kind = obj.get("type")
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "content_block_start":
            return self._block_start(obj)
        if kind in ("content_block_stop", "ping"):
            return []
        if kind == "message_start":
            return self._message_start(obj.get("message"))
        if kind == "message_delta":
            return self._message_delta(obj)
        if kind == "message_stop":
            return self._message_stop()
        if kind == "error":
            return self._error(obj.get("error"))
        return []

    def finish(self) -> list[bytes]:
        """The closing events once the upstream body ended (an error event if it ended early)."""
        if self.done:
            return []
        return self.fail("The upstream stream ended before the message was complete.")

    def fail(self, message: str, error_type: str = "server_error") -> list[bytes]:
        """End the client's stream with an OpenAI-style error event."""
        self.done = True
        return [b"data: " + orjson.dumps(openai_error_json(message, error_type)) + b"\n\n"]

    def _chunk(self, delta: bytes) -> bytes:
        return self._prefix + delta + _OPEN_SUFFIX

    def _message_start(self, message: Any) -> list[bytes]:
        if not isinstance(message, dict):
            return self.fail("The upstream sent a malformed message_start event.")
        usage = message.get("usage")
        self._usage = dict(usage) if isinstance(usage, dict) else None
        head = orjson.dumps(
            {
                "id": message.get("id"),
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
            }
        )
        self._prefix = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":'
        return [self._chunk(b'{"role":"assistant","content":""}')]

    def _delta(self, obj: JSON) -> list[bytes]:
        delta = obj.get("delta")
        if not isinstance(delta, dict) or not self._prefix:
            return self.fail("The upstream sent a malformed content_block_delta event.")
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if not text:
                return []
            return [self._chunk(b'{"content":' + orjson.dumps(text) + b"}")]
        if kind == "input_json_delta":
            partial = delta.get("partial_json")
            tool = self._tools.get(obj.get("index", -1))
            if tool is None:
                return self.fail("The upstream sent tool input for an unknown block.")
            if not partial:
                return []
            return [
                self._chunk(
                    b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}'
                    % (tool, orjson.dumps(partial))
                )
            ]
        if kind == "thinking_delta":  # as DeepSeek-style providers stream reasoning
            thinking = delta.get("thinking")
            if not thinking:
                return []
            return [self._chunk(b'{"reasoning_content":' + orjson.dumps(thinking) + b"}")]
        return []  # signature and citation deltas have no chat-completions form

    def _block_start(self, obj: JSON) -> list[bytes]:
        block = obj.get("content_block")
        if not isinstance(block, dict) or not self._prefix:
            return self.fail("The upstream sent a malformed content_block_start event.")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            return [self._chunk(b'{"content":' + orjson.dumps(text) + b"}")] if text else []
        if kind != "tool_use":
            return []  # thinking comes as its deltas; redacted thinking has no readable form
        index = len(self._tools)
        self._tools[obj.get("index", -1)] = index
        initial = block.get("input")
        arguments = orjson.dumps(initial).decode() if initial else ""
        call = {
            "index": index,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": arguments},
        }
        return [self._chunk(b'{"tool_calls":' + orjson.dumps([call]) + b"}")]

    def _message_delta(self, obj: JSON) -> list[bytes]:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if self._usage is None:
                self._usage = {}
            self._usage.update((k, v) for k, v in usage.items() if v is not None)
        delta = obj.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if stop_reason is None or not self._prefix:
            return []
        self.finish_reason = FINISH_REASONS.get(stop_reason, "stop")
        tail = b',"logprobs":null,"finish_reason":"%b"}]}\n\n' % self.finish_reason.encode()
        return [self._prefix + b"{}" + tail]

    def _message_stop(self) -> list[bytes]:
        self.done = True
        self.completed = True
        if not self._include_usage:
            return [DONE]
        head = self._prefix[6 : self._prefix.index(b',"choices":')]
        usage = openai_usage_json(self.usage or Usage())
        return [b"data: " + head + b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n", DONE]

    def _error(self, error: Any) -> list[bytes]:
        kind = str(error.get("type") or "api_error") if isinstance(error, dict) else "api_error"
        message = error.get("message") if isinstance(error, dict) else None
        self.upstream_error = kind
        self.done = True
        body = openai_error_json(
            message if isinstance(message, str) else "The upstream provider failed.",
            ERROR_TYPES.get(kind, "server_error"),
            code=kind,
        )
        return [b"data: " + orjson.dumps(body) + b"\n\n"]
