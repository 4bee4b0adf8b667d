"""deploy/grafana/: the dashboards are what the generator (grafana-foundation-sdk) makes,
and every PromQL expression in them parses (Debian's promtool). That each returns data
from a live agent is tests/e2e/test_dashboards.py."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

GRAFANA = Path(__file__).parents[2] / "deploy" / "grafana"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def substituted(expr: str) -> str:
    """A dashboard expression as Grafana sends it: variables replaced."""
    return expr.replace("$__rate_interval", "1m").replace("$service", ".*")


def dashboard_expressions(source: str) -> list[str]:
    model = json.loads((GRAFANA / f"otel-ebpf-{source}.json").read_text())
    return [t["expr"] for panel in model["panels"] for t in panel.get("targets", [])]


def promtool_check(tmp_path: Path, expressions: list[str]) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("no promtool; run `make test` (host-setup --test installs prometheus)")
    rules: dict[str, Any] = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(expressions)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_the_dashboards_are_what_the_generator_makes() -> None:
    out = subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("source", ["scrape", "otlp"])
def test_every_expression_parses(tmp_path: Path, source: str) -> None:
    expressions = dashboard_expressions(source)
    assert expressions == list(generator().expressions(source).values())
    checked = promtool_check(tmp_path, [substituted(e) for e in expressions])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(expressions)} rules found" in checked.stdout
    # the check can fail: a broken expression is reported
    broken = promtool_check(tmp_path, [substituted(expressions[0]) + ")"])
    assert broken.returncode != 0


@pytest.mark.parametrize("source", ["scrape", "otlp"])
def test_dashboard_shape(source: str) -> None:
    model = json.loads((GRAFANA / f"otel-ebpf-{source}.json").read_text())
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    assert model["uid"] == f"otel-ebpf-{source}"
    panels = [p for p in model["panels"] if p["type"] != "row"]
    assert {p["type"] for p in panels} >= {"heatmap", "timeseries", "stat"}
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    histogram = "_bucket" if source == "scrape" else "linux_syscall_duration_seconds{"
    assert any(histogram in e for e in dashboard_expressions(source))
    assert not any(re.search(r"\$(?!__rate_interval|service)", e)
                   for e in dashboard_expressions(source))
