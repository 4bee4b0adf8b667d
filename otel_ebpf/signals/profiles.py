"""The profiles unit: the probes' stack samples merged into windows (one per profile type
the probes declare), and every export interval a window built into an OTLP profiles
request for its delivery, and into the folded file (otel_ebpf.export.profiles).

Samples arrive on the probes' drain threads (merging them is the bulk of their cost);
windows are built on the shared periodic runner's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time

from otel_ebpf.enrich.identity import IdentityResolver
from otel_ebpf.export.profiles import ProfileExport
from otel_ebpf.model import Collection
from otel_ebpf.periodic import Periodic
from otel_ebpf.signals.metrics import AgentCounters

log = logging.getLogger(__name__)


class ProfilesSignal:
    def __init__(self, export: ProfileExport, identity: IdentityResolver, interval: float,
                 counters: AgentCounters) -> None:
        self.export = export
        self._identity = identity
        if export.delivery is not None:
            export.delivery.metrics.sink = counters.add
        self.periodic: Periodic[None] = Periodic("profiles", interval, self._flush)

    def add(self, collection: Collection) -> None:
        """A collection's samples (any thread); a collection without them is ignored."""
        if collection.samples and collection.profile_type is not None:
            self.export.add(collection.samples, collection.period_ns,
                            collection.profile_type)

    def _flush(self) -> None:
        """The windows, built and queued for delivery (and the folded file)."""
        resolve = self._identity.sample_resolver(self.export.workloads())
        self.export.flush(resolve, time.time_ns())

    async def run(self) -> None:
        tasks = [self.periodic.run()]
        if self.export.delivery is not None:
            tasks.append(self.export.delivery.run())
        await asyncio.gather(*tasks)

    async def last(self, deadline: float) -> None:
        if self.periodic.busy:
            log.warning("a profile window was still being built at shutdown; dropped")
        elif not await self.periodic.last(deadline):
            log.warning("the last profile window was not built in time; dropped")
        if self.export.delivery is not None:
            await self.export.delivery.flush(deadline)

    def close(self) -> None:
        self.periodic.close()
