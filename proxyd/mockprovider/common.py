"""What every mock route shares: the text, one paced timer for all streams, auth, errors.

Pre-serialised event bytes and one deadline-paced timer keep thousands of streams cheap.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxyd.protocol.sse import chunk_frame

_TEXT = (
    "The quick brown fox jumps over the lazy dog while a patient relay carries every "
    "token from the model to the client without buffering, trimming or inventing any "
    "part of the stream it was given."
)
WORDS: tuple[str, ...] = tuple(" " + w for w in _TEXT.split(" "))
MODELS: tuple[str, ...] = ("mock-gpt", "mock-gpt-mini", "mock-claude", "mock-embed")
_PAD = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 4
_CHUNK_TARGET = 145  # bytes of a chat chunk after its id/model prefix: ~250-byte events in total
_QUANTUM = 0.001  # timer resolution: streams due within the same millisecond share one wake-up
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def mock_text(n: int) -> str:
    """The completion the mock emits for `n` tokens: word `k` is WORDS[k % len(WORDS)]."""
    return "".join(WORDS[k % len(WORDS)] for k in range(n))


def prompt_tokens(body: dict[str, Any]) -> int:
    """Deterministic prompt size: ceil(UTF-8 bytes / 4) of every string in messages, system,
    prompt and input (role/type/name/id fields excluded), at least 1."""
    size = sum(_strlen(body.get(k)) for k in ("messages", "system", "prompt", "input"))
    return max(1, math.ceil(size / 4))


def _strlen(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_strlen(v) for v in value)
    if isinstance(value, dict):
        skip = ("role", "type", "name", "id", "cache_control")
        return sum(_strlen(v) for k, v in value.items() if k not in skip)
    return 0


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _Stream:
    """One open streamed response: its framed content events and where it has got to."""

    __slots__ = ("done", "events", "pos", "transport")

    def __init__(
        self, transport: asyncio.Transport, events: list[bytes], done: asyncio.Future[None]
    ):
        self.transport = transport
        self.events = events
        self.pos = 0
        self.done = done


class Ticker:
    """One timer for all streams: each wake-up writes the due event to every stream in that slot.

    Event k of a stream is due at start + k * interval on a millisecond grid, so a late wake-up
    never shifts the schedule (deadline pacing, no per-stream sleep drift).
    """

    def __init__(self, interval: float) -> None:
        self._step = max(1, round(interval / _QUANTUM))
        self._loop = asyncio.get_running_loop()
        self._slots: dict[int, list[_Stream]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed = -1

    @property
    def open_streams(self) -> int:
        """How many streams are waiting for their next event."""
        return sum(len(bucket) for bucket in self._slots.values())

    def add(self, stream: _Stream) -> None:
        """Schedule the stream's first content event one interval from now."""
        self._put(math.ceil(self._loop.time() / _QUANTUM) + self._step, stream)

    def _put(self, slot: int, stream: _Stream) -> None:
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = [stream]
            heapq.heappush(self._heap, slot)
            if self._timer is None or slot < self._armed:
                self._arm(slot)
        else:
            bucket.append(stream)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = self._loop.call_at(slot * _QUANTUM, self._fire)

    def _fire(self) -> None:
        self._timer = None
        due = math.floor(self._loop.time() / _QUANTUM + 0.5)
        heap, slots, step = self._heap, self._slots, self._step
        while heap and heap[0] <= due:
            slot = heapq.heappop(heap)
            nxt = slot + step
            for s in slots.pop(slot):
                transport = s.transport
                if s.pos == len(s.events) or transport.is_closing():
                    if not s.done.done():
                        s.done.set_result(None)
                    continue
                transport.write(s.events[s.pos])
                s.pos += 1
                self._put(nxt, s)
        if heap and self._timer is None:
            self._arm(heap[0])

    def close(self) -> None:
        """Stop the timer and release every waiting stream."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for bucket in self._slots.values():
            for s in bucket:
                if not s.done.done():
                    s.done.set_result(None)
        self._slots.clear()
        self._heap.clear()


class MockConfig:
    """The knobs of one mock app and its per-app request counter."""

    def __init__(self, chunk_interval: float, chunks: int, instant: bool) -> None:
        self.interval = chunk_interval
        self.chunks = chunks
        self.instant = instant
        self.counter = itertools.count(1)
        self.ticker: Ticker | None = None
        self.chat_tails = [_chat_tail({"content": w}, None) for w in WORDS]
        self.chat_tails_usage = [_chat_tail({"content": w}, None, usage_null=True) for w in WORDS]
        self.anthropic_deltas = [chunk_frame(_sse("content_block_delta", _delta(w))) for w in WORDS]


CONFIG_KEY = web.AppKey("mock_config", MockConfig)


def _delta(word: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": word},
    }


def _chat_tail(
    delta: dict[str, Any], finish: str | None, obj: str = "chat", usage_null: bool = False
) -> bytes:
    """A chunk after its id/model prefix; with include_usage, OpenAI adds "usage":null to each."""
    if obj == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
    else:
        choice = {"text": delta.get("content", ""), "index": 0, "logprobs": None}
    choice["finish_reason"] = finish
    usage = b',"usage":null' if usage_null else b""
    head = (
        b'"system_fingerprint":"fp_mock","choices":['
        + orjson.dumps(choice)
        + b"]"
        + usage
        + b',"obfuscation":"'
    )
    pad = _PAD[: max(0, _CHUNK_TARGET - len(head) - 4)]
    return head + pad + b'"}\n\n'


def _usage_openai(p: int, c: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _openai_error(status: int, message: str, etype: str, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _anthropic_error(status: int, message: str, etype: str) -> web.Response:
    body = {"type": "error", "error": {"type": etype, "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def _read_json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _budget(cfg: MockConfig, limit: Any) -> tuple[int, bool]:
    """How many tokens to emit and whether the caller's max-token limit cut the answer short."""
    if isinstance(limit, int) and 0 < limit < cfg.chunks:
        return limit, True
    return cfg.chunks, False


async def _stream(
    request: web.Request, first: bytes, content: list[bytes], last: bytes
) -> web.StreamResponse:
    """Send `first` now, one framed `content` event per tick, then `last` and the chunk end."""
    cfg = request.app[CONFIG_KEY]
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        await resp.write(first)
        transport = request.transport
        if transport is None:
            return resp
        if cfg.instant or cfg.ticker is None:
            transport.write(b"".join(content))
        else:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            cfg.ticker.add(_Stream(transport, content, done))
            await done
        await resp.write_eof(last)
    except ConnectionError:
        pass  # the client left; nothing more to send
    return resp


async def _pace(cfg: MockConfig, n: int) -> None:
    if not cfg.instant:
        await asyncio.sleep(cfg.interval * (n + 1))


def _openai_auth(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _openai_error(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return await handler(request)

    return wrapped


def _bad_body(name: str) -> web.Response:
    return _openai_error(
        400, f"The request body must be a JSON object with '{name}'.", "invalid_request_error", None
    )
