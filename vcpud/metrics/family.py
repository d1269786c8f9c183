"""The metric model: :class:`Family` (and its grouped variant for per-CPU info), label-value cleaning,
and the histogram family; the builders fill it and :mod:`.textformat` writes it."""

from __future__ import annotations

from typing import ClassVar

from prometheus_client.utils import floatToGoString

from ..snapshot import HistogramView

Sample = tuple[str, tuple[str, ...], float]


def label(value: str) -> str:
    """A label value that encodes as UTF-8 (a VM name may carry undecodable bytes as surrogates)."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:  # bytes decoded with surrogateescape: show them as \xNN
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


class Family:
    """One metric family.

    ``name`` is the base name (a counter's without ``_total``, an info's without ``_info``),
    ``labels`` the label names in exposition order (sorted, as the text format sorts them), and each
    sample is ``(suffix, label values, value)`` with the sample name ``name + suffix``.
    """

    __slots__ = ("name", "type", "help", "labels", "samples")

    SUFFIX: ClassVar[dict[str, str]] = {"gauge": "", "counter": "_total", "info": "_info"}

    def __init__(self, name: str, type: str, help: str, labels: tuple[str, ...] = ()) -> None:  # noqa: A002
        assert list(labels) == sorted(labels), f"{name}: labels must be in sorted order"
        self.name, self.type, self.help, self.labels = name, type, help, labels
        self.samples: list[Sample] = []

    @property
    def exposed_name(self) -> str:
        """The name in ``# TYPE`` (a counter's with ``_total``, an info's with ``_info``)."""
        return self.name + self.SUFFIX.get(self.type, "")

    def add(self, values: tuple[str, ...], value: float) -> None:
        self.samples.append((self.SUFFIX[self.type], values, value))

    def all_samples(self) -> list[Sample]:
        return self.samples


class CpuInfoFamily(Family):
    """An info family labelled ``cpu`` first, held as groups: ``(label values after cpu, CPU strings)``.

    vcpud_cpu_vm_info has a series for every CPU a VM's threads may run on: a VM floating over a
    32-CPU pool is 32 of them (and 200 such VMs 6,400). Grouped, the text serializer writes each
    group with one ``str.join``; the samples, in this order, are (cpu, *values) per CPU per group.
    """

    __slots__ = ("groups",)

    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:  # noqa: A002
        assert labels[0] == "cpu"
        super().__init__(name, "info", help, labels)
        self.groups: list[tuple[tuple[str, ...], list[str]]] = []

    def all_samples(self) -> list[Sample]:
        return [("_info", (c, *values), 1) for values, cpus in self.groups for c in cpus]


def histogram(name: str, help: str, h: HistogramView) -> Family:  # noqa: A002
    """HistogramView counts are per bucket with +Inf last; Prometheus wants them cumulative."""
    bounds = [floatToGoString(b) for b in h.buckets] + ["+Inf"]
    counts = list(h.counts[: len(bounds)]) + [0] * (len(bounds) - len(h.counts))
    counts[-1] += sum(h.counts[len(bounds):])  # (a malformed view: anything extra is above the last bound)
    f = Family(name, "histogram", help, ("le",))
    total = 0
    for le, n in zip(bounds, counts, strict=True):
        total += n
        f.samples.append(("_bucket", (le,), total))
    f.samples.append(("_count", (), total))
    f.samples.append(("_sum", (), float(h.sum)))
    return f


def gauge(name: str, help: str, value: float) -> Family:  # noqa: A002
    f = Family(name, "gauge", help)
    f.add((), value)
    return f


def counter(name: str, help: str, value: float) -> Family:  # noqa: A002
    f = Family(name, "counter", help)
    f.add((), value)
    return f
