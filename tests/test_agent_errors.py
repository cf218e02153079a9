"""Errors a coding agent can act on: `x-should-retry` on refusals, attempts on upstream failures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import SECRET, SDKs, StartProxy, StartServer, channel, key, make_config
from tests.conftest import server_url as url_of
from tests.fakes import FakeProvider, Step, anthropic_body

ANT = {"x-api-key": SECRET, "anthropic-version": "2023-06-01"}
BODY = {"model": "claude-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


async def _proxy(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, **cfg: Any
) -> tuple[TestClient[Any, Any], FakeProvider]:
    fake = FakeProvider(Step(body=anthropic_body("ok")))
    server = await start_server(fake.app())
    chans = [channel("a", url_of(server), type="anthropic", models=["claude-x"])]
    client, _ = await start_proxy(make_config(tmp_path, chans, **cfg))
    return client, fake


@pytest.mark.parametrize(
    ("headers", "cfg", "status", "should_retry"),
    [
        ({"x-api-key": "sk-unknown", "anthropic-version": "2023-06-01"}, {}, 401, "false"),
        (ANT, {"keys": [key(status="disabled")]}, 403, "false"),
        (ANT, {"balance": 0}, 429, "false"),
        (ANT, {"keys": [key(rpm=1)]}, 429, "true"),
    ],
)
async def test_refusals_say_whether_a_retry_can_help(
    start_server: StartServer,
    start_proxy: StartProxy,
    tmp_path: Path,
    headers: dict[str, str],
    cfg: dict[str, object],
    status: int,
    should_retry: str,
) -> None:
    """401, 403 and an empty balance say x-should-retry: false; a rate limit says true."""
    client, _ = await _proxy(start_server, start_proxy, tmp_path, **cfg)
    last = None
    for _ in range(2):  # the rpm case is refused on the second request
        last = await client.post("/v1/messages", json=BODY, headers=headers)
        if last.status != 200:
            break
    assert last is not None
    assert last.status == status
    assert last.headers["x-should-retry"] == should_retry
    if should_retry == "true":
        assert int(last.headers["Retry-After"]) >= 1


async def test_sdk_gives_up_at_once_on_an_empty_balance(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path, sdk: SDKs
) -> None:
    """The anthropic SDK, retries on, stops at the first 429 for an empty balance."""
    client, fake = await _proxy(start_server, start_proxy, tmp_path, balance=0)
    sdk_client = sdk.anthropic(client).with_options(max_retries=4)
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError) as refused:
        await sdk_client.messages.create(**BODY)
    assert time.monotonic() - started < 1.0
    assert "balance" in refused.value.message.lower() or "quota" in refused.value.message.lower()
    assert fake.seen == []


async def test_upstream_failure_says_how_many_attempts_proxyd_made(
    start_server: StartServer, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """After failing over across two channels, the 5xx carries x-proxyd-attempts: 2."""
    fakes = [FakeProvider(Step(status=503, body=b'{"error": "down"}')) for _ in range(2)]
    servers = [await start_server(f.app()) for f in fakes]
    chans = [
        channel(f"a{i}", url_of(s), type="anthropic", models=["claude-x"])
        for i, s in enumerate(servers)
    ]
    client, _ = await start_proxy(make_config(tmp_path, chans))
    resp = await client.post("/v1/messages", json=BODY, headers=ANT)
    assert resp.status == 503
    assert resp.headers["x-proxyd-attempts"] == "2"
    assert sum(len(f.seen) for f in fakes) == 2
