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
    counts: bool = False  # a token count: never billed, answered offline where no upstream can


CHAT = Endpoint(
    "chat.completions", "/v1/chat/completions", "openai", "/chat/completions", True, True
)
COMPLETIONS = Endpoint("completions", "/v1/completions", "openai", "/completions", True, False)
EMBEDDINGS = Endpoint("embeddings", "/v1/embeddings", "openai", "/embeddings", False, False)
RESPONSES = Endpoint("responses", "/v1/responses", "openai", "/responses", True, False)
MESSAGES = Endpoint("messages", "/v1/messages", "anthropic", "/v1/messages", True, True)

ALL: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)

# Token counting: sent to a channel of the client's protocol, else counted by the bundled
# tokenizer. Served by their own handler (`proxyd.server.count`), not the completion one.
COUNT_TOKENS = Endpoint(
    "count_tokens",
    "/v1/messages/count_tokens",
    "anthropic",
    "/v1/messages/count_tokens",
    False,
    False,
    counts=True,
)
INPUT_TOKENS = Endpoint(
    "responses.input_tokens",
    "/v1/responses/input_tokens",
    "openai",
    "/responses/input_tokens",
    False,
    False,
    counts=True,
)
COUNTING: tuple[Endpoint, ...] = (COUNT_TOKENS, INPUT_TOKENS)
