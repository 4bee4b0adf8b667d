"""`otel-ebpf health`: the agent's report and its reading (the container image's HEALTHCHECK
and the DaemonSet's probes run this check)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from otel_ebpf import cli, health
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Collection
from otel_ebpf.probes.base import Probe
from otel_ebpf.workers import PeriodicCollector, ProbeWorkers

NOW = 1_000_000.0


def test_fresh_report_with_draining_probes_is_healthy(tmp_path: Path) -> None:
    path = tmp_path / "h"
    health.write(path, {"syscall_latency": (5.0, 1.25), "cpu_profile": (1.0, 0.5)}, now=NOW)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    ok, why = health.check(path, now=NOW + 4)
    assert ok, why
    assert why == (f"the agent (pid {os.getpid()}) reported 4.0s ago; drains: "
                   "cpu_profile 0.5s ago, syscall_latency 1.2s ago")


def test_missing_report_says_why(tmp_path: Path) -> None:
    ok, why = health.check(tmp_path / "none")
    assert not ok and "has not attached its probes yet" in why


@pytest.mark.parametrize("text", ["", "{", "[]", '{"pid": 1}', '{"pid": 1, "time": "x", '
                                  '"probes": {}}'])
def test_unreadable_report_is_unhealthy(tmp_path: Path, text: str) -> None:
    path = tmp_path / "h"
    path.write_text(text)
    ok, why = health.check(path, now=NOW)
    assert not ok and why.startswith(f"unreadable report at {path}")


def test_old_report_means_a_stuck_agent(tmp_path: Path) -> None:
    path = tmp_path / "h"
    health.write(path, {"syscall_latency": (5.0, 0.0)}, now=NOW)
    assert health.check(path, now=NOW + health.STALE_S)[0]
    ok, why = health.check(path, now=NOW + health.STALE_S + 1)
    assert not ok and "last reported 31s ago" in why and "event loop is stuck" in why


def test_a_probe_whose_drain_stopped_is_named(tmp_path: Path) -> None:
    path = tmp_path / "h"
    # 3 intervals of 60 s allowed for a slow probe; 30 s at least for fast ones
    health.write(path, {"slow": (60.0, 170.0), "fast": (1.0, 29.0)}, now=NOW)
    assert health.check(path, now=NOW)[0]
    health.write(path, {"slow": (60.0, 181.0), "fast": (1.0, 31.0)}, now=NOW)
    ok, why = health.check(path, now=NOW)
    assert not ok
    assert why.endswith("no longer drains: fast (last drained 31s ago, every 1s), "
                        "slow (last drained 181s ago, every 60s)")


async def test_reporter_rewrites_until_closed(tmp_path: Path) -> None:
    path = tmp_path / "h"
    ages = {"p": (5.0, 0.0)}
    reporter = health.HealthReporter(path, lambda: ages, period=0.01)
    task = asyncio.create_task(reporter.run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        if path.exists():
            break
    ages = {"p": (5.0, 2.0)}
    for _ in range(200):
        await asyncio.sleep(0.01)
        if json.loads(path.read_text())["probes"]["p"]["since_drain"] == 2.0:
            break
    assert json.loads(path.read_text())["probes"]["p"]["since_drain"] == 2.0
    task.cancel()
    reporter.close()
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left behind


async def test_unwritable_report_is_logged_once(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    reporter = health.HealthReporter(tmp_path / "missing-dir" / "h", dict, period=0.01)
    task = asyncio.create_task(reporter.run())
    await asyncio.sleep(0.1)
    task.cancel()
    errors = [r for r in caplog.records if "cannot write the health report" in r.message]
    assert len(errors) == 1 and health.ENV in errors[0].message


class CountingProbe(Probe):
    name = "counting"
    summary = "test"
    hooks = ()
    exports = ()

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.calls = threading.Semaphore(0)

    def start(self, engine: Engine) -> None:
        raise NotImplementedError

    def verify(self, engine: Engine) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def collect(self) -> Collection:
        self.calls.release()
        if self.fail:
            raise RuntimeError("map read failed")
        return Collection(self.name)


@pytest.mark.parametrize("fail", [False, True])
def test_only_completed_drains_count(fail: bool) -> None:
    probe = CountingProbe(fail)
    collector = PeriodicCollector(probe, 0.01, lambda p: p.collect(), lambda c: None)
    collector.start()
    started = collector.last_drained
    for _ in range(3):  # the 3rd began after the 2nd's end was recorded (or not)
        assert probe.calls.acquire(timeout=5)
    assert collector.stop(5)
    assert (collector.last_drained == started) if fail else (collector.last_drained > started)


async def test_workers_report_each_probe_drain_age() -> None:
    probe = CountingProbe(False)
    workers = ProbeWorkers(lambda p: p.collect(), lambda c: None, lambda s: None, 0.01, 1.0)
    workers.start_collector(probe, 0.5)
    ((name, (interval, age)),) = workers.drain_ages().items()
    await workers.stop()
    assert name == "counting" and interval == 0.5 and age >= 0


def test_cli_health_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(health.ENV, raising=False)
    assert cli.main(["health"]) == 2
    assert f"set {health.ENV}" in capsys.readouterr().err
    path = tmp_path / "h"
    monkeypatch.setenv(health.ENV, str(path))
    assert cli.main(["health"]) == 1
    assert capsys.readouterr().out.startswith("unhealthy: no report at")
    health.write(path, {"syscall_latency": (5.0, 0.1)})
    assert cli.main(["health"]) == 0
    assert capsys.readouterr().out.startswith("healthy: the agent")
    assert cli.main(["health", "--file", str(tmp_path / "other")]) == 1
