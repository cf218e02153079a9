"""Reasoning across protocols: Anthropic `thinking` <-> OpenAI `reasoning_effort`, and the
signature given to thinking translated from an OpenAI-style provider's `reasoning_content`.

Pure module: tables and small functions, no I/O.

Budget mapping (documented in README "Reasoning across protocols"):
- Anthropic -> OpenAI: `thinking.budget_tokens` below 4,096 is `low`, below 16,384 `medium`,
  from 16,384 `high`; adaptive thinking takes `output_config.effort` (`max` is `high`), else
  `medium`. `output_config.effort` alone maps the same way.
- OpenAI -> Anthropic: `minimal` 1,024 budget tokens, `low` 4,096, `medium` 12,288, `high`
  32,768, `none` no thinking; the budget is capped below the request's `max_tokens` (both
  protocols count reasoning within that cap), and a cap that leaves less than Anthropic's
  minimum of 1,024 is a 400 naming `reasoning_effort`.
"""

from __future__ import annotations

from typing import Any

from proxyd.errors import InvalidRequest

# Thinking that came from an OpenAI-style provider has no Anthropic signature. Clients keep the
# field and send it back; proxyd drops thinking of earlier turns before an OpenAI-style
# provider (DeepSeek refuses reasoning_content in its input), so it never has to be verified.
TRANSLATED_SIGNATURE = "proxyd-translated-reasoning"

MIN_BUDGET = 1024
_BUDGETS = {"minimal": 1024, "low": 4096, "medium": 12288, "high": 32768}
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high", "minimal": "minimal"}


def effort_for_thinking(thinking: Any, output_config: Any) -> str | None:
    """The `reasoning_effort` for an Anthropic request's thinking settings (None: none)."""
    config_effort = output_config.get("effort") if isinstance(output_config, dict) else None
    mapped = _EFFORTS.get(config_effort) if isinstance(config_effort, str) else None
    if config_effort is not None and mapped is None:
        raise InvalidRequest(
            f"output_config.effort '{config_effort}' has no reasoning_effort equivalent.",
            param="output_config.effort",
        )
    if not isinstance(thinking, dict) or thinking.get("type") in (None, "disabled"):
        return mapped
    kind = thinking.get("type")
    if kind == "adaptive":
        return mapped or "medium"
    if kind != "enabled":
        raise InvalidRequest(f"thinking.type '{kind}' is not supported.", param="thinking.type")
    budget = thinking.get("budget_tokens")
    if type(budget) is not int or budget < MIN_BUDGET:
        raise InvalidRequest(
            "thinking.budget_tokens must be an integer of at least 1024.",
            param="thinking.budget_tokens",
        )
    if mapped is not None:
        return mapped
    return "low" if budget < 4096 else "medium" if budget < 16384 else "high"


def thinking_for_effort(effort: Any, max_tokens: int) -> dict[str, Any] | None:
    """Anthropic `thinking` for an OpenAI `reasoning_effort` (None for `none`)."""
    if effort == "none":
        return None
    budget = _BUDGETS.get(effort) if isinstance(effort, str) else None
    if budget is None:
        raise InvalidRequest(
            f"reasoning_effort must be one of none, {', '.join(_BUDGETS)}.",
            param="reasoning_effort",
        )
    budget = min(budget, max_tokens - 1)
    if budget < MIN_BUDGET:
        raise InvalidRequest(
            f"reasoning_effort needs a token limit above {MIN_BUDGET} on this model's provider "
            "(it counts reasoning within the limit).",
            param="reasoning_effort",
        )
    return {"type": "enabled", "budget_tokens": budget}
