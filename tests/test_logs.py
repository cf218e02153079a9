"""Logging: one redacted JSON line per request; bodies and key material never get through."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import orjson
import pydantic
import pytest
import structlog

from proxyd.billing.record import UsageRecord
from proxyd.observability.logs import BODY_FIELDS, configure_logging, request_log

CANARY = "canary-5d1e0a77-a-prompt-nobody-may-see"
SECRET = "sk-ant-api03-Zx9qLw2Vb7Nc4Rt1Yu8Io5Pa3Sd6Fg0Hj"

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """configure_logging into a buffer; structlog and the root logger are restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def setup(level: str = "info", fmt: str = "json") -> io.StringIO:
        buf = io.StringIO()
        configure_logging(level, fmt, stream=buf)
        return buf

    yield setup
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    """The JSON objects written so far, one per line."""
    return [orjson.loads(line) for line in buf.getvalue().splitlines() if line]


def record(**overrides: object) -> UsageRecord:
    """A finished request's usage row."""
    fields: dict[str, object] = {
        "request_id": "req-42",
        "created_at": 1_700_000_000.0,
        "key_id": "key-7",
        "account_id": "acct-3",
        "model": "gpt-4o",
        "endpoint": "/v1/chat/completions",
        "channel_id": "openai-main",
        "stream": True,
        "status_code": 200,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "cached_tokens": 5,
        "reasoning_tokens": 6,
        "cost_nanos": 7890,
        "latency_ms": 1500,
        "ttft_ms": 250,
        "client_ip": "203.0.113.5",
    }
    fields.update(overrides)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def test_request_log_is_one_json_line_with_the_request_metadata(configure: Configure) -> None:
    """request_log writes exactly one JSON line with ids, status, tokens and timings."""
    buf = configure()
    request_log(record())
    [line] = lines(buf)
    assert line["event"] == "request"
    assert line["level"] == "info"
    expected = {
        "request_id": "req-42",
        "key_id": "key-7",
        "account_id": "acct-3",
        "model": "gpt-4o",
        "channel_id": "openai-main",
        "status": 200,
        "error_type": None,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "cached_tokens": 5,
        "reasoning_tokens": 6,
        "latency_ms": 1500,
        "ttft_ms": 250,
    }
    assert {k: line[k] for k in expected} == expected
    assert "client_ip" not in line


def test_timestamps_are_iso_utc(configure: Configure) -> None:
    """Every line carries an ISO-8601 timestamp in UTC close to now."""
    buf = configure()
    structlog.get_logger().info("started")
    stamp = str(lines(buf)[0]["timestamp"])
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60


def test_server_failures_log_at_warning_and_level_filters(configure: Configure) -> None:
    """5xx request lines are warnings; level="warning" drops the info lines of successes."""
    buf = configure(level="warning")
    request_log(record())
    request_log(record(status_code=502, error_type="upstream_error"))
    [line] = lines(buf)
    assert line["level"] == "warning"
    assert line["error_type"] == "upstream_error"


@pytest.mark.parametrize(
    "name", ["messages", "prompt", "input", "content", "body", "completion", "request_body"]
)
def test_body_named_fields_are_dropped(configure: Configure, name: str) -> None:
    """A field named like a body never reaches the output; its name is listed as redacted."""
    buf = configure()
    structlog.get_logger().info("oops", **{name: [{"role": "user", "content": CANARY}]})
    assert CANARY not in buf.getvalue()
    [line] = lines(buf)
    assert name not in line
    assert line["redacted"] == [name]


def test_every_listed_body_field_is_dropped(configure: Configure) -> None:
    """All names in BODY_FIELDS, in any case, are dropped at once."""
    buf = configure()
    fields = {name.upper() if i % 2 else name: CANARY for i, name in enumerate(BODY_FIELDS)}
    structlog.get_logger().info("many", **fields)
    assert CANARY not in buf.getvalue()


def test_nested_body_fields_are_dropped(configure: Configure) -> None:
    """Body-named keys inside a logged mapping are dropped too."""
    buf = configure()
    structlog.get_logger().info("nested", upstream={"status": 500, "body": CANARY})
    assert CANARY not in buf.getvalue()
    assert lines(buf)[0]["upstream"] == {"status": 500}


