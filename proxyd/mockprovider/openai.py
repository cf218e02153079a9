"""The mock's OpenAI routes: chat, completions, embeddings, models and responses."""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from proxyd.mockprovider.cache import CACHE_KEY, credential, echo_tier, responses_searches
from proxyd.mockprovider.common import (
    CONFIG_KEY,
    MODELS,
    WORDS,
    _bad_body,
    _budget,
    _chat_tail,
    _json,
    _openai_auth,
    _pace,
    _read_json,
    _sse,
    _stream,
    _usage_openai,
    mock_text,
    prompt_tokens,
)
from proxyd.protocol.sse import chunk_frame


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
    cached = request.app[CACHE_KEY].openai(credential(request.headers), body, p)
    tier = echo_tier(body)
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
                "usage": _usage_openai(p, n, cached),
                "service_tier": tier,
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
    content = [chunk_frame(prefix + tails[k % len(tails)]) for k in range(n)]
    last = prefix + _chat_tail({}, finish, usage_null=with_usage)
    if with_usage:
        usage = orjson.dumps(_usage_openai(p, n, cached))
        last += (
            prefix
            + b'"service_tier":"%s","system_fingerprint":"fp_mock","choices":[],"usage":'
            % tier.encode()
            + usage
            + b"}\n\n"
        )
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
    first, content = events[0] if events else b"", [chunk_frame(e) for e in events[1:]]
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
    searches = responses_searches(body)
    usage = {
        "input_tokens": p,
        "input_tokens_details": {
            "cached_tokens": request.app[CACHE_KEY].openai(credential(request.headers), body, p)
        },
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": p + n,
    }
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": mid, "type": "message", "status": status, "role": "assistant", "content": [part]}
    calls = [
        {"id": f"ws_mock{num:012d}_{i}", "type": "web_search_call", "status": "completed"}
        for i in range(searches)
    ]
    if not body.get("stream"):
        await _pace(cfg, n)
        return _json(_response_obj(rid, model, created, status, [*calls, item], usage, limit))
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
        chunk_frame(
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
    done = _response_obj(rid, model, created, status, [*calls, item], usage, limit)
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
