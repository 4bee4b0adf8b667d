"""What the agent process loads at start: optional clients stay out of memory until used."""

from __future__ import annotations

import subprocess
import sys


def test_agent_does_not_load_aiohttp_until_an_enricher_needs_it() -> None:
    # aiohttp and its client costs ~15 MB of RSS; only the Docker, Kubernetes and cloud
    # enrichers need it, and they import it when they open a session
    code = ("import sys, otel_ebpf.cli, otel_ebpf.daemon, otel_ebpf.enrich.identity; "
            "print('aiohttp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
