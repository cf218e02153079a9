"""Reads what a client asked for: the model, streaming, the token cap, and the body to send on.

Pure module. The body is parsed once, here; it is handed to the relay and to nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxyd.errors import InvalidRequest
from proxyd.protocol.endpoints import CHAT, COMPLETIONS, MESSAGES, RESPONSES, Endpoint


@dataclass(slots=True)
class Call:
    """One client request, parsed."""

    endpoint: Endpoint
    raw: bytes
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int | None
    wants_usage: bool  # the client asked for `stream_options.include_usage`
    query: str = ""  # the client's query string (`beta=true`), passed on to a native channel


def parse_call(endpoint: Endpoint, raw: bytes) -> Call:
    """Parse and check the body; raises InvalidRequest (400) naming what is wrong."""
    if not raw:
        raise InvalidRequest("The request body is empty; a JSON object is required.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    if stream and not endpoint.streams:
        raise InvalidRequest(f"Streaming is not supported on {endpoint.path}.", param="stream")
    max_tokens = _max_tokens(endpoint, body)
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return Call(endpoint, raw, body, model, stream, max_tokens, wants_usage)


def _max_tokens(endpoint: Endpoint, body: dict[str, Any]) -> int | None:
    if endpoint is RESPONSES:
        names: tuple[str, ...] = ("max_output_tokens",)
    elif endpoint is CHAT:
        names = ("max_completion_tokens", "max_tokens")
    else:
        names = ("max_tokens",)
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
        return value
    if endpoint is MESSAGES:  # count_tokens takes no max_tokens
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    return None


def injects_usage(call: Call) -> bool:
    """Whether proxyd must ask an OpenAI provider for stream usage the client did not ask for."""
    return call.stream and not call.wants_usage and call.endpoint in (CHAT, COMPLETIONS)


def native_body(call: Call, upstream_model: str) -> bytes:
    """The body for a channel of the client's own protocol: as sent, unless proxyd must change it.

    Two deliberate changes only: the model name (the channel's `model_map`) and, on OpenAI
    streams, `stream_options.include_usage` so the row can carry the provider's own counts.
    """
    inject = injects_usage(call)
    if upstream_model == call.model and not inject:
        return call.raw
    body = dict(call.body)
    body["model"] = upstream_model
    if inject:
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return orjson.dumps(body)
