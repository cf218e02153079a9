"""Channel failures are the operator's, not the customer's: a rejected upstream credential or an
empty upstream account fails over and cools the channel, and no upstream message naming the
operator's account ever reaches a client (issue 17, item 2)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxyd.app import create_control
from tests.conftest import SECRET, SDKs, StartProxy, StartServer, channel, make_config, server_url
from tests.fakes import FakeProvider, Step, anthropic_body, chat_body, chat_events

AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES: dict[str, Any] = {
    "model": "gpt-test",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
ADMIN = "a" * 24

# What OpenAI answers for a revoked key (the evidence), and the words in it that name the
# operator's upstream account; none of them may reach a client.
OPENAI_BAD_KEY = orjson.dumps(
    {
        "error": {
            "message": "Incorrect API key provided: sk-ab***yz. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
)
ANTHROPIC_BAD_KEY = orjson.dumps(
    {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
)
OPENAI_NO_QUOTA = orjson.dumps(
    {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details. org-Zq81xYwVb2",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
)
ANTHROPIC_NO_CREDIT = orjson.dumps(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. Please go "
            "to Plans & Billing to upgrade or purchase credits.",
        },
    }
)
ANTHROPIC_FORBIDDEN = orjson.dumps(
    {
        "type": "error",
        "error": {"type": "permission_error", "message": "Your API key does not have permission"},
    }
)
OPENAI_RATE_LIMIT = orjson.dumps(
    {
        "error": {
            "message": "Rate limit reached for gpt-4o in organization org-Zq81xYwVb2 on tokens "
            "per min (TPM): Limit 30000, Used 29000.",
            "type": "tokens",
            "code": "rate_limit_exceeded",
        }
    }
)
LEAKS = (b"sk-ab", b"org-Zq81", b"api-keys", b"x-api-key", b"quota", b"credit", b"Billing")


def no_leak(raw: bytes) -> None:
    for word in LEAKS:
        assert word.lower() not in raw.lower(), word


async def two_channels(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    bad: Step,
    *,
    primary_type: str = "openai",
    **upstream: Any,
) -> tuple[Any, Any, FakeProvider, FakeProvider]:
    """proxyd with a primary that always answers `bad` and a healthy backup of lower priority."""
    primary = FakeProvider(bad)
    backup = FakeProvider(Step(body=chat_body("from backup")))
    a = await start_server(primary.app())
    b = await start_server(backup.app())
    config = make_config(
        tmp_path,
        [
            channel("primary", server_url(a), priority=10, type=primary_type),
            channel("backup", server_url(b), priority=0),
        ],
        upstream=upstream,
        server={"admin_token": ADMIN},
    )
    client, parts = await start_proxy(config)
    return client, parts, primary, backup


async def test_rejected_credential_fails_over_and_cools_the_channel(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """Issue evidence: the top channel's 401 `Incorrect API key provided: sk-ab***yz` — every
    request is served by the backup with a 200, the bad channel is asked once and then cools down
    (seen in /metrics and the control API), and the key-bearing message reaches no client."""
    bad = Step(status=401, body=OPENAI_BAD_KEY)
    client, parts, primary, backup = await two_channels(tmp_path, start_server, start_proxy, bad)
    for _ in range(10):
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        raw = await resp.read()
        assert resp.status == 200
        assert orjson.loads(raw)["choices"][0]["message"]["content"] == "from backup"
        no_leak(raw)
        no_leak(b"".join(f"{k}: {v}".encode() for k, v in resp.headers.items()))
    assert len(primary.seen) == 1
    assert len(backup.seen) == 10

    health = {c["id"]: c for c in parts.channel_health()}["primary"]
    assert health["state"] == "cooling_down"
    assert health["last_error_type"] == "upstream_credential"
    assert 50 < health["cooldown_remaining_seconds"] <= 60  # the credential cooldown, not 1 s

    metrics = await (await client.get("/metrics")).text()
    assert 'proxyd_channel_healthy{channel="primary"} 0.0' in metrics
    assert 'proxyd_failovers_total{channel="primary",reason="upstream_credential"} 1.0' in metrics

    control = await aiohttp_client(create_control(parts))
    listed = await control.get("/control/v1/channels", headers={"Authorization": f"Bearer {ADMIN}"})
    assert listed.status == 200
    views = {c["id"]: c for c in (await listed.json())["channels"]}
    assert views["primary"]["health"]["state"] == "cooling_down"
    assert views["primary"]["health"]["last_error_type"] == "upstream_credential"


async def test_rejected_credential_on_a_stream_fails_over_before_any_byte(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """A stream through the real `openai` SDK: the 401 channel is skipped, the backup streams."""
    bad = Step(status=401, body=OPENAI_BAD_KEY)
    client, _, primary, backup = await two_channels(tmp_path, start_server, start_proxy, bad)
    backup.default = Step(events=chat_events(["from", " backup"]))
    stream = await sdk.openai(client).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "from backup"
    assert len(primary.seen) == 1


@pytest.mark.parametrize(
    ("status", "body", "primary_type"),
    [
        (429, OPENAI_NO_QUOTA, "openai"),
        (400, ANTHROPIC_NO_CREDIT, "anthropic"),
        (401, ANTHROPIC_BAD_KEY, "anthropic"),
        (402, b'{"error": {"message": "Payment required"}}', "openai"),
    ],
    ids=["openai-insufficient-quota", "anthropic-credit", "anthropic-401", "402"],
)
async def test_empty_or_disabled_upstream_account_fails_over(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    status: int,
    body: bytes,
    primary_type: str,
) -> None:
    """Out of credit, quota gone or key refused (either provider): the backup serves the
    customer's 200 and the channel cools down as a bad credential. (A 403 refusing one model
    cools that model only: test_a_403_about_one_model_leaves_the_channels_other_models.)"""
    client, parts, primary, _ = await two_channels(
        tmp_path,
        start_server,
        start_proxy,
        Step(status=status, body=body),
        primary_type=primary_type,
    )
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        raw = await resp.read()
        assert resp.status == 200, raw
        no_leak(raw)
    assert len(primary.seen) == 1
    health = {c["id"]: c for c in parts.channel_health()}["primary"]
    assert (health["state"], health["last_error_type"]) == ("cooling_down", "upstream_credential")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_no_channel_left_is_503_with_proxyds_message_in_each_wire_format(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, stream: bool
) -> None:
    """Every channel refuses the operator's key: OpenAI and Anthropic clients get a 503 in their
    own format with proxyd's words, never a 401 that blames their key or the provider's text."""
    openai_fake = FakeProvider(Step(status=401, body=OPENAI_BAD_KEY))
    anthropic_fake = FakeProvider(Step(status=401, body=ANTHROPIC_BAD_KEY))
    a = await start_server(openai_fake.app())
    b = await start_server(anthropic_fake.app())
    config = make_config(
        tmp_path,
        [
            channel("oa", server_url(a), priority=10),
            channel("an", server_url(b), type="anthropic"),
        ],
    )
    client, _ = await start_proxy(config)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT | {"stream": stream})
    raw = await resp.read()
    assert resp.status == 503
    no_leak(raw)
    error = orjson.loads(raw)["error"]
    assert "not a problem with your API key" in error["message"]
    assert error["code"] == "upstream_credential"
    assert len(openai_fake.seen) == 1
    assert len(anthropic_fake.seen) == 1

    resp = await client.post(
        "/v1/messages", headers={"x-api-key": SECRET}, json=MESSAGES | {"stream": stream}
    )
    raw = await resp.read()
    assert resp.status == 503  # both channels are cooling down now: proxyd's own 503
    no_leak(raw)
    body = orjson.loads(raw)
    assert body["type"] == "error"
    assert body["error"]["type"] in ("overloaded_error", "api_error")


async def test_upstream_rate_limit_keeps_its_status_but_not_its_words(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """A 429 naming the operator's organisation, on every channel: the client gets 429 with the
    provider's Retry-After and proxyd's message; the org id reaches no one."""
    limited = Step(status=429, body=OPENAI_RATE_LIMIT, headers={"Retry-After": "7"})
    client, parts, _, backup = await two_channels(tmp_path, start_server, start_proxy, limited)
    backup.default = limited
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    raw = await resp.read()
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "7"
    no_leak(raw)
    assert orjson.loads(raw)["error"]["message"] == "The upstream provider is busy; retry shortly."
    health = {c["id"]: c for c in parts.channel_health()}["primary"]
    assert health["last_error_type"] == "upstream_error"  # a rate limit, not a bad credential


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"error": {"message": "bad temperature", "param": "temperature"}}'),
        (
            400,
            b'{"error": {"message": "Your request was rejected as a result of our safety '
            b'system.", "code": "content_policy_violation"}}',
        ),
        (404, b'{"error": {"message": "The model `gpt-9` does not exist"}}'),
        (413, b'{"error": {"message": "Request too large"}}'),
        (422, b'{"error": {"message": "messages: field required"}}'),
        (
            403,
            b'{"error": {"message": "This prompt was flagged by our moderation", '
            b'"code": "content_policy_violation"}}',
        ),
    ],
    ids=["400", "policy-400", "404", "413", "422", "policy-403"],
)
async def test_errors_about_the_clients_request_pass_with_the_providers_message(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, status: int, body: bytes
) -> None:
    """400, 404, 413, 422 and content-policy refusals: the provider's message, unchanged, and
    the backup is never asked (the same request would fail there too)."""
    client, parts, _, backup = await two_channels(
        tmp_path, start_server, start_proxy, Step(status=status, body=body)
    )
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == status
    assert await resp.read() == body
    assert backup.seen == []
    assert {c["id"]: c for c in parts.channel_health()}["primary"]["healthy"] is True


@pytest.mark.parametrize("status", [405, 409, 410, 418])
async def test_other_upstream_4xx_keep_their_status_with_proxyds_message(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, status: int
) -> None:
    """Any other 4xx is not about the client's request: its status, proxyd's words."""
    body = b'{"error": {"message": "internal route /v1/x disabled for org-Zq81xYwVb2"}}'
    client, _, _, backup = await two_channels(
        tmp_path, start_server, start_proxy, Step(status=status, body=body)
    )
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    raw = await resp.read()
    no_leak(raw)
    # The org id marks it as the operator's account: failed over to the backup.
    assert resp.status == 200
    assert len(backup.seen) == 1

    plain = b'{"error": {"message": "upstream says: nope"}}'
    client, _, _, backup = await two_channels(
        tmp_path / "b", start_server, start_proxy, Step(status=status, body=plain)
    )
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    raw = await resp.read()
    assert resp.status == status
    assert b"nope" not in raw
    assert orjson.loads(raw)["error"]["message"] == "The upstream provider refused the request."
    assert backup.seen == []


async def test_translated_credential_failure_reaches_an_anthropic_client_in_its_format(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, sdk: SDKs
) -> None:
    """The real `anthropic` SDK over an OpenAI channel whose key is refused and an Anthropic
    backup: the message is answered by the backup."""
    bad = FakeProvider(Step(status=401, body=OPENAI_BAD_KEY))
    good = FakeProvider(Step(body=anthropic_body("from backup")))
    a = await start_server(bad.app())
    b = await start_server(good.app())
    config = make_config(
        tmp_path,
        [
            channel("oa", server_url(a), priority=10),
            channel("an", server_url(b), type="anthropic"),
        ],
    )
    client, _ = await start_proxy(config)
    message = await sdk.anthropic(client).messages.create(**MESSAGES)
    assert message.content[0].text == "from backup"
    assert len(bad.seen) == 1


OPENAI_MODEL_FORBIDDEN = orjson.dumps(
    {
        "error": {
            "message": "Project `proj_Zq81xYwVb2` does not have access to model `gpt-b`",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
)


@pytest.mark.parametrize(
    ("forbidden", "primary_type"),
    [(OPENAI_MODEL_FORBIDDEN, "openai"), (ANTHROPIC_FORBIDDEN, "anthropic")],
    ids=["openai-project-model", "anthropic-permission"],
)
async def test_a_403_about_one_model_leaves_the_channels_other_models(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    aiohttp_client: Any,
    forbidden: bytes,
    primary_type: str,
) -> None:
    """The primary's credential may not use gpt-b (403) but serves gpt-a. Before: one such 403
    cooled the whole channel for 60 s, so gpt-a went to the backup too. Now gpt-b moves to the
    backup (asked of the primary once) while gpt-a stays on the primary, whose health is
    healthy with gpt-b under `refused_models`; no client sees the provider's words."""
    asked: Counter[str] = Counter()

    async def primary_answer(request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        asked[model] += 1
        if model == "gpt-b":
            return web.Response(status=403, body=forbidden, content_type="application/json")
        if primary_type == "anthropic":
            return web.Response(
                body=anthropic_body("from primary"), content_type="application/json"
            )
        return web.Response(body=chat_body("from primary"), content_type="application/json")

    primary = web.Application()
    primary.router.add_route("POST", "/{tail:.*}", primary_answer)
    backup = FakeProvider(Step(body=chat_body("from backup")))
    a = await start_server(primary)
    b = await start_server(backup.app())
    models = ["gpt-a", "gpt-b"]
    config = make_config(
        tmp_path,
        [
            channel("primary", server_url(a), priority=10, type=primary_type, models=models),
            channel("backup", server_url(b), priority=0, models=models),
        ],
        server={"admin_token": ADMIN},
    )
    client, parts = await start_proxy(config)

    async def ask(model: str) -> str:
        resp = await client.post(
            "/v1/chat/completions", headers=AUTH, json={**CHAT, "model": model}
        )
        raw = await resp.read()
        assert resp.status == 200, raw
        no_leak(raw)
        assert b"proj_" not in raw
        content: str = orjson.loads(raw)["choices"][0]["message"]["content"]
        return content

    for _ in range(3):
        assert await ask("gpt-b") == "from backup"
        assert await ask("gpt-a") == "from primary"
    assert asked == {"gpt-b": 1, "gpt-a": 3}
    health = {c["id"]: c for c in parts.channel_health()}["primary"]
    assert health["state"] == "healthy"
    refused = health["refused_models"]
    assert isinstance(refused, dict)
    assert list(refused) == ["gpt-b"]
    assert 50 < refused["gpt-b"] <= 60  # the credential cooldown

    control = await aiohttp_client(create_control(parts))
    listed = await control.get("/control/v1/channels", headers={"Authorization": f"Bearer {ADMIN}"})
    views = {c["id"]: c for c in (await listed.json())["channels"]}
    assert list(views["primary"]["health"]["refused_models"]) == ["gpt-b"]
