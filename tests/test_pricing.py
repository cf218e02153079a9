"""Integer pricing: exact against a Fraction reference, discount once, documented rounding."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.billing.pricing import Price, compile_price, cost_nanos, max_cost_nanos

decimals = st.decimals(
    min_value=Decimal(0), max_value=Decimal(1000), places=6, allow_nan=False, allow_infinity=False
).map(lambda d: f"{d:f}")
discounts = st.decimals(
    min_value=Decimal(0), max_value=Decimal(2), places=4, allow_nan=False, allow_infinity=False
).map(lambda d: f"{d:f}")
tokens = st.integers(min_value=0, max_value=10_000_000)


def reference(inp: str, out: str, cached: str | None, disc: str, p: int, c: int, k: int) -> int:
    """The exact cost as a Fraction, rounded half up once."""
    k = min(k, p)
    per_token = Fraction(10**9, 10**6)
    rate_cached = Fraction(cached) if cached is not None else Fraction(inp)
    exact = (
        (Fraction(inp) * (p - k) + rate_cached * k + Fraction(out) * c) * per_token * Fraction(disc)
    )
    return int((exact + Fraction(1, 2)) // 1)


def test_known_price() -> None:
    """$2.50 in / $10 out per million at 0.8: 1000 + 500 tokens cost 6,000,000 nanos."""
    price = compile_price("2.50", "10", None, "0.8")
    assert cost_nanos(price, 1000, 500) == 2_000_000 + 4_000_000


def test_cached_tokens_billed_at_cached_rate() -> None:
    """Cached tokens are part of the prompt and billed at cached_input."""
    price = compile_price("2", "8", "0.5", "1")
    assert cost_nanos(price, 1000, 0, 400) == 600 * 2000 + 400 * 500
    # without a cached price they cost the input rate
    assert cost_nanos(compile_price("2", "8", None, "1"), 1000, 0, 400) == 1000 * 2000


def test_rounding_is_half_up_once_per_request() -> None:
    """A third of a nano per token adds up before rounding, and .5 rounds up."""
    price = compile_price("0.000001", "0", None, "0.333333")  # 0.000333333 nanos per token
    assert cost_nanos(price, 1, 0) == 0
    assert cost_nanos(price, 3000, 0) == 1  # 0.999999 -> 1
    half = compile_price("0.0005", "0", None, "1")  # 0.5 nanos per token
    assert cost_nanos(half, 1, 0) == 1
    assert cost_nanos(half, 3, 0) == 2  # 1.5 -> 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("-1", "1", None, "1"), "input"),
        (("1", "NaN", None, "1"), "output"),
        (("1", "1", "1e3", "1"), "cached_input"),
        (("1", "1", None, "abc"), "discount"),
        (("1", "1", None, ""), "discount"),
        (("inf", "1", None, "1"), "input"),
        ((1.5, "1", None, "1"), "input"),
    ],
)
def test_garbage_is_refused_naming_the_field(args: tuple[object, ...], field: str) -> None:
    """Negative, NaN, exponent, float or garbage values raise ValueError naming the field."""
    with pytest.raises(ValueError, match=f"^{field}:"):
        compile_price(*args)  # type: ignore[arg-type]


def test_price_holds_no_float() -> None:
    """Every arithmetic field of a compiled price is an int."""
    price = compile_price("0.15", "0.60", "0.075", "0.85")
    for name in ("input_num", "output_num", "cached_num", "denominator"):
        assert type(getattr(price, name)) is int


@given(decimals, decimals, st.none() | decimals, discounts, tokens, tokens, tokens)
def test_exact_against_fraction_reference(
    inp: str, out: str, cached: str | None, disc: str, p: int, c: int, k: int
) -> None:
    """cost_nanos equals the exact rational cost rounded half up once."""
    price = compile_price(inp, out, cached, disc)
    assert cost_nanos(price, p, c, k) == reference(inp, out, cached, disc, p, c, k)


@given(decimals, decimals, st.none() | decimals, discounts, tokens, tokens, tokens, tokens)
def test_monotonic_in_tokens(
    inp: str, out: str, cached: str | None, disc: str, p: int, c: int, k: int, extra: int
) -> None:
    """More prompt or completion tokens never cost less."""
    price = compile_price(inp, out, cached, disc)
    base = cost_nanos(price, p, c, k)
    assert cost_nanos(price, p + extra, c, k) >= base
    assert cost_nanos(price, p, c + extra, k) >= base


@given(decimals, decimals, st.none() | decimals, discounts, tokens, tokens)
def test_discount_applied_once(
    inp: str, out: str, cached: str | None, disc: str, p: int, c: int
) -> None:
    """The discounted cost is the undiscounted exact cost times the discount, rounded once."""
    full = compile_price(inp, out, cached, "1")
    disc_price = compile_price(inp, out, cached, disc)
    exact_full = Fraction(_num(full, p, c), full.denominator)
    assert cost_nanos(disc_price, p, c) == int((exact_full * Fraction(disc) + Fraction(1, 2)) // 1)


def _num(price: Price, p: int, c: int) -> int:
    return p * price.input_num + c * price.output_num


@given(decimals, decimals, st.none() | decimals, discounts, tokens, tokens, tokens)
def test_reservation_covers_any_real_cost(
    inp: str, out: str, cached: str | None, disc: str, p: int, c: int, k: int
) -> None:
    """max_cost_nanos is never below the cost of a request within its bounds."""
    price = compile_price(inp, out, cached, disc)
    assert max_cost_nanos(price, p, c) >= cost_nanos(price, p, c, k)
