"""Integer pricing: every category exact against a Fraction reference, rounding, reservation."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.billing.pricing import (
    Price,
    compile_price,
    cost_nanos,
    fallback_tokens,
    max_cost_nanos,
)
from proxyd.protocol.usage import Usage

decimals = st.decimals(
    min_value=Decimal(0), max_value=Decimal(1000), places=6, allow_nan=False, allow_infinity=False
).map(lambda d: f"{d:f}")
discounts = st.decimals(
    min_value=Decimal(0), max_value=Decimal(2), places=4, allow_nan=False, allow_infinity=False
).map(lambda d: f"{d:f}")
counts = st.integers(min_value=0, max_value=5_000_000)
OPTIONAL: tuple[str, ...] = ("cached_input", "cache_write", "cache_write_1h", "audio_input")
OPTIONAL += ("audio_output", "image_output")


def P(**rates: Any) -> Price:  # noqa: N802 - reads like the Price it builds
    """A price with discount 1."""
    return compile_price(rates, "1")


@st.composite
def prices(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """Any price: base rates, optional categories, long-context levels, tiers, per-call fees."""
    spec: dict[str, Any] = {"input": draw(decimals), "output": draw(decimals)}
    for f in OPTIONAL:
        if draw(st.booleans()):
            spec[f] = draw(decimals)
    if draw(st.booleans()):  # a long-context level no cheaper than the base (else refused)
        n = draw(st.integers(0, 2_000_000))
        bump = draw(st.sampled_from(["0", "1.5", "10"]))
        spec["long_context"] = [
            {"above_prompt_tokens": n}
            | {
                f: f"{Decimal(spec[f]) + Decimal(bump):f}"
                for f in ("input", "output", *OPTIONAL)
                if f in spec
            }
        ]
    if draw(st.booleans()):
        spec["tiers"] = {"priority": {"input": draw(decimals), "output": draw(decimals)}}
    if draw(st.booleans()):
        spec["per_call"] = {"web_search": draw(decimals)}
    return spec, draw(discounts)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    """Any usage: disjoint category counts summed into the whole prompt and completion."""
    plain, read, w5, w1h, ain = (draw(counts) for _ in range(5))
    text, aout, img = (draw(counts) for _ in range(3))
    return Usage(
        plain + read + w5 + w1h + ain,
        text + aout + img,
        read,
        0,
        cache_write_tokens=w5 + w1h,
        cache_write_1h_tokens=w1h,
        audio_input_tokens=ain,
        audio_output_tokens=aout,
        image_output_tokens=img,
        service_tier=draw(st.sampled_from([None, "priority", "flex"])),
        tool_calls={"web_search": draw(st.integers(0, 20))},
    )


def reference(spec: dict[str, Any], disc: str, u: Usage) -> int:
    """The exact cost by the README's rule, as a Fraction, rounded half up once."""
    layers = dict(spec)
    lcs = spec.get("long_context") or []
    tier = (spec.get("tiers") or {}).get(u.service_tier) if u.service_tier else None
    own = {k: v for k, v in tier.items() if k != "long_context"} if tier is not None else {}
    if tier is not None and "long_context" in tier:
        layers |= own
        lcs, own = tier["long_context"], {}
    for entry in sorted(lcs, key=lambda e: e["above_prompt_tokens"]):
        if u.prompt_tokens > entry["above_prompt_tokens"]:
            layers |= {k: v for k, v in entry.items() if k != "above_prompt_tokens"}
    layers |= own  # a tier using the base's levels: its own rates win at each

    def rate(f: str) -> Fraction:
        chain = {
            "cached_input": "input",
            "cache_write": "input",
            "cache_write_1h": "cache_write",
            "audio_input": "input",
            "audio_output": "output",
            "image_output": "output",
        }
        while f not in layers:
            f = chain[f]
        return Fraction(layers[f])

    w5 = u.cache_write_tokens - u.cache_write_1h_tokens
    plain = u.prompt_tokens - u.cached_tokens - u.cache_write_tokens - u.audio_input_tokens
    text = u.completion_tokens - u.audio_output_tokens - u.image_output_tokens
    per_m = (
        plain * rate("input")
        + u.cached_tokens * rate("cached_input")
        + w5 * rate("cache_write")
        + u.cache_write_1h_tokens * rate("cache_write_1h")
        + u.audio_input_tokens * rate("audio_input")
        + text * rate("output")
        + u.audio_output_tokens * rate("audio_output")
        + u.image_output_tokens * rate("image_output")
    )
    calls = sum(
        n * Fraction((spec.get("per_call") or {}).get(t, 0)) for t, n in u.tool_calls.items()
    )
    exact = (per_m * Fraction(1000) + calls * 10**9) * Fraction(disc)
    return int((exact + Fraction(1, 2)) // 1)


def test_claude_code_turn_by_hand() -> None:
    """95k cache reads, 4k 1-hour writes, 1k input, 1k output at Sonnet rates: $0.0705."""
    price = P(input="3", output="15", cached_input="0.30", cache_write="3.75", cache_write_1h="6")
    u = Usage(100_000, 1_000, 95_000, cache_write_tokens=4_000, cache_write_1h_tokens=4_000)
    # 95,000 x 0.30 + 4,000 x 6 + 1,000 x 3 + 1,000 x 15 = 28,500 + 24,000 + 3,000 + 15,000
    # = 70,500 millionths of a unit = 70,500,000 nanos
    assert cost_nanos(price, u) == 70_500_000


def test_five_minute_write_and_defaults() -> None:
    """A 5-minute write is 1.25 x input; without cache_write_1h a 1-hour write costs cache_write."""
    price = P(input="3", output="15", cache_write="3.75")
    u = Usage(2_000, 0, 0, cache_write_tokens=2_000, cache_write_1h_tokens=500)
    assert cost_nanos(price, u) == 2_000 * 3_750
    assert fallback_tokens(price, u) == [("cache_write_1h", 500)]
    bare = P(input="2", output="8")  # every cache rate falls back to input
    assert cost_nanos(bare, Usage(1000, 0, 400, cache_write_tokens=300)) == 1000 * 2000


def test_long_context_prices_the_whole_request() -> None:
    """Past the threshold every token takes the long-context rates; at it, the base rates."""
    price = P(
        input="3",
        output="15",
        long_context=[{"above_prompt_tokens": 200_000, "input": "6", "output": "22.50"}],
    )
    assert cost_nanos(price, Usage(200_000, 1_000)) == 200_000 * 3_000 + 1_000 * 15_000
    assert cost_nanos(price, Usage(200_001, 1_000)) == 200_001 * 6_000 + 1_000 * 22_500


def test_tier_and_per_call_with_discount() -> None:
    """A priority answer takes the tier's rates; two web searches at $0.01, all at 0.8."""
    price = compile_price(
        {
            "input": "2",
            "output": "8",
            "tiers": {"priority": {"input": "3.5", "output": "14"}},
            "per_call": {"web_search": "0.01"},
        },
        "0.8",
    )
    u = Usage(1_000, 100, service_tier="priority", tool_calls={"web_search": 2})
    # (1,000 x 3.5 + 100 x 14) x 1,000 = 4,900,000; + 2 x 0.01 x 1e9 = 20,000,000; x 0.8
    assert cost_nanos(price, u) == (4_900_000 + 20_000_000) * 8 // 10


def test_rounding_is_half_up_once_per_request() -> None:
    """A third of a nano per token adds up before rounding, and .5 rounds up."""
    price = compile_price({"input": "0.000001", "output": "0"}, "0.333333")
    assert cost_nanos(price, Usage(1, 0)) == 0
    assert cost_nanos(price, Usage(3000, 0)) == 1  # 0.999999 -> 1
    half = P(input="0.0005", output="0")  # 0.5 nanos per token
    assert cost_nanos(half, Usage(1, 0)) == 1
    assert cost_nanos(half, Usage(3, 0)) == 2  # 1.5 -> 2


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"input": "-1", "output": "1"}, "input"),
        ({"input": "1", "output": "NaN"}, "output"),
        ({"input": "1", "output": "1", "cached_input": "1e3"}, "cached_input"),
        ({"input": 1.5, "output": "1"}, "input"),
        ({"input": "1", "output": "1", "per_call": {"web_search": "x"}}, r"per_call\.web_search"),
        ({"input": "1", "output": "1", "tiers": {"flex": {"input": "-"}}}, r"tiers\.flex\.input"),
        (
            {
                "input": "2",
                "output": "1",
                "long_context": [{"above_prompt_tokens": 5, "input": "1"}],
            },
            r"long_context\[0\]\.input",
        ),
    ],
)
def test_garbage_is_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    """Bad values and a long-context level cheaper than the base raise ValueError naming it."""
    with pytest.raises(ValueError, match=f"^{field}"):
        compile_price(spec, "1")


