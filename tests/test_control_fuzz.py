"""Fuzz every control endpoint from its OpenAPI document with schemathesis (valid and invalid data).

Pins: no 5xx, every status and body as documented, and a refused call changes no state at all.
The app runs on a real listener in a background thread; schemathesis calls it over HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from proxyd.control.api import create_control_app
from proxyd.control.openapi import build_document
from proxyd.state.schemas import Snapshot
from proxyd.state.store import State, StateStore
from tests.test_control_api import AUTH, TOKEN, MemoryLedger, MemoryLimits, channel, key

DOCUMENT = build_document()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = [(path, method.upper()) for path, ops in DOCUMENT["paths"].items() for method in ops]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Sections at version 0: most valid pushes are accepted (409s are pinned in test_control_api).
SEED = Snapshot.model_validate(
    {
        "keys": {"version": 0, "keys": [key("k1"), key("k2", allowed_cidrs=["10.0.0.0/8"])]},
        "prices": {"version": 0, "prices": {"gpt-test": {"input": "1", "output": "2"}}},
        "channels": {"version": 0, "channels": [channel("a")]},
    }
)


class AnyEnviron(dict[str, str]):
    """An environment in which every credential variable a generated channel names is set."""

    def get(self, name: str, default: Any = None) -> str:
        return f"sk-from-{name}"


@dataclass
class Served:
    """The control app on a loopback port, run by its own event loop in a thread."""

    base_url: str
    store: StateStore
    ledger: MemoryLedger

    def reset(self) -> None:
        """Back to the seed state: two keys, a price, a channel, one account at version 2."""
        self.store.current = State()
        self.store.load(SEED)
        self.ledger.balances = {"acct-1": 1000}
        self.ledger.versions = {"acct-1": 2}
        self.ledger.credits = {("acct-1", "c1")}

    def fingerprint(self) -> tuple[Any, ...]:
        """Everything a call could change: the state object in force and the ledger's contents."""
        return (id(self.store.current), self.ledger.dump())


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """Start the control app in a thread for the whole module."""
    store, ledger = StateStore(environ=AnyEnviron()), MemoryLedger()
    app = create_control_app(
        store=store,
        ledger=ledger,
        limits=MemoryLimits(),
        channel_health=lambda: [{"id": "a", "healthy": True}],
        admin_token=TOKEN,
        allow_cidrs=["127.0.0.0/8"],
    )
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{port}", store, ledger)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def strategy(path: str, method: str) -> st.SearchStrategy[Any]:
    """Valid and invalid cases; calls on keys also hit the seeded key ids."""
    operation = SCHEMA[path][method]
    options = [operation.as_strategy(GenerationMode.POSITIVE)]
    if "requestBody" in DOCUMENT["paths"][path][method.lower()] or "{id}" in path:
        options.append(operation.as_strategy(GenerationMode.NEGATIVE))
    if "/keys/{id}" in path or "/accounts/{id}" in path:
        known = {"id": "k1"} if "/keys/" in path else {"id": "acct-1"}
        options.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
    return st.one_of(options)


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_fuzz_endpoint(served: Served, path: str, method: str) -> None:
    """No 5xx, responses as documented, and nothing changes when a call is refused."""
    session = requests.Session()
    statuses: set[int] = set()

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy(path, method))
    def run(case: Any) -> None:
        served.reset()
        held = served.store.current  # kept alive, so its id cannot be reused
        before = served.fingerprint()
        response = case.call(base_url=served.base_url, session=session, headers=dict(AUTH))
        statuses.add(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=dict(AUTH))
        if response.status_code >= 400:
            assert served.fingerprint() == before, response.text
            assert served.store.current is held
            assert response.json()["error"]["message"]

    try:
        run()
    finally:
        session.close()
    assert max(statuses) < 500
    assert min(statuses) < 300, "no example was accepted: the fuzz only saw refusals"
    if "requestBody" in DOCUMENT["paths"][path][method.lower()]:
        assert 400 in statuses, "no example was refused: the fuzz only saw valid bodies"
