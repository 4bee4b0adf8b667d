"""The compiler process: the one place that imports `bcc`. The agent runs it once per
program (otel_ebpf.kernel.compiler) and keeps nothing of LLVM or clang.

It reads a request (JSON on stdin: source, cflags), compiles with BCC, which also creates
the program's maps, and hands the agent what it needs to run the program without BCC:
  - the map file descriptors, over the Unix socket whose fd is argv[1] (SCM_RIGHTS);
  - on stdout, one JSON object (otel_ebpf.kernel.image): the license, each map's name and
    ctypes key/value/event types (as BCC derives them from the program's table
    descriptions), each function's instructions with the places that name a map fd; and
    "btf", the BTF object the maps were created with (the compile cache recreates them
    from it), read here through the fd BCC holds: the agent, given only the maps, could
    fetch it by id alone, and BPF_BTF_GET_FD_BY_ID needs CAP_SYS_ADMIN.
Then it exits without cleaning up: the agent holds the maps now. Compiler diagnostics go
to stderr; a failure is {"error": "..."} on stdout and exit status 1.
"""

from __future__ import annotations

import base64
import ctypes as ct
import json
import os
import socket
import struct
import sys
import time
from types import SimpleNamespace
from typing import Any

from otel_ebpf.kernel import bpfsys
from otel_ebpf.kernel.ctypes_json import describe
from otel_ebpf.kernel.lifetime import die_with_parent

_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2


def relocations(insns: bytes, index_of_fd: dict[int, int]) -> list[list[int]]:
    """[instruction index, map index] of every 64-bit load of a map fd (or map value)."""
    out = []
    i = 0
    while i * 8 < len(insns):
        code, regs, _off, imm = struct.unpack_from("=BBhi", insns, i * 8)
        if code == _LD_IMM64:
            if regs >> 4 in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE) and imm in index_of_fd:
                out.append([i, index_of_fd[imm]])
            i += 2
        else:
            i += 1
    return out


def _type(bcc: Any, desc: bytes | None) -> Any:
    if not desc:
        return None
    return describe(bcc.BPF._decode_table_type(json.loads(desc.decode())))


def image(bcc: Any, bpf: Any) -> tuple[dict[str, Any], list[int]]:
    """The program as otel_ebpf.kernel.image reads it, and the map fds in its map order."""
    from bcc.table import _get_event_class

    lib, module = bcc.libbcc.lib, bpf.module
    lib.bpf_num_tables.restype = ct.c_size_t
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
    maps, fds = [], []
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i)
        fd = lib.bpf_table_fd(module, name)
        if fd < 0:
            continue
        event = None
        if lib.bpf_perf_event_fields(module, name) > 0:
            event = describe(_get_event_class(SimpleNamespace(bpf=bpf, _name=name)))
        maps.append({"name": name.decode(),
                     "key": _type(bcc, lib.bpf_table_key_desc(module, name)),
                     "value": _type(bcc, lib.bpf_table_leaf_desc(module, name)),
                     "event": event})
        fds.append(fd)
    index_of_fd = {fd: i for i, fd in enumerate(fds)}
    functions = {}
    for i in range(lib.bpf_num_functions(module)):
        fn = lib.bpf_function_name(module, i)
        insns = ct.string_at(lib.bpf_function_start(module, fn),
                             lib.bpf_function_size(module, fn))
        functions[fn.decode()] = {"insns": base64.b64encode(insns).decode(),
                                  "relocations": relocations(insns, index_of_fd)}
    return {"license": lib.bpf_module_license(module).decode(), "maps": maps,
            "functions": functions}, fds


def maps_btf(map_fds: list[int]) -> str | None:
    """The raw BTF the maps were created with, base64, or None when no map has BTF (or
    they name more than one object, which BCC never makes). BCC keeps no API to its BTF
    fd, so it is found among this process's fds by the id the maps name."""
    ids = {bpfsys.map_info(fd)["btf_id"] for fd in map_fds} - {0}
    if len(ids) != 1:
        return None
    wanted = ids.pop()
    for entry in os.scandir("/proc/self/fd"):
        try:
            if os.readlink(entry.path) != "anon_inode:btf":
                continue
            fd = int(entry.name)
            if bpfsys.btf_info(fd)[0] == wanted:
                return base64.b64encode(bpfsys.btf_data(fd)).decode()
        except (OSError, ValueError):  # an fd closed meanwhile (the scandir's own)
            continue
    return None


def main(argv: list[str]) -> int:
    die_with_parent()
    sock = socket.socket(fileno=int(argv[1]))
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything BCC or clang prints joins the diagnostics
    request = json.load(sys.stdin)
    started = time.monotonic()
    with result:
        try:
            import bcc
        except ImportError:
            json.dump({"error": "the BCC Python module is not importable. Fix: install "
                       "Debian's python3-bpfcc and run from a venv made with "
                       "--system-site-packages (make setup does both)"}, result)
            return 1
        imported = time.monotonic()
        try:
            bpf = bcc.BPF(text=request["text"].encode(),
                          cflags=[str(flag) for flag in request["cflags"]])
            described, fds = image(bcc, bpf)
            described["btf"] = maps_btf(fds)
            described["seconds"] = {"import": imported - started,
                                    "compile": time.monotonic() - imported}
        except Exception as exc:
            json.dump({"error": str(exc) or type(exc).__name__}, result)
            return 1
        socket.send_fds(sock, [b"maps"], fds)
        json.dump(described, result)
    return 0


def run() -> None:
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # No cleanup: the maps now belong to the agent, and freeing the compiler's heap would
    # only cost time.
    os._exit(code)


if __name__ == "__main__":
    run()
