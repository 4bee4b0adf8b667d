"""Compiling a program in a short-lived process (otel_ebpf.kernel.loader), so that LLVM,
clang and their heap never enter the agent: importing BCC alone maps ~65 MB of them, and a
compile leaves ~100 MB of heap that glibc keeps.

What comes back is an Image (license, maps with their ctypes types, each function's
instructions and where they name a map) and the map fds, the maps already created in the
kernel. The agent loads each function itself when a probe attaches it (bpf(BPF_PROG_LOAD)
after putting its own fd numbers into the instructions), as BCC would have.

At most `jobs` compiles run at once: each is CPU-bound and holds ~135 MB while it runs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otel_ebpf.kernel.cache import ImageCache
from otel_ebpf.kernel.callbacks import CALLBACK_PREFIX, link_callback
from otel_ebpf.kernel.ctypes_json import build
from otel_ebpf.kernel.lifetime import boot

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 300.0
_MAX_FDS = 253  # SCM_MAX_FD
_BOOT = boot("otel_ebpf.kernel.loader", "run")


class CompileError(RuntimeError):
    """The compiler process failed; the message is BCC's (diagnostics went to stderr)."""


@dataclass(frozen=True)
class MapSpec:
    name: str
    key_type: Any  # ctypes type, None where BCC has none (ring buffers)
    value_type: Any
    event_type: Any  # of the records of a ring or perf buffer, where BCC knows it


@dataclass(frozen=True)
class Function:
    insns: bytes
    relocations: tuple[tuple[int, int], ...]  # (instruction index, map index)


@dataclass(frozen=True)
class Image:
    license: str
    maps: tuple[MapSpec, ...]
    functions: dict[str, Function]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        def ctype(desc: Any) -> Any:
            return None if desc is None else build(desc)

        return cls(
            license=data["license"],
            maps=tuple(MapSpec(m["name"], ctype(m["key"]), ctype(m["value"]),
                               ctype(m["event"])) for m in data["maps"]),
            functions={name: Function(base64.b64decode(f["insns"]),
                                      tuple((int(i), int(m)) for i, m in f["relocations"]))
                       for name, f in data["functions"].items()})

    def instructions(self, fn_name: str, map_fds: Sequence[int]) -> bytes:
        """fn_name's instructions naming the maps by `map_fds` (in self.maps order), with
        its loop callback appended when it takes one's address (see link_callback)."""
        fn = self.functions[fn_name]
        insns = bytearray(fn.insns)
        for index, map_index in fn.relocations:
            struct.pack_into("=i", insns, index * 8 + 4, map_fds[map_index])
        callbacks = sorted(name for name in self.functions
                           if name.startswith(CALLBACK_PREFIX) and name != fn_name)
        if fn_name.startswith(CALLBACK_PREFIX) or not callbacks:
            return bytes(insns)
        if len(callbacks) > 1:
            raise ValueError(f"more than one loop callback ({', '.join(callbacks)}): the "
                             "engine links one per program")
        return link_callback(bytes(insns), self.instructions(callbacks[0], map_fds))

    def callback_of(self, fn_name: str) -> str | None:
        """The loop callback that instructions() links into fn_name, if any."""
        if fn_name.startswith(CALLBACK_PREFIX):
            return None
        return next((name for name in sorted(self.functions)
                     if name.startswith(CALLBACK_PREFIX)), None)


class Compiler:
    """Runs the compiler process, at most `jobs` at a time; with a cache, only for a
    program it does not hold yet."""

    def __init__(self, jobs: int, cache: ImageCache | None = None) -> None:
        self.jobs = max(1, jobs)
        self.cache = cache
        self._slots = threading.BoundedSemaphore(self.jobs)

    def compile(self, text: str, cflags: Sequence[str]) -> tuple[Image, list[int], bool]:
        """The program's Image, its map fds (the caller closes them) and whether they came
        from the cache. Raises CompileError with BCC's message; the compiler's output is
        copied to stderr."""
        key = self.cache.key(text, cflags) if self.cache is not None else ""
        hit = self.cache.load(key) if self.cache is not None else None
        if hit is not None:
            result, fds = hit
        else:
            with self._slots:
                result, fds = self._run(text, cflags)
            btf = result.pop("btf", None)
            seconds = result.pop("seconds", {})
            log.debug("compiled in a child process: %.2fs importing BCC, %.2fs compiling",
                      seconds.get("import", 0.0), seconds.get("compile", 0.0))
            if self.cache is not None:
                self.cache.store(key, result, fds, btf)
        try:
            image = Image.from_json(result)
            if len(fds) != len(image.maps):
                raise CompileError(f"the compiler process described {len(image.maps)} maps "
                                   f"but handed over {len(fds)}")
        except Exception:
            for fd in fds:
                os.close(fd)
            raise
        return image, fds, hit is not None

    def _run(self, text: str, cflags: Sequence[str]) -> tuple[dict[str, Any], list[int]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with ours:
            try:
                proc = subprocess.Popen(
                    [sys.executable or "/usr/bin/python3", "-c", _BOOT, str(theirs.fileno())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=(theirs.fileno(),))
            finally:
                theirs.close()
            try:
                out, err = proc.communicate(
                    json.dumps({"text": text, "cflags": list(cflags)}).encode(),
                    timeout=COMPILE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise CompileError(f"the compiler process did not finish in "
                                   f"{COMPILE_TIMEOUT_S:.0f}s") from None
            if err:
                sys.stderr.write(err.decode(errors="replace"))
                sys.stderr.flush()
            result = _parse(out)
            if proc.returncode != 0 or "error" in result:
                raise CompileError(_failure(proc.returncode, result))
            ours.setblocking(False)
            try:
                _, fds, _, _ = socket.recv_fds(ours, 16, _MAX_FDS)
            except BlockingIOError:
                raise CompileError("the compiler process handed over no maps") from None
        return result, list(fds)


def _parse(out: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(out.decode() or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _failure(returncode: int, result: dict[str, Any]) -> str:
    if "error" in result:
        return str(result["error"])
    if returncode < 0:
        return (f"the compiler process died of {signal.Signals(-returncode).name} (out of "
                "memory?)")
    return f"the compiler process exited with status {returncode} and said nothing"
