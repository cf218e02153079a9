"""Validated shapes of everything the control plane pushes: keys, prices, channels, balances.

Pure module. The control API, the config file and the control-plane snapshot all validate with
these models, and the OpenAPI document is generated from them; nothing here touches the network.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
_DECIMAL = re.compile(r"^\d{1,12}(\.\d{1,12})?$")

Id = Annotated[str, Field(pattern=_ID_PATTERN, description="An identifier (1-128 characters).")]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]
# Integers stop at 2**62 so every value fits the 64-bit integers of orjson, Redis and SQL.
_MAX = 2**62
Version = Annotated[
    int,
    Field(ge=0, le=_MAX, description="Monotonic version; a lower one than in force is refused."),
]


def _decimal_string(value: str) -> str:
    if not _DECIMAL.match(value):
        raise ValueError("must be a non-negative decimal string such as '2.50'")
    try:
        Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the pattern already excludes this
        raise ValueError("must be a decimal string") from exc
    return value


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP network in CIDR notation") from exc


DecimalString = Annotated[
    str,
    AfterValidator(_decimal_string),
    Field(description='A non-negative decimal number written as a string, e.g. "2.50".'),
]
Cidr = Annotated[str, AfterValidator(_cidr), Field(description="An IP network, e.g. 10.0.0.0/8.")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Burst(_Strict):
    """Bucket sizes when they should differ from one minute's worth of the rate."""

    requests: int | None = Field(default=None, ge=1, le=_MAX)
    tokens: int | None = Field(default=None, ge=1, le=_MAX)


_SPEND_MAX = 2**53  # exact in the doubles of Redis's Lua


class SpendLimits(_Strict):
    """Spend caps per key in nanos; day, week (ISO) and month are UTC calendar periods."""

    window_5h_nanos: int | None = Field(
        default=None,
        ge=1,
        le=_SPEND_MAX,
        description="Spend within 5 hours from the first request after the previous window ended.",
    )
    daily_nanos: int | None = Field(default=None, ge=1, le=_SPEND_MAX)
    weekly_nanos: int | None = Field(default=None, ge=1, le=_SPEND_MAX)
    monthly_nanos: int | None = Field(default=None, ge=1, le=_SPEND_MAX)


class KeyBody(_Strict):
    """An API key as the control plane describes it, without its id."""

    hash: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="Lowercase hex SHA-256 of the secret; proxyd never receives the secret.",
    )
    account_id: Id
    status: Literal["active", "disabled"] = "active"
    expires_at: AwareDatetime | None = None
    models: list[ModelName] = Field(default_factory=lambda: ["*"], min_length=1)
    rpm: int | None = Field(
        default=None, ge=1, le=_MAX, description="Requests per minute; null: no limit."
    )
    tpm: int | None = Field(
        default=None, ge=1, le=_MAX, description="Tokens per minute; null: no limit."
    )
    burst: Burst | None = None
    max_concurrency: int | None = Field(default=None, ge=1, le=_MAX)
    allowed_cidrs: list[Cidr] = Field(default_factory=list)
    block_on_resale: bool = Field(
        default=False,
        description="Refuse with 403 while the key is flagged as shared by many clients.",
    )
    spend_limits: SpendLimits | None = Field(
        default=None,
        description="Spend caps (5-hour window, day, week, month), refused with 429 "
        "insufficient_quota when a request's reservation does not fit.",
    )


class KeySpec(KeyBody):
    """An API key with its id."""

    id: Id


ToolName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
TierName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class _Rates(_Strict):
    """Rates in currency units per million tokens; see `proxyd/billing/pricing.py`."""

    cached_input: DecimalString | None = Field(
        default=None, description="Cache reads; default: `input`."
    )
    cache_write: DecimalString | None = Field(
        default=None,
        description="5-minute cache writes (and writes with no TTL); default: `input`.",
    )
    cache_write_1h: DecimalString | None = Field(
        default=None, description="1-hour cache writes; default: `cache_write`."
    )
    audio_input: DecimalString | None = Field(default=None, description="Default: `input`.")
    audio_output: DecimalString | None = Field(default=None, description="Default: `output`.")
    image_output: DecimalString | None = Field(default=None, description="Default: `output`.")


class LongContextSpec(_Rates):
    """Rates for every token of a request whose whole prompt has more than the threshold."""

    above_prompt_tokens: int = Field(ge=0, le=_MAX)
    input: DecimalString | None = None
    output: DecimalString | None = None


class TierSpec(_Rates):
    """A service tier's rates; fields it does not give are the base price's."""

    input: DecimalString | None = None
    output: DecimalString | None = None
    long_context: list[LongContextSpec] | None = Field(
        default=None, description="This tier's long-context levels; default: the base price's."
    )


