"""Offline token estimation: bundled encodings, request prompts, delivered completions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
import tiktoken_ext.openai_public as openai_public

from proxyd.protocol.estimate import (
    IMAGE_TOKENS_LOW,
    PER_MESSAGE,
    REPLY_PRIMING,
    Tokenizer,
    load_encoding,
    prompt_parts,
)
from proxyd.protocol.usage import StreamUsage, Usage


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """One loaded o200k tokenizer for the module."""
    t = Tokenizer()
    t.load()
    return t


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_bundled_encoding_matches_tiktoken_definition(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our encoding has tiktoken's own pattern, special tokens and file hash."""
    ours = load_encoding(name)
    seen: dict[str, Any] = {}

    def fake_load(url: str, expected_hash: str) -> dict[bytes, int]:
        seen["hash"] = expected_hash
        return ours._mergeable_ranks

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    official = getattr(openai_public, name)()
    assert ours._pat_str == official["pat_str"]
    assert ours._special_tokens == official["special_tokens"]
    assert len(ours._mergeable_ranks) == len(official["mergeable_ranks"])


def test_known_token_counts(tok: Tokenizer) -> None:
    """Well-known strings tokenize to tiktoken's published ids."""
    enc = tok.load()
    assert enc.encode_ordinary("hello world") == [24912, 2375]
    assert load_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert tok.count("") == 0
    assert tok.count("<|endoftext|>") > 1  # special strings count as plain text, never raise


def test_unknown_encoding_refused() -> None:
    """A misspelt encoding name is a ValueError naming the field."""
    with pytest.raises(ValueError, match=r"^encoding:"):
        Tokenizer("gpt2_base")


def test_no_download_with_empty_home_and_caches(tmp_path: Path) -> None:
    """With HOME, caches and TMPDIR empty and sockets refused, the tokenizer still loads."""
    code = textwrap.dedent(
        """
        import socket
        def refuse(*a, **k):
            raise OSError("network refused by test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from proxyd.protocol.estimate import Tokenizer
        print(Tokenizer().count("hello world"), Tokenizer("cl100k_base").count("hello world"))
        """
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"),
        "DATA_GYM_CACHE_DIR": str(tmp_path / "gym"),
        "TMPDIR": str(tmp_path),
    }
    out = subprocess.run(  # noqa: S603 - our own interpreter with a fixed script
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.split() == ["2", "2"]
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing cached


def test_chat_prompt(tok: Tokenizer) -> None:
    """Chat prompts count every message's text plus the per-message and priming overhead."""
    req = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                ],
            },
        ],
    }
    texts = ["system", "You are terse.", "user", "What is this?"]
    expected = sum(tok.count(t) for t in texts) + 2 * PER_MESSAGE + REPLY_PRIMING
    assert tok.prompt_tokens("/v1/chat/completions", req) == expected + IMAGE_TOKENS_LOW
    parts, _ = prompt_parts("chat/completions", req)
    assert "https://x/y.png" not in parts  # urls and ids are not text the model reads


def test_anthropic_and_responses_and_tools(tok: Tokenizer) -> None:
    """System, tools and Responses instructions are counted; more text means more tokens."""
    tools = [{"name": "get_weather", "description": "Weather for a city", "input_schema": {}}]
    base = {"messages": [{"role": "user", "content": "Hi there"}]}
    with_system = {**base, "system": "Be kind and precise."}
    with_tools = {**with_system, "tools": tools}
    a = tok.prompt_tokens("/v1/messages", base)
    b = tok.prompt_tokens("/v1/messages", with_system)
    c = tok.prompt_tokens("/v1/messages", with_tools)
    assert a < b < c
    assert c - b == tok.count(orjson.dumps(tools).decode())
    resp = tok.prompt_tokens("/v1/responses", {"instructions": "Be brief.", "input": "Hello"})
    assert resp == tok.count("Be brief.") + tok.count("Hello")


def test_completions_and_embeddings(tok: Tokenizer) -> None:
    """String, string-list and pre-tokenized inputs."""
    assert tok.prompt_tokens("/v1/completions", {"prompt": "hello world"}) == 2
    assert tok.prompt_tokens("/v1/completions", {"prompt": [[1, 2, 3], [4]]}) == 4
    assert tok.prompt_tokens("/v1/embeddings", {"input": ["hello world", "hello"]}) == 3
    assert tok.prompt_tokens("/v1/embeddings", {"input": [5, 6, 7]}) == 3


def _chunk(text: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"delta": {"content": text}}]}) + b"\n\n"


def test_estimate_stream_cut_without_usage(tok: Tokenizer) -> None:
    """A stream with no usage is estimated from the request and what was delivered."""
    scanner = StreamUsage()
    for word in ("Hello", " world", "!"):
        scanner.feed(_chunk(word))
    req = {"messages": [{"role": "user", "content": "Say hello"}]}
    usage, source = tok.estimate("/v1/chat/completions", req, scanner)
    assert source == "estimated"
    assert usage.completion_tokens == tok.count("Hello world!")
    assert usage.prompt_tokens == tok.prompt_tokens("/v1/chat/completions", req)


def test_estimate_keeps_reported_anthropic_prompt(tok: Tokenizer) -> None:
    """After message_start only, the provider's prompt count is kept and output estimated."""
    scanner = StreamUsage()
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 77, "output_tokens": 1}},
    }
    scanner.feed(b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n")
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hello world"}}
    scanner.feed(b"event: content_block_delta\ndata: " + orjson.dumps(delta) + b"\n\n")
    usage, source = tok.estimate("/v1/messages", {"messages": []}, scanner)
    assert (usage.prompt_tokens, usage.completion_tokens, source) == (77, 2, "estimated")


def test_estimate_upstream_when_complete(tok: Tokenizer) -> None:
    """A complete provider usage is returned untouched and marked upstream."""
    scanner = StreamUsage()
    scanner.feed(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n')
    assert tok.estimate("/v1/chat/completions", {}, scanner) == (Usage(5, 6), "upstream")


def test_estimate_non_stream_text_and_extrapolation(tok: Tokenizer) -> None:
    """A non-stream body's text is counted; past keep_bytes the count is scaled up."""
    usage, _ = tok.estimate("/v1/completions", {"prompt": "hi"}, response_text="hello world")
    assert usage.completion_tokens == 2
    small = StreamUsage(keep_bytes=1)
    for _ in range(10):
        small.feed(_chunk("hello world"))
    assert tok.completion_tokens(small) == 10 * 2
