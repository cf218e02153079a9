"""Plain-number counters and histograms render exactly what prometheus_client's own would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxyd.observability.metrics import LATENCY_BUCKETS
from proxyd.observability.tally import CounterTally, HistogramTally


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if not s.name.endswith("_created")
    }


observations = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.one_of(
            st.floats(min_value=0, max_value=1000, allow_nan=False),
            st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: the bound is inclusive
        ),
    ),
    max_size=60,
)


@given(observations)
def test_histogram_matches_prometheus_client(values: list[tuple[str, float]]) -> None:
    """Buckets (cumulative, `le` inclusive, +Inf), count and sum equal prometheus_client's."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = HistogramTally("x_seconds", "x", ("model",), LATENCY_BUCKETS)
    ours.register(tally)
    reference = Histogram("x_seconds", "x", ("model",), buckets=LATENCY_BUCKETS, registry=theirs)
    for label, value in values:
        tally.cell(label).observe(value)
        reference.labels(label).observe(value)
    got, want = _samples(ours), _samples(theirs)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name


@given(st.lists(st.tuples(st.sampled_from(["x", "y", "z"]), st.integers(0, 10**12)), max_size=40))
def test_counter_matches_prometheus_client(bumps: list[tuple[str, int]]) -> None:
    """A counter's series and values equal prometheus_client's for the same increments."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = CounterTally("y_total", "y", ("kind",))
    ours.register(tally)
    reference = Counter("y_total", "y", ("kind",), registry=theirs)
    for label, amount in bumps:
        tally.cell(label).value += amount
        reference.labels(label).inc(amount)
    assert _samples(ours) == _samples(theirs)


def test_a_series_is_made_once_and_labels_are_checked() -> None:
    """The same label values give the same cell; a wrong label count is refused."""
    tally = CounterTally("z_total", "z", ("a", "b"))
    assert tally.cell("1", "2") is tally.cell("1", "2")
    with pytest.raises(ValueError, match="takes labels"):
        tally.cell("1")
    with pytest.raises(ValueError, match="_total"):
        CounterTally("z", "z", ())
    with pytest.raises(ValueError, match="increasing"):
        HistogramTally("h", "h", (), (1.0, 0.5))


def test_duplicate_names_are_refused_by_the_registry() -> None:
    """A tally declares its name, so the registry refuses a second metric of that name."""
    registry = CollectorRegistry()
    registry.register(CounterTally("dup_total", "d", ()))
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("dup_total", "d", registry=registry)
