"""Privacy canary: a unique string in prompts and completions never leaves the request path.

It is sent in every kind of body proxyd relays (chat, messages, embeddings, responses, tool
calls and results, error bodies, streams cut short or abandoned) and must appear in no billing
row, no spool byte, no log line (debug, JSON) and no metric; nor may the client's key secret.
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest
import structlog

from proxyd.observability.logs import configure_logging
from tests.conftest import (
    SDKs,
    StartProxy,
    StartServer,
    channel,
    key,
    key_hash,
    make_config,
    pg_url,
)
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, anthropic_body, anthropic_events, chat_body, chat_events
from tests.pg_proxy import PgProxy
from tests.test_billing_e2e import until

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_proxy() -> AsyncIterator[PgProxy]:
    """A TCP proxy to PostgreSQL that the test can cut and restore."""
    proxy = PgProxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# The test's own clients log their request bodies at debug level; they are not proxyd.
CLIENT_LOGGERS = ("openai", "anthropic", "httpx", "httpcore", "httpx2", "httpcore2")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """proxyd's JSON logging at debug level into a buffer; the previous set-up is restored.

    Every logger in the process writes there at debug (aiohttp, asyncio, asyncpg included)
    except the test's SDK clients, which are held at warning.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    clients = {name: logging.getLogger(name).level for name in CLIENT_LOGGERS}
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    yield buf
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in clients.items():
        logging.getLogger(name).setLevel(old)


class Canary:
    """The strings that must not leak, and the checks that they did not."""

    def __init__(self) -> None:
        self.text = f"canary-{uuid.uuid4().hex}"
        self.secret = f"sk-privacy-{uuid.uuid4().hex}"
        self.wrong_secret = f"sk-privacy-wrong-{uuid.uuid4().hex}"
        self.needles = {
            "canary": self.text.encode(),
            "secret": self.secret.encode(),
            "wrong secret": self.wrong_secret.encode(),
            "secret hash": key_hash(self.secret).encode(),
            # the canary's tail alone, in case something truncated or escaped the prefix
            "canary tail": self.text[-24:].encode(),
        }

    def assert_absent(self, where: str, data: bytes | str) -> None:
        """Fail naming the place and the needle when any needle is in `data`."""
        raw = data.encode() if isinstance(data, str) else data
        for name, needle in self.needles.items():
            assert needle not in raw, f"the {name} leaked into {where}"


def files_under(path: Path) -> dict[str, bytes]:
    """Every regular file below `path` with its bytes."""
    return {str(p): p.read_bytes() for p in path.rglob("*") if p.is_file()}


async def traffic(client: Any, sdk: SDKs, oa: FakeProvider, an: FakeProvider, c: Canary) -> int:
    """Send the canary through every endpoint and failure path; return the rows it makes."""
    oai, claude = sdk.openai(client, c.secret), sdk.anthropic(client, c.secret)
    t = c.text
    auth = {"Authorization": f"Bearer {c.secret}"}
    user: Any = [{"role": "user", "content": f"my password is {t}"}]
    rows = 0

    oa.then(Step(body=chat_body(f"you said {t}")))
    reply = await oai.chat.completions.create(model="gpt-p", messages=user)
    assert t in (reply.choices[0].message.content or "")  # it really went through
    rows += 1

    oa.then(Step(events=chat_events([t, " and more"])))
    stream = await oai.chat.completions.create(model="gpt-p", messages=user, stream=True)
    assert t in "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    rows += 1

    tool_turn: Any = [
        {"role": "user", "content": "look it up"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": orjson.dumps({"q": t}).decode()},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": f"result: {t}"},
    ]
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": f"finds {t}",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    oa.then(Step(body=chat_body(t)))
    await oai.chat.completions.create(model="gpt-p", messages=tool_turn, tools=tools)
    rows += 1

    emb = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
        "model": "gpt-p",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    oa.then(Step(body=orjson.dumps(emb)))
    await oai.embeddings.create(model="gpt-p", input=[t, f"{t} again"])
    rows += 1

    answer = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": t, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
    }
    oa.then(Step(body=orjson.dumps(answer)))
    resp = await client.post(
        "/v1/responses", headers=auth, json={"model": "gpt-p", "input": t, "instructions": t}
    )
    assert resp.status == 200
    rows += 1

    an.then(Step(body=anthropic_body(f"claude says {t}")))
    message = await claude.messages.create(
        model="claude-p",
        max_tokens=50,
        system=f"system {t}",
        messages=[
            {"role": "user", "content": t},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"q": t}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": t}],
            },
        ],
    )
    assert t in message.content[0].text
    rows += 1

    an.then(Step(events=anthropic_events([t, " done"])))
    async with claude.messages.stream(model="claude-p", max_tokens=50, messages=user) as s:
        assert t in await s.get_final_text()
    rows += 1

    an.then(Step(events=anthropic_events([t])))  # chat translated to the Anthropic channel
    stream = await oai.chat.completions.create(model="claude-p", messages=user, stream=True)
    assert t in "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    rows += 1

    oa.then(Step(events=chat_events([t, t], usage=False)))  # estimated from the delivered text
    stream = await oai.chat.completions.create(model="gpt-p", messages=user, stream=True)
    _ = [ch async for ch in stream]
    rows += 1

    bad = {"error": {"message": f"invalid input {t}", "type": "invalid_request_error"}}
    oa.then(Step(status=400, body=orjson.dumps(bad)))  # providers echo input in errors
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="gpt-p", messages=user)
    rows += 1

    oa.then(Step(status=500, body=orjson.dumps(bad)))
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(model="gpt-p", messages=user)
    rows += 1

    resp = await client.post(  # a malformed field holding the canary: 400, never echoed to logs
        "/v1/chat/completions",
        headers=auth,
        json={"model": "gpt-p", "stream": t, "messages": user, "temperature": t},
    )
    assert resp.status == 400
    rows += 1

    oa.then(Step(events=chat_events([t] * 5), cut_after=3))  # the provider drops the stream
    resp = await client.post(
        "/v1/chat/completions",
        headers=auth,
        json={"model": "gpt-p", "stream": True, "messages": user},
    )
    assert t.encode() in await resp.read()
    rows += 1

    oa.then(Step(events=chat_events([t] * 200), stall_between=0.01))  # the client leaves
    resp = await client.post(
        "/v1/chat/completions",
        headers=auth,
        json={"model": "gpt-p", "stream": True, "messages": user},
    )
    received = b""
    while received.count(t.encode()) < 2:
        received += await resp.content.readany()
    resp.close()
    await asyncio.wait_for(oa.disconnected.wait(), 5)
    rows += 1

    resp = await client.post(  # an unknown key: no row, and the secret must not be logged
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {c.wrong_secret}"},
        json={"model": "gpt-p", "messages": user},
    )
    assert resp.status == 401
    return rows


