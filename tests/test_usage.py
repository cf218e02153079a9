"""Usage extraction from provider bodies and streamed SSE events of every supported API."""

from __future__ import annotations

import orjson

from proxyd.protocol.usage import (
    StreamUsage,
    Usage,
    completion_text,
    is_usage_only_chunk,
    parse_usage,
    usage_from_body,
)


def sse(obj: object, event: str | None = None) -> bytes:
    """One SSE event as the relay hands it over."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def finished(scanner: StreamUsage) -> bool:
    """Whether the scanner saw the final usage (a call, so mypy does not narrow it)."""
    return scanner.complete


def chat_chunk(text: str) -> bytes:
    """An OpenAI chat chunk with include_usage on (usage null)."""
    return sse(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            "usage": None,
        }
    )


CHAT_USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 3},
}


def test_chat_body() -> None:
    """A chat completion body yields prompt, completion, cached and reasoning tokens."""
    body = orjson.dumps({"choices": [], "usage": CHAT_USAGE})
    assert usage_from_body(body) == Usage(19, 10, 4, 3)


def test_embeddings_body() -> None:
    """Embeddings report prompt tokens only."""
    body = {"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert usage_from_body(body) == Usage(8, 0, 0, 0)


def test_responses_body() -> None:
    """The Responses API's input/output tokens with their details."""
    u = {
        "input_tokens": 100,
        "input_tokens_details": {"cached_tokens": 60},
        "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 150,
    }
    assert usage_from_body(orjson.dumps({"object": "response", "usage": u})) == Usage(
        100, 50, 60, 20
    )


def test_anthropic_body_counts_cache_in_prompt() -> None:
    """Anthropic's input_tokens excludes cache reads and writes; the prompt includes them."""
    u = {
        "input_tokens": 10,
        "cache_read_input_tokens": 200,
        "cache_creation_input_tokens": 30,
        "output_tokens": 7,
    }
    assert parse_usage(u) == Usage(240, 7, 200, 0, cache_write_tokens=30)


def test_body_without_usage_or_garbage() -> None:
    """No usage, a non-object or broken JSON give None."""
    assert usage_from_body(b'{"choices": []}') is None
    assert usage_from_body(b"[1, 2]") is None
    assert usage_from_body(b"{not json") is None
    assert usage_from_body(b'{"usage": null}') is None


def test_openai_stream_final_usage_chunk() -> None:
    """Only the final usage chunk is parsed; chunks with usage null are not."""
    scanner = StreamUsage()
    for t in ("Hel", "lo"):
        scanner.feed(chat_chunk(t))
    assert scanner.usage() is None
    assert not finished(scanner)
    last = sse({"id": "c1", "choices": [], "usage": CHAT_USAGE})
    scanner.feed(last)
    scanner.feed(b"data: [DONE]\n\n")
    assert finished(scanner)
    assert scanner.usage() == Usage(19, 10, 4, 3)


def test_usage_only_chunk_predicate() -> None:
    """The extra usage chunk is recognised; content chunks and usage-bearing content are not."""
    assert is_usage_only_chunk(sse({"choices": [], "usage": CHAT_USAGE}))
    assert is_usage_only_chunk(b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n')
    assert not is_usage_only_chunk(chat_chunk("hi"))
    assert not is_usage_only_chunk(sse({"choices": [{"delta": {}}], "usage": CHAT_USAGE}))
    # a model writing the words "usage" and "choices":[] inside its text is escaped in JSON
    assert not is_usage_only_chunk(chat_chunk('"usage":{ "choices":[]'))


def test_text_mentioning_usage_is_not_parsed_as_usage() -> None:
    """Content that talks about "usage" objects is escaped JSON and never taken for usage."""
    scanner = StreamUsage()
    scanner.feed(chat_chunk('{"usage":{"prompt_tokens": 999}}'))
    assert scanner.usage() is None


def test_anthropic_stream() -> None:
    """message_start gives the prompt (cache included); message_delta's cumulative output wins."""
    scanner = StreamUsage()
    start = {
        "type": "message_start",
        "message": {
            "id": "m",
            "usage": {
                "input_tokens": 25,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 5,
                "output_tokens": 1,
            },
        },
    }
    scanner.feed(sse(start, "message_start"))
    assert scanner.prompt_known
    assert not finished(scanner)
    assert scanner.usage() == Usage(
        130, 0, 100, 0, cache_write_tokens=5
    )  # the placeholder output count is ignored
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"},
    }
    scanner.feed(sse(delta, "content_block_delta"))
    scanner.feed(sse({"type": "message_delta", "usage": {"output_tokens": 3}}, "message_delta"))
    scanner.feed(sse({"type": "message_delta", "usage": {"output_tokens": 15}}, "message_delta"))
    scanner.feed(sse({"type": "message_stop"}, "message_stop"))
    assert finished(scanner)
    assert scanner.usage() == Usage(130, 15, 100, 0, cache_write_tokens=5)


