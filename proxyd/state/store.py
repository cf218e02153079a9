"""The in-memory state every request reads: keys, prices and channels as one immutable snapshot.

Each push compiles a new `State` and swaps it in with one assignment, so a request sees the old
state or the new one, never a mix. Balances are not here: they change per request (see balances).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from proxyd.billing import pricing
from proxyd.state.schemas import (
    ChannelSpec,
    ChannelsPush,
    KeyBody,
    KeySpec,
    KeysPush,
    PricesPush,
    Snapshot,
    expiry_epoch,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class VersionConflict(Exception):
    """A push carried a lower version than the one in force."""

    def __init__(self, kind: str, pushed: int, current: int) -> None:
        super().__init__(f"{kind} version {pushed} is older than the version in force ({current})")
        self.kind = kind
        self.pushed = pushed
        self.current = current


class StateError(ValueError):
    """A push that validated but cannot be compiled (e.g. a missing credential variable)."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key, compiled for the request path."""

    id: str
    hash: str
    account_id: str
    active: bool
    expires_at: float | None
    models: frozenset[str] | None  # None: every model
    rpm: int | None
    tpm: int | None
    burst_requests: int | None
    burst_tokens: int | None
    max_concurrency: int | None
    allowed_networks: tuple[IPNetwork, ...]
    block_on_resale: bool
    # (window name, limit nanos) for each cap set: window_5h, daily, weekly, monthly
    spend_limits: tuple[tuple[str, int], ...] = ()

    def allows_model(self, model: str) -> bool:
        """Whether the key's model list admits `model`."""
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Channel:
    """One upstream provider account, compiled for the request path."""

    id: str
    type: str  # "openai" or "anthropic"
    base_url: str  # without a trailing slash
    api_keys: tuple[str, ...]
    models: frozenset[str]
    model_map: Mapping[str, str]
    priority: int
    weight: int
    headers: tuple[tuple[str, str], ...]
    proxy: str | None
    verify_tls: bool
    connect_timeout: float
    first_byte_timeout: float
    chunk_timeout: float
    rpm: int | None
    max_concurrency: int | None
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"

    def upstream_model(self, model: str) -> str:
        """The name the provider knows `model` by."""
        return self.model_map.get(model, model)


