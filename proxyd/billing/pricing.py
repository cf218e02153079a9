"""Integer pricing: a pushed price compiled once, then per-request cost in integer nanos only.

Pure module: no float ever touches money, no I/O. The rule, once for every category:

- A price gives decimal currency units per million tokens for `input`, `output`, and optionally
  `cached_input` (cache reads), `cache_write` (5-minute cache writes), `cache_write_1h` (1-hour
  writes), `audio_input`, `audio_output`, `image_output`. A missing rate falls back:
  `cached_input` and `cache_write` to `input`, `cache_write_1h` to `cache_write`, `audio_input`
  to `input`, `audio_output` and `image_output` to `output`. Tokens billed through a fallback are
  counted (per category) so an operator sees an incomplete price table.
- The prompt (`prompt_tokens`, the whole prompt) splits into cache reads, 5-minute writes,
  1-hour writes (the 1-hour part of `cache_write_tokens`), audio input and plain input; the
  completion into audio output, image output and plain (text and reasoning) output. Each part is
  billed at its rate. Cache writes reported without a TTL are 5-minute writes.
- The tier that served the request (as the *response* reports it) picks the price's `tiers`
  entry; fields a tier does not give are the base price's. A tier without its own
  `long_context` uses the base price's list, its own rates winning at every level.
- `long_context`: when the whole prompt has more than `above_prompt_tokens`, every token of the
  request is billed at that entry's rates (the highest threshold passed wins; fields it does not
  give are the tier's, then the base price's). An entry may not be cheaper than the level below.
- `per_call`: each paid server-tool call the provider reports costs its decimal price in currency
  units.
- The table-wide discount multiplies every part, per-call fees included. The exact rational cost
  of a request is rounded half up to whole nanos ONCE per request; the balance reservation
  (`max_cost_nanos`) rounds up instead and takes the dearest reachable rate, so it is never below
  the cost of a request inside its bounds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from math import lcm
from types import MappingProxyType
from typing import Any

from proxyd.errors import InvalidRequest
from proxyd.protocol.paid import Paid
from proxyd.protocol.usage import Usage

_DECIMAL = re.compile(r"\d{1,15}(?:\.\d{1,15})?")

# A price is in currency units per million tokens; one unit is 10**9 nanos, so one token at a
# price of P costs P * 10**9 / 10**6 = P * 1000 nanos.
_NANOS_PER_UNIT_PER_TOKEN = Fraction(10**9, 10**6)
_NANOS_PER_UNIT = Fraction(10**9)

RATE_FIELDS = (
    "input",
    "output",
    "cached_input",
    "cache_write",
    "cache_write_1h",
    "audio_input",
    "audio_output",
    "image_output",
)
# Resolved in this order, so `cache_write_1h` sees a resolved `cache_write`.
FALLBACKS: tuple[tuple[str, str], ...] = (
    ("cached_input", "input"),
    ("cache_write", "input"),
    ("cache_write_1h", "cache_write"),
    ("audio_input", "input"),
    ("audio_output", "output"),
    ("image_output", "output"),
)
_PROMPT_FIELDS = ("input", "cached_input", "cache_write", "cache_write_1h", "audio_input")
_COMPLETION_FIELDS = ("output", "audio_output", "image_output")


@dataclass(frozen=True, slots=True)
class Rates:
    """One level's integer numerators per token (shared denominator on the Price)."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    audio_input: int
    audio_output: int
    image_output: int
    fallback: frozenset[str]  # rate fields this level bills through a fallback
    prompt_max: int  # the dearest rate a prompt token can have at this level
    completion_max: int  # the dearest rate a completion token can have


# (above_prompt_tokens, rates), ascending; the first entry is the level with no threshold (-1).
Levels = tuple[tuple[int, Rates], ...]


