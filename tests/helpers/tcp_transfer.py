"""TCP transfers whose ends are known: a server that reads each connection to EOF and a
client that sends a given number of bytes over one or more sequential connections.

    tcp_transfer.py server HOST PORT [N [echo]]  prints "listening <pid>"; serves N (1)
                                                 connections, each read to EOF (with echo,
                                                 then as many bytes sent back), then prints
                                                 "received <bytes>"
    tcp_transfer.py client HOST PORT BYTES [N]   per connection prints "connected <pid>
                                                 <local addr> <local port>", sends BYTES,
                                                 half-closes and reads until the server's
                                                 close; at the end prints "sent <bytes>
                                                 received <bytes>"
    tcp_transfer.py connect HOST PORT TIMEOUT    prints "connecting <pid>", tries to connect
                                                 for TIMEOUT seconds, prints "connected" or
                                                 "timeout"

Plain blocking sockets with default options: the kernel picks segment sizes and offloads.
A HOST with a colon is IPv6 (AF_INET6), so "::ffff:127.0.0.1" makes a dual-stack socket
that speaks IPv4 on the wire.
"""

from __future__ import annotations

import os
import socket
import sys

CHUNK = 256 * 1024


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def server(host: str, port: int, connections: int, echo: bool) -> None:
    block = b"\x5a" * CHUNK
    with socket.socket(_family(host), socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(connections)
        print(f"listening {os.getpid()}", flush=True)
        total = 0
        for _ in range(connections):
            conn, _ = listener.accept()
            with conn:
                received = 0
                while data := conn.recv(CHUNK):
                    received += len(data)
                total += received
                # Only after EOF, so neither side blocks sending to one that is not reading.
                while echo and received > 0:
                    n = min(received, CHUNK)
                    conn.sendall(block[:n])
                    received -= n
        print(f"received {total}", flush=True)


def client(host: str, port: int, nbytes: int, connections: int) -> None:
    block = b"\xa5" * CHUNK
    received = 0
    for _ in range(connections):
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.connect((host, port))
            local = sock.getsockname()
            print(f"connected {os.getpid()} {local[0]} {local[1]}", flush=True)
            left = nbytes
            while left > 0:
                n = min(left, CHUNK)
                sock.sendall(block[:n])
                left -= n
            sock.shutdown(socket.SHUT_WR)
            while data := sock.recv(CHUNK):  # until the server's close
                received += len(data)
    print(f"sent {nbytes * connections} received {received}", flush=True)


def connect(host: str, port: int, timeout: float) -> None:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        print(f"connecting {os.getpid()}", flush=True)
        try:
            sock.connect((host, port))
        except TimeoutError:
            print("timeout", flush=True)
            return
        print("connected", flush=True)


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = sys.argv[4:]
    if mode == "server":
        server(host, port, int(extra[0]) if extra else 1, extra[1:2] == ["echo"])
    elif mode == "client":
        client(host, port, int(extra[0]), int(extra[1]) if len(extra) > 1 else 1)
    elif mode == "connect":
        connect(host, port, float(extra[0]))
    else:
        sys.exit(f"unknown mode {mode}")
