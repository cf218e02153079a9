"""Shared fixtures: a proxyd app built from a test config, in front of scripted fake providers."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxyd.config import Config

SECRET = "sk-test-alpha-0123456789"
OTHER_SECRET = "sk-test-bravo-0123456789"


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key(id: str = "k1", secret: str = SECRET, **extra: Any) -> dict[str, Any]:
    return {"id": id, "hash": key_hash(secret), "account_id": "acct-1", **extra}


def channel(
    id: str, url: str, *, type: str = "openai", models: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    base = url + "/v1" if type == "openai" else url
    return {
        "id": id,
        "type": type,
        "base_url": base,
        "api_key": f"upstream-{id}",
        "models": models or ["gpt-test"],
        **extra,
    }


def make_config(
    tmp_path: Path,
    channels: list[dict[str, Any]],
    *,
    keys: list[dict[str, Any]] | None = None,
    prices: dict[str, dict[str, Any]] | None = None,
    balance: int = 10**15,
    **sections: Any,
) -> Config:
    models = {m for c in channels for m in c["models"]}
    data: dict[str, Any] = {
        "billing": {
            "database_url": f"sqlite:///{tmp_path}/usage.sqlite3",
            "spool_dir": str(tmp_path / "spool"),
            "flush_interval_seconds": 0.05,
        },
        "state": {
            "keys": {"version": 1, "keys": keys if keys is not None else [key()]},
            "prices": {
                "version": 1,
                "discount": "1",
                "prices": prices
                if prices is not None
                else {m: {"input": "1", "output": "2"} for m in models},
            },
            "channels": {"version": 1, "channels": channels},
            "balances": {"acct-1": {"version": 1, "balance_nanos": balance}},
        },
    }
    for name, value in sections.items():
        data.setdefault(name, {}).update(value)
    return Config.model_validate(data)


StartServer = Callable[[web.Application], Awaitable[TestServer]]
StartProxy = Callable[[Config], Awaitable[tuple[TestClient[Any, Any], Any]]]


@pytest.fixture
async def start_server(aiohttp_server: Any) -> StartServer:
    """Start any aiohttp app (a fake provider) on a loopback port."""

    async def start(app: web.Application) -> TestServer:
        server: TestServer = await aiohttp_server(app)
        return server

    return start


@pytest.fixture
async def start_proxy(aiohttp_client: Any) -> StartProxy:
    """Start proxyd from a config, as `proxyd serve` would (handlers cancelled on disconnect)."""

    from proxyd.app import PARTS, create_app  # imported late: the app pulls in every part

    async def start(config: Config) -> tuple[TestClient[Any, Any], Any]:
        app = create_app(config)
        client: TestClient[Any, Any] = await aiohttp_client(
            app, server_kwargs={"handler_cancellation": True}
        )
        return client, app[PARTS]

    return start


def server_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


class SDKs:
    """Real `openai` and `anthropic` SDK clients pointed at a test proxyd, closed after the test."""

    def __init__(self) -> None:
        self.made: list[Any] = []

    def openai(self, client: TestClient[Any, Any], secret: str = SECRET) -> Any:
        import openai

        sdk = openai.AsyncOpenAI(
            api_key=secret, base_url=str(client.make_url("/v1")), max_retries=0
        )
        self.made.append(sdk)
        return sdk

    def anthropic(self, client: TestClient[Any, Any], secret: str = SECRET) -> Any:
        import anthropic

        sdk = anthropic.AsyncAnthropic(
            api_key=secret, base_url=str(client.make_url("")), max_retries=0
        )
        self.made.append(sdk)
        return sdk


@pytest.fixture
async def sdk() -> AsyncIterator[SDKs]:
    """Factory of SDK clients that are closed when the test ends."""
    sdks = SDKs()
    yield sdks
    for made in sdks.made:
        await made.close()


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url(database: str) -> str:
    """A direct connection URL to one database of the test server."""
    return f"postgresql://postgres@127.0.0.1:5432/{database}"


async def _pg_admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh, empty database for one test; dropped (connections and all) afterwards."""
    name = f"proxyd_test_{uuid.uuid4().hex[:16]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