@dataclass(frozen=True, slots=True)
class Price:
    """A compiled price: cost = (sum of count x numerator) / denominator, rounded half up."""

    base: Levels
    tiers: Mapping[str, Levels]
    per_call: Mapping[str, int]
    denominator: int
    discount: str

    @property
    def input_num(self) -> int:
        """The base input numerator (display and tests)."""
        return self.base[0][1].input


def parse_decimal(value: object, field: str) -> Fraction:
    """A non-negative decimal string such as "2.50" as a Fraction; ValueError names `field`."""
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise ValueError(f"{field}: must be a non-negative decimal string such as '2.50'")
    return Fraction(value)


def _given(spec: Mapping[str, Any], where: str) -> dict[str, Fraction]:
    return {
        f: parse_decimal(spec[f], f"{where}{f}") for f in RATE_FIELDS if spec.get(f) is not None
    }


def _resolve(given: Mapping[str, Fraction]) -> tuple[dict[str, Fraction], frozenset[str]]:
    out = dict(given)
    fallback = set()
    for name, source in FALLBACKS:
        if name not in out:
            out[name] = out[source]
            fallback.add(name)
    return out, frozenset(fallback)


def _levels(
    layers: Mapping[str, Fraction],
    long_context: object,
    where: str,
    over: Mapping[str, Fraction] | None = None,
) -> list[tuple[int, dict[str, Fraction], frozenset[str]]]:
    """Each level's resolved rates: `layers`, then an entry's fields, then `over`'s."""
    over = over or {}
    base, fb = _resolve({**layers, **over})
    out = [(-1, base, fb)]
    if long_context is None:
        return out
    if not isinstance(long_context, list | tuple):
        raise ValueError(f"{where}long_context: must be a list")  # noqa: TRY004 - the store reports ValueError as 400
    entries = []
    for i, entry in enumerate(long_context):
        at = f"{where}long_context[{i}]."
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at[:-1]}: must be an object")  # noqa: TRY004 - the store reports ValueError as 400
        n = entry.get("above_prompt_tokens")
        if type(n) is not int or n < 0:
            raise ValueError(f"{at}above_prompt_tokens: must be a non-negative integer")
        entries.append((n, _given(entry, at), at))
    entries.sort(key=lambda e: e[0])
    for n, given, at in entries:
        if n == out[-1][0]:
            raise ValueError(f"{at}above_prompt_tokens: {n} appears twice")
        rates, fb = _resolve({**layers, **given, **over})
        below = out[-1][1]
        for f in RATE_FIELDS:
            if rates[f] < below[f]:
                raise ValueError(f"{at}{f}: lower than the rate below this threshold")
        out.append((n, rates, fb))
    return out


