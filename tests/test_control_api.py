"""The control API over real HTTP: every call, push-then-read, conflicts, refusals, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxyd.control.api import create_control_app
from proxyd.control.openapi import OPERATIONS, PREFIX, build_document
from proxyd.state.schemas import KeysPush
from proxyd.state.store import KeyRecord, StateStore, VersionConflict

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
V1 = PREFIX


@dataclass(frozen=True)
class View:
    balance_nanos: int
    reserved_nanos: int
    version: int


@dataclass
class MemoryLedger:
    """An in-memory ledger with the control API's protocol (versioned sets, once-only credits)."""

    balances: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    credits: set[tuple[str, str]] = field(default_factory=set)

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        await asyncio.sleep(0)  # a real ledger awaits here; let other pushes interleave
        current = self.versions.get(account_id, -1)
        if version < current:  # then checks and sets in one step (a Lua script in Redis)
            raise VersionConflict("balance", version, current)
        self.balances[account_id] = balance_nanos
        self.versions[account_id] = version

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        if version <= self.versions.get(account_id, -1):
            return False
        self.balances[account_id] = balance_nanos
        self.versions[account_id] = version
        return True

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        if (account_id, credit_id) in self.credits:
            return False
        self.credits.add((account_id, credit_id))
        self.balances[account_id] = self.balances.get(account_id, 0) + amount_nanos
        return True

    async def view(self, account_id: str) -> View:
        return View(self.balances.get(account_id, 0), 0, self.versions.get(account_id, -1))

    def dump(self) -> tuple[dict[str, int], dict[str, int], frozenset[tuple[str, str]]]:
        return dict(self.balances), dict(self.versions), frozenset(self.credits)


class MemoryLimits:
    """Limit state as a dict derived from the key, like the real limiter's view."""

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        return {"requests": {"limit": key.rpm}, "in_flight": 0, "shared": False}


