"""A real Prometheus server as a subprocess: private directory, loopback port, PromQL.

Debian's `prometheus` package (installed by `deploy/host-setup.sh --test`, whose system
service is never left running) is the default binary; each test runs its own server on a
free loopback port with its own TSDB in a temporary directory, so nothing is shared with
another test or another engineer's run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers.process import _LIVE, LOOPBACK, WorkDir, free_port

BUILD3 = Path(__file__).with_name("build-prometheus3.sh")
BUILD3_TIMEOUT = 3600.0  # a cold build on a busy 2-core machine


def prometheus3() -> Path:
    """Prometheus 3 built from its Go module (tests/peers/build-prometheus3.sh, cached
    outside the repository: milliseconds once built)."""
    try:
        result = subprocess.run(["bash", str(BUILD3)], capture_output=True, text=True,
                                timeout=BUILD3_TIMEOUT, stdin=subprocess.DEVNULL,
                                check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{BUILD3.name} timed out after {BUILD3_TIMEOUT:.0f}s") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{BUILD3.name} failed (exit {result.returncode}); it needs Go "
                           f"and the Go module proxy on a cold cache:\n{result.stderr}")
    return Path(lines[-1])


def debian_prometheus() -> Path:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("no prometheus binary; run `make test` (deploy/host-setup.sh "
                           "--test installs Debian's prometheus package)")
    return Path(binary)


class PrometheusServer:
    """`prometheus` on `config` (YAML text), in a private directory. Use as a context
    manager; `query()` runs instant PromQL queries through the HTTP API."""

    def __init__(self, config: str, binary: Path | None = None,
                 extra_args: list[str] | None = None, startup_timeout: float = 30.0) -> None:
        self.config = config
        self.binary = binary or debian_prometheus()
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = WorkDir("prometheus")  # its configuration, TSDB and output
        self.log = ""

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, attempts: int = 3) -> PrometheusServer:
        d = self.workdir.make()
        (d / "prometheus.yml").write_text(self.config)
        for _ in range(attempts):
            self.port = free_port()
            with open(d / "output.log", "ab") as out:
                self.proc = subprocess.Popen(
                    [str(self.binary), f"--config.file={d / 'prometheus.yml'}",
                     f"--storage.tsdb.path={d / 'data'}",
                     f"--web.listen-address={LOOPBACK}:{self.port}", *self.extra_args],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d)
            _LIVE.add(self.proc)  # killed at exit should the test never stop it
            if self._wait_ready():
                return self
            self._terminate()
        self.stop()
        raise RuntimeError(f"prometheus did not start; output:\n{self.log}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now: [{metric: labels, value: float}];
        a native histogram sample's value is its count (its buckets under "histogram")."""
        data = self.api("query", query=promql)
        return [{"metric": r["metric"], "value": float(r["value"][1])} if "value" in r
                else {"metric": r["metric"], "value": float(r["histogram"][1]["count"]),
                      "histogram": r["histogram"][1]}
                for r in data["result"]]

    def wait_for(self, promql: str, expected: float, timeout: float = 60.0
                 ) -> list[dict[str, Any]]:
        """Query until one series equals `expected` (or the time is up); the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if any(r["value"] == expected for r in result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            _LIVE.discard(proc)

    def stop(self) -> None:
        self._terminate()
        if self.workdir.exists:
            log = self.workdir / "output.log"
            self.log = log.read_text(errors="replace") if log.exists() else ""
            self.workdir.remove()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def otlp_config(promoted: list[str]) -> str:
    """A Prometheus 3 configuration for OTLP in (`--web.enable-otlp-receiver`): the
    resource attributes in `promoted` become labels of every series."""
    listed = "".join(f"\n    - {name}" for name in promoted)
    return ("global:\n  evaluation_interval: 2s\n"
            f"otlp:\n  promote_resource_attributes:{listed}\n")


def scrape_config(target_port: int, interval: str = "2s") -> str:
    """A Prometheus configuration scraping the agent's /metrics on loopback."""
    return (f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            "scrape_configs:\n  - job_name: otel-ebpf\n    static_configs:\n"
            f"      - targets: ['{LOOPBACK}:{target_port}']\n")
