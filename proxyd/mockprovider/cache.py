"""The mock's prompt cache, tier echo and paid-tool counts, so the demo bills every category.

A prefix a credential sent before is a cache read; a new one is a write (Anthropic: marked with
`cache_control`, 1-hour when its `ttl` is "1h"; OpenAI: automatic, prompts of 1,024+ tokens).
Only hashes of prefixes are kept, in a bounded map; nothing of a body is stored.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from proxyd.mockprovider.common import _strlen

OPENAI_MIN_CACHED = 1024  # OpenAI caches prompts from 1,024 tokens on


class PromptCache:
    """Prefix hashes each credential has written (least recently used dropped past the bound)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._max = max_entries

    def _hit(self, credential: str, prefix: object) -> bool:
        digest = hashlib.sha256(credential.encode() + b"\0" + orjson.dumps(prefix)).digest()
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return True
        self._seen[digest] = None
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return False

    def anthropic(self, credential: str, body: dict[str, Any], prompt: int) -> dict[str, Any]:
        """Anthropic usage cache fields for `body`: the prefix up to its last cache breakpoint."""
        blocks = _anthropic_blocks(body)
        last, ttl = -1, "5m"
        for i, block in enumerate(blocks):
            mark = block.get("cache_control") if isinstance(block, dict) else None
            if isinstance(mark, dict):
                last, ttl = i, "1h" if mark.get("ttl") == "1h" else "5m"
        usage: dict[str, Any] = {
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        if last < 0:
            return usage
        prefix = blocks[: last + 1]
        tokens = min(prompt, max(1, math.ceil(_strlen(prefix) / 4)))
        usage["input_tokens"] = prompt - tokens
        if self._hit(credential, prefix):
            usage["cache_read_input_tokens"] = tokens
        else:
            usage["cache_creation_input_tokens"] = tokens
        written = usage["cache_creation_input_tokens"]
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": written if ttl == "5m" else 0,
            "ephemeral_1h_input_tokens": written if ttl == "1h" else 0,
        }
        return usage

    def openai(self, credential: str, body: dict[str, Any], prompt: int) -> int:
        """Cached tokens of an OpenAI request: its prompt but the last turn, when seen before."""
        turns = body.get("messages", body.get("input"))
        if prompt < OPENAI_MIN_CACHED or not isinstance(turns, list) or len(turns) < 2:
            return 0
        prefix = [body.get("instructions"), body.get("tools"), turns[:-1]]
        tokens = min(prompt, math.ceil(_strlen(prefix) / 4))
        if tokens < OPENAI_MIN_CACHED:
            return 0
        return tokens if self._hit(credential, prefix) else 0


CACHE_KEY = web.AppKey("mock_prompt_cache", PromptCache)


def _anthropic_blocks(body: dict[str, Any]) -> list[Any]:
    """Tools, system blocks, then message content blocks, in Anthropic's cache order."""
    out: list[Any] = list(body.get("tools") or ())
    system = body.get("system")
    if isinstance(system, list):
        out.extend(system)
    elif isinstance(system, str):
        out.append({"type": "text", "text": system})
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            out.extend(content)
        elif isinstance(content, str):
            out.append({"type": "text", "text": content})
    return out


def anthropic_searches(body: dict[str, Any]) -> int:
    """One web search when the request enables Anthropic's web search tool."""
    for tool in body.get("tools") or ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith("web_search_"):
            return 1
    return 0


def responses_searches(body: dict[str, Any]) -> int:
    """One web search when a Responses request enables the hosted web search tool."""
    for tool in body.get("tools") or ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind in ("web_search", "web_search_preview"):
            return 1
    return 0


def echo_tier(body: dict[str, Any]) -> str:
    """The tier an OpenAI answer reports: the one asked for, `default` for none or `auto`."""
    tier = body.get("service_tier")
    return tier if isinstance(tier, str) and tier not in ("auto", "") else "default"


def credential(headers: Any) -> str:
    """The caller's credential as the mock's cache key (x-api-key or bearer)."""
    key = headers.get("x-api-key", "")
    if key:
        return str(key)
    auth = str(headers.get("Authorization", ""))
    return auth[7:].strip() if auth.startswith("Bearer ") else ""
