"""The control API's table of operations and its OpenAPI 3.1 document, generated from the models.

Request shapes come from proxyd.state.schemas (the one validation code), response shapes are
declared here; the document is built from their JSON schemas and never written by hand. No
aiohttp here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic.json_schema import models_json_schema

from proxyd.state.schemas import (
    BalancePush,
    ChannelSpec,
    ChannelsPush,
    CreditPush,
    Id,
    KeyBody,
    KeySpec,
    KeysPush,
    PricesPush,
)

PREFIX = "/control/v1"
REF = "#/components/schemas/{model}"
# Channel fields that hold credentials: accepted on push, never returned.
SECRET_CHANNEL_FIELDS = frozenset({"api_key", "api_keys"})


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(_Out):
    """One problem of a rejected body."""

    field: str | None = Field(description="Where: a dotted path with indexes, e.g. keys[3].hash.")
    message: str


class ErrorDetail(_Out):
    """What went wrong."""

    message: str
    field: str | None = None
    errors: list[FieldError] | None = Field(default=None, description="Every problem found.")
    kind: str | None = Field(default=None, description="On 409: what the version belongs to.")
    pushed_version: int | None = None
    current_version: int | None = None


class ErrorBody(_Out):
    """Every error response of the control API."""

    error: ErrorDetail


class Section(_Out):
    """Version in force (-1: never pushed) and how many entries it holds."""

    version: int
    count: int


class PricesSection(Section):
    """The price table in force."""

    discount: str | None


class StateView(_Out):
    """GET /control/v1/state, also the answer to every replace push."""

    loaded: bool = Field(description="State was loaded at start (from a file or a snapshot).")
    keys: Section
    prices: PricesSection
    channels: Section
    models: list[str] = Field(description="Models served: a channel has them and they have prices.")


class BalanceOut(_Out):
    """An account's ledger."""

    balance_nanos: int
    reserved_nanos: int
    available_nanos: int = Field(description="balance_nanos - reserved_nanos")
    version: int = Field(description="Version of the last balance set; -1: never set.")


class AccountView(_Out):
    """The answer to a balance set."""

    account_id: str
    balance: BalanceOut


class CreditResult(_Out):
    """The answer to a credit: 201 when applied now, 200 when it was applied before."""

    account_id: str
    credit_id: str
    applied: bool
    balance: BalanceOut


class SpendWindowOut(_Out):
    """One spend window of a key."""

    limit_nanos: int
    spent_nanos: int = Field(description="Settled spend in the current period.")
    resets_at: str | None = Field(
        description="RFC 3339 UTC; null for a 5-hour window that has not started."
    )


class KeyView(_Out):
    """GET /control/v1/keys/{id}: the key as pushed, its live limits and its account's balance."""

    key: KeySpec
    limits: dict[str, Any]
    balance: BalanceOut
    spend: dict[str, SpendWindowOut] = Field(
        description="Each capped window (window_5h, daily, weekly, monthly) of the key."
    )


class KeyWritten(_Out):
    """The answer to a key upsert or revocation."""

    id: str
    created: bool = Field(description="On upsert: the key did not exist before.")
    deleted: bool
    keys_version: int


ChannelView: type[BaseModel] = create_model(
    "ChannelView",
    __config__=ConfigDict(extra="forbid"),
    __doc__="A channel as pushed, without its credentials, with its live health.",
    **{  # type: ignore[call-overload]  # field definitions built from ChannelSpec's own fields
        name: (info.annotation, info)
        for name, info in ChannelSpec.model_fields.items()
        if name not in SECRET_CHANNEL_FIELDS
    },
    api_key_count=(int, Field(description="How many credentials the channel holds.")),
    health=(dict[str, Any] | None, Field(description="Live health; null when unknown.")),
)


class ChannelList(_Out):
    """GET /control/v1/channels."""

    version: int
    channels: list[ChannelView]


@dataclass(frozen=True, slots=True)
class Operation:
    """One call of the control API."""

    name: str
    method: Literal["GET", "PUT", "POST", "DELETE"]
    path: str  # below PREFIX
    summary: str
    body: type[BaseModel] | None
    ok: dict[int, type[BaseModel] | None]
    errors: tuple[int, ...]


_WRITE = (400, 409, 413, 415)
OPERATIONS: tuple[Operation, ...] = (
    Operation("replace_keys", "PUT", "/keys", "Replace all keys atomically.",
              KeysPush, {200: StateView}, _WRITE),
    Operation("upsert_key", "PUT", "/keys/{id}", "Insert or replace one key.",
              KeyBody, {200: KeyWritten}, (400, 413, 415)),
    Operation("delete_key", "DELETE", "/keys/{id}", "Revoke one key at once.",
              None, {200: KeyWritten}, (404,)),
    Operation("get_key", "GET", "/keys/{id}", "A key with its live limits and balance.",
              None, {200: KeyView}, (404,)),
    Operation("replace_prices", "PUT", "/prices", "Replace the price table and discount.",
              PricesPush, {200: StateView}, _WRITE),
    Operation("replace_channels", "PUT", "/channels", "Replace the channel list.",
              ChannelsPush, {200: StateView}, _WRITE),
    Operation("get_channels", "GET", "/channels", "Channels without credentials, with health.",
              None, {200: ChannelList}, ()),
    Operation("set_balance", "PUT", "/accounts/{id}/balance", "Set an account's balance.",
              BalancePush, {200: AccountView}, (400, 409, 413, 415)),
    Operation("add_credit", "POST", "/accounts/{id}/credits", "Add credit once per credit_id.",
              CreditPush, {201: CreditResult, 200: CreditResult}, (400, 413, 415)),
    Operation("get_state", "GET", "/state", "Versions and counts in force.",
              None, {200: StateView}, ()),
    Operation("openapi", "GET", "/openapi.json", "This document.", None, {200: None}, ()),
)  # fmt: skip

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    400: "The body is invalid; `field` names where.",
    401: "Missing or wrong admin token.",
    403: "The source address is outside the allowlist.",
    404: "No such key.",
    409: "The pushed version is lower than the one in force; nothing changed.",
    413: "The body is over the size limit.",
    415: "The body is not JSON.",
}


def _models() -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {"ErrorBody": ErrorBody}
    for op in OPERATIONS:
        for model in (op.body, *op.ok.values()):
            if model is not None:
                seen[model.__name__] = model
    return list(seen.values())


def _content(model: type[BaseModel] | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    if model is not None:
        schema = {"$ref": REF.format(model=model.__name__)}
    return {"application/json": {"schema": schema}}


def _operation(op: Operation, id_schema: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, model in sorted(op.ok.items()):
        responses[str(status)] = {"description": _STATUS_TEXT[status], "content": _content(model)}
    for status in sorted({401, 403, *op.errors}):
        responses[str(status)] = {
            "description": _STATUS_TEXT[status],
            "content": _content(ErrorBody),
        }
    out: dict[str, Any] = {"operationId": op.name, "summary": op.summary, "responses": responses}
    if "{id}" in op.path:
        out["parameters"] = [{"name": "id", "in": "path", "required": True, "schema": id_schema}]
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": _content(op.body)}
    return out


def build_document(title: str = "proxyd control API", version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the control API."""
    _, defs = models_json_schema(
        [(m, "validation") for m in _models()], ref_template=REF, title=title
    )
    id_schema = TypeAdapter(Id).json_schema()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(PREFIX + op.path, {})[op.method.lower()] = _operation(op, id_schema)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
