"""One scrape for many worker processes: each process's samples, and their sum rendered once.

Pure module (no I/O). Counters and histograms are summed; gauges follow `GAUGE_AGGREGATION`
(sum unless named there); the process collector's series keep one `worker` label per process,
a label bounded by the number of workers. The hot path is untouched: a process snapshots its
own registry only when a scrape asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

Family = dict[str, Any]  # {"n": name, "t": type, "h": help, "u": unit, "s": [[name, labels, v]]}

# How a gauge of several workers becomes one number; gauges not named here are summed.
GAUGE_AGGREGATION: dict[str, str] = {
    "proxyd_ready": "min",  # ready only when every worker is
    "proxyd_state_version": "min",  # the version every worker has applied
    "proxyd_state_keys": "min",
    "proxyd_channel_healthy": "min",
    "proxyd_channel_cooldown_remaining_seconds": "max",
    "proxyd_redis_fallback": "max",  # 1 when any worker is on its local fallback
    "proxyd_build_info": "max",
    "proxyd_workers": "max",
}
PER_WORKER_PREFIX = "proxyd_process_"  # CPU, memory, fds: per process, labelled `worker`


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """This process's families as plain data (sent to the scraped worker)."""
    out: list[Family] = []
    for metric in registry.collect():
        samples = [
            [s.name, s.labels, None if math.isnan(s.value) else s.value] for s in metric.samples
        ]
        out.append(
            {
                "n": metric.name,
                "t": metric.type,
                "h": metric.documentation,
                "u": metric.unit,
                "s": samples,
            }
        )
    return out


def _combine(how: str, old: float, new: float) -> float:
    if math.isnan(old):
        return new
    if how == "min":
        return min(old, new)
    if how == "max":
        return max(old, new)
    return old + new


def merge(parts: Sequence[tuple[str, Sequence[Family]]]) -> list[Metric]:
    """The families of every `(worker name, families)` part, aggregated into one exposition."""
    heads: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, families in parts:
        for fam in families:
            name = fam["n"]
            heads.setdefault(name, fam)
            series = values.setdefault(name, {})
            per_worker = name.startswith(PER_WORKER_PREFIX)
            how = "sum"
            if fam["t"] == "gauge":
                how = GAUGE_AGGREGATION.get(name, "sum")
            for sample_name, labels, value in fam["s"]:
                v = math.nan if value is None else float(value)
                if per_worker:
                    labels = {**labels, "worker": worker}
                sample_how = "min" if sample_name.endswith("_created") else how
                key = (sample_name, tuple(sorted(labels.items())))
                old = series.get(key)
                series[key] = v if old is None else _combine(sample_how, old, v)
    out: list[Metric] = []
    for name, fam in heads.items():
        metric = Metric(name, fam["h"], fam["t"], fam["u"])
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        out.append(metric)
    return out


class _Fixed:
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def render(metrics: Iterable[Metric]) -> bytes:
    """The Prometheus text exposition of already merged families."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry)
