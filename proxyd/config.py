"""Process configuration: one file (TOML or JSON), validated at start, with environment overrides.

Pure module: reads a file and the environment, never the network. A mistake names the file and
the field; the state part has the control API's shape and is validated by the same schemas.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxyd.state.schemas import Cidr, Snapshot

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_CONTROL_LISTEN = "127.0.0.1:9090"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """Listeners, request limits and shutdown."""

    listen: str = DEFAULT_LISTEN
    control_listen: str = DEFAULT_CONTROL_LISTEN
    # Optional listener of this process alone for /metrics, /healthz and /readyz (several
    # processes sharing the client port through SO_REUSEPORT are each scraped here).
    metrics_listen: str | None = None
    admin_token: str | None = Field(default=None, min_length=16)
    control_allow_cidrs: list[Cidr] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    trusted_proxies: list[Cidr] = Field(default_factory=list)
    max_body_bytes: int = Field(default=16 * 2**20, ge=1024)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # Worker processes behind one supervisor (`proxyd serve --workers`); "auto" = the cores this
    # process may run on. They share the client port and read-only data (see proxyd/supervisor).
    workers: int | Literal["auto"] = Field(default=1)
    # Client connection deadlines (proxyd/server/connection.py): a connection past one is closed
    # and counted in proxyd_client_connections_cut_total{phase}.
    head_timeout_seconds: float = Field(default=10.0, gt=0)  # first byte to the end of the head
    body_timeout_seconds: float = Field(default=30.0, gt=0)  # end of the head to the whole body
    idle_timeout_seconds: float = Field(default=75.0, gt=0)  # keep-alive between requests
    max_connections: int = Field(default=10_000, ge=1)  # open client connections per process
    max_head_bytes: int = Field(default=65_536, ge=1024)  # request line and headers (431 past)
    # The Server header of every client response; none by default (it would name the stack).
    server_header: str | None = Field(default=None, min_length=1, pattern=r"^[\x20-\x7e]+$")
    # TLS on the client listener (both or neither); reloaded from the same files on SIGHUP.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_min_version: Literal["1.2", "1.3"] = "1.3"

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 512:
            raise ValueError("must be between 1 and 512, or 'auto'")
        return value


class UpstreamSettings(_Section):
    """The shared upstream connection pool and the failover budget."""

    pool_size: int = Field(default=10_000, ge=1)
    pool_size_per_host: int = Field(default=0, ge=0)
    keepalive_seconds: float = Field(default=30.0, gt=0)
    pool_acquire_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="The longest a request waits for a free upstream connection when the pool "
        "is at its caps; past it the attempt counts as an upstream timeout and fails over.",
    )
    fast_client: bool | None = Field(
        default=None,
        description="Ignored (kept so older config files still load): every upstream call, "
        "proxied ones included, goes through proxyd's own HTTP/1.1 client.",
    )
    max_attempts: int = Field(default=3, ge=1, le=10)
    deadline_seconds: float = Field(default=60.0, gt=0)
    default_anthropic_max_tokens: int = Field(default=4096, ge=1)
    failure_threshold: int = Field(default=3, ge=1, description="Failures before a cooldown.")
    base_cooldown_seconds: float = Field(default=1.0, gt=0)
    max_cooldown_seconds: float = Field(default=300.0, gt=0)
    credential_cooldown_seconds: float = Field(
        default=60.0,
        gt=0,
        description="First cooldown of a channel whose upstream key or account was refused "
        "(401/403, out of credit); doubles per failed trial up to max_cooldown_seconds.",
    )


class BillingSettings(_Section):
    """Where usage rows go and how they are batched, spooled and retained."""

    database_url: str = "sqlite:///var/proxyd.sqlite3"
    batch_size: int = Field(default=1000, ge=1)
    flush_interval_seconds: float = Field(default=0.2, gt=0)
    # Rows past this many in memory go to the fsync'd spool: it bounds what a SIGKILL can lose.
    queue_max: int = Field(default=5000, ge=1)
    spool_dir: str = "var/spool"
    spool_max_rows: int = Field(default=5_000_000, ge=1)
    retention_days: int = Field(default=90, ge=1)


class RedisSettings(_Section):
    """Optional Redis shared by all instances for limits, balances and invalidations."""

    url: str | None = None
    prefix: str = "proxyd:"
    # While Redis is away each worker limits a key to a fair share of its budget: the key's
    # limits divided by (instances x workers). Set this to the number of proxyd instances
    # (hosts or pods) sharing this Redis.
    fallback_instances: int = Field(default=1, ge=1)
    # The most one worker may spend per account while Redis is away; unset means its fair share
    # of the available balance it last saw in Redis.
    fallback_balance_nanos: int | None = Field(default=None, ge=0)
    retry_interval_seconds: float = Field(
        default=1.0, gt=0, description="First wait before checking a Redis that went away."
    )
    retry_max_interval_seconds: float = Field(
        default=10.0, gt=0, description="Longest wait between checks (the wait doubles)."
    )


class AdmissionConfig(_Section):
    """Admission defaults that are not per key."""

    default_max_tokens: int = Field(default=4096, ge=1)
    resale_window_seconds: float = Field(default=3600.0, gt=0)
    resale_max_ips: int = Field(default=20, ge=1)
    resale_max_user_agents: int = Field(default=10, ge=1)
    count_tokens_per_minute: int = Field(
        default=600,
        ge=1,
        description="Token-count calls per key per minute; a bucket apart from rpm and tpm.",
    )
    max_tool_calls: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Paid server-tool calls reserved for per enabled tool (Anthropic `max_uses` "
        "lowers it per request).",
    )
    unbounded_reserve_nanos: int = Field(
        default=1_000_000_000,
        ge=0,
        le=2**62,
        description="The least reserved for a request whose cost its body cannot bound "
        "(previous_response_id, conversation, file ids, image URLs).",
    )


class StickySettings(_Section):
    """Sticky sessions: a conversation's turns stay on one channel and credential."""

    enabled: bool = True
    ttl_seconds: float = Field(default=3600.0, gt=0, description="Sliding: each turn renews it.")
    max_sessions: int = Field(default=100_000, ge=1, description="Per process; LRU beyond.")


