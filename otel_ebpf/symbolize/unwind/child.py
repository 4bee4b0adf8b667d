"""The unwind tables' compiler process (worker.py starts it): a request per file until the
agent closes the socket. A request is the row bound (u64) with the file's descriptor
attached (SCM_RIGHTS); the answer a status and length, then the table as entry.py encodes
it, or the compiler's error. It imports only what a compile needs: it starts anew after
each idle spell, and its start-up is CPU the agent's node pays for."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys

from otel_ebpf.kernel.lifetime import die_with_parent
from otel_ebpf.symbolize.unwind import cfi, entry

REQUEST = struct.Struct("<Q")  # max rows (the file comes as a descriptor)
REPLY = struct.Struct("<BI")  # status, payload bytes
OK, TOO_LARGE, CFI_ERROR = 0, 1, 2
ROWS = struct.Struct("<Q")  # TOO_LARGE: the rows the table takes, then the message


class Closed(Exception):
    """The other end closed the socket."""


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Closed
        data += chunk
    return bytes(data)


def serve(fd: int) -> None:
    die_with_parent()
    with socket.socket(fileno=fd) as sock:
        while True:
            try:
                head, fds, _, _ = socket.recv_fds(sock, REQUEST.size, 1)
                if not head or not fds:
                    return
                head += read_exactly(sock, REQUEST.size - len(head))
            except (OSError, Closed):
                return
            (max_rows,) = REQUEST.unpack(head)
            with os.fdopen(fds[0], "rb") as file:
                try:
                    status, payload = OK, entry.encode(cfi.compile_file(file, max_rows))
                except cfi.TooLarge as exc:
                    status, payload = TOO_LARGE, ROWS.pack(exc.rows) + str(exc).encode()
                except cfi.CfiError as exc:
                    status, payload = CFI_ERROR, str(exc).encode()
            with contextlib.suppress(OSError):
                sock.sendall(REPLY.pack(status, len(payload)) + payload)


def run() -> None:
    """The process's entry: the socket's fd is argv[1]."""
    serve(int(sys.argv[1]))