async def test_canary_appears_in_no_row_spool_log_or_metric(
    tmp_path: Path,
    database: str,
    pg_proxy: PgProxy,
    start_server: StartServer,
    start_proxy: StartProxy,
    sdk: SDKs,
    json_logs: io.StringIO,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Prompts, completions and the key secret reach no row, spool file, log line or metric."""
    c = Canary()
    oa, an = FakeProvider(), FakeProvider()
    channels = [
        channel("po", url_of(await start_server(oa.app())), models=["gpt-p"]),
        channel("pa", url_of(await start_server(an.app())), type="anthropic", models=["claude-p"]),
    ]
    config = make_config(
        tmp_path,
        channels,
        keys=[key("kp", c.secret)],
        billing={
            "database_url": pg_proxy.dsn(database),
            "spool_dir": str(tmp_path / "spool"),
            "flush_interval_seconds": 0.05,
            "batch_size": 4,
        },
    )
    client, parts = await start_proxy(config)  # migrates the database while it is reachable
    stats = parts.writer.stats
    pg_proxy.cut()  # every row of the traffic goes through the spool first
    rows = await traffic(client, sdk, oa, an, c)
    assert len(oa.seen) + len(an.seen) == rows - 1  # all but the malformed one went upstream
    assert any(c.text in orjson.dumps(s.body).decode() for s in oa.seen)

    await until(lambda: stats.rows_spooled == rows)
    spool = files_under(tmp_path / "spool")
    spooled = b"".join(spool.values())
    assert spooled.count(b'"request_id"') == rows  # the spool holds the rows, metadata only
    for name, data in spool.items():
        c.assert_absent(f"spool file {name}", data)

    pg_proxy.restore()
    await until(lambda: stats.rows_replayed == rows and stats.spool_rows == 0, within=20)
    metrics = await client.get("/metrics")
    exposition = await metrics.text()
    assert "proxyd_requests_total" in exposition
    await client.close()

    conn = await asyncpg.connect(pg_url(database))
    try:
        stored = [r[0] for r in await conn.fetch("SELECT t::text FROM usage_records t")]
    finally:
        await conn.close()
    assert len(stored) == rows
    assert sum("kp" in row for row in stored) == rows
    for row in stored:
        c.assert_absent("a billing row", row)

    c.assert_absent("GET /metrics", exposition)
    logged = json_logs.getvalue()
    events = [orjson.loads(line) for line in logged.splitlines()]
    assert sum(e.get("event") == "request" for e in events) == rows  # capture really worked
    assert any(e.get("event") == "billing_sink_unavailable" for e in events)
    c.assert_absent("the JSON log", logged)
    captured = capfd.readouterr()
    c.assert_absent("stdout", captured.out)
    c.assert_absent("stderr", captured.err)
    for name, data in files_under(tmp_path).items():  # spool, rejected rows, anything else
        c.assert_absent(f"file {name}", data)
