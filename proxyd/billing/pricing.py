"""Integer pricing: a pushed price compiled once, then per-request cost in integer nanos only.

Pure module: no float ever touches money, no I/O. Rounding rule: the exact rational cost of a
request (tokens x price x discount) is rounded half up to whole nanos ONCE per request; the
balance reservation (`max_cost_nanos`) rounds up instead, so it is never below a real cost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from math import lcm

_DECIMAL = re.compile(r"\d{1,15}(?:\.\d{1,15})?")

# A price is in currency units per million tokens; one unit is 10**9 nanos, so one token at a
# price of P costs P * 10**9 / 10**6 = P * 1000 nanos.
_NANOS_PER_UNIT_PER_TOKEN = Fraction(10**9, 10**6)


@dataclass(frozen=True, slots=True)
class Price:
    """A compiled price: the exact cost of a request is (sum of tokens x numerator) / denominator.

    Each numerator is price x discount x 1000 x denominator, an exact integer, so a request costs
    three integer multiplications, one sum and one division.
    """

    input_num: int
    output_num: int
    cached_num: int
    denominator: int
    # The decimal strings it came from, for display; never used in arithmetic.
    input: str
    output: str
    cached_input: str | None
    discount: str


def parse_decimal(value: object, field: str) -> Fraction:
    """A non-negative decimal string such as "2.50" as a Fraction; ValueError names `field`."""
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise ValueError(f"{field}: must be a non-negative decimal string such as '2.50'")
    return Fraction(value)


def compile_price(
    input: str,
    output: str,
    cached_input: str | None,
    discount: str,
) -> Price:
    """Compile a pushed price and the table-wide discount into integer numerators (push time)."""
    rates = {
        "input": parse_decimal(input, "input"),
        "output": parse_decimal(output, "output"),
    }
    if cached_input is not None:
        rates["cached_input"] = parse_decimal(cached_input, "cached_input")
    factor = parse_decimal(discount, "discount") * _NANOS_PER_UNIT_PER_TOKEN
    scaled = {name: rate * factor for name, rate in rates.items()}
    denominator = lcm(*(s.denominator for s in scaled.values()))
    nums = {name: s.numerator * (denominator // s.denominator) for name, s in scaled.items()}
    return Price(
        input_num=nums["input"],
        output_num=nums["output"],
        cached_num=nums.get("cached_input", nums["input"]),
        denominator=denominator,
        input=input,
        output=output,
        cached_input=cached_input,
        discount=discount,
    )


def _exact_numerator(price: Price, prompt: int, completion: int, cached: int) -> int:
    prompt = max(prompt, 0)
    completion = max(completion, 0)
    cached = min(max(cached, 0), prompt)
    return (
        (prompt - cached) * price.input_num
        + cached * price.cached_num
        + completion * price.output_num
    )


def cost_nanos(
    price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> int:
    """Cost of one request in nanos, rounded half up once.

    Cached tokens are part of `prompt_tokens` and are billed at `cached_input` when the price has
    one (at `input` otherwise). Negative counts count as zero; cached is capped at prompt.
    """
    num = _exact_numerator(price, prompt_tokens, completion_tokens, cached_tokens)
    den = price.denominator
    return (2 * num + den) // (2 * den)


def max_cost_nanos(price: Price, prompt_tokens_estimate: int, max_completion_tokens: int) -> int:
    """Upper bound of a request's cost for balance reservation, rounded up.

    Every prompt token is taken at the dearer of `input` and `cached_input`, so the bound holds
    whatever part of the prompt the provider later reports as cached.
    """
    prompt = max(prompt_tokens_estimate, 0)
    completion = max(max_completion_tokens, 0)
    num = prompt * max(price.input_num, price.cached_num) + completion * price.output_num
    return -(-num // price.denominator)
