"""Counters and histograms kept as plain numbers per label tuple, rendered at scrape time.

prometheus_client's own objects take a lock per increment and walk a histogram's buckets in
Python; a request bumps about ten of them. Here a bump is an attribute add and an observation a
bisect, which is safe because every update and every scrape runs on the one event-loop thread.
Never called per streamed chunk; labels are whatever the caller bounded them to.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# The `le` text prometheus_client writes for a bound (its helper carries no annotations).
_le_text: Callable[[float], str] = floatToGoString


class Cell:
    """One counter series: `value` only ever grows."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class BucketCell:
    """One histogram series: a count per bucket (not cumulative; +Inf last) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose upper bound is at least `value`."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


C = TypeVar("C", Cell, BucketCell)


class _Family(Generic[C]):
    """A metric family: its name, help and label names, and one cell per label tuple."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], make: Callable[[], C]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self._make: Callable[[], C] = make
        self._cells: dict[tuple[str, ...], C] = {}

    def cell(self, *labelvalues: str) -> C:
        """The series for these label values, made on first use; keep it to update it cheaply."""
        if len(labelvalues) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {labelvalues}")
        cell = self._cells.get(labelvalues)
        if cell is None:
            cell = self._cells[labelvalues] = self._make()
        return cell

    def _series(self) -> list[tuple[tuple[str, ...], C]]:
        return list(self._cells.items())


class CounterTally(_Family[Cell]):
    """A counter family (`name` ends in `_total`); register it on a CollectorRegistry."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end with '_total'")
        super().__init__(name, documentation, labels, Cell)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labelvalues, cell in self._series():
            family.add_metric(labelvalues, cell.value)
        yield family


class HistogramTally(_Family[BucketCell]):
    """A histogram family with fixed bucket bounds; register it on a CollectorRegistry."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct and increasing")
        super().__init__(name, documentation, labels, lambda: BucketCell(bounds))
        self._le = [*(_le_text(b) for b in bounds), "+Inf"]

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labelvalues, cell in self._series():
            running, buckets = 0, []
            for le, count in zip(self._le, cell.counts, strict=True):
                running += count
                buckets.append((le, float(running)))
            family.add_metric(labelvalues, buckets, cell.sum)
        yield family