def khash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key(id: str, secret: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": id, "hash": khash(secret or f"sk-{id}"), "account_id": "acct-1", **extra}


def channel(id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": id,
        "type": "openai",
        "base_url": "https://api.example.com/v1",
        "api_key": f"sk-upstream-{id}-SECRET",
        "models": ["gpt-test"],
        **extra,
    }


@dataclass
class Control:
    client: TestClient[Any, Any]
    store: StateStore
    ledger: MemoryLedger
    changes: list[str]

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        headers = {**AUTH, **kw.pop("headers", {})}
        response = await self.client.request(method, V1 + path, json=body, headers=headers, **kw)
        return response.status, await response.json()


MakeControl = Callable[..., Awaitable[Control]]


@pytest.fixture
async def make_control(aiohttp_client: Any) -> MakeControl:
    """Build a control app on a store, an in-memory ledger and in-memory limits."""

    async def make(
        environ: dict[str, str] | None = None,
        health: list[dict[str, Any]] | None = None,
        **kw: Any,
    ) -> Control:
        store = StateStore(environ=environ if environ is not None else {})
        ledger = MemoryLedger()
        changes: list[str] = []

        async def on_change(kind: str) -> None:
            changes.append(kind)

        app = create_control_app(
            store=store,
            ledger=ledger,
            limits=MemoryLimits(),
            channel_health=lambda: list(health or []),
            admin_token=TOKEN,
            allow_cidrs=kw.pop("allow_cidrs", ["127.0.0.0/8", "::1/128"]),
            on_change=on_change,
            **kw,
        )
        return Control(await aiohttp_client(app), store, ledger, changes)

    return make


async def test_empty_state(make_control: MakeControl) -> None:
    """A fresh store shows every version as -1 and nothing in force."""
    c = await make_control()
    status, body = await c.call("GET", "/state")
    assert status == 200
    assert body == {
        "loaded": False,
        "keys": {"version": -1, "count": 0},
        "prices": {"version": -1, "count": 0, "discount": None},
        "channels": {"version": -1, "count": 0},
        "models": [],
    }


async def test_push_everything_then_read(make_control: MakeControl) -> None:
    """Channels, prices, keys and a balance pushed in turn are all in force and readable."""
    c = await make_control()
    status, body = await c.call("PUT", "/channels", {"version": 1, "channels": [channel("a")]})
    assert status == 200
    assert body["channels"] == {"version": 1, "count": 1}
    assert body["models"] == []  # no price yet: not served
    prices = {"gpt-test": {"input": "2.50", "output": "10"}}
    status, body = await c.call(
        "PUT", "/prices", {"version": 3, "discount": "0.8", "prices": prices}
    )
    assert status == 200
    assert body["prices"] == {"version": 3, "count": 1, "discount": "0.8"}
    assert body["models"] == ["gpt-test"]
    keys = [key("k1", rpm=60), key("k2", models=["gpt-test"])]
    status, body = await c.call("PUT", "/keys", {"version": 7, "keys": keys})
    assert (status, body["keys"]) == (200, {"version": 7, "count": 2})
    status, body = await c.call(
        "PUT", "/accounts/acct-1/balance", {"version": 1, "balance_nanos": 5}
    )
    assert status == 200
    assert body == {
        "account_id": "acct-1",
        "balance": {"balance_nanos": 5, "reserved_nanos": 0, "available_nanos": 5, "version": 1},
    }
    status, body = await c.call("GET", "/keys/k1")
    assert status == 200
    assert body["key"]["id"] == "k1"
    assert body["key"]["hash"] == khash("sk-k1")
    assert body["key"]["rpm"] == 60
    assert body["limits"]["requests"] == {"limit": 60}
    assert body["balance"]["balance_nanos"] == 5
    assert c.store.current.keys_by_hash[khash("sk-k2")].id == "k2"
    assert c.store.current.served("gpt-test")
    assert c.changes == ["channels", "prices", "keys", "balances"]


async def test_upsert_and_revoke_one_key(make_control: MakeControl) -> None:
    """Upsert creates then replaces; delete removes the key from the lookup at once; then 404."""
    c = await make_control()
    status, body = await c.call("PUT", "/keys/k1", {"hash": khash("a"), "account_id": "x"})
    assert (status, body["created"], body["keys_version"]) == (200, True, 0)
    status, body = await c.call("PUT", "/keys/k1", {"hash": khash("b"), "account_id": "x"})
    assert (status, body["created"]) == (200, False)
    assert khash("a") not in c.store.current.keys_by_hash
    assert c.store.current.keys_by_hash[khash("b")].id == "k1"
    status, body = await c.call("DELETE", "/keys/k1")
    assert (status, body["deleted"]) == (200, True)
    assert khash("b") not in c.store.current.keys_by_hash
    assert (await c.call("GET", "/keys/k1"))[0] == 404
    status, body = await c.call("DELETE", "/keys/k1")
    assert (status, body["error"]["field"]) == (404, "id")
    assert c.changes == ["keys", "keys", "keys"]


async def test_upsert_refusals_change_nothing(make_control: MakeControl) -> None:
    """A hash already used by another key, a body with an id, or a bad path id is a 400."""
    c = await make_control()
    await c.call("PUT", "/keys", {"version": 1, "keys": [key("k1", "s")]})
    before = c.store.current
    status, body = await c.call("PUT", "/keys/k2", {"hash": khash("s"), "account_id": "x"})
    assert (status, body["error"]["field"]) == (400, "hash")
    status, body = await c.call(
        "PUT", "/keys/k2", {"id": "k2", "hash": khash("t"), "account_id": "x"}
    )
    assert (status, body["error"]["field"]) == (400, "id")
    status, body = await c.call("PUT", "/keys/-bad", {"hash": khash("t"), "account_id": "x"})
    assert (status, body["error"]["field"]) == (400, "id")
    assert c.store.current is before
    assert c.changes == ["keys"]


async def test_channels_never_show_credentials(make_control: MakeControl) -> None:
    """GET channels hides api_key, api_keys, header values and proxy passwords; adds health."""
    health = [{"id": "a", "healthy": False, "cooldown_seconds": 3.0}]
    c = await make_control(environ={"UPSTREAM_B": "sk-from-env-SECRET"}, health=health)
    channels = [
        channel("a", headers={"x-extra-auth": "hdr-SECRET"}, proxy="http://u:pw-SECRET@p:3128"),
        channel("b", api_key=None, api_key_env="UPSTREAM_B"),
        channel("c", api_key=None, api_keys=["sk-1-SECRET", "sk-2-SECRET"]),
    ]
    assert (await c.call("PUT", "/channels", {"version": 2, "channels": channels}))[0] == 200
    response = await c.client.get(V1 + "/channels", headers=AUTH)
    text = await response.text()
    assert response.status == 200
    assert "SECRET" not in text
    body = await response.json()
    a, b, cc = body["channels"]
    assert body["version"] == 2
    assert a["health"] == {"id": "a", "healthy": False, "cooldown_seconds": 3.0}
    assert a["headers"] == {"x-extra-auth": "***"}
    assert a["proxy"] == "http://***@p:3128"
    assert "api_key" not in a
    assert "api_keys" not in cc
    assert (b["api_key_env"], b["health"]) == ("UPSTREAM_B", None)
    assert [x["api_key_count"] for x in body["channels"]] == [1, 1, 2]
    assert c.store.current.channels[1].api_keys == ("sk-from-env-SECRET",)


async def test_missing_credential_variable_is_400(make_control: MakeControl) -> None:
    """A channel whose api_key_env is unset is refused naming that field; nothing changes."""
    c = await make_control(environ={})
    channels = [channel("a"), channel("b", api_key=None, api_key_env="NOPE")]
    status, body = await c.call("PUT", "/channels", {"version": 1, "channels": channels})
    assert (status, body["error"]["field"]) == (400, "channels[1].api_key_env")
    assert c.store.current.channels_version == -1
    assert c.changes == []


@pytest.mark.parametrize(
    ("path", "make_body"),
    [
        ("/keys", lambda v: {"version": v, "keys": [key(f"k{v}")]}),
        ("/prices", lambda v: {"version": v, "prices": {"m": {"input": str(v), "output": "1"}}}),
        ("/channels", lambda v: {"version": v, "channels": [channel(f"c{v}")]}),
        ("/accounts/acct-1/balance", lambda v: {"version": v, "balance_nanos": v}),
    ],
)
async def test_stale_version_is_409_and_changes_nothing(
    make_control: MakeControl, path: str, make_body: Callable[[int], Any]
) -> None:
    """A version below the one in force gets 409 with both versions; an equal one is accepted."""
    c = await make_control()
    assert (await c.call("PUT", path, make_body(5)))[0] == 200
    before, ledger_before = c.store.current, c.ledger.dump()
    status, body = await c.call("PUT", path, make_body(4))
    assert status == 409
    assert body["error"]["pushed_version"] == 4
    assert body["error"]["current_version"] == 5
    assert c.store.current is before
    assert c.ledger.dump() == ledger_before
    assert len(c.changes) == 1
    assert (await c.call("PUT", path, make_body(5)))[0] == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": 1, "keys": [key("a"), key("b", hash="ABC")]}, "keys[1].hash"),
        ({"version": 1, "keys": [key("a"), key("a", "other")]}, "keys[1].id"),
        ({"version": 1, "keys": [key("a"), key("b", "sk-a")]}, "keys[1].hash"),
        ({"keys": []}, "version"),
        ({"version": -1, "keys": []}, "version"),
        (
            {"version": 1, "keys": [key("a", allowed_cidrs=["10.0.0.0/8", "nope"])]},
            "keys[0].allowed_cidrs[1]",
        ),
        (
            {"version": 1, "keys": [key("a", expires_at="2030-01-01T00:00:00")]},
            "keys[0].expires_at",
        ),
        ({"version": 1, "keys": [key("a", surprise=1)]}, "keys[0].surprise"),
        ({"version": 1, "keys": {}}, "keys"),
        ([], None),
    ],
)
async def test_bad_keys_push_names_the_field(
    make_control: MakeControl, body: Any, field: str | None
) -> None:
    """A bad push gets 400 naming the first bad field, and the keys in force stay as they were."""
    c = await make_control()
    await c.call("PUT", "/keys", {"version": 0, "keys": [key("keep")]})
    before = c.store.current
    status, answer = await c.call("PUT", "/keys", body)
    assert status == 400
    assert answer["error"]["field"] == field
    assert answer["error"]["message"]
    assert answer["error"]["errors"][0]["field"] == field
    assert c.store.current is before


