"""The control API application: versioned pushes of keys, prices, channels and balances.

Reads and validates a whole body before the store sees it, so a refused push changes nothing.
Never returns a channel credential or a key secret (proxyd never has the latter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from proxyd.admission.spend import SpendWindows
from proxyd.control import BalanceViewLike, LedgerLike, LimitsLike
from proxyd.control.auth import Handler, auth_middleware
from proxyd.control.openapi import OPERATIONS, PREFIX, SECRET_CHANNEL_FIELDS, build_document
from proxyd.errors import ErrorType, ProxydError
from proxyd.state.schemas import (
    BalancePush,
    ChannelSpec,
    ChannelsPush,
    CreditPush,
    Id,
    KeyBody,
    KeysPush,
    PricesPush,
)
from proxyd.state.store import StateError, StateStore, VersionConflict

log = structlog.get_logger("proxyd.control")

M = TypeVar("M", bound=BaseModel)
OnChange = Callable[[str], Awaitable[None]]
_ID = TypeAdapter(Id)
_ROOT_PATH = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.\w+)+) ")
_MAX_LISTED_ERRORS = 20


class ControlRefusal(ProxydError):
    """A control call refused with a status, a message and optional details for the body."""

    error_type = ErrorType.INVALID_REQUEST

    def __init__(self, status: int, message: str, *, field: str | None = None, **details: Any):
        super().__init__(message, status=status, param=field)
        self.details = details


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic error location as a path: `("keys", 3, "hash")` -> `keys[3].hash`."""
    out = ""
    for part in loc:
        if isinstance(part, int) or part == "[key]":
            out += f"[{part}]" if isinstance(part, int) else part
        elif not part.startswith("function-"):  # a validator's tag, not a place in the body
            out += f".{part}" if out else part
    return out or None


def _message(error: Mapping[str, Any]) -> str:
    text = str(error["msg"])
    return text.removeprefix("Value error, ")


