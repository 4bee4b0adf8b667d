"""The agent's threads carry their Python names in the kernel (otel_ebpf/kernel/threads.py)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from otel_ebpf.kernel.threads import name_new_threads


def kernel_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


@pytest.fixture
def naming() -> Iterator[None]:
    name_new_threads()
    try:
        yield
    finally:
        threading.setprofile(None)


def test_a_thread_started_after_is_named_in_the_kernel_and_keeps_no_hook(naming: None) -> None:
    seen: dict[str, object] = {}

    def look() -> None:
        seen["comm"], seen["hook"] = kernel_name(), sys.getprofile()

    thread = threading.Thread(target=look, name="collect-cpu_profile")
    thread.start()
    thread.join()
    assert seen == {"comm": "collect-cpu_pro", "hook": None}  # 15 bytes, as the kernel keeps


def test_a_pools_workers_are_named_too(naming: None) -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="metrics") as pool:
        assert pool.submit(kernel_name).result() == "metrics_0"


def test_without_it_threads_keep_the_process_name() -> None:
    thread_names = []
    thread = threading.Thread(target=lambda: thread_names.append(kernel_name()), name="other")
    thread.start()
    thread.join()
    assert thread_names == [Path("/proc/self/comm").read_text().strip()]
