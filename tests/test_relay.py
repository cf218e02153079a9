"""The relay core end to end: real SDKs → proxyd → scripted fake providers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from proxyd.upstream.h1 import H1Pool
from tests.conftest import (
    OTHER_SECRET,
    SECRET,
    SDKs,
    StartProxy,
    StartServer,
    channel,
    key,
    make_config,
    server_url,
)
from tests.fakes import (
    FakeProvider,
    Step,
    anthropic_body,
    anthropic_events,
    chat_body,
    chat_events,
    sse,
)


async def _setup(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    fake: FakeProvider,
    *,
    type: str = "openai",
    models: list[str] | None = None,
    **extra: Any,
) -> Any:
    server = await start_server(fake.app())
    config = make_config(
        tmp_path,
        [channel("c1", server_url(server), type=type, models=models, **extra)],
        keys=[
            key(),
            key("k2", OTHER_SECRET, status="disabled"),
        ],
    )
    client, parts = await start_proxy(config)
    return client, parts


async def test_chat_non_stream_through_openai_sdk(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """A non-stream chat completion arrives intact and upstream sees the channel's own key."""
    fake = FakeProvider(Step(body=chat_body("hi there")))
    client, parts = await _setup(
        tmp_path, start_server, start_proxy, fake, model_map={"gpt-test": "up-model"}
    )
    result = await sdk.openai(client).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}]
    )
    assert result.choices[0].message.content == "hi there"
    # the answer came through the h1 client, which keeps the connection
    assert parts.upstream.h1.idle_connections() == 1
    seen = fake.seen[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == "Bearer upstream-c1"
    assert SECRET not in str(seen.headers)
    assert seen.body["model"] == "up-model"


async def test_chat_stream_is_byte_identical(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A client that asked for usage gets exactly the provider's bytes, event for event."""
    events = chat_events(["Hel", "lo", " world"])
    fake = FakeProvider(Step(events=events))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={
            "model": "gpt-test",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == b"".join(events)
    assert resp.headers["x-request-id"].startswith("req_")


async def test_injected_usage_chunk_is_removed(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """proxyd asks upstream for usage and strips that chunk from a client that did not ask."""
    events = chat_events(["a", "b"])
    # OpenAI adds "usage":null to each chunk of a stream that asked for usage.
    upstream = [
        e.replace(b',"choices"', b',"usage":null,"choices"') if b'"usage"' not in e else e
        for e in events
    ]
    fake = FakeProvider(Step(events=upstream))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    body = await resp.read()
    assert fake.seen[0].body["stream_options"] == {"include_usage": True}
    expected = b"".join(e for e in events if b'"usage"' not in e)
    assert body == expected
    assert body.endswith(b"data: [DONE]\n\n")


async def test_event_split_across_reads(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """An event cut in two TCP reads reaches the client whole and unchanged."""
    events = chat_events(["one", "two", "three"])
    whole = b"".join(events)
    fake = FakeProvider(Step(events=events, split_at=len(events[0]) + 17))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    stream = await sdk.openai(client).chat.completions.create(
        model="gpt-test",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "x"}],
    )
    texts = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(t or "" for t in texts) == "onetwothree"
    assert len(whole) > len(events[0]) + 17


async def test_openai_sdk_stream(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """The openai SDK reads a relayed stream to its end."""
    fake = FakeProvider(Step(events=chat_events(["x", "y", "z"])))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    stream = await sdk.openai(client).chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": "x"}]
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "xyz"
    assert all(c.usage is None for c in chunks)


async def test_anthropic_sdk_stream_and_body(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """Anthropic clients stream and fetch messages through an anthropic channel."""
    events = anthropic_events(["Hi", " there"])
    fake = FakeProvider().then(Step(events=events), Step(body=anthropic_body("plain")))
    client, _ = await _setup(
        tmp_path, start_server, start_proxy, fake, type="anthropic", models=["claude-test"]
    )
    claude = sdk.anthropic(client)
    async with claude.messages.stream(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        text = await stream.get_final_text()
    assert text == "Hi there"
    message = await claude.messages.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.content[0].text == "plain"
    seen = fake.seen[0]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "upstream-c1"
    assert seen.headers["anthropic-version"]
    assert "Authorization" not in seen.headers


async def test_anthropic_stream_bytes(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Anthropic events are relayed byte for byte, ping included."""
    events = anthropic_events(["a", "b"])
    fake = FakeProvider(Step(events=events))
    client, _ = await _setup(
        tmp_path, start_server, start_proxy, fake, type="anthropic", models=["claude-test"]
    )
    resp = await client.post(
        "/v1/messages",
        headers={"x-api-key": SECRET, "anthropic-version": "2023-06-01"},
        json={"model": "claude-test", "max_tokens": 5, "stream": True, "messages": []},
    )
    assert await resp.read() == b"".join(events)


@pytest.mark.parametrize(
    ("path", "payload", "upstream_path"),
    [
        ("/v1/completions", {"model": "gpt-test", "prompt": "hi"}, "/v1/completions"),
        ("/v1/embeddings", {"model": "gpt-test", "input": "hi"}, "/v1/embeddings"),
        ("/v1/responses", {"model": "gpt-test", "input": "hi"}, "/v1/responses"),
    ],
)
async def test_other_openai_endpoints(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    path: str,
    payload: dict[str, Any],
    upstream_path: str,
) -> None:
    """Completions, embeddings and responses reach the matching upstream path unchanged."""
    answer = orjson.dumps({"object": "x", "usage": {"prompt_tokens": 3, "total_tokens": 3}})
    fake = FakeProvider(Step(body=answer))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(path, headers={"Authorization": f"Bearer {SECRET}"}, json=payload)
    assert resp.status == 200
    assert await resp.read() == answer
    assert fake.seen[0].path == upstream_path
    assert fake.seen[0].body == payload


async def test_models_lists_what_the_key_may_use(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """GET /v1/models shows the served models the key's list allows, in both formats."""
    fake = FakeProvider()
    server = await start_server(fake.app())
    config = make_config(
        tmp_path,
        [channel("c1", server_url(server), models=["gpt-a", "gpt-b"])],
        keys=[key(models=["gpt-b"])],
    )
    client, _ = await start_proxy(config)
    page = await sdk.openai(client).models.list()
    assert [m.id for m in page.data] == ["gpt-b"]
    resp = await client.get(
        "/v1/models", headers={"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
    )
    assert (await resp.json())["data"][0]["type"] == "model"


async def test_refusals_in_openai_format(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """401, 403, 404 come as OpenAI errors that the SDK raises as the right exception."""
    fake = FakeProvider()
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    messages: Any = [{"role": "user", "content": "x"}]
    wrong = sdk.openai(client, "sk-nope")
    with pytest.raises(openai.AuthenticationError) as unknown:
        await wrong.chat.completions.create(model="gpt-test", messages=messages)
    assert "sk-nope" not in str(unknown.value)
    disabled = sdk.openai(client, OTHER_SECRET)
    with pytest.raises(openai.PermissionDeniedError):
        await disabled.chat.completions.create(model="gpt-test", messages=messages)
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.openai(client).chat.completions.create(model="nope", messages=messages)
    assert missing.value.code == "model_not_found"
    assert fake.seen == []


async def test_refusals_in_anthropic_format(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """The same refusals on /v1/messages come in Anthropic's error shape."""
    fake = FakeProvider()
    client, _ = await _setup(
        tmp_path, start_server, start_proxy, fake, type="anthropic", models=["claude-test"]
    )
    resp = await client.post(
        "/v1/messages",
        headers={"x-api-key": "wrong"},
        json={"model": "claude-test", "max_tokens": 5, "messages": []},
    )
    assert resp.status == 401
    assert await resp.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "The API key provided is not valid."},
    }
    claude = sdk.anthropic(client)
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.create(model="nope", max_tokens=5, messages=[])


async def test_expired_key(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """An expired key gets 403 key_expired."""
    fake = FakeProvider()
    server = await start_server(fake.app())
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    config = make_config(tmp_path, [channel("c1", server_url(server))], keys=[key(expires_at=past)])
    client, _ = await start_proxy(config)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "messages": []},
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "key_expired"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        (b"{not json", None),
        (b'{"messages": []}', "model"),
        (b"[1, 2]", None),
        (b'{"model": "gpt-test", "stream": "yes"}', "stream"),
    ],
)
async def test_malformed_bodies(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    data: bytes,
    param: str | None,
) -> None:
    """Malformed JSON or a missing model is a 400 naming the parameter; nothing goes upstream."""
    fake = FakeProvider()
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
        data=data,
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fake.seen == []


async def test_body_over_limit_is_413(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A body over the limit is refused with 413 before it is read."""
    fake = FakeProvider()
    server = await start_server(fake.app())
    config = make_config(
        tmp_path, [channel("c1", server_url(server))], server={"max_body_bytes": 2048}
    )
    client, _ = await start_proxy(config)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        data=b"{" + b" " * 5000 + b"}",
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("pad", [10, 3000])
async def test_chunked_body_is_held_to_the_limit(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, pad: int
) -> None:
    """A chunked body (no Content-Length) is served under the limit and refused over it."""
    fake = FakeProvider(Step(body=chat_body("ok")))
    server = await start_server(fake.app())
    config = make_config(
        tmp_path, [channel("c1", server_url(server))], server={"max_body_bytes": 2048}
    )
    client, _ = await start_proxy(config)
    payload = orjson.dumps({"model": "gpt-test", "messages": [], "user": "u" * pad})

    async def chunks() -> AsyncIterator[bytes]:
        yield payload[:20]
        yield payload[20:]

    resp = await client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {SECRET}"}, data=chunks()
    )
    if pad < 2048:
        assert resp.status == 200
        assert fake.seen[0].body["user"] == "u" * pad
    else:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"
        assert fake.seen == []


async def test_upstream_4xx_passes_through(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """An upstream 400 reaches the client unchanged and is not retried."""
    error = orjson.dumps(
        {
            "error": {
                "message": "bad temperature",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": None,
            }
        }
    )
    fake = FakeProvider(Step(status=400, body=error))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "messages": [], "temperature": 9},
    )
    assert resp.status == 400
    assert await resp.read() == error
    assert len(fake.seen) == 1


async def test_client_disconnect_releases_upstream(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """When the client leaves mid-stream, proxyd stops reading upstream at once."""
    events = chat_events([f"w{i}" for i in range(200)])
    fake = FakeProvider(Step(events=events, stall_between=0.02))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "stream": True, "messages": []},
    )
    await resp.content.readany()
    resp.close()
    await asyncio.wait_for(fake.disconnected.wait(), 2)


async def test_request_id_on_every_response(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Success, refusal, health and metrics responses all carry x-request-id."""
    fake = FakeProvider(Step(body=chat_body("ok")))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        (
            "POST",
            "/v1/chat/completions",
            {
                "json": {"model": "gpt-test", "messages": []},
                "headers": {"Authorization": f"Bearer {SECRET}"},
            },
        ),
        ("POST", "/v1/chat/completions", {"json": {}}),
        ("GET", "/healthz", {}),
        ("GET", "/metrics", {}),
    ]
    for method, path, kwargs in calls:
        resp = await client.request(method, path, **kwargs)
        assert resp.headers.get("x-request-id"), path


def test_sse_helper_shape() -> None:
    """The fake's SSE framing is what providers send (guards the fixtures themselves)."""
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'


async def test_stream_gap_over_chunk_timeout_ends_with_error_event(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """An upstream silent mid-stream for longer than chunk_timeout ends with an error event."""
    fake = FakeProvider(Step(events=chat_events(["a", "b", "c"]), stall_between=1.5))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake, chunk_timeout=0.3)
    started = time.monotonic()
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "stream": True, "messages": []},
    )
    body = await resp.read()
    assert b"stopped responding" in body
    assert b"upstream_timeout" in body
    assert time.monotonic() - started < 1.4


async def test_stream_with_gaps_under_timeout_completes(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Gaps shorter than chunk_timeout, over a total longer than it, do not break a stream."""
    events = chat_events(["a", "b", "c", "d", "e", "f"])
    fake = FakeProvider(Step(events=events, stall_between=0.15))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake, chunk_timeout=0.4)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"model": "gpt-test", "stream": True, "messages": []},
    )
    body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"stopped responding" not in body


async def test_slow_reader_gets_every_byte(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A client reading slowly pauses the relay and still receives every byte in order."""
    events = [
        sse({"choices": [{"index": 0, "delta": {"content": f"x{i:05d}" * 2000}}]})
        for i in range(2000)
    ]
    events.append(b"data: [DONE]\n\n")
    fake = FakeProvider(Step(events=events))
    client, _ = await _setup(tmp_path, start_server, start_proxy, fake)
    resp = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {SECRET}"},
        json={
            "model": "gpt-test",
            "stream": True,
            "messages": [],
            "stream_options": {"include_usage": True},
        },
    )
    await asyncio.sleep(0.5)
    parts: list[bytes] = []
    while part := await resp.content.read(65536):
        parts.append(part)
        await asyncio.sleep(0.002)
    assert b"".join(parts) == b"".join(events)


async def test_streams_leave_no_connection_busy(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Complete, cut and abandoned streams all give their h1 connection back (or close it)."""
    events = chat_events([f"part{i} " for i in range(40)])
    fake = FakeProvider().then(
        Step(events=events, stall_between=0.005),
        Step(events=events, cut_after=5),
        Step(events=events, stall_between=0.05),
    )
    client, parts = await _setup(tmp_path, start_server, start_proxy, fake)
    body = {
        "model": "gpt-test",
        "stream": True,
        "messages": [],
        "stream_options": {"include_usage": True},
    }
    auth = {"Authorization": f"Bearer {SECRET}"}
    whole = await client.post("/v1/chat/completions", headers=auth, json=body)
    assert await whole.read() == b"".join(events)
    cut = await client.post("/v1/chat/completions", headers=auth, json=body)
    assert b"upstream_reset" in await cut.read()
    left = await client.post("/v1/chat/completions", headers=auth, json=body)
    await left.content.readline()
    left.close()
    h1: H1Pool = parts.upstream.h1

    def busy() -> int:
        return h1.open_connections - h1.idle_connections()

    for _ in range(100):
        if not busy():
            break
        await asyncio.sleep(0.05)
    assert busy() == 0


async def test_provider_cookies_are_not_kept(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A cookie set in one provider answer never goes upstream with a later request."""
    fake = FakeProvider().then(
        Step(body=chat_body("one"), headers={"Set-Cookie": "session=abc; Path=/"}),
        Step(body=chat_body("two")),
    )
    server = await start_server(fake.app())
    # a host name: aiohttp's default jar ignores cookies from bare IP addresses
    url = server_url(server).replace("127.0.0.1", "localhost")
    client, _ = await start_proxy(make_config(tmp_path, [channel("c1", url)], keys=[key()]))
    for _ in range(2):
        resp = await client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {SECRET}"},
            json={"model": "gpt-test", "messages": []},
        )
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers
    assert len(fake.seen) == 2
    assert "Cookie" not in fake.seen[1].headers


async def test_whole_answer_reaches_the_client_before_the_record_step(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer is written before its billing row is made: a slow record step (here one
    second) delays nobody's response, and the row still comes, covering the write."""
    import socket

    fake = FakeProvider(Step(body=chat_body("hello")))
    client, parts = await _setup(tmp_path, start_server, start_proxy, fake)
    submitted: list[Any] = []
    submit = parts.writer.submit

    def slow_submit(record: Any) -> None:
        time.sleep(1.0)  # blocks the loop, as a stuck record step would
        submitted.append(record)
        submit(record)

    monkeypatch.setattr(parts.writer, "submit", slow_submit)
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxyd\r\nConnection: close\r\n"
        b"Authorization: Bearer " + SECRET.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    def fetch() -> tuple[float, bytes]:  # in a thread: it reads while the loop is blocked
        started = time.monotonic()
        with socket.create_connection((client.host, client.port), timeout=5) as sock:
            sock.sendall(raw)
            got = b""
            while b'"hello"' not in got:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
            return time.monotonic() - started, got

    elapsed, got = await asyncio.to_thread(fetch)
    assert got.startswith(b"HTTP/1.1 200 ")
    assert b'"hello"' in got
    assert elapsed < 0.5, f"the client waited {elapsed:.2f} s for the record step"
    for _ in range(100):
        if submitted:
            break
        await asyncio.sleep(0.02)
    assert len(submitted) == 1
    assert submitted[0].status_code == 200
    assert submitted[0].request_id.encode() in got
