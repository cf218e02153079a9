"""Logging set-up: structlog JSON lines (or console text), stdlib logs routed the same way.

Every line passes `redact`: a field named like a body is dropped and key-shaped text is masked,
so a prompt, a completion or key material never reaches a log. Keys appear only as their id.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from proxyd.billing.record import UsageRecord

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}
FORMATS = ("json", "console")

# Field names that carry (or usually carry) request/response content or credentials.
BODY_FIELDS = frozenset(
    (
        "messages", "prompt", "prompts", "input", "inputs", "content", "contents", "body",
        "completion", "completions", "text", "system", "instructions", "tools", "tool_calls",
        "choices", "delta", "data", "payload", "raw", "chunk", "chunks", "response", "request",
        "headers", "authorization", "api_key", "x-api-key", "apikey", "secret", "password",
        "token", "admin_token", "key", "cookie",
    )
)  # fmt: skip
BODY_SUFFIXES = ("_body", "_content", "_secret", "_password", "_token", "_api_key")
REDACTED = "[REDACTED]"
_SECRET = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{16,}"  # OpenAI/Anthropic-style keys (sk-…, sk-ant-…)
    r"|(?i:bearer)\s+[^\s\"',;]+"  # an Authorization header value
    r"|(?i:x-api-key|api[_-]?key|token|secret|password)[\"']?\s*[=:]\s*[\"']?[^\s\"',;}]+"
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"  # a JWT
)
# pydantic's ValidationError echoes the offending input: that input is client content.
_INPUT_VALUE = re.compile(r"input_value=.*?(?=, input_type=|\]$|$)", re.DOTALL)
_MAX_DEPTH = 4


@functools.lru_cache(maxsize=4096)  # field names come from code: a small, fixed set
def _is_body_name(name: str) -> bool:
    low = name.lower()
    return low in BODY_FIELDS or low.endswith(BODY_SUFFIXES)


def scrub(text: str) -> str:
    """`text` with anything shaped like a key, token or echoed input replaced by [REDACTED]."""
    low = text.lower()
    # Plain substring tests first: most values (ids, model names) can skip the regex entirely.
    if not (
        "k-" in low or "=" in low or ":" in low or "bearer" in low or "eyj" in low or "akia" in low
    ):
        return text
    text = _SECRET.sub(REDACTED, text)
    if "input_value=" in text:
        text = _INPUT_VALUE.sub("input_value=" + REDACTED, text)
    return text


def _clean(value: object, depth: int) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return {str(k): _clean(v, depth + 1) for k, v in value.items() if not _is_body_name(str(k))}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {scrub(str(value))}"
    # Any other object could render its content through repr(): only its type name is logged.
    return f"<{type(value).__name__}>"


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Drop body-named fields (listing their names in `redacted`), mask key-shaped values."""
    dropped = [name for name in event_dict if _is_body_name(name)]
    for name in dropped:
        del event_dict[name]
    for name, value in event_dict.items():
        kind = type(value)
        if kind is str:
            event_dict[name] = scrub(value)
        elif not (kind is int or kind is bool or value is None):
            event_dict[name] = _clean(value, 0)
    if dropped:
        event_dict["redacted"] = dropped
    return event_dict


def _dumps(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _shared() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        # A plain-text traceback, never one with local variables (they can hold bodies).
        structlog.processors.format_exc_info,
        redact,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _stdlib_logger_name(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger"] = record.name
    return event_dict


class _ProxydHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler `configure_logging` installs; found again and replaced on reconfigure."""


def configure_logging(
    level: str = "info", fmt: str = "json", *, stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging through one redacting pipeline to `stream` (stdout).

    `fmt` is "json" (one orjson line per event, ISO-8601 UTC `timestamp`) or "console".
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {sorted(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    levelno = LEVELS[level.lower()]
    out = stream if stream is not None else sys.stdout
    shared = _shared()
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = _ProxydHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[_stdlib_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ProxydHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)


def request_fields(record: UsageRecord) -> MutableMapping[str, object]:
    """The metadata of one request as it appears in its log line: ids, counts, timings."""
    r = record
    return {
        "request_id": r.request_id,
        "key_id": r.key_id,
        "account_id": r.account_id,
        "endpoint": r.endpoint,
        "model": r.model,
        "upstream_model": r.upstream_model,
        "channel_id": r.channel_id,
        "stream": r.stream,
        "status": r.status_code,
        "error_type": None if r.error_type is None else str(r.error_type),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "cost_nanos": r.cost_nanos,
        "latency_ms": r.latency_ms,
        "ttft_ms": r.ttft_ms,
        "usage_source": r.usage_source,
    }


@functools.lru_cache(maxsize=8)
def _bound_request_logger(_processors_id: int, _wrapper: type, _factory: object) -> Any:
    """The request logger bound once per structlog configuration (the key changes with it)."""
    return structlog.get_logger("proxyd.request").bind()


def _request_logger() -> Any:
    config = structlog.get_config()
    # The processors list is a new object on every configure() and the cached logger keeps it
    # alive, so its id cannot be reused while the entry exists.
    return _bound_request_logger(
        id(config["processors"]), config["wrapper_class"], config["logger_factory"]
    )


def request_log(record: UsageRecord, logger: Any = None) -> None:
    """Log the one line of a finished request: info below 500, warning for 5xx."""
    log = logger if logger is not None else _request_logger()
    level = logging.WARNING if record.status_code >= 500 else logging.INFO
    enabled = getattr(log, "is_enabled_for", None)
    if enabled is not None and not enabled(level):
        return  # filtered out: do not build the fields
    if level == logging.WARNING:
        log.warning("request", **request_fields(record))
    else:
        log.info("request", **request_fields(record))
