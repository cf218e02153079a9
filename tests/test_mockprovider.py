"""The mock provider speaks OpenAI and Anthropic wire formats well enough for their real SDKs."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam
from pytest_aiohttp import AiohttpServer

from proxyd.mockprovider import CONFIG_KEY, create_mock_app, mock_text, prompt_tokens

Serve = Callable[..., Awaitable[str]]
TEXT = "Say something about foxes, please."
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": TEXT}]
CLAUDE_PROMPT: list[MessageParam] = [{"role": "user", "content": TEXT}]


@pytest.fixture
def serve(aiohttp_server: AiohttpServer) -> Serve:
    """Start a mock app with the given options and return its root URL."""

    async def start(**options: Any) -> str:
        options.setdefault("chunk_interval", 0.002)
        options.setdefault("chunks", 6)
        server = await aiohttp_server(create_mock_app(**options))
        return str(server.make_url("")).rstrip("/")

    return start


async def test_chat_stream_parses_and_reports_honest_usage(serve: Serve) -> None:
    """The openai SDK reads role, content, finish and usage chunks; usage counts the content."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        stream = await client.chat.completions.create(
            model="mock-gpt",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(content) == mock_text(6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == len(content) == 6
    assert usage.prompt_tokens == prompt_tokens({"messages": PROMPT}) == 9
    assert usage.total_tokens == usage.prompt_tokens + 6


async def test_chat_stream_without_include_usage_has_no_usage_chunk(serve: Serve) -> None:
    """Without stream_options.include_usage no usage chunk is sent, like OpenAI."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        stream = await client.chat.completions.create(
            model="mock-gpt",
            messages=PROMPT,
            stream=True,
        )
        chunks = [c async for c in stream]
    assert all(c.usage is None and c.choices for c in chunks)


async def test_chat_max_tokens_cuts_answer_with_length(serve: Serve) -> None:
    """max_tokens below the configured length emits that many tokens and finish_reason length."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        reply = await client.chat.completions.create(
            model="mock-gpt",
            messages=PROMPT,
            max_tokens=3,
        )
        stream = await client.chat.completions.create(
            model="mock-gpt",
            messages=PROMPT,
            max_completion_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert reply.choices[0].message.content == mock_text(3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


async def test_legacy_completions_stream_and_not(serve: Serve) -> None:
    """/v1/completions answers text_completion bodies and streams with a usage chunk."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        reply = await client.completions.create(model="mock-gpt", prompt="abcdefgh")
        stream = await client.completions.create(
            model="mock-gpt", prompt="abcdefgh", stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    assert reply.choices[0].text == mock_text(6)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 6)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == mock_text(6)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


async def test_embeddings_base64_and_float_agree(serve: Serve) -> None:
    """Embeddings are deterministic per input and decode the same from base64 and floats."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        b64 = await client.embeddings.create(model="mock-embed", input=["a", "b"], dimensions=16)
        floats = await client.embeddings.create(
            model="mock-embed", input=["a", "b"], dimensions=16, encoding_format="float"
        )
    assert [len(d.embedding) for d in b64.data] == [16, 16]
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding)
    assert b64.data[0].embedding != b64.data[1].embedding
    assert b64.usage.prompt_tokens == 1


async def test_models_lists_mock_models(serve: Serve) -> None:
    """GET /v1/models lists the mock's model names."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        page = await client.models.list()
    assert "mock-gpt" in [m.id for m in page.data]


async def test_responses_stream_and_not(serve: Serve) -> None:
    """/v1/responses streams created..delta..completed with usage, and answers non-stream."""
    root = await serve()
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key="k") as client:
        reply = await client.responses.create(model="mock-gpt", input="hi there")
        stream = await client.responses.create(model="mock-gpt", input="hi there", stream=True)
        events = [e async for e in stream]
        cut = await client.responses.create(model="mock-gpt", input="x", max_output_tokens=2)
    assert reply.output_text == mock_text(6)
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (2, 6)
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == mock_text(6)
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    assert final.response.usage.output_tokens == len(deltas)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert cut.status == "incomplete"
    assert cut.output_text == mock_text(2)


async def test_anthropic_stream_and_not(serve: Serve) -> None:
    """The anthropic SDK accumulates the stream; usage and stop_reason follow max_tokens."""
    root = await serve()
    async with anthropic.AsyncAnthropic(base_url=root, api_key="k") as client:
        async with client.messages.stream(
            model="mock-claude",
            max_tokens=100,
            messages=CLAUDE_PROMPT,
        ) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
        cut = await client.messages.create(
            model="mock-claude",
            max_tokens=4,
            messages=CLAUDE_PROMPT,
        )
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert final.content[0].text == mock_text(6)  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 6)
    assert cut.content[0].text == mock_text(4)  # type: ignore[union-attr]
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 4


async def test_auth_is_enforced(serve: Serve) -> None:
    """OpenAI routes need a bearer token; Anthropic needs a key (x-api-key or bearer), a version."""
    root = await serve()
    body = {"model": "m", "messages": PROMPT, "max_tokens": 5}
    async with aiohttp.ClientSession() as http:
        async with http.post(root + "/v1/chat/completions", json=body) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with http.get(root + "/v1/models", headers={"Authorization": "Bearer  "}) as r:
            assert r.status == 401
        headers = {"anthropic-version": "2023-06-01"}
        async with http.post(root + "/v1/messages", json=body, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        async with http.post(root + "/v1/messages", json=body, headers={"x-api-key": "k"}) as r:
            assert r.status == 400
        bearer = {"anthropic-version": "2023-06-01", "Authorization": "Bearer k"}
        async with http.post(root + "/v1/messages", json=body, headers=bearer) as r:
            assert r.status == 200


async def test_malformed_body_is_400(serve: Serve) -> None:
    """A body that is not JSON gets 400 in OpenAI's error shape."""
    root = await serve()
    headers = {"Authorization": "Bearer k"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(root + "/v1/chat/completions", data=b"{", headers=headers) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "invalid_request_error"


async def _arrivals(http: aiohttp.ClientSession, url: str, max_tokens: int) -> list[float]:
    body = {"model": "m", "messages": PROMPT, "stream": True, "max_tokens": max_tokens}
    async with http.post(url, json=body, headers={"Authorization": "Bearer k"}) as r:
        return [time.perf_counter() async for _ in r.content.iter_any()]


async def test_streams_are_deadline_paced(serve: Serve) -> None:
    """Events arrive one interval apart on a fixed schedule: the last lands at (n+1) intervals."""
    root = await serve(chunk_interval=0.02, chunks=10)
    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        times = await _arrivals(http, root + "/v1/chat/completions", 10)
    total = times[-1] - start
    assert 11 * 0.02 - 0.003 <= total <= 11 * 0.02 + 0.05
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 10
    assert min(gaps[1:]) >= 0.01


async def test_instant_mode_does_not_pace(serve: Serve) -> None:
    """Instant mode sends a long stream at once."""
    root = await serve(chunk_interval=0.05, chunks=40, instant=True)
    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        await _arrivals(http, root + "/v1/chat/completions", 40)
    assert time.perf_counter() - start < 0.5


async def test_many_concurrent_streams_share_one_timer(aiohttp_server: AiohttpServer) -> None:
    """400 concurrent streams finish intact in about one stream's duration."""
    app = create_mock_app(chunk_interval=0.02, chunks=8)
    server = await aiohttp_server(app)
    url = str(server.make_url("/v1/chat/completions"))
    body = {"model": "m", "messages": PROMPT, "stream": True}
    headers = {"Authorization": "Bearer k"}

    async def one(http: aiohttp.ClientSession) -> bytes:
        async with http.post(url, json=body, headers=headers) as r:
            return await r.read()

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        start = time.perf_counter()
        bodies = await asyncio.gather(*(one(http) for _ in range(400)))
        elapsed = time.perf_counter() - start
    assert all(b.count(b"data: ") == 11 and b.endswith(b"data: [DONE]\n\n") for b in bodies)
    assert elapsed < 3.0
    ticker = app[CONFIG_KEY].ticker
    assert ticker is not None
    assert ticker.open_streams == 0


async def test_client_leaving_mid_stream_releases_it(aiohttp_server: AiohttpServer) -> None:
    """A stream whose client disconnects is dropped from the timer at its next tick."""
    app = create_mock_app(chunk_interval=0.01, chunks=1000)
    server = await aiohttp_server(app)
    url = str(server.make_url("/v1/chat/completions"))
    ticker_holder = app[CONFIG_KEY]
    async with aiohttp.ClientSession() as http:
        body = {"model": "m", "messages": PROMPT, "stream": True}
        async with http.post(url, json=body, headers={"Authorization": "Bearer k"}) as r:
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
            assert ticker_holder.ticker is not None
            assert ticker_holder.ticker.open_streams == 1
            r.close()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if ticker_holder.ticker.open_streams == 0:
            break
    assert ticker_holder.ticker.open_streams == 0


def test_create_mock_app_rejects_bad_options() -> None:
    """Zero chunks or a non-positive interval are refused."""
    with pytest.raises(ValueError, match="chunks"):
        create_mock_app(chunks=0)
    assert isinstance(create_mock_app(instant=True), web.Application)


async def test_include_usage_marks_every_chunk_usage_null(serve: Serve) -> None:
    """With include_usage every chunk but the last carries "usage":null, as OpenAI sends it."""
    root = await serve()
    body = {
        "model": "m",
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            root + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}
        ) as r,
    ):
        raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert len(events) == 1 + 6 + 1 + 1 + 1
    assert all(b',"usage":null,' in e for e in events[:-2])
    assert b'"choices":[],"usage":{"prompt_tokens":9' in events[-2]
    assert all(200 <= len(e) + 2 <= 300 for e in events[1:7])
