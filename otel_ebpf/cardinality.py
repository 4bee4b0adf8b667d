"""A hard cap on each metric's series, as the OpenTelemetry SDKs' cardinality limit.

Up to `limit` series of a metric get a series of their own (the SDK's default is 2000);
once a metric holds that many, the deltas of any further series fold into the metric's
one overflow series, whose attributes are `otel.metric.overflow=true` (the SDKs' name).
The overflow series sums counts and merges histograms, so totals across a metric's series
stay exact. It belongs to no workload: it is exported on the host's resource.

Admission is stable: a series admitted keeps its own series while it lives (until the
store forgets it), and a series folded keeps folding while its workload lives, so the set
of series below the cap does not churn with every export; slots freed by gone workloads
go to new series only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from otel_ebpf.model import AttributeValue, Workload

if TYPE_CHECKING:
    from otel_ebpf.aggregate import SeriesKey

# pid -2: no process, no container; identity gives it the host's resource (host, cloud
# and configured attributes), like the system-wide series
OVERFLOW = Workload(pid=-2)
OVERFLOW_ATTRIBUTES: dict[str, AttributeValue] = {"otel.metric.overflow": True}


@dataclass(slots=True)
class _Folded:
    workload: Workload
    updated_ns: int


class SeriesLimit:
    """Decides which new series get one of their own; counts what folds into overflow.

    The store tells it when a series of its own starts (`admit`) and stops being exported
    (`release`); it remembers folded series (at most `max_tracked`; past that, a folded
    series may later be admitted, with its earlier counts staying in the overflow)."""

    def __init__(self, limit: int = 2000, per_metric: Mapping[str, int] | None = None,
                 max_tracked: int = 100_000) -> None:
        self.default = limit
        self.per_metric = dict(per_metric or {})
        self.max_tracked = max_tracked
        self._live: Counter[str] = Counter()  # metric -> series of their own, exported
        self._folded: dict[SeriesKey, _Folded] = {}
        self._overflowed: Counter[str] = Counter()  # metric -> deltas folded, untaken

    def limit(self, metric: str) -> int:
        return self.per_metric.get(metric, self.default)

    def live(self, metric: str) -> int:
        return self._live[metric]

    def folded(self, key: SeriesKey) -> bool:
        return key in self._folded

    def admit(self, key: SeriesKey, workload: Workload, now_ns: int) -> bool:
        """A delta for a series with no exported series of its own (new, or retired by
        the store): True gives it one, False folds the delta into the overflow series."""
        metric = key[0]
        folded = self._folded.get(key)
        if folded is None and self._live[metric] < self.limit(metric):
            self._live[metric] += 1
            return True
        if folded is not None:
            folded.updated_ns = now_ns
        elif len(self._folded) < self.max_tracked:
            self._folded[key] = _Folded(workload, now_ns)
        self._overflowed[metric] += 1
        return False

    def release(self, metric: str) -> None:
        """An admitted series is exported no more (retired or forgotten)."""
        self._live[metric] -= 1
        if self._live[metric] <= 0:
            del self._live[metric]

    def expire(self, alive: Callable[[Workload], bool], updated_by_ns: int | None) -> None:
        """Forget the folded series for which `alive` is false and that no delta changed
        since `updated_by_ns` (None: at once); a later delta for one of them is a new
        series."""
        gone = [key for key, f in self._folded.items()
                if (updated_by_ns is None or f.updated_ns <= updated_by_ns)
                and not alive(f.workload)]
        for key in gone:
            del self._folded[key]

    def take_overflowed(self) -> dict[str, int]:
        """metric -> deltas folded into its overflow series since the previous call."""
        taken = dict(self._overflowed)
        self._overflowed.clear()
        return taken

    def folded_series(self) -> Counter[str]:
        """metric -> series currently folded into its overflow series."""
        return Counter(key[0] for key in self._folded)