async def test_bad_prices_and_channels_name_the_field(make_control: MakeControl) -> None:
    """Field paths reach into maps and nested lists: prices.<model>.input, channels[0]..."""
    c = await make_control()
    bad_price = {"version": 1, "prices": {"gpt-x": {"input": "-1", "output": "1"}}}
    assert (await c.call("PUT", "/prices", bad_price))[1]["error"]["field"] == "prices.gpt-x.input"
    no_credential = {"version": 1, "channels": [channel("a", api_key=None)]}
    assert (await c.call("PUT", "/channels", no_credential))[1]["error"]["field"] == "channels[0]"
    bad_url = {"version": 1, "channels": [channel("a", base_url="ftp://x")]}
    assert (await c.call("PUT", "/channels", bad_url))[1]["error"][
        "field"
    ] == "channels[0].base_url"
    assert c.store.current.prices_version == c.store.current.channels_version == -1


async def test_not_json_and_empty_bodies(make_control: MakeControl) -> None:
    """Broken JSON and an empty body are 400; a form content type is 415."""
    c = await make_control()
    response = await c.client.put(
        V1 + "/keys", data=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 400
    json_type = {**AUTH, "Content-Type": "application/json"}
    response = await c.client.put(V1 + "/keys", headers=json_type)  # no body
    assert response.status == 400
    assert (await response.json())["error"]["message"] == "A JSON body is required."
    response = await c.client.put(V1 + "/keys", data=b"{}", headers=AUTH)  # octet-stream
    assert response.status == 415
    response = await c.client.put(
        V1 + "/keys",
        data=b"version=1",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 415
    assert (await response.json())["error"]["message"].startswith("The body must be JSON")
    assert c.store.current.keys_version == -1


async def test_body_over_the_limit_is_413(make_control: MakeControl) -> None:
    """Too large by Content-Length, and too large while reading a chunked body: 413, unchanged."""
    c = await make_control(max_body_bytes=2048)
    big = {"version": 1, "keys": [key(f"k{i}") for i in range(40)]}
    status, body = await c.call("PUT", "/keys", big)
    assert status == 413
    assert "2048" in body["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"version": 1, "keys": ['
        for _ in range(100):
            yield b'{"id": "x"},' * 10

    response = await c.client.put(
        V1 + "/keys", data=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 413
    assert c.store.current.keys_version == -1
    small = {"version": 1, "keys": [key("k1")]}
    assert (await c.call("PUT", "/keys", small))[0] == 200


async def test_credits_apply_once(make_control: MakeControl) -> None:
    """A credit is 201 the first time, 200 with applied false after; the amount is added once."""
    c = await make_control()
    await c.call("PUT", "/accounts/acct-9/balance", {"version": 1, "balance_nanos": 100})
    credit = {"credit_id": "topup-1", "amount_nanos": 50}
    status, body = await c.call("POST", "/accounts/acct-9/credits", credit)
    assert (status, body["applied"], body["balance"]["balance_nanos"]) == (201, True, 150)
    status, body = await c.call("POST", "/accounts/acct-9/credits", credit)
    assert (status, body["applied"], body["balance"]["balance_nanos"]) == (200, False, 150)
    status, body = await c.call(
        "POST", "/accounts/acct-9/credits", {"credit_id": "t", "amount_nanos": 0}
    )
    assert (status, body["error"]["field"]) == (400, "amount_nanos")
    assert c.ledger.balances["acct-9"] == 150
    assert c.changes == ["balances", "balances"]


async def test_concurrent_pushes_highest_version_wins(make_control: MakeControl) -> None:
    """Many replace pushes at once: the highest version is in force, whole, and never torn."""
    c = await make_control()
    versions = list(range(1, 41))
    random.Random(7).shuffle(versions)

    def keys_of(v: int) -> list[dict[str, Any]]:
        return [key(f"v{v}-{i}") for i in range(v % 5 + 1)]

    seen_versions: list[int] = []

    def check(old: Any, new: Any) -> None:  # every swap installs one push's whole key set
        ids = {k.split("-")[0] for k in new.key_specs}
        assert ids == {f"v{new.keys_version}"}
        assert len(new.key_specs) == new.keys_version % 5 + 1
        seen_versions.append(new.keys_version)

    c.store.subscribe(check)
    results = await asyncio.gather(
        *(c.call("PUT", "/keys", {"version": v, "keys": keys_of(v)}) for v in versions),
        *(
            c.call("PUT", "/accounts/a/balance", {"version": v, "balance_nanos": v})
            for v in versions
        ),
    )
    assert {status for status, _ in results} <= {200, 409}
    assert results[versions.index(40)][0] == 200
    assert c.store.current.keys_version == 40
    assert sorted(c.store.current.key_specs) == sorted(k["id"] for k in keys_of(40))
    assert seen_versions == sorted(seen_versions)
    assert (c.ledger.balances["a"], c.ledger.versions["a"]) == (40, 40)


async def test_unknown_route_and_method_are_json(make_control: MakeControl) -> None:
    """aiohttp's own 404 and 405 come back in the control API's error shape."""
    c = await make_control()
    status, body = await c.call("GET", "/nothing")
    assert (status, body["error"]["field"]) == (404, None)
    status, body = await c.call("POST", "/state")
    assert status == 405
    assert body["error"]["message"]


async def test_openapi_document_covers_every_route(make_control: MakeControl) -> None:
    """The served document lists exactly the app's routes, with bodies from the schemas."""
    c = await make_control()
    status, doc = await c.call("GET", "/openapi.json")
    assert status == 200
    assert doc == build_document()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    routed = {
        (r.method, r.resource.canonical)
        for r in c.client.app.router.routes()
        if r.resource is not None and r.method != "HEAD"  # aiohttp answers HEAD for GET
    }
    assert documented == routed
    assert len(documented) == len(OPERATIONS)
    schemas = doc["components"]["schemas"]
    expected = KeysPush.model_json_schema(ref_template="#/components/schemas/{model}")
    expected.pop("$defs")
    assert schemas["KeysPush"] == expected
    put_keys = doc["paths"][V1 + "/keys"]["put"]
    assert put_keys["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeysPush"
    }
    assert set(put_keys["responses"]) == {"200", "400", "401", "403", "409", "413", "415"}


async def test_ids_with_a_slash_are_percent_encoded(make_control: MakeControl) -> None:
    """An id like team/k1 (allowed by the schema) is reached as team%2Fk1 in the path."""
    c = await make_control()
    path = URL(V1 + "/keys/team%2Fk1", encoded=True)
    body = {"hash": khash("t"), "account_id": "team/acct"}
    response = await c.client.put(path, json=body, headers=AUTH)
    assert (response.status, (await response.json())["id"]) == (200, "team/k1")
    response = await c.client.get(path, headers=AUTH)
    assert (await response.json())["key"]["account_id"] == "team/acct"
    assert "team/k1" in c.store.current.keys_by_id


async def test_types_are_strict(make_control: MakeControl) -> None:
    """A number written as a string, or a boolean for a number, is a 400, not coerced."""
    c = await make_control()
    status, body = await c.call("PUT", "/keys", {"version": "1", "keys": []})
    assert (status, body["error"]["field"]) == (400, "version")
    status, body = await c.call("PUT", "/keys", {"version": 1, "keys": [key("a", rpm=True)]})
    assert (status, body["error"]["field"]) == (400, "keys[0].rpm")
    assert c.store.current.keys_version == -1
