"""Shapes and small helpers shared by the OpenAI <-> Anthropic translators.

Pure module: no aiohttp, no I/O, no logging. Nothing here ever logs or stores a body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxyd.errors import ErrorType, InvalidRequest, UpstreamFailure

JSON = dict[str, Any]

ANTHROPIC_MESSAGES_PATH = "/v1/messages"
"""Appended to an `anthropic` channel's base_url (e.g. https://api.anthropic.com)."""
OPENAI_CHAT_PATH = "/chat/completions"
"""Appended to an `openai` channel's base_url (e.g. https://api.openai.com/v1)."""
ANTHROPIC_VERSION = "2023-06-01"

_DATA_URL = re.compile(r"^data:([^;,]+)((?:;[^;,]*)*),", re.ASCII)
ANTHROPIC_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """A translated request: where to send it on the channel and what to send.

    `headers` are the protocol headers only; the relay adds the channel's credential
    (`x-api-key` for anthropic, `Authorization: Bearer` for openai) and its extra headers.
    """

    path: str
    headers: dict[str, str]
    body: JSON
    stream: bool

    def payload(self) -> bytes:
        """The body serialised for the wire."""
        return orjson.dumps(self.body)


def unsupported(param: str, what: str) -> InvalidRequest:
    """The refusal of a feature with no faithful equivalent on the other protocol (400)."""
    return InvalidRequest(
        f"{what} cannot be translated for this model's provider; "
        f"remove '{param}' or use a model served natively.",
        error_type=ErrorType.UNSUPPORTED_FEATURE,
        param=param,
    )


def invalid(param: str, what: str) -> InvalidRequest:
    """The refusal of a malformed part of the request body (400)."""
    return InvalidRequest(what, param=param)


def bad_upstream(what: str) -> UpstreamFailure:
    """The failure of an upstream answer that cannot be translated (502)."""
    return UpstreamFailure(what, error_type=ErrorType.UPSTREAM_ERROR)


def parse_data_url(url: str, param: str) -> tuple[str, str]:
    """Split a base64 `data:` URL into (media type, base64 payload)."""
    match = _DATA_URL.match(url)
    if match is None or ";base64" not in match.group(2).lower():
        raise invalid(param, "A data: URL must be of the form data:<media type>;base64,<data>.")
    return match.group(1).lower(), url[match.end() :]


def sse_data(event: bytes) -> bytes | None:
    """The data field of ONE complete SSE event, or None when it carries no data line.

    Several data lines are joined with a newline, as the SSE specification says.
    """
    if event.startswith(b"data:") and event.count(b"\n", 0, len(event) - 2) == 0:
        value = event[5:].rstrip(b"\r\n")
        return value[1:] if value.startswith(b" ") else value
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    return b"\n".join(parts)


def load_json_object(raw: bytes) -> JSON | None:
    """Parse a JSON object, or None when the bytes are not one."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