@pytest.mark.parametrize(
    "text",
    [
        f"calling with {SECRET}",
        f"Authorization: Bearer {CANARY}",
        f"header x-api-key: {CANARY}",
        f"url?api_key={CANARY}&x=1",
        f'{{"token": "{CANARY}"}}',
    ],
)
def test_key_shaped_values_are_masked(configure: Configure, text: str) -> None:
    """Key-shaped text is replaced by [REDACTED] wherever it appears in a value or the event."""
    buf = configure()
    structlog.get_logger().info(text, detail=text)
    out = buf.getvalue()
    assert SECRET not in out
    assert CANARY not in out
    line = lines(buf)[0]
    assert "[REDACTED]" in str(line["event"])
    assert "[REDACTED]" in str(line["detail"])


def test_plain_ids_and_model_names_pass_unchanged(configure: Configure) -> None:
    """Redaction does not mangle the ordinary metadata it should keep."""
    buf = configure()
    values = {"model": "deepseek-chat", "key_id": "key-7", "path": "/v1/chat/completions"}
    structlog.get_logger().info("ok", **values)
    line = lines(buf)[0]
    assert {k: line[k] for k in values} == values


def test_unknown_objects_log_only_their_type(configure: Configure) -> None:
    """An arbitrary object is logged as its type name, never through its repr."""

    class Leaky:
        def __repr__(self) -> str:
            return CANARY

        __str__ = __repr__

    buf = configure()
    structlog.get_logger().info("obj", thing=Leaky())
    assert CANARY not in buf.getvalue()
    assert lines(buf)[0]["thing"] == "<Leaky>"


def test_validation_errors_do_not_echo_their_input(configure: Configure) -> None:
    """pydantic's ValidationError quotes the bad input; that quote is masked in tracebacks."""

    class Body(pydantic.BaseModel):
        max_tokens: int

    buf = configure()
    try:
        Body.model_validate({"max_tokens": CANARY})
    except pydantic.ValidationError as exc:
        structlog.get_logger().exception("bad body")
        structlog.get_logger().warning("bad body", error=exc)
    out = buf.getvalue()
    assert "ValidationError" in out
    assert "input_value=[REDACTED]" in out
    assert CANARY not in out


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_local_variables(configure: Configure, fmt: str) -> None:
    """Exceptions are rendered as plain tracebacks: a body held in a local variable stays out."""
    buf = configure(fmt=fmt)

    def handler() -> None:
        prompt = CANARY
        raise RuntimeError(f"failed after {len(prompt)} characters")

    try:
        handler()
    except RuntimeError:
        structlog.get_logger().exception("handler failed")
    out = buf.getvalue()
    assert "RuntimeError: failed after" in out
    assert CANARY not in out


def test_stdlib_logs_go_through_the_same_redaction(configure: Configure) -> None:
    """A library logging through stdlib logging gets a JSON line with the same masking."""
    buf = configure()
    logging.getLogger("aiohttp.access").warning("GET / Authorization: Bearer %s", CANARY)
    [line] = lines(buf)
    assert line["logger"] == "aiohttp.access"
    assert line["level"] == "warning"
    assert CANARY not in buf.getvalue()


def test_console_format_is_readable_text(configure: Configure) -> None:
    """fmt="console" writes key=value text, not JSON, with the same redaction."""
    buf = configure(fmt="console")
    request_log(record())
    structlog.get_logger().info("x", messages=CANARY)
    out = buf.getvalue()
    assert "request" in out
    assert "key_id=key-7" in out
    assert not out.lstrip().startswith("{")
    assert CANARY not in out


def test_reconfiguring_replaces_the_handler(configure: Configure) -> None:
    """Calling configure_logging twice leaves one proxyd handler, writing to the new stream."""
    first = configure()
    second = configure()
    logging.getLogger("lib").error("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_bad_level_or_format_is_refused() -> None:
    """An unknown level or format is a configuration error, not a silent default."""
    with pytest.raises(ValueError, match="level"):
        configure_logging("verbose")
    with pytest.raises(ValueError, match="format"):
        configure_logging("info", "xml")
