"""The usage record: one per request that passed authentication, metadata only.

Pure module. A record holds no prompt, no completion and no key material, only the key's id.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class UsageRecord:
    """One row of `usage_records`; field names are the column names."""

    request_id: str
    created_at: float  # unix seconds (UTC) when the request arrived
    key_id: str
    account_id: str
    model: str
    endpoint: str
    upstream_model: str | None = None
    channel_id: str | None = None
    stream: bool = False
    status_code: int = 0
    error_type: str | None = None  # an ErrorType value, None on success
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0  # all cache writes within the prompt
    cache_write_1h_tokens: int = 0  # the 1-hour part of those
    service_tier: str | None = None  # the priced tier that served it; None: standard
    tool_calls: int = 0  # paid server-tool calls
    cost_nanos: int = 0
    shortfall_nanos: int = 0  # cost that could not be charged
    latency_ms: int = 0
    ttft_ms: int | None = None
    client_ip: str | None = None
    usage_source: str = field(default="upstream")  # "upstream" or "estimated"


COLUMNS: tuple[str, ...] = (
    "request_id",
    "created_at",
    "key_id",
    "account_id",
    "model",
    "upstream_model",
    "channel_id",
    "endpoint",
    "stream",
    "status_code",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_nanos",
    "latency_ms",
    "ttft_ms",
    "client_ip",
    "usage_source",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "service_tier",
    "tool_calls",
    "shortfall_nanos",
)
