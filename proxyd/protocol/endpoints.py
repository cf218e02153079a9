"""The client endpoints proxyd serves and what each one means for routing and usage.

Pure module: a table, looked up once per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Protocol = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One client endpoint."""

    name: str  # the billing row's `endpoint` value
    path: str  # the client path
    protocol: Protocol  # the wire format the client speaks
    upstream_suffix: str  # appended to an `openai` channel's base_url (anthropic: /v1/messages)
    streams: bool  # whether `"stream": true` is allowed
    translatable: bool  # whether a channel of the other protocol can serve it


CHAT = Endpoint(
    "chat.completions", "/v1/chat/completions", "openai", "/chat/completions", True, True
)
COMPLETIONS = Endpoint("completions", "/v1/completions", "openai", "/completions", True, False)
EMBEDDINGS = Endpoint("embeddings", "/v1/embeddings", "openai", "/embeddings", False, False)
RESPONSES = Endpoint("responses", "/v1/responses", "openai", "/responses", True, False)
MESSAGES = Endpoint("messages", "/v1/messages", "anthropic", "/v1/messages", True, True)

ALL: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)