def test_discount_garbage_is_refused() -> None:
    """A discount that is not a decimal string is refused, naming discount."""
    with pytest.raises(ValueError, match=r"^discount"):
        compile_price({"input": "1", "output": "1"}, "abc")


@given(prices())
def test_price_holds_no_float(priced: tuple[dict[str, Any], str]) -> None:
    """Every number of a compiled price is an int: no float ever reaches money."""
    price = compile_price(*priced)
    assert type(price.denominator) is int
    for levels in (price.base, *price.tiers.values()):
        for n, rates in levels:
            assert type(n) is int
            for f in (
                "input",
                "output",
                "cached_input",
                "cache_write",
                "cache_write_1h",
                "audio_input",
                "audio_output",
                "image_output",
                "prompt_max",
            ):
                assert type(getattr(rates, f)) is int
    assert all(type(v) is int for v in price.per_call.values())


@given(prices(), usages())
def test_exact_against_fraction_reference(priced: tuple[dict[str, Any], str], u: Usage) -> None:
    """cost_nanos equals the exact rational cost of every category, rounded half up once."""
    price = compile_price(*priced)
    cost = cost_nanos(price, u)
    assert type(cost) is int
    assert cost == reference(*priced, u)


@given(prices(), usages(), st.sampled_from(range(9)), st.integers(1, 1_000_000))
def test_monotone_in_every_count(
    priced: tuple[dict[str, Any], str], u: Usage, which: int, extra: int
) -> None:
    """One more token of any category (or one more paid call) never costs less."""
    price = compile_price(*priced)
    more = Usage(**{f: getattr(u, f) for f in Usage.__dataclass_fields__})
    more.tool_calls = dict(u.tool_calls)
    if which == 0:  # plain input
        more.prompt_tokens += extra
    elif which == 1:  # cache read
        more.prompt_tokens += extra
        more.cached_tokens += extra
    elif which == 2:  # 5-minute write
        more.prompt_tokens += extra
        more.cache_write_tokens += extra
    elif which == 3:  # 1-hour write
        more.prompt_tokens += extra
        more.cache_write_tokens += extra
        more.cache_write_1h_tokens += extra
    elif which == 4:  # audio input
        more.prompt_tokens += extra
        more.audio_input_tokens += extra
    elif which == 5:  # text output
        more.completion_tokens += extra
    elif which == 6:  # audio output
        more.completion_tokens += extra
        more.audio_output_tokens += extra
    elif which == 7:  # image output
        more.completion_tokens += extra
        more.image_output_tokens += extra
    else:
        more.tool_calls["web_search"] = more.tool_calls.get("web_search", 0) + 1
    assert cost_nanos(price, more) >= cost_nanos(price, u)


@given(prices(), usages(), st.integers(0, 1_000_000), st.integers(0, 1_000_000))
def test_reservation_covers_any_bounded_cost(
    priced: tuple[dict[str, Any], str], u: Usage, spare_prompt: int, spare_out: int
) -> None:
    """The reservation for a request's bounds and tier is never below the cost inside them."""
    price = compile_price(*priced)
    tier = u.service_tier if u.service_tier in price.tiers else None
    u.service_tier = tier
    reserved = max_cost_nanos(
        price,
        u.prompt_tokens + spare_prompt,
        u.completion_tokens + spare_out,
        tier=tier,
        tool_calls={"web_search": u.tool_calls.get("web_search", 0)},
    )
    assert reserved >= cost_nanos(price, u)