@dataclass(frozen=True, slots=True)
class State:
    """Everything a request reads, compiled once per push."""

    keys_version: int = -1
    prices_version: int = -1
    channels_version: int = -1
    keys_by_hash: Mapping[str, KeyRecord] = field(default_factory=dict)
    keys_by_id: Mapping[str, KeyRecord] = field(default_factory=dict)
    key_specs: Mapping[str, KeySpec] = field(default_factory=dict)
    prices: Mapping[str, pricing.Price] = field(default_factory=dict)
    prices_push: PricesPush | None = None
    channels: tuple[Channel, ...] = ()
    channels_push: ChannelsPush | None = None
    routes: Mapping[str, tuple[Channel, ...]] = field(default_factory=dict)
    # (model, protocol) -> that protocol's channels of the model, made on first use and kept
    # with this state (init=False: a replace() for a new push starts an empty one)
    _native: dict[tuple[str, str], tuple[Channel, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def native_route(self, model: str, protocol: str) -> tuple[Channel, ...]:
        """The channels of `model` that speak `protocol`: the route itself when all do, else
        one filtered tuple made once per state (the router caches its grouping per tuple)."""
        found = self._native.get((model, protocol))
        if found is None:
            route = self.routes.get(model, ())
            if all(c.type == protocol for c in route):
                found = route
            else:
                found = tuple(c for c in route if c.type == protocol)
            self._native[(model, protocol)] = found
        return found

    def served(self, model: str) -> bool:
        """A model is served when some channel has it and it has a price."""
        return model in self.routes and model in self.prices

    def models(self) -> list[str]:
        """The served model names, sorted."""
        return sorted(m for m in self.routes if m in self.prices)


def compile_key(spec: KeySpec) -> KeyRecord:
    """Turn a validated key into its request-path form."""
    return KeyRecord(
        id=spec.id,
        hash=spec.hash,
        account_id=spec.account_id,
        active=spec.status == "active",
        expires_at=expiry_epoch(spec.expires_at),
        models=None if "*" in spec.models else frozenset(spec.models),
        rpm=spec.rpm,
        tpm=spec.tpm,
        burst_requests=spec.burst.requests if spec.burst else None,
        burst_tokens=spec.burst.tokens if spec.burst else None,
        max_concurrency=spec.max_concurrency,
        allowed_networks=tuple(ipaddress.ip_network(c) for c in spec.allowed_cidrs),
        block_on_resale=spec.block_on_resale,
        spend_limits=_spend_limits(spec),
    )


def _spend_limits(spec: KeySpec) -> tuple[tuple[str, int], ...]:
    s = spec.spend_limits
    if s is None:
        return ()
    caps = (
        ("window_5h", s.window_5h_nanos),
        ("daily", s.daily_nanos),
        ("weekly", s.weekly_nanos),
        ("monthly", s.monthly_nanos),
    )
    return tuple((name, limit) for name, limit in caps if limit is not None)


def compile_channel(
    spec: ChannelSpec, index: int, environ: Mapping[str, str] | None = None
) -> Channel:
    """Turn a validated channel into its request-path form, resolving its credentials."""
    env = os.environ if environ is None else environ
    if spec.api_key_env is not None:
        secret = env.get(spec.api_key_env)
        if not secret:
            raise StateError(
                f"channels[{index}].api_key_env",
                f"environment variable {spec.api_key_env} is not set",
            )
        api_keys: tuple[str, ...] = (secret,)
    elif spec.api_key is not None:
        api_keys = (spec.api_key,)
    else:
        api_keys = tuple(spec.api_keys)
    return Channel(
        id=spec.id,
        type=spec.type,
        base_url=spec.base_url.rstrip("/"),
        api_keys=api_keys,
        models=frozenset(spec.models) | frozenset(spec.model_map),
        model_map=MappingProxyType(dict(spec.model_map)),
        priority=spec.priority,
        weight=spec.weight,
        headers=tuple(spec.headers.items()),
        proxy=spec.proxy,
        verify_tls=spec.verify_tls,
        connect_timeout=spec.connect_timeout,
        first_byte_timeout=spec.first_byte_timeout,
        chunk_timeout=spec.chunk_timeout,
        rpm=spec.rpm,
        max_concurrency=spec.max_concurrency,
        max_tokens_field=spec.max_tokens_field,
    )


def _routes(channels: tuple[Channel, ...]) -> Mapping[str, tuple[Channel, ...]]:
    table: dict[str, list[Channel]] = {}
    for channel in channels:
        for model in channel.models:
            table.setdefault(model, []).append(channel)
    return MappingProxyType(
        {m: tuple(sorted(cs, key=lambda c: -c.priority)) for m, cs in table.items()}
    )


def _check_version(kind: str, pushed: int, current: int) -> None:
    if pushed < current:
        raise VersionConflict(kind, pushed, current)


Listener = Callable[[State, State], None]


class StateStore:
    """Holds the state in force and swaps in a new one per push."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.current = State()
        self._environ = environ
        self._listeners: list[Listener] = []
        self.loaded = False

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(old, new)` after every swap."""
        self._listeners.append(listener)

    def _swap(self, new: State) -> State:
        old, self.current = self.current, new
        for listener in self._listeners:
            listener(old, new)
        return new

    def replace_keys(self, push: KeysPush) -> State:
        """Replace every key at once."""
        cur = self.current
        _check_version("keys", push.version, cur.keys_version)
        return self._swap(self._with_keys(cur, push.version, {k.id: k for k in push.keys}))

    def upsert_key(self, key_id: str, body: KeyBody) -> State:
        """Insert or replace one key; the keys version stays as it is."""
        cur = self.current
        spec = KeySpec(id=key_id, **body.model_dump())
        specs = dict(cur.key_specs)
        clash = next((k for k in specs.values() if k.hash == spec.hash and k.id != key_id), None)
        if clash is not None:
            raise StateError("hash", "another key already has this hash")
        specs[key_id] = spec
        return self._swap(self._with_keys(cur, max(cur.keys_version, 0), specs))

    def delete_key(self, key_id: str) -> bool:
        """Revoke one key; False when there was no such key."""
        cur = self.current
        if key_id not in cur.key_specs:
            return False
        specs = {k: v for k, v in cur.key_specs.items() if k != key_id}
        self._swap(self._with_keys(cur, cur.keys_version, specs))
        return True

    @staticmethod
    def _with_keys(cur: State, version: int, specs: Mapping[str, KeySpec]) -> State:
        records = [compile_key(s) for s in specs.values()]
        return replace(
            cur,
            keys_version=version,
            key_specs=MappingProxyType(dict(specs)),
            keys_by_hash=MappingProxyType({r.hash: r for r in records}),
            keys_by_id=MappingProxyType({r.id: r for r in records}),
        )

    def replace_prices(self, push: PricesPush) -> State:
        """Replace the price table and discount."""
        cur = self.current
        _check_version("prices", push.version, cur.prices_version)
        compiled: dict[str, pricing.Price] = {}
        for model, spec in push.prices.items():
            try:
                compiled[model] = pricing.compile_price(
                    spec.model_dump(exclude_none=True), push.discount
                )
            except ValueError as exc:
                raise StateError(f"prices.{model}", str(exc)) from exc
        return self._swap(
            replace(
                cur,
                prices_version=push.version,
                prices=MappingProxyType(compiled),
                prices_push=push,
            )
        )

    def replace_channels(self, push: ChannelsPush) -> State:
        """Replace the channel list; streams in flight keep the channel they hold."""
        cur = self.current
        _check_version("channels", push.version, cur.channels_version)
        channels = tuple(
            compile_channel(spec, i, self._environ) for i, spec in enumerate(push.channels)
        )
        return self._swap(
            replace(
                cur,
                channels_version=push.version,
                channels=channels,
                channels_push=push,
                routes=_routes(channels),
            )
        )

    def load(self, snapshot: Snapshot) -> None:
        """Apply a whole snapshot at once (config file or control plane); balances apart."""
        staged = StateStore(self._environ)
        staged.current = self.current
        if snapshot.keys is not None:
            staged.replace_keys(snapshot.keys)
        if snapshot.prices is not None:
            staged.replace_prices(snapshot.prices)
        if snapshot.channels is not None:
            staged.replace_channels(snapshot.channels)
        self._swap(staged.current)
        self.loaded = True
