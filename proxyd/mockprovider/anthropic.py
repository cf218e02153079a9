"""The mock's Anthropic route: /v1/messages, streaming or not."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxyd.mockprovider.cache import CACHE_KEY, anthropic_searches, credential
from proxyd.mockprovider.common import (
    CONFIG_KEY,
    _anthropic_error,
    _budget,
    _json,
    _pace,
    _read_json,
    _sse,
    _stream,
    mock_text,
    prompt_tokens,
)


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
    usage = request.app[CACHE_KEY].anthropic(credential(request.headers), body, p)
    searches = anthropic_searches(body)
    final_usage: dict[str, Any] = {"output_tokens": n}
    if searches:
        final_usage["server_tool_use"] = {"web_search_requests": searches}
    if body.get("speed") == "fast":
        usage["speed"] = "fast"
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
                "usage": {**usage, **final_usage},
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
                    "usage": final_usage,
                },
            ),
            _sse("message_stop", {"type": "message_stop"}),
        ]
    )
    return await _stream(request, first, content, last)
