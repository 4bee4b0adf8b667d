"""Fixtures shared by the kernel tests: one engine and one syscall table per session."""

from __future__ import annotations

import pytest

from otel_ebpf.kernel import headers, syscalls
from otel_ebpf.kernel.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(headers.discover())


@pytest.fixture(scope="session")
def table() -> syscalls.SyscallTable:
    source = headers.discover()
    return syscalls.load([source.bcc_kernel_source or source.path] if source else [])
