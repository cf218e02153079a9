"""A local mock LLM provider (OpenAI and Anthropic wire formats) for `make run`, tests, benchmarks.

Streams deterministic text on one shared deadline-paced timer with pre-serialised event bytes, so
thousands of streams cost little. It never calls the network and never logs a body.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import heapq
import itertools
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop
from aiohttp import web

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


def _frame(event: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame around an event."""
    return b"%x\r\n%s\r\n" % (len(event), event)


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
        self.anthropic_deltas = [_frame(_sse("content_block_delta", _delta(w))) for w in WORDS]


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


def _usage_openai(p: int, c: int) -> dict[str, Any]:
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
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


@_openai_auth
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, streaming or not."""
    cfg = request.app[CONFIG_KEY]
    body = await _read_json(request)
    if body is None or not isinstance(body.get("model"), str) or "messages" not in body:
        return _bad_body("model' and 'messages")
    model: str = body["model"]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    n, cut = _budget(cfg, limit)
    finish = "length" if cut else "stop"
    p = prompt_tokens(body)
    rid = f"chatcmpl-mock{next(cfg.counter):012d}"
    created = int(time.time())
    if not body.get("stream"):
        await _pace(cfg, n)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": mock_text(n),
            "refusal": None,
            "annotations": [],
        }
        return _json(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                ],
                "usage": _usage_openai(p, n),
                "service_tier": "default",
                "system_fingerprint": "fp_mock",
            }
        )
    prefix = b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
        rid.encode(),
        created,
        orjson.dumps(model),
    )
    opts = body.get("stream_options")
    with_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    role = {"role": "assistant", "content": "", "refusal": None}
    first = prefix + _chat_tail(role, None, usage_null=with_usage)
    tails = cfg.chat_tails_usage if with_usage else cfg.chat_tails
    content = [_frame(prefix + tails[k % len(tails)]) for k in range(n)]
    last = prefix + _chat_tail({}, finish, usage_null=with_usage)
    if with_usage:
        usage = orjson.dumps(_usage_openai(p, n))
        last += prefix + b'"system_fingerprint":"fp_mock","choices":[],"usage":' + usage + b"}\n\n"
    return await _stream(request, first, content, last + b"data: [DONE]\n\n")


@_openai_auth
async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (legacy text completions), streaming or not."""
    cfg = request.app[CONFIG_KEY]
    body = await _read_json(request)
    if body is None or not isinstance(body.get("model"), str) or "prompt" not in body:
        return _bad_body("model' and 'prompt")
    model: str = body["model"]
    n, cut = _budget(cfg, body.get("max_tokens"))
    finish = "length" if cut else "stop"
    p = prompt_tokens(body)
    rid = f"cmpl-mock{next(cfg.counter):012d}"
    created = int(time.time())
    if not body.get("stream"):
        await _pace(cfg, n)
        return _json(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"text": mock_text(n), "index": 0, "logprobs": None, "finish_reason": finish}
                ],
                "usage": _usage_openai(p, n),
                "system_fingerprint": "fp_mock",
            }
        )
    prefix = b'data: {"id":"%s","object":"text_completion","created":%d,"model":%s,' % (
        rid.encode(),
        created,
        orjson.dumps(model),
    )
    events = [
        prefix + _chat_tail({"content": WORDS[k % len(WORDS)]}, None, "text") for k in range(n)
    ]
    first, content = events[0] if events else b"", [_frame(e) for e in events[1:]]
    last = prefix + _chat_tail({}, finish, "text")
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        usage = orjson.dumps(_usage_openai(p, n))
        last += prefix + b'"system_fingerprint":"fp_mock","choices":[],"usage":' + usage + b"}\n\n"
    return await _stream(request, first, content, last + b"data: [DONE]\n\n")


@_openai_auth
async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings: a deterministic vector per input, float list or base64."""
    body = await _read_json(request)
    if body is None or not isinstance(body.get("model"), str) or "input" not in body:
        return _bad_body("model' and 'input")
    raw = body["input"]
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else 64
    as_b64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(inputs):
        seed = hashlib.sha256(orjson.dumps(item)).digest()
        vec = [(seed[j % 32] - 127.5) / 128.0 for j in range(dims)]
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    p = prompt_tokens({"input": inputs})
    return _json(
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": p, "total_tokens": p},
        }
    )


@_openai_auth
async def models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: the fixed list of mock model names."""
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in MODELS]
    return _json({"object": "list", "data": data})


def _response_obj(
    rid: str,
    model: str,
    created: int,
    status: str,
    output: list[Any],
    usage: dict[str, Any] | None,
    limit: Any,
) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": None,
        "max_output_tokens": limit,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": {},
    }