def refusal_from(exc: ValidationError) -> ControlRefusal:
    """The 400 for a body the schemas refused, naming the first field and listing the others."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        path, message = field_path(error["loc"]), _message(error)
        if path is None and (found := _ROOT_PATH.match(message)):
            path = found.group(1)  # a whole-body check names the field in its message
        problems.append({"field": path, "message": message})
    first = problems[0]
    return ControlRefusal(
        400, first["message"] or "invalid body", field=first["field"],
        errors=problems[:_MAX_LISTED_ERRORS],
    )  # fmt: skip


def dumps(data: Any) -> bytes:
    """JSON bytes; integers beyond 64 bits (valid JSON, refused by orjson) go through json."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data).encode()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps(data), content_type="application/json")


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 past `limit` (by Content-Length, then while reading)."""
    if not _is_json(request.headers.get("Content-Type")):
        raise ControlRefusal(415, "The body must be JSON (Content-Type: application/json).")
    too_large = ControlRefusal(413, f"The body is over the limit of {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def validate(model: type[M], body: bytes) -> M:
    """The body as `model`, or a 400 naming the field. Strict: "5" is not an integer."""
    if not body.strip():
        raise ControlRefusal(400, "A JSON body is required.")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise refusal_from(exc) from None


def _path_id(request: web.Request) -> str:
    raw = request.match_info["id"]
    try:
        return _ID.validate_python(raw)
    except ValidationError as exc:
        raise ControlRefusal(400, _message(exc.errors()[0]), field="id") from None


def _balance(view: BalanceViewLike) -> dict[str, int]:
    return {
        "balance_nanos": view.balance_nanos,
        "reserved_nanos": view.reserved_nanos,
        "available_nanos": view.balance_nanos - view.reserved_nanos,
        "version": view.version,
    }


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc="***@" + host))


def channel_view(spec: ChannelSpec, health: Mapping[str, Any] | None) -> dict[str, Any]:
    """A channel as GET shows it: no credentials, header values and proxy password hidden."""
    view = spec.model_dump(mode="json", exclude=set(SECRET_CHANNEL_FIELDS))
    view["headers"] = dict.fromkeys(spec.headers, "***")
    if spec.proxy is not None:
        view["proxy"] = _redact_url(spec.proxy)
    view["api_key_count"] = len(spec.api_keys) or 1
    view["health"] = dict(health) if health is not None else None
    return view


def state_view(store: StateStore) -> dict[str, Any]:
    """Versions and counts in force."""
    s = store.current
    return {
        "loaded": store.loaded,
        "keys": {"version": s.keys_version, "count": len(s.key_specs)},
        "prices": {
            "version": s.prices_version,
            "count": len(s.prices),
            "discount": s.prices_push.discount if s.prices_push else None,
        },
        "channels": {"version": s.channels_version, "count": len(s.channels)},
        "models": s.models(),
    }


def _conflict(exc: VersionConflict) -> ControlRefusal:
    return ControlRefusal(
        409, str(exc), kind=exc.kind, pushed_version=exc.pushed, current_version=exc.current
    )


class ControlApi:
    """The handlers, holding the store, the ledger and the limits they act on."""

    def __init__(
        self,
        store: StateStore,
        ledger: LedgerLike,
        limits: LimitsLike,
        channel_health: Callable[[], list[dict[str, Any]]],
        max_body_bytes: int,
        on_change: OnChange | None,
        spend: SpendWindows | None = None,
    ) -> None:
        self.spend = spend
        self.store = store
        self.ledger = ledger
        self.limits = limits
        self.channel_health = channel_health
        self.max_body_bytes = max_body_bytes
        self.on_change = on_change
        self.document = dumps(build_document())

    async def _body(self, request: web.Request, model: type[M]) -> M:
        return validate(model, await read_body(request, self.max_body_bytes))

    async def _changed(self, kind: str, **fields: Any) -> None:
        log.info("control_change", kind=kind, **fields)
        if self.on_change is not None:
            await self.on_change(kind)

    def _apply(self, change: Callable[[], object]) -> None:
        try:
            change()
        except VersionConflict as exc:
            raise _conflict(exc) from None
        except StateError as exc:
            raise ControlRefusal(400, str(exc), field=exc.field_path) from None

    async def replace_keys(self, request: web.Request) -> web.Response:
        push = await self._body(request, KeysPush)
        self._apply(lambda: self.store.replace_keys(push))
        await self._changed("keys", version=push.version, count=len(push.keys))
        return _json(state_view(self.store))

    async def upsert_key(self, request: web.Request) -> web.Response:
        key_id = _path_id(request)
        body = await self._body(request, KeyBody)
        created = key_id not in self.store.current.key_specs
        self._apply(lambda: self.store.upsert_key(key_id, body))
        await self._changed("keys", key_id=key_id)
        version = self.store.current.keys_version
        return _json({"id": key_id, "created": created, "deleted": False, "keys_version": version})

    async def delete_key(self, request: web.Request) -> web.Response:
        key_id = request.match_info["id"]
        if not self.store.delete_key(key_id):
            raise ControlRefusal(404, "No key has this id.", field="id")
        await self._changed("keys", key_id=key_id, deleted=True)
        version = self.store.current.keys_version
        return _json({"id": key_id, "created": False, "deleted": True, "keys_version": version})

    async def get_key(self, request: web.Request) -> web.Response:
        state = self.store.current
        key_id = request.match_info["id"]
        spec, record = state.key_specs.get(key_id), state.keys_by_id.get(key_id)
        if spec is None or record is None:
            raise ControlRefusal(404, "No key has this id.", field="id")
        limits = await self.limits.key_view(record)
        balance = await self.ledger.view(record.account_id)
        key = spec.model_dump(mode="json")
        spend = await self.spend.view(record) if self.spend is not None else {}
        return _json({"key": key, "limits": limits, "balance": _balance(balance), "spend": spend})

    async def replace_prices(self, request: web.Request) -> web.Response:
        push = await self._body(request, PricesPush)
        self._apply(lambda: self.store.replace_prices(push))
        await self._changed("prices", version=push.version, count=len(push.prices))
        return _json(state_view(self.store))

    async def replace_channels(self, request: web.Request) -> web.Response:
        push = await self._body(request, ChannelsPush)
        self._apply(lambda: self.store.replace_channels(push))
        await self._changed("channels", version=push.version, count=len(push.channels))
        return _json(state_view(self.store))

    async def get_channels(self, request: web.Request) -> web.Response:
        state = self.store.current
        health: dict[str, Mapping[str, Any]] = {}
        for entry in self.channel_health():
            channel_id = entry.get("id", entry.get("channel_id"))
            if isinstance(channel_id, str):
                health[channel_id] = entry
        push = state.channels_push
        specs = push.channels if push is not None else []
        channels = [channel_view(spec, health.get(spec.id)) for spec in specs]
        return _json({"version": state.channels_version, "channels": channels})

    async def set_balance(self, request: web.Request) -> web.Response:
        account_id = _path_id(request)
        push = await self._body(request, BalancePush)
        try:
            await self.ledger.set_balance(account_id, push.version, push.balance_nanos)
        except VersionConflict as exc:
            raise _conflict(exc) from None
        await self._changed("balances", account_id=account_id, version=push.version)
        view = await self.ledger.view(account_id)
        return _json({"account_id": account_id, "balance": _balance(view)})

    async def add_credit(self, request: web.Request) -> web.Response:
        account_id = _path_id(request)
        push = await self._body(request, CreditPush)
        applied = await self.ledger.credit(account_id, push.credit_id, push.amount_nanos)
        if applied:
            await self._changed("balances", account_id=account_id, credit_id=push.credit_id)
        view = await self.ledger.view(account_id)
        body = {
            "account_id": account_id,
            "credit_id": push.credit_id,
            "applied": applied,
            "balance": _balance(view),
        }
        return _json(body, status=201 if applied else 200)

    async def get_state(self, request: web.Request) -> web.Response:
        return _json(state_view(self.store))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.document, content_type="application/json")

    def routes(self) -> list[web.RouteDef]:
        """One route per operation of the OpenAPI table."""
        return [web.route(op.method, PREFIX + op.path, getattr(self, op.name)) for op in OPERATIONS]


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as `{"error": {"message", "field", ...}}`, aiohttp's own 404/405 included."""
    try:
        return await handler(request)
    except ControlRefusal as exc:
        error = {"message": exc.message, "field": exc.param, **exc.details}
        return _json({"error": error}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = {"message": exc.reason, "field": None}
        return _json({"error": error}, status=exc.status)


def create_control_app(
    *,
    store: StateStore,
    ledger: LedgerLike,
    limits: LimitsLike,
    channel_health: Callable[[], list[dict[str, Any]]],
    admin_token: str,
    allow_cidrs: list[str],
    max_body_bytes: int = 8 * 2**20,
    on_change: OnChange | None = None,
    spend: SpendWindows | None = None,
) -> web.Application:
    """The control application; serve it on its own listener, never the client port."""
    api = ControlApi(store, ledger, limits, channel_health, max_body_bytes, on_change, spend)
    app = web.Application(
        middlewares=[render_errors, auth_middleware(admin_token, allow_cidrs)],
        client_max_size=max_body_bytes,
    )
    app.router.add_routes(api.routes())
    return app
