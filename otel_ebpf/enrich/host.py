"""Host and OS identity, read once at start."""

from __future__ import annotations

import platform
import socket
from pathlib import Path

from otel_ebpf.model import AttributeValue

# semantic-conventions host.arch values
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm32", "ppc64le": "ppc64",
         "s390x": "s390x", "i686": "x86", "i386": "x86"}


def host_attributes(machine_id_paths: tuple[Path, ...] = (
    Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"),
)) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "host.name": socket.gethostname(),
        "host.arch": _ARCH.get(platform.machine(), platform.machine()),
        "os.type": "linux",
        "os.version": platform.release(),
    }
    for path in machine_id_paths:
        try:
            machine_id = path.read_text().strip()
        except OSError:
            continue
        if machine_id:
            attrs["host.id"] = machine_id
            break
    return attrs
