"""Carries pushed state between instances: a change here is published, a change there applied.

Over the Redis broadcast: the payload is the same JSON body the control API takes, validated by
the same schemas on arrival. Balances are not carried here; with Redis they are shared already.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson
import structlog
from pydantic import ValidationError

from proxyd.state.schemas import ChannelsPush, KeysPush, PricesPush
from proxyd.state.store import StateError, StateStore, VersionConflict

log = structlog.get_logger("proxyd.state.sync")

KINDS = ("keys", "prices", "channels")


def versioned_body(store: StateStore, kind: str) -> tuple[int, bytes] | None:
    """The state in force of one kind, as the control API body that would recreate it."""
    cur = store.current
    if kind == "keys":
        specs = [s.model_dump(mode="json") for s in cur.key_specs.values()]
        version = max(cur.keys_version, 0)
        return version, orjson.dumps({"version": version, "keys": specs})
    if kind == "prices" and cur.prices_push is not None:
        return cur.prices_push.version, orjson.dumps(cur.prices_push.model_dump(mode="json"))
    if kind == "channels" and cur.channels_push is not None:
        return cur.channels_push.version, orjson.dumps(cur.channels_push.model_dump(mode="json"))
    return None


def body_of(store: StateStore, kind: str) -> bytes | None:
    """`versioned_body` without the version."""
    found = versioned_body(store, kind)
    return found[1] if found is not None else None


def apply(store: StateStore, kind: str, payload: bytes) -> bool:
    """Apply a body another instance published; False (logged) when it is stale or invalid."""
    try:
        if kind == "keys":
            store.replace_keys(KeysPush.model_validate_json(payload))
        elif kind == "prices":
            store.replace_prices(PricesPush.model_validate_json(payload))
        elif kind == "channels":
            store.replace_channels(ChannelsPush.model_validate_json(payload))
        else:
            return False
    except VersionConflict as exc:
        log.info("sync_stale", kind=kind, pushed=exc.pushed, current=exc.current)
        return False
    except (ValidationError, StateError) as exc:
        log.warning("sync_rejected", kind=kind, error=type(exc).__name__)
        return False
    return True


def applier(store: StateStore, kind: str) -> Callable[[bytes], None]:
    """A broadcast callback applying `kind` bodies from other instances to `store`."""

    def on_message(payload: bytes) -> None:
        if payload != body_of(store, kind):  # the state in force already (a catch-up, say)
            apply(store, kind, payload)

    return on_message


class Publish(Protocol):
    """Sends a kind's body to the other instances and keeps it as that kind's latest state."""

    def __call__(
        self, kind: str, payload: bytes, /, *, version: int | None = None
    ) -> Awaitable[None]: ...


class Publisher:
    """What the control API calls after a change: send that kind's state to the others."""

    def __init__(self, store: StateStore, publish: Publish) -> None:
        self._store = store
        self._publish = publish

    async def __call__(self, kind: str) -> None:
        if kind == "key":
            kind = "keys"
        found = versioned_body(self._store, kind)
        if found is not None:
            await self._publish(kind, found[1], version=found[0])