class PriceSpec(_Rates):
    """Upstream price of a model: decimal currency units per million tokens unless said so."""

    input: DecimalString
    output: DecimalString
    long_context: list[LongContextSpec] = Field(
        default_factory=list,
        description="Levels by whole-prompt size; the highest threshold passed prices every token.",
    )
    tiers: dict[TierName, TierSpec] = Field(
        default_factory=dict,
        description="Tier name (priority, flex, fast, ...) to rates, applied when the response "
        "says that tier served the request. A request asking for a tier not listed is refused.",
    )
    per_call: dict[ToolName, DecimalString] = Field(
        default_factory=dict,
        description="Paid server tool (web_search, web_fetch, image_generation, file_search) to "
        "its price per call in currency units. A request enabling a tool not listed is refused.",
    )


_PROXY_SCHEMES = ("http", "socks5", "socks5h")


class ChannelSpec(_Strict):
    """An upstream provider account that serves some models."""

    id: Id
    type: Literal["openai", "anthropic"]
    base_url: str = Field(
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="API root as the provider's SDK takes it, e.g. https://api.openai.com/v1.",
    )
    api_key: str | None = Field(default=None, min_length=1)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_keys: list[str] = Field(
        default_factory=list, description="Several credentials, used in rotation."
    )
    models: list[ModelName] = Field(min_length=1)
    model_map: dict[ModelName, ModelName] = Field(default_factory=dict)
    priority: int = Field(default=0, ge=-_MAX, le=_MAX)
    weight: int = Field(default=1, ge=1, le=1_000_000)
    headers: dict[str, str] = Field(default_factory=dict, description="Extra upstream headers.")
    proxy: str | None = Field(
        default=None,
        description="Outbound proxy: http://[user:pass@]host:port (an HTTP proxy; a CONNECT "
        "tunnel for https upstreams) or socks5://… / socks5h://… (SOCKS5; socks5h resolves "
        "the upstream's name at the proxy).",
    )
    verify_tls: bool = True
    connect_timeout: float = Field(default=10.0, gt=0, le=600)
    first_byte_timeout: float = Field(default=300.0, gt=0, le=3600)
    chunk_timeout: float = Field(default=300.0, gt=0, le=3600)
    rpm: int | None = Field(
        default=None, ge=1, le=_MAX, description="Upstream requests per minute cap."
    )
    max_concurrency: int | None = Field(default=None, ge=1, le=_MAX)
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        default="max_tokens",
        description="On an openai channel, the field a translated Anthropic request's max_tokens"
        " is sent as: max_tokens (any OpenAI-compatible server) or max_completion_tokens"
        " (what OpenAI's reasoning models require).",
    )

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in _PROXY_SCHEMES:
            raise ValueError(f"the scheme must be one of {', '.join(_PROXY_SCHEMES)}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port is not a number from 1 to 65535") from None
        if not parts.hostname or port is None:
            raise ValueError("give the proxy's host and port: scheme://[user:pass@]host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL has no path, query or fragment")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> ChannelSpec:
        given = sum(x is not None for x in (self.api_key, self.api_key_env)) + bool(self.api_keys)
        if given != 1:
            raise ValueError("give exactly one of api_key, api_key_env or api_keys")
        return self


class KeysPush(_Strict):
    """PUT /control/v1/keys: replace all keys atomically."""

    version: Version
    keys: list[KeySpec]

    @model_validator(mode="after")
    def _unique(self) -> KeysPush:
        _no_duplicates("keys", [k.id for k in self.keys], "id")
        _no_duplicates("keys", [k.hash for k in self.keys], "hash")
        return self


class PricesPush(_Strict):
    """PUT /control/v1/prices: replace the price table."""

    version: Version
    discount: DecimalString = "1"
    prices: dict[ModelName, PriceSpec]


class ChannelsPush(_Strict):
    """PUT /control/v1/channels: replace the channel list."""

    version: Version
    channels: list[ChannelSpec]

    @model_validator(mode="after")
    def _unique(self) -> ChannelsPush:
        _no_duplicates("channels", [c.id for c in self.channels], "id")
        return self


class BalancePush(_Strict):
    """PUT /control/v1/accounts/{id}/balance: set an account's balance."""

    version: Version
    balance_nanos: int = Field(ge=0, le=_MAX)


class CreditPush(_Strict):
    """POST /control/v1/accounts/{id}/credits: add credit once per credit_id."""

    credit_id: Id
    amount_nanos: int = Field(gt=0, le=_MAX)


class Snapshot(_Strict):
    """Whole state as the config file or the control plane's snapshot URL gives it."""

    keys: KeysPush | None = None
    prices: PricesPush | None = None
    channels: ChannelsPush | None = None
    balances: dict[Id, BalancePush] = Field(default_factory=dict)


def _no_duplicates(field: str, values: list[str], attr: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise ValueError(f"{field}[{index}].{attr} is a duplicate")
        seen.add(value)


def expiry_epoch(expires_at: datetime | None) -> float | None:
    """Seconds since the epoch of an aware datetime, None for no expiry."""
    return None if expires_at is None else expires_at.timestamp()
