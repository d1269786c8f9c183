"""The test oracle of vcpud.metrics' text format: the same model rendered through prometheus_client's
public custom-collector classes and ``generate_latest`` (what vcpud once served; now only compared with)."""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)

from vcpud.metrics import Family, Source, model
from vcpud.snapshot import Snapshot


def metric(f: Family) -> Metric:
    """The prometheus_client metric family of one model family."""
    samples = f.all_samples()
    if f.type == "histogram":
        buckets = [(v[0], n) for sfx, v, n in samples if sfx == "_bucket"]
        total = next(n for sfx, _, n in samples if sfx == "_sum")
        return HistogramMetricFamily(f.name, f.help, buckets=buckets, sum_value=total)
    cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "info": InfoMetricFamily}[f.type]
    m = cls(f.name, f.help, labels=f.labels)
    for _, values, value in samples:
        if f.type == "info":
            m.add_metric(values, {})
        else:
            m.add_metric(values, value)
    return m


class SnapshotCollector:
    """A prometheus_client collector over ``source()``, called once per ``collect()``."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return iter([metric(f) for f in model(self.source())])

    def describe(self) -> Iterable[Metric]:
        return ()  # names depend on the snapshot; nothing to check at registration


def render(snapshot: Snapshot | None) -> bytes:
    """The text format (0.0.4) of one snapshot as prometheus_client writes it."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(reg)