@_openai_auth
async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses, streaming (response.created ... response.completed) or not."""
    cfg = request.app[CONFIG_KEY]
    body = await _read_json(request)
    if body is None or not isinstance(body.get("model"), str) or "input" not in body:
        return _bad_body("model' and 'input")
    model: str = body["model"]
    limit = body.get("max_output_tokens")
    n, cut = _budget(cfg, limit)
    status = "incomplete" if cut else "completed"
    p = prompt_tokens(body)
    num = next(cfg.counter)
    rid, mid, created = f"resp_mock{num:012d}", f"msg_mock{num:012d}", int(time.time())
    text = mock_text(n)
    usage = {
        "input_tokens": p,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": p + n,
    }
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": mid, "type": "message", "status": status, "role": "assistant", "content": [part]}
    if not body.get("stream"):
        await _pace(cfg, n)
        return _json(_response_obj(rid, model, created, status, [item], usage, limit))
    seq = itertools.count()
    at = {"item_id": mid, "output_index": 0, "content_index": 0}
    pending = _response_obj(rid, model, created, "in_progress", [], None, limit)
    empty_item = {**item, "status": "in_progress", "content": []}
    first = b"".join(
        [
            _sse(
                "response.created",
                {"type": "response.created", "sequence_number": next(seq), "response": pending},
            ),
            _sse(
                "response.in_progress",
                {"type": "response.in_progress", "sequence_number": next(seq), "response": pending},
            ),
            _sse(
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": empty_item,
                },
            ),
            _sse(
                "response.content_part.added",
                {
                    "type": "response.content_part.added",
                    "sequence_number": next(seq),
                    **at,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                },
            ),
        ]
    )
    content = [
        _frame(
            _sse(
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": next(seq),
                    **at,
                    "delta": WORDS[k % len(WORDS)],
                    "logprobs": [],
                },
            )
        )
        for k in range(n)
    ]
    done = _response_obj(rid, model, created, status, [item], usage, limit)
    last = b"".join(
        [
            _sse(
                "response.output_text.done",
                {
                    "type": "response.output_text.done",
                    "sequence_number": next(seq),
                    **at,
                    "text": text,
                    "logprobs": [],
                },
            ),
            _sse(
                "response.content_part.done",
                {
                    "type": "response.content_part.done",
                    "sequence_number": next(seq),
                    **at,
                    "part": part,
                },
            ),
            _sse(
                "response.output_item.done",
                {
                    "type": "response.output_item.done",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": item,
                },
            ),
            _sse(
                f"response.{status}",
                {"type": f"response.{status}", "sequence_number": next(seq), "response": done},
            ),
        ]
    )
    return await _stream(request, first, content, last)


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages in Anthropic's wire format, streaming or not."""
    cfg = request.app[CONFIG_KEY]
    auth = request.headers.get("Authorization", "")
    bearer = auth[7:].strip() if auth.startswith("Bearer ") else ""
    if not request.headers.get("x-api-key", "").strip() and not bearer:
        # Anthropic takes the key as x-api-key; its newer SDKs send Authorization: Bearer.
        return _anthropic_error(401, "x-api-key header is required", "authentication_error")
    if not request.headers.get("anthropic-version"):
        return _anthropic_error(
            400, "anthropic-version: header is required", "invalid_request_error"
        )
    body = await _read_json(request)
    if (
        body is None
        or not isinstance(body.get("model"), str)
        or "messages" not in body
        or not isinstance(body.get("max_tokens"), int)
    ):
        return _anthropic_error(
            400, "model, messages and max_tokens are required", "invalid_request_error"
        )
    model: str = body["model"]
    n, cut = _budget(cfg, body["max_tokens"])
    stop = "max_tokens" if cut else "end_turn"
    p = prompt_tokens(body)
    mid = f"msg_mock{next(cfg.counter):016d}"
    usage = {"input_tokens": p, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    if not body.get("stream"):
        await _pace(cfg, n)
        return _json(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": mock_text(n)}],
                "stop_reason": stop,
                "stop_sequence": None,
                "usage": {**usage, "output_tokens": n},
            }
        )
    start: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    first = b"".join(
        [
            _sse("message_start", {"type": "message_start", "message": start}),
            _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _sse("ping", {"type": "ping"}),
        ]
    )
    deltas = cfg.anthropic_deltas
    content = [deltas[k % len(deltas)] for k in range(n)]
    last = b"".join(
        [
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": n},
                },
            ),
            _sse("message_stop", {"type": "message_stop"}),
        ]
    )
    return await _stream(request, first, content, last)


def create_mock_app(
    *, chunk_interval: float = 0.02, chunks: int = 16, instant: bool = False
) -> web.Application:
    """The mock provider: OpenAI routes under /v1 and Anthropic's /v1/messages on one app."""
    if chunks < 1 or chunk_interval <= 0:
        raise ValueError("chunks must be >= 1 and chunk_interval > 0")
    app = web.Application()
    cfg = MockConfig(chunk_interval, chunks, instant)
    app[CONFIG_KEY] = cfg

    async def ticker_ctx(_app: web.Application) -> Any:
        cfg.ticker = Ticker(chunk_interval)
        yield
        cfg.ticker.close()
        cfg.ticker = None

    app.cleanup_ctx.append(ticker_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/messages", messages)
    return app


def main(argv: list[str] | None = None) -> None:
    """`python -m proxyd.mockprovider --port 9100 [--instant] [--chunks N] [--interval S]`."""
    parser = argparse.ArgumentParser(prog="python -m proxyd.mockprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=16, help="content tokens per answer")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--instant", action="store_true", help="no pacing: answer at once")
    args = parser.parse_args(argv)
    uvloop.install()
    app = create_mock_app(chunk_interval=args.interval, chunks=args.chunks, instant=args.instant)
    gc.freeze()  # start-up objects never need scanning again: shorter collector pauses
    print(
        f"mock provider on http://{args.host}:{args.port} (OpenAI: /v1, Anthropic: /)", flush=True
    )
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