class ControlPlaneSettings(_Section):
    """Where to fetch a state snapshot at start, and how often to poll it again."""

    snapshot_url: str | None = None
    snapshot_token: str | None = None
    poll_interval_seconds: float | None = Field(default=None, gt=0)


class LoggingSettings(_Section):
    """Log level and format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Config(_Section):
    """The whole configuration file."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    sticky: StickySettings = Field(default_factory=StickySettings)
    control_plane: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics_enabled: bool = True
    state: Snapshot = Field(default_factory=Snapshot)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the field."""


# Environment variable -> (section, field) it overrides.
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "PROXYD_LISTEN": ("server", "listen"),
    "PROXYD_CONTROL_LISTEN": ("server", "control_listen"),
    "PROXYD_METRICS_LISTEN": ("server", "metrics_listen"),
    "PROXYD_ADMIN_TOKEN": ("server", "admin_token"),
    "PROXYD_DATABASE_URL": ("billing", "database_url"),
    "PROXYD_REDIS_URL": ("redis", "url"),
    "PROXYD_LOG_LEVEL": ("logging", "level"),
    "PROXYD_LOG_FORMAT": ("logging", "format"),
    "PROXYD_SNAPSHOT_URL": ("control_plane", "snapshot_url"),
    "PROXYD_WORKERS": ("server", "workers"),
    "PROXYD_TLS_CERT": ("server", "tls_cert"),
    "PROXYD_TLS_KEY": ("server", "tls_key"),
}


def field_path(loc: tuple[int | str, ...]) -> str:
    """`("keys", 3, "hash")` -> `keys[3].hash`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def describe(exc: ValidationError) -> str:
    """One line per problem: `field: message`."""
    return "; ".join(f"{field_path(e['loc'])}: {e['msg']}" for e in exc.errors())


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table/object")
    return data


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; `path` None means PROXYD_CONFIG or no file at all."""
    env = os.environ if environ is None else environ
    chosen = path if path is not None else env.get("PROXYD_CONFIG") or None
    data: dict[str, Any] = _read(Path(chosen)) if chosen is not None else {}
    for var, (section, name) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value:
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"{chosen}: {section}: must be a table")
            data[section][name] = value
    where = str(chosen) if chosen is not None else "environment"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc)}") from exc


def split_host_port(value: str) -> tuple[str, int]:
    """`"0.0.0.0:8080"` -> `("0.0.0.0", 8080)`; `"[::1]:8080"` works too."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{value!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def worker_count(value: int | str, cores: int | None = None) -> int:
    """`server.workers` as a number: `"auto"` is the cores this process may run on."""
    if value == "auto":
        return cores if cores is not None else len(os.sched_getaffinity(0)) or 1
    return int(value)


def with_workers(config: Config, value: str) -> Config:
    """`config` with `server.workers` from the command line (`--workers N` or `auto`)."""
    try:
        server = ServerSettings.model_validate({**config.server.model_dump(), "workers": value})
    except ValidationError as exc:
        raise ConfigError(f"--workers: {describe(exc).partition(': ')[2]}") from exc
    return config.model_copy(update={"server": server})
