"""The live page in a real browser: headless Chromium (Debian's package) loads / from the
agent while known workloads run; the flame graph shows the CPU workload's hot function,
the heatmap the syscall workload's syscall; a screenshot is kept (its path is printed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.peers.process import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

# more calls than other tests' runs of the same helper make (they may run meanwhile): the
# page's busiest series, which its heatmap shows first, is this one
N_GETPPID = 200_000


class Texts(HTMLParser):
    """The text inside each element with an id, by that id (nested ids included)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str | None] = []
        self.texts: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("meta", "link", "br", "img", "input"):
            return
        self.open.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self.open and tag not in ("meta", "link", "br", "img", "input"):
            self.open.pop()

    def handle_data(self, data: str) -> None:
        for ident in self.open:
            if ident:
                self.texts.setdefault(ident, []).append(data)

    def text(self, ident: str) -> str:
        return " ".join(self.texts.get(ident, []))


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("no chromium; run `make test` (host-setup --test installs it)")
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120)


def wait_json(url: str, ok: object, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if ok(body) or time.monotonic() > deadline:  # type: ignore[operator]
            return body  # type: ignore[no-any-return]
        time.sleep(0.5)


def test_live_page_shows_the_hot_function_and_the_syscall(
        tmp_path: Path, syscall_workload: Path, cpu_hot: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, config_text=agent_config(
        {"syscall_latency": {"interval": "500ms", "aggregation": "process",
                             "filter": {"comms": ["syscall_workloa"]}},
         "cpu_profile": {"interval": "500ms"}},
        exporter={"enabled": False}, endpoints={"enabled": True, "port": port}))
    base = f"http://127.0.0.1:{port}"
    try:
        agent.wait_for_log("probe cpu_profile attached")
        agent.wait_for_log("probe syscall_latency attached")
        subprocess.run([str(cpu_hot), "split", "3"], capture_output=True, check=True,
                       timeout=30)
        workload = subprocess.run([str(syscall_workload), str(N_GETPPID), "1", "1"],
                                  capture_output=True, text=True, check=True, timeout=30)
        assert workload.stdout.strip() == "done"
        profile = wait_json(base + "/api/profile", lambda b: "hot_a" in json.dumps(b))
        assert "hot_a" in json.dumps(profile)
        live = wait_json(base + "/api/live",
                         lambda b: b["syscalls"] and b["syscalls"][0]["count"] == N_GETPPID)
        busiest = live["syscalls"][0]  # type: ignore[index]
        assert (busiest["syscall"], busiest["count"]) == ("getppid", N_GETPPID), busiest

        dumped = chromium(tmp_path, "--dump-dom", base + "/")
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        page = Texts()
        page.feed(dumped.stdout)
        flame = page.text("flame")
        assert "hot_a" in flame and "cpu_hot" in flame, flame[:2000]
        caption = page.text("heatmap-caption")
        assert f"getppid - {N_GETPPID} calls" in caption, caption
        assert "ready" in page.text("status")
        assert "memory (RSS)" in page.text("health")

        screenshot = tmp_path / "live-page.png"
        shot = chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,1400",
                        base + "/")
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert screenshot.stat().st_size > 20_000  # drawn, not a blank page
        print(f"live page screenshot: {screenshot}")
        code, _ = agent.stop()
        assert code == 0
    finally:
        agent.kill()