def compile_price(spec: Mapping[str, Any], discount: str) -> Price:
    """Compile a pushed price (a Price object as a dict) and the discount (push time).

    ValueError names the offending field.
    """
    factor = parse_decimal(discount, "discount")
    base_given = _given(spec, "")
    for required in ("input", "output"):
        if required not in base_given:
            raise ValueError(f"{required}: required")
    base_lc = spec.get("long_context")
    raw: dict[str | None, list[tuple[int, dict[str, Fraction], frozenset[str]]]] = {
        None: _levels(base_given, base_lc, "")
    }
    tiers = spec.get("tiers") or {}
    if not isinstance(tiers, Mapping):
        raise ValueError("tiers: must be an object")  # noqa: TRY004 - the store reports ValueError as 400
    for name, tier in tiers.items():
        if not isinstance(tier, Mapping):
            raise ValueError(f"tiers.{name}: must be an object")  # noqa: TRY004 - the store reports ValueError as 400
        where = f"tiers.{name}."
        tier_given = _given(tier, where)
        lc = tier.get("long_context")
        if lc is None:  # the base price's levels, the tier's own rates winning at each
            raw[str(name)] = _levels(base_given, base_lc, where, tier_given)
        else:
            raw[str(name)] = _levels({**base_given, **tier_given}, lc, where)
    per_call_spec = spec.get("per_call") or {}
    if not isinstance(per_call_spec, Mapping):
        raise ValueError("per_call: must be an object")  # noqa: TRY004 - the store reports ValueError as 400
    per_call = {
        str(t): parse_decimal(v, f"per_call.{t}") * _NANOS_PER_UNIT * factor
        for t, v in per_call_spec.items()
    }
    token_factor = factor * _NANOS_PER_UNIT_PER_TOKEN
    scaled = [
        r * token_factor
        for levels in raw.values()
        for _, rates, _ in levels
        for r in rates.values()
    ]
    denominator = lcm(*(s.denominator for s in [*scaled, *per_call.values()]))

    def num(x: Fraction) -> int:
        return x.numerator * (denominator // x.denominator)

    def compiled(levels: list[tuple[int, dict[str, Fraction], frozenset[str]]]) -> Levels:
        out = []
        for n, rates, fb in levels:
            nums = {f: num(rates[f] * token_factor) for f in RATE_FIELDS}
            out.append(
                (
                    n,
                    Rates(
                        **nums,
                        fallback=fb,
                        prompt_max=max(nums[f] for f in _PROMPT_FIELDS),
                        completion_max=max(nums[f] for f in _COMPLETION_FIELDS),
                    ),
                )
            )
        return tuple(out)

    return Price(
        base=compiled(raw.pop(None)),
        tiers=MappingProxyType({str(k): compiled(v) for k, v in raw.items()}),
        per_call=MappingProxyType({t: num(v) for t, v in per_call.items()}),
        denominator=denominator,
        discount=discount,
    )


def _rates(levels: Levels, prompt: int) -> Rates:
    rates = levels[0][1]
    for n, r in levels[1:]:
        if prompt <= n:
            break
        rates = r
    return rates


@dataclass(slots=True)
class Split:
    """A usage's counts split into disjoint billed parts (what each rate multiplies); made per
    request, so not frozen (a frozen dataclass costs four times as much to make)."""

    input: int
    cached_input: int
    cache_write: int
    cache_write_1h: int
    audio_input: int
    output: int
    audio_output: int
    image_output: int


def split(u: Usage) -> Split:
    """Disjoint parts of a usage; parts are capped so they never exceed the whole."""
    prompt = u.prompt_tokens if u.prompt_tokens > 0 else 0
    cached = min(max(u.cached_tokens, 0), prompt)
    rest = prompt - cached
    write = min(max(u.cache_write_tokens, 0), rest)
    w1h = min(max(u.cache_write_1h_tokens, 0), write)
    rest -= write
    ain = min(max(u.audio_input_tokens, 0), rest)
    comp = u.completion_tokens if u.completion_tokens > 0 else 0
    aout = min(max(u.audio_output_tokens, 0), comp)
    img = min(max(u.image_output_tokens, 0), comp - aout)
    return Split(rest - ain, cached, write - w1h, w1h, ain, comp - aout - img, aout, img)


def levels_for(price: Price, tier: str | None) -> Levels:
    """The levels of the tier that served the request (the base price for none or unknown)."""
    if tier is None:
        return price.base
    return price.tiers.get(tier, price.base)


def cost_numerator(price: Price, u: Usage) -> int:
    """The exact cost of `u` times the price's denominator (hot: plain comparisons, no calls)."""
    prompt = u.prompt_tokens
    if prompt < 0:
        prompt = 0
    tier = u.service_tier
    if (
        tier is None
        and not (
            u.cached_tokens
            or u.cache_write_tokens
            or u.audio_input_tokens
            or u.audio_output_tokens
            or u.image_output_tokens
            or u.tool_calls
        )
        and len(price.base) == 1
    ):  # plain input and output at the base price (most requests): what the rest comes to
        r = price.base[0][1]
        comp = u.completion_tokens
        return prompt * r.input + (comp * r.output if comp > 0 else 0)
    levels = price.base if tier is None else price.tiers.get(tier, price.base)
    r = levels[0][1]
    if len(levels) > 1:  # long-context levels: the highest threshold passed
        for n, level in levels:
            if prompt <= n:
                break
            r = level
    cached = u.cached_tokens
    if cached > prompt:
        cached = prompt
    elif cached < 0:
        cached = 0
    rest = prompt - cached
    write = u.cache_write_tokens
    if write > rest:
        write = rest
    elif write < 0:
        write = 0
    w1h = u.cache_write_1h_tokens
    if w1h > write:
        w1h = write
    elif w1h < 0:
        w1h = 0
    rest -= write
    comp = u.completion_tokens
    if comp < 0:
        comp = 0
    num = (
        rest * r.input
        + cached * r.cached_input
        + (write - w1h) * r.cache_write
        + w1h * r.cache_write_1h
        + comp * r.output
    )
    ain = u.audio_input_tokens
    if ain > 0:
        ain = min(ain, rest)
        num += ain * (r.audio_input - r.input)
    aout = u.audio_output_tokens
    img = u.image_output_tokens
    if aout > 0 or img > 0:
        aout = min(max(aout, 0), comp)
        img = min(max(img, 0), comp - aout)
        num += aout * (r.audio_output - r.output) + img * (r.image_output - r.output)
    calls = u.tool_calls
    if calls:
        per_call = price.per_call
        for tool, n in calls.items():
            if n > 0 and tool in per_call:
                num += n * per_call[tool]
    return num


def cost_nanos(price: Price, u: Usage) -> int:
    """Cost of one request in nanos, rounded half up once."""
    den = price.denominator
    return (2 * cost_numerator(price, u) + den) // (den + den)


def fallback_tokens(price: Price, u: Usage) -> list[tuple[str, int]]:
    """(rate field, tokens) billed through a fallback rate; empty for a complete price."""
    if (
        u.cached_tokens <= 0
        and u.cache_write_tokens <= 0
        and u.audio_input_tokens <= 0
        and u.audio_output_tokens <= 0
        and u.image_output_tokens <= 0
    ):  # plain input and output only (most requests): those rates are never a fallback
        return []
    r = _rates(levels_for(price, u.service_tier), max(u.prompt_tokens, 0))
    if not r.fallback:
        return []
    parts = split(u)
    return [(f, n) for f in sorted(r.fallback) if (n := getattr(parts, f)) > 0]


def max_cost_nanos(
    price: Price,
    prompt_tokens_bound: int,
    max_completion_tokens: int,
    *,
    tier: str | None = None,
    tool_calls: Mapping[str, int] | None = None,
) -> int:
    """Upper bound of a request's cost for balance reservation, rounded up.

    Every prompt token is taken at the dearest prompt rate and every completion token at the
    dearest completion rate of every long-context level the prompt could reach in the requested
    tier; each paid tool at its maximum number of calls.
    """
    prompt = prompt_tokens_bound if prompt_tokens_bound > 0 else 0
    completion = max_completion_tokens if max_completion_tokens > 0 else 0
    pm = cm = 0
    levels = price.base if tier is None else price.tiers.get(tier, price.base)  # levels_for
    for n, r in levels:  # plain comparisons: a max() call costs more than the rest of a level
        if prompt <= n:
            break
        if r.prompt_max > pm:
            pm = r.prompt_max
        if r.completion_max > cm:
            cm = r.completion_max
    num = prompt * pm + completion * cm
    if tool_calls:
        for tool, calls in tool_calls.items():
            num += max(calls, 0) * price.per_call.get(tool, 0)
    return -(-num // price.denominator)


def check_priced(price: Price, paid: Paid) -> None:
    """Refuse (400, naming the field) a tier or paid tool that `price` does not price."""
    if paid.tier is not None and paid.tier not in price.tiers:
        raise InvalidRequest(
            f"{paid.tier_field}: the service tier '{paid.tier}' is not available for this model.",
            param=paid.tier_field,
        )
    for tool, field in paid.tools:
        if tool not in price.per_call:
            raise InvalidRequest(
                f"{field}: the server tool '{tool}' is not available for this model.", param=field
            )
