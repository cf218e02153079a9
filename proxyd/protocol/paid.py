"""What a request asks for that costs more than tokens: a service tier and paid server tools.

Pure module: reads the parsed body only. Admission refuses what the model's price lacks and
reserves for what it has; the response, not the request, later says what was actually used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxyd.protocol.usage import STANDARD_TIERS

# Anthropic server tools are typed with a dated version: `web_search_20250305`.
_ANTHROPIC_TOOL_PREFIXES = (("web_search_", "web_search"), ("web_fetch_", "web_fetch"))
# Responses API hosted tools and the `per_call` tool each one is.
_RESPONSES_TOOLS = {
    "web_search": "web_search",
    "web_search_preview": "web_search",
    "image_generation": "image_generation",
    "file_search": "file_search",
}


@dataclass(frozen=True, slots=True)
class Paid:
    """The tier a request asks for (None: standard) and its paid tools, each with its field."""

    tier: str | None = None
    tier_field: str = ""
    tools: tuple[tuple[str, str], ...] = ()  # (per_call tool, the request field enabling it)


NOTHING = Paid()


def paid_features(body: dict[str, Any]) -> Paid:
    """The tier and paid tools a request body asks for, in either wire format."""
    tier: str | None = None
    tier_field = ""
    st = body.get("service_tier")
    if isinstance(st, str) and st not in STANDARD_TIERS:
        tier, tier_field = st, "service_tier"
    if body.get("speed") == "fast":  # Anthropic fast mode
        tier, tier_field = "fast", "speed"
    # most bodies name no tool at all: no generator for them
    tools = tuple(_tools(body)) if "tools" in body or "web_search_options" in body else ()
    if tier is None and not tools:
        return NOTHING
    return Paid(tier, tier_field, tools)


def _tools(body: dict[str, Any]) -> Iterable[tuple[str, str]]:
    seen: set[str] = set()
    if body.get("web_search_options") is not None:  # OpenAI chat search models
        seen.add("web_search")
        yield "web_search", "web_search_options"
    listed = body.get("tools")
    if not isinstance(listed, list):
        return
    for i, tool in enumerate(listed):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            continue
        name = _RESPONSES_TOOLS.get(kind)
        if name is None:
            name = next((t for p, t in _ANTHROPIC_TOOL_PREFIXES if kind.startswith(p)), None)
        if name is not None and name not in seen:
            seen.add(name)
            yield name, f"tools[{i}].type"


def max_calls(body: dict[str, Any], tool: str, default: int) -> int:
    """The most calls of `tool` a request allows: Anthropic's `max_uses`, else `default`."""
    listed = body.get("tools")
    if isinstance(listed, list):
        for entry in listed:
            if not isinstance(entry, dict):
                continue
            kind = entry.get("type")
            uses = entry.get("max_uses")
            if (
                isinstance(kind, str)
                and kind.startswith(f"{tool}_")
                and type(uses) is int
                and 0 < uses <= default
            ):
                return uses
    return default