def test_responses_stream() -> None:
    """response.created's null usage is skipped; response.completed carries the usage."""
    scanner = StreamUsage()
    created = {"type": "response.created", "response": {"id": "r", "usage": None}}
    scanner.feed(sse(created, "response.created"))
    scanner.feed(
        sse({"type": "response.output_text.delta", "delta": "Hi"}, "response.output_text.delta")
    )
    assert scanner.usage() is None
    done = {
        "type": "response.completed",
        "response": {
            "id": "r",
            "usage": {
                "input_tokens": 9,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 2,
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        },
    }
    scanner.feed(sse(done, "response.completed"))
    assert finished(scanner)
    assert scanner.usage() == Usage(9, 2, 0, 0)


def test_delivered_text_of_every_dialect() -> None:
    """Without usage, the scanner gives back the text that was delivered, in order."""
    scanner = StreamUsage()
    scanner.feed(chat_chunk("Hello"))
    scanner.feed(sse({"choices": [{"index": 0, "text": " world"}]}))  # completions
    tool = {"function": {"name": "f", "arguments": '{"a":1}'}}
    scanner.feed(sse({"choices": [{"delta": {"tool_calls": [tool]}}]}))
    thinking = {"type": "content_block_delta", "delta": {"thinking": "hmm"}}
    scanner.feed(sse(thinking, "content_block_delta"))
    scanner.feed(sse({"type": "response.output_text.delta", "delta": "!"}))
    scanner.feed(b": keep-alive comment\n\n")
    scanner.feed(b"data: [DONE]\n\n")
    assert scanner.delivered_text() == 'Hello worldf{"a":1}hmm!'
    assert not finished(scanner)


def test_memory_is_bounded_and_extrapolated() -> None:
    """Past keep_bytes only the byte count grows; the ratio scales the estimate."""
    scanner = StreamUsage(keep_bytes=300)
    chunk = chat_chunk("x" * 10)
    for _ in range(100):
        scanner.feed(chunk)
    delivered, kept = scanner.extrapolation()
    assert delivered == 100 * len(chunk)
    assert 300 <= kept < 300 + len(chunk)
    assert scanner.delivered_text() == "x" * 10 * (kept // len(chunk))


def test_references_dropped_once_usage_arrives() -> None:
    """After the final usage no event is kept."""
    scanner = StreamUsage()
    scanner.feed(chat_chunk("secret"))
    scanner.feed(sse({"choices": [], "usage": CHAT_USAGE}))
    assert scanner.delivered_text() == ""


def test_completion_text_of_non_stream_bodies() -> None:
    """The generated text of chat, completions, Anthropic and Responses bodies."""
    chat = {
        "choices": [
            {
                "message": {
                    "content": "Hi",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                }
            }
        ]
    }
    assert completion_text(orjson.dumps(chat)) == "Hif{}"
    assert completion_text({"choices": [{"text": "abc"}]}) == "abc"
    anthropic = {
        "content": [{"type": "text", "text": "yo"}, {"type": "tool_use", "input": {"a": 1}}]
    }
    assert completion_text(anthropic) == 'yo{"a":1}'
    responses = {
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}]
    }
    assert completion_text(responses) == "ok"
    assert completion_text(b"not json") == ""


def test_every_category_of_each_dialect() -> None:
    """Cache writes with their 1-hour part, audio, DeepSeek hits, tiers and paid tool calls."""
    anthropic = {
        "input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 50,
        "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 30},
        "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
        "speed": "fast", "service_tier": "standard",
    }  # fmt: skip
    assert parse_usage(anthropic) == Usage(
        155, 9, 100, 0, cache_write_tokens=50, cache_write_1h_tokens=30,
        service_tier="fast", tool_calls={"web_search": 2, "web_fetch": 1},
    )  # fmt: skip
    chat = {
        "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 30,
                                  "audio_tokens": 5},
        "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 4},
    }  # fmt: skip
    assert parse_usage(chat) == Usage(
        100, 20, 40, 8, cache_write_tokens=30, audio_input_tokens=5, audio_output_tokens=4
    )
    deepseek = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                "prompt_cache_hit_tokens": 6, "prompt_cache_miss_tokens": 4}  # fmt: skip
    assert parse_usage(deepseek) == Usage(10, 2, 6)


def test_total_beyond_prompt_and_completion_is_output() -> None:
    """Reasoning a provider reports only in total_tokens is billed as output."""
    u = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 40}
    assert parse_usage(u).completion_tokens == 30


def test_tier_and_tool_calls_beside_the_usage() -> None:
    """OpenAI's service_tier and Responses tool-call items are read whole and streamed."""
    chat = {"object": "chat.completion", "service_tier": "priority",
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip
    whole = usage_from_body(orjson.dumps(chat))
    assert whole is not None
    assert whole.service_tier == "priority"
    assert usage_from_body(orjson.dumps(chat | {"service_tier": "default"})).service_tier is None  # type: ignore[union-attr]
    scanner = StreamUsage()
    scanner.feed(sse({"object": "chat.completion.chunk", "service_tier": "flex", "choices": [],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 1}}))  # fmt: skip
    assert scanner.usage().service_tier == "flex"  # type: ignore[union-attr]
    resp = {"id": "r", "object": "response", "service_tier": "priority",
            "output": [{"type": "web_search_call"}, {"type": "image_generation_call"},
                       {"type": "web_search_call"}, {"type": "message"}],
            "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}  # fmt: skip
    scanner = StreamUsage()
    scanner.feed(sse({"type": "response.completed", "response": resp}, "response.completed"))
    got = scanner.usage()
    assert got is not None
    assert got.tool_calls == {"web_search": 2, "image_generation": 1}
    assert got.service_tier == "priority"
    assert usage_from_body(orjson.dumps(resp)) == got
