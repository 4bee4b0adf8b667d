"""The shared periodic runner: runs on its interval on a thread of its own, never cancels a
run half-way, skips a tick while a run is under way, survives a failing run, and tells at
shutdown whether the last run made it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from otel_ebpf.periodic import Periodic


async def test_runs_on_its_interval_on_its_own_thread() -> None:
    threads: list[str] = []
    results: list[int | None] = []

    def work() -> int:
        threads.append(threading.current_thread().name)
        return len(threads)

    async def after(result: int | None) -> None:
        results.append(result)

    periodic = Periodic("job", 0.05, work, after)
    task = asyncio.create_task(periodic.run())
    while len(results) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    periodic.close()
    assert results[:3] == [1, 2, 3]
    assert all(name.startswith("job") for name in threads)
    assert threading.current_thread().name not in threads


async def test_cancelling_leaves_a_run_to_finish_and_a_busy_tick_is_skipped() -> None:
    release = threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        release.wait(5)
        finished.append(True)

    periodic: Periodic[None] = Periodic("slow", 10, slow)
    first = asyncio.create_task(periodic.once())
    await asyncio.sleep(0.05)
    assert periodic.busy
    assert await periodic.once() is None  # skipped: the first is still under way
    first.cancel()
    await asyncio.sleep(0.05)
    assert periodic.busy and not finished  # cancelled the caller, not the run
    assert not await periodic.last(time.monotonic() + 1)  # no second run at shutdown
    release.set()
    while periodic.busy:
        await asyncio.sleep(0.01)
    assert finished == [True]
    periodic.close()


async def test_a_failing_run_is_logged_and_the_next_goes_on(
    caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return len(calls)

    periodic = Periodic("flaky", 10, flaky)
    with caplog.at_level(logging.ERROR, "otel_ebpf.periodic"):
        assert await periodic.once() is None
    assert "flaky failed; retrying at the next interval" in caplog.text
    assert await periodic.once() == 2
    periodic.close()


async def test_last_waits_until_the_deadline_only() -> None:
    release = threading.Event()
    periodic: Periodic[None] = Periodic("last", 10, lambda: release.wait(5) and None)
    assert not await periodic.last(time.monotonic() + 0.2)  # gave up: the run holds on
    assert periodic.busy
    release.set()
    while periodic.busy:
        await asyncio.sleep(0.01)
    assert await periodic.last(time.monotonic() + 1)
    periodic.close()
