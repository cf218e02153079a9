"""Native requests pass as sent: every field, header value, query and event, unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tests.conftest import SECRET, StartProxy, StartServer, channel, make_config
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, named

BETAS = (
    "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "extended-cache-ttl-2025-04-11,a-beta-from-next-year-2027-01-01"
)
ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01", "anthropic-beta": BETAS}
OAI = {"Authorization": f"Bearer {SECRET}"}

# The kind of body Claude Code sends, written by hand from Anthropic's documentation.
MESSAGES_BODY: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 32000,
    "stream": True,
    "system": [
        {
            "type": "text",
            "text": "You are an agent.",
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Read the file."}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "EqQBCkYIBxgC"},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/a"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "contents",
                    "cache_control": {"type": "ephemeral", "ttl": "5m"},
                },
                {"type": "a_block_type_from_next_year", "payload": {"x": 1}},
            ],
        },
    ],
    "tools": [{"name": "Read", "input_schema": {"type": "object"}, "defer_loading": True}],
    "thinking": {"type": "enabled", "budget_tokens": 31999, "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "metadata": {"user_id": '{"device_id":"d","account_uuid":"","session_id":"s-1"}'},
    "a_field_from_next_year": {"enabled": True},
}

START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 1},
    },
}
EVENTS = [
    named("message_start", START),
    named(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""},
        },
    ),
    named(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "Hmm."},
        },
    ),
    named(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "EqQB"},
        },
    ),
    named("content_block_stop", {"type": "content_block_stop", "index": 0}),
    named(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "redacted_thinking", "data": "Emw"},
        },
    ),
    named("content_block_stop", {"type": "content_block_stop", "index": 1}),
    named("an_event_from_next_year", {"type": "an_event_from_next_year", "detail": [1, 2]}),
    named(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "a_new_block", "x": 1},
        },
    ),
    named(
        "content_block_delta",
        {"type": "content_block_delta", "index": 2, "delta": {"type": "a_new_delta", "y": 2}},
    ),
    named("content_block_stop", {"type": "content_block_stop", "index": 2}),
    named(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 7},
            "context_management": {"applied_edits": []},
        },
    ),
    named("message_stop", {"type": "message_stop"}),
]


async def test_anthropic_native_request_and_stream_pass_unchanged(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Betas, ?beta=true, cache_control ttl, new fields, blocks and events: all as sent."""
    fake = FakeProvider(Step(events=EVENTS))
    server = await start_server(fake.app())
    chans = [channel("a", url_of(server), type="anthropic", models=["claude-x"])]
    client, _ = await start_proxy(make_config(tmp_path, chans))
    raw = orjson.dumps(MESSAGES_BODY)
    resp = await client.post(
        "/v1/messages?beta=true",
        data=raw,
        headers={**ANT, "Content-Type": "application/json"},
    )
    assert resp.status == 200
    assert await resp.read() == b"".join(EVENTS)
    seen = fake.seen[0]
    assert seen.path == "/v1/messages"
    assert seen.query == "beta=true"
    assert seen.headers["anthropic-beta"] == BETAS
    assert seen.body == MESSAGES_BODY


async def test_anthropic_native_whole_answer_passes_unchanged(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """A whole answer with new block types and fields reaches the client byte for byte."""
    answer = orjson.dumps(
        {
            "id": "msg_2",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "t", "signature": "sig"},
                {"type": "a_new_block", "z": 3},
                {"type": "text", "text": "done"},
            ],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 4, "a_new_usage_field": 1},
            "context_management": {"applied_edits": []},
        }
    )
    fake = FakeProvider(Step(body=answer))
    server = await start_server(fake.app())
    chans = [channel("a", url_of(server), type="anthropic", models=["claude-x"])]
    client, _ = await start_proxy(make_config(tmp_path, chans))
    body = {**MESSAGES_BODY, "stream": False}
    resp = await client.post("/v1/messages", json=body, headers=ANT)
    assert await resp.read() == answer
    assert fake.seen[0].body == body
    assert fake.seen[0].query == ""


# What Codex sends to /v1/responses, written by hand from OpenAI's Responses API documentation.
RESPONSES_BODY: dict[str, Any] = {
    "model": "gpt-x",
    "stream": True,
    "store": False,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199-thread",
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "reasoning": {"effort": "medium", "summary": "auto"},
    "instructions": "You are Codex.",
    "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAAAB"},
        {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"type": "an_item_from_next_year", "x": 1},
    ],
    "tools": [
        {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
        {"type": "web_search"},
    ],
    "client_metadata": {"x-codex-installation-id": "i-1"},
    "text": {"verbosity": "low"},
}


async def test_responses_request_from_codex_passes_unchanged(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """store, include, prompt_cache_key, tools, input items and new events pass unchanged."""
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "r1"}}
    done = {
        "type": "response.completed",
        "sequence_number": 2,
        "response": {
            "id": "r1",
            "status": "completed",
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 8},
                "output_tokens": 2,
                "output_tokens_details": {"reasoning_tokens": 1},
                "total_tokens": 12,
            },
        },
    }
    events = [
        named("response.created", created),
        named("response.an_event_from_next_year", {"type": "response.an_event_from_next_year"}),
        named("response.completed", done),
    ]
    fake = FakeProvider(Step(events=events))
    server = await start_server(fake.app())
    prices = {"gpt-x": {"input": "1", "output": "2", "per_call": {"web_search": "0.01"}}}
    chans = [channel("o", url_of(server), models=["gpt-x"])]
    client, _ = await start_proxy(make_config(tmp_path, chans, prices=prices))
    resp = await client.post("/v1/responses", json=RESPONSES_BODY, headers=OAI)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b"".join(events)
    assert fake.seen[0].path == "/v1/responses"
    assert fake.seen[0].body == RESPONSES_BODY
