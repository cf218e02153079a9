"""Scripted fake providers: real aiohttp servers whose next answers a test writes down.

Each fake serves OpenAI (`/v1/...`) and Anthropic (`/v1/messages`) paths and plays its script
one step per request: "500 then OK", "cut after 3 chunks", "stall before headers".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from proxyd.state.store import Channel


@dataclass
class Step:
    """One scripted answer."""

    status: int = 200
    body: bytes | None = None  # a whole non-stream body
    events: list[bytes] | None = None  # SSE events, written one per write
    split_at: int | None = None  # write the events joined, cut into two reads at this offset
    cut_after: int | None = None  # drop the connection after this many events
    stall_before_headers: float = 0.0
    stall_between: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    """What the fake received: enough to assert on, never logged."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    query: str = ""  # the raw query string, as it arrived


class FakeProvider:
    """A scripted provider; when the script runs out, `default` answers."""

    def __init__(self, default: Step | None = None) -> None:
        self.script: list[Step] = []
        self.default = default or Step(body=chat_body("hello"))
        self.seen: list[Seen] = []
        self.disconnected = asyncio.Event()

    def then(self, *steps: Step) -> FakeProvider:
        self.script.extend(steps)
        return self

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(
            Seen(
                request.path,
                dict(request.headers),
                orjson.loads(raw) if raw else {},
                request.rel_url.raw_query_string,
            )
        )
        step = self.script.pop(0) if self.script else self.default
        if step.stall_before_headers:
            await asyncio.sleep(step.stall_before_headers)
        if step.events is None:
            return web.Response(
                status=step.status,
                body=step.body or b"",
                headers={"Content-Type": "application/json", **step.headers},
            )
        response = web.StreamResponse(
            status=step.status,
            headers={"Content-Type": "text/event-stream; charset=utf-8", **step.headers},
        )
        await response.prepare(request)
        try:
            if step.split_at is not None:
                data = b"".join(step.events)
                await response.write(data[: step.split_at])
                await asyncio.sleep(0.05)
                await response.write(data[step.split_at :])
                return response
            for index, event in enumerate(step.events):
                if step.cut_after is not None and index == step.cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(event)
                if step.stall_between:
                    await asyncio.sleep(step.stall_between)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def named(event: str, obj: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def chat_body(text: str, model: str = "up-model", prompt: int = 7, completion: int = 2) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


def chat_events(
    words: list[str], *, usage: bool = True, prompt: int = 7, model: str = "up-model"
) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    out = [sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    out += [
        sse({**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
        for w in words
    ]
    out.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if usage:
        u = {"prompt_tokens": prompt, "completion_tokens": len(words)}
        u["total_tokens"] = prompt + len(words)
        out.append(sse({**base, "choices": [], "usage": u}))
    out.append(b"data: [DONE]\n\n")
    return out


def anthropic_events(words: list[str], *, prompt: int = 9) -> list[bytes]:
    msg: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "up-claude",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": 1},
    }
    out = [named("message_start", {"type": "message_start", "message": msg})]
    out.append(
        named(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )
    out.append(named("ping", {"type": "ping"}))
    out += [
        named(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
        )
        for w in words
    ]
    out.append(named("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(
        named(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        )
    )
    out.append(named("message_stop", {"type": "message_stop"}))
    return out


def anthropic_body(text: str, prompt: int = 9, completion: int = 3) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "up-claude",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }
    )


Factory = Callable[..., Awaitable[Any]]


def make_channel(
    cid: str = "a",
    *,
    priority: int = 0,
    weight: int = 1,
    type: str = "openai",
    base_url: str = "http://127.0.0.1:1/v1",
    api_keys: tuple[str, ...] = ("k",),
    verify_tls: bool = True,
    rpm: int | None = None,
    max_concurrency: int | None = None,
) -> Channel:
    """A compiled channel for the tests that drive routing, health or the upstream pools."""
    return Channel(
        id=cid,
        type=type,
        base_url=base_url,
        api_keys=api_keys,
        models=frozenset({"m"}),
        model_map=MappingProxyType({}),
        priority=priority,
        weight=weight,
        headers=(),
        proxy=None,
        verify_tls=verify_tls,
        connect_timeout=1.0,
        first_byte_timeout=1.0,
        chunk_timeout=1.0,
        rpm=rpm,
        max_concurrency=max_concurrency,
    )
