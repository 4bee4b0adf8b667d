"""The BPF engine. Probes ask it to compile a program with some cflags, attach tracepoints
or perf events, and drain maps; they get back plain ctypes values.

BCC compiles, in a short-lived process of its own (otel_ebpf.kernel.compiler, .loader):
the agent never maps LLVM or clang, nor keeps their heap. It receives the maps as file
descriptors and loads, attaches and reads with bpf(2) and perf_event_open(2) directly
(otel_ebpf.kernel.bpfsys, .maps, .buffers). The order a probe follows still holds: load
(the maps exist), fill its maps, attach (each function is verified when first attached).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import importlib.util
import logging
import os
import re
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from otel_ebpf import memory
from otel_ebpf.kernel import bpfsys, callbacks
from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.buffers import PerfBuffer, RingBuffer
from otel_ebpf.kernel.cache import ImageCache
from otel_ebpf.kernel.compiler import CompileError, Compiler, Image
from otel_ebpf.kernel.headers import HeaderSource
from otel_ebpf.kernel.maps import BpfMap, update_set_map
from otel_ebpf.kernel.tracefs import tracefs_root

__all__ = ["BpfMap", "Engine", "EngineError", "Program", "bpf_source", "bpf_source_dir",
           "update_set_map"]

log = logging.getLogger(__name__)

BPF_PACKAGE = "otel_ebpf.bpf"  # probes/, shipped inside the package


class EngineError(RuntimeError):
    """A BPF program could not be compiled, loaded or attached; the message says why."""


def bpf_source_dir() -> Path:
    """The directory of the .bpf.c sources and the headers they share, which BCC needs on
    disk as an include path: the package otel_ebpf.bpf wherever it is installed (editable
    checkout, wheel, container image), else probes/ beside an otel_ebpf that nothing
    installed (a source tree on sys.path)."""
    spec = importlib.util.find_spec(BPF_PACKAGE)
    if spec is not None and spec.origin is not None:  # origin None: a namespace package
        return Path(spec.origin).parent
    tree = Path(__file__).resolve().parents[2] / "probes"  # pyproject.toml's package-dir
    if (tree / "__init__.py").is_file():
        return tree
    raise EngineError(
        f"the BPF sources ({BPF_PACKAGE}) are missing from this installation of otel_ebpf. "
        "Fix: reinstall it (pip install ., or make setup in a checkout)")


def bpf_source(name: str) -> str:
    """The text of probes/<name>.bpf.c."""
    return (bpf_source_dir() / f"{name}.bpf.c").read_text()


_LOCAL_INCLUDE = re.compile(r'^#include "(?P<name>[\w.-]+\.h)"[ \t]*$')
MAIN_FILE = "/virtual/main.c"  # what BCC calls the program it compiles


def inline_headers(text: str, directories: Sequence[Path], name: str = MAIN_FILE) -> str:
    """`text` with each `#include "x.h"` of a header in `directories` replaced by the
    header itself. BCC rewrites map calls (`probe_stats.lookup(&k)`) only in the file it
    compiles, never in an included one, so a shared header whose helpers call maps must be
    part of that file; #line markers keep compiler messages naming the header and line."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        found = _LOCAL_INCLUDE.match(line)
        header = next((d / found.group("name") for d in directories
                       if (d / found.group("name")).is_file()), None) if found else None
        if header is None:
            out.append(line)
            continue
        out += [f'#line 1 "{header.name}"',
                inline_headers(header.read_text(), directories, header.name).rstrip("\n"),
                f'#line {number + 1} "{name}"']
    return "\n".join(out) + "\n"


def default_jobs() -> int:
    """Compiles at once: $OTEL_EBPF_COMPILE_JOBS, else two where two CPUs are ours, else
    one. A compiler process holds ~135 MB while it runs, ~65 MB of it LLVM's code, which
    two processes share: two at once keep the start-up peak at ~250 MB (PSS) and finish
    in about the time of the largest program; the compile cache makes a restart need
    none."""
    try:
        return max(1, int(os.environ["OTEL_EBPF_COMPILE_JOBS"]))
    except (KeyError, ValueError):
        return min(2, len(os.sched_getaffinity(0)))


class Program:
    """A compiled BPF object: its maps (fds handed over by the compiler process) and the
    functions loaded so far. `close()` detaches everything it attached."""

    def __init__(self, name: str, image: Image, map_fds: Sequence[int]) -> None:
        self.name = name
        self._image = image
        self._map_fds = list(map_fds)
        self._map_index = {spec.name: i for i, spec in enumerate(image.maps)}
        self._maps: dict[str, BpfMap] = {}
        self._progs: dict[str, int] = {}  # function -> program fd
        self._attachments: list[int] = []  # raw tracepoint and perf event fds
        self._rings: list[RingBuffer] = []
        self._perf_buffers: list[PerfBuffer] = []
        self.perf_lost = 0  # samples the perf buffer reported lost (ring buffers count in BPF)

    # -- loading and attaching ---------------------------------------------------------

    def _prog_fd(self, fn_name: str, kind: str) -> int:
        fd = self._progs.get(fn_name)
        if fd is not None:
            return fd
        if fn_name not in self._image.functions:
            raise EngineError(f"{self.name}: the program has no function {fn_name}")
        insns = self._image.instructions(fn_name, self._map_fds)
        btf_fd, func_info = 0, b""
        try:
            callback = self._image.callback_of(fn_name)
            main_size = len(self._image.functions[fn_name].insns)
            if callback is not None and len(insns) > main_size:
                # a program with a subprogram needs BTF function information
                btf_fd = callbacks.load_btf(callbacks.func_info_btf([fn_name, callback]))
                func_info = struct.pack("=IIII", 0, 4, main_size // 8, 5)
            fd, _ = bpfsys.prog_load(bpfsys.PROG_TYPES[kind], insns, self._image.license,
                                     fn_name, btf_fd, func_info)
        except OSError as exc:
            if exc.filename:
                sys.stderr.write(f"{exc.filename}\n")
                sys.stderr.flush()
            raise EngineError(f"{self.name}: the verifier refused {fn_name}: "
                              f"{exc.strerror} (its log is above)") from exc
        finally:
            if btf_fd:
                os.close(btf_fd)
        self._progs[fn_name] = fd
        return fd

    def load_function(self, fn_name: str, kind: str) -> None:
        """Pass the verifier (kind: raw_tracepoint | tracepoint | perf_event)."""
        self._prog_fd(fn_name, kind)

    def attach_raw_tracepoint(self, tracepoint: str, fn_name: str) -> None:
        prog = self._prog_fd(fn_name, "raw_tracepoint")
        try:
            self._attachments.append(bpfsys.raw_tracepoint_open(tracepoint, prog))
        except OSError as exc:
            raise EngineError(
                f"{self.name}: cannot attach raw tracepoint {tracepoint}: {exc}. "
                "Run `otel-ebpf doctor` for what is missing"
            ) from exc

    def attach_tracepoint(self, tracepoint: str, fn_name: str) -> None:
        """tracepoint as "category:event" (sched:sched_switch)."""
        prog = self._prog_fd(fn_name, "tracepoint")
        try:
            root = tracefs_root()
            if root is None:
                raise OSError("tracefs is not mounted")
            event_id = int((root / "events" / tracepoint.replace(":", "/") / "id").read_text())
            self._open_perf_events(bpfsys.PERF_TYPE_TRACEPOINT, event_id, [0], prog,
                                   sample_period=1)
        except (OSError, ValueError) as exc:
            raise EngineError(
                f"{self.name}: cannot attach tracepoint {tracepoint}: {exc}. "
                "Run `otel-ebpf doctor` for what is missing"
            ) from exc

    def attach_cpu_clock(self, fn_name: str, frequency_hz: int) -> None:
        """Run fn_name on the software cpu-clock of every online CPU (no PMU needed)."""
        prog = self._prog_fd(fn_name, "perf_event")
        try:
            self._open_perf_events(bpfsys.PERF_TYPE_SOFTWARE, bpfsys.PERF_COUNT_SW_CPU_CLOCK,
                                   bpfsys.cpus("online"), prog, sample_freq=frequency_hz)
        except OSError as exc:
            raise EngineError(
                f"{self.name}: cannot open cpu-clock perf events at {frequency_hz} Hz: "
                f"{exc}. Check perf_event_paranoid and CAP_PERFMON (`otel-ebpf doctor`)"
            ) from exc

    def _open_perf_events(self, type_: int, config: int, cpus: Sequence[int], prog: int,
                          sample_freq: int = 0, sample_period: int = 0) -> None:
        for cpu in cpus:
            fd = bpfsys.perf_event_open(type_, config, cpu, sample_freq=sample_freq,
                                        sample_period=sample_period)
            self._attachments.append(fd)
            bpfsys.perf_event_attach(fd, prog)

    def program_ids(self) -> list[int]:
        """Kernel ids of the loaded programs (as `bpftool prog show` lists them)."""
        return sorted(bpfsys.prog_id(fd) for fd in self._progs.values())

    # -- maps and event buffers ------------------------------------------------------------

    def map(self, name: str) -> BpfMap:
        if name not in self._maps:
            index = self._map_index[name]  # KeyError for a map the program lacks
            spec = self._image.maps[index]
            self._maps[name] = BpfMap(self._map_fds[index], spec.key_type or ct.c_int,
                                      spec.value_type or ct.c_int)
        return self._maps[name]

    def adopt_map(self, name: str, fd: int) -> None:
        """Use the map `fd` (a duplicate of it) in place of this program's own `name`, so
        programs share it: before any function is loaded, and of the same kind (type, key
        and value sizes, flags); its size may differ."""
        if self._progs:
            raise EngineError(f"{self.name}: {name} adopted after a function was loaded")
        index = self._map_index[name]
        mine, theirs = bpfsys.map_info(self._map_fds[index]), bpfsys.map_info(fd)
        differ = [k for k in ("type", "key_size", "value_size", "flags")
                  if mine[k] != theirs[k]]
        if differ:
            raise EngineError(f"{self.name}: cannot share {name}: its {', '.join(differ)} "
                              "differ from the program's declaration")
        own, self._map_fds[index] = self._map_fds[index], os.dup(fd)
        os.close(own)
        self._maps.pop(name, None)

    def open_event_buffer(self, name: str, handle: Callable[[Any], None], *, perf: bool,
                          pages: int = 64) -> None:
        """Deliver each event of a BPF_RINGBUF_OUTPUT (or BPF_PERF_OUTPUT) map to `handle`
        as a ctypes struct that is only valid during the call: copy what you keep."""
        index = self._map_index[name]
        spec, fd = self._image.maps[index], self._map_fds[index]
        if spec.event_type is None:
            raise EngineError(f"{self.name}: BCC described no event type for {name} (it "
                              "learns it from the program's ringbuf_output/perf_submit)")
        try:
            if perf:
                self._perf_buffers.append(PerfBuffer(fd, pages, spec.event_type, handle,
                                                     self._on_lost))
            else:
                size = bpfsys.map_info(fd)["max_entries"]
                self._rings.append(RingBuffer(fd, size, spec.event_type, handle))
        except OSError as exc:
            raise EngineError(f"{self.name}: cannot open the event buffer {name}: {exc}"
                              ) from exc

    def _on_lost(self, count: int) -> None:
        self.perf_lost += count

    def event_fds(self) -> list[int]:
        """File descriptors that poll readable when an event buffer holds events (ring
        buffer maps, per-CPU perf buffers), for a reader that sleeps in epoll."""
        return ([ring.fd for ring in self._rings]
                + [fd for buffer in self._perf_buffers for fd in buffer.fds])

    def poll_event_buffers(self) -> None:
        """Hand every pending event to its handler, without waiting for more."""
        for ring in self._rings:
            ring.consume()
        for buffer in self._perf_buffers:
            buffer.consume()

    def close(self) -> None:
        """Detach and unload; safe to call twice."""
        for fd in self._attachments:
            with contextlib.suppress(OSError):
                os.close(fd)
        for buffer in self._perf_buffers:
            buffer.close()
        for ring in self._rings:
            ring.close()
        for fd in [*self._progs.values(), *self._map_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._attachments, self._perf_buffers, self._rings = [], [], []
        self._progs, self._map_fds, self._maps = {}, [], {}


class Engine:
    """Compiles and loads BPF programs with the header tree chosen by discovery."""

    def __init__(self, headers: HeaderSource | None, jobs: int | None = None,
                 cache: ImageCache | None = None) -> None:
        self.headers = headers
        if headers is not None and headers.bcc_kernel_source is not None:
            # BCC reads this when it compiles, in the compiler process (which inherits it).
            os.environ["BCC_KERNEL_SOURCE"] = str(headers.bcc_kernel_source)
        self.compiler = Compiler(jobs or default_jobs(), cache)

    def load(self, name: str, cflags: Sequence[str] = (), *, source: Path | None = None
             ) -> Program:
        """Compile probes/<name>.bpf.c (or `source`) and create its maps."""
        if self.headers is None:
            raise EngineError(
                "no kernel headers found for BCC. Fix: install the kernel headers package "
                "(Debian: linux-headers-amd64; `make setup` links them) or set "
                "BCC_KERNEL_SOURCE; `otel-ebpf doctor` shows what was searched"
            )
        text = source.read_text() if source is not None else bpf_source(name)
        # shared headers (rate_limit.h) sit beside the sources
        directories = list(dict.fromkeys(
            [*([source.parent] if source is not None else []), bpf_source_dir()]))
        text = inline_headers(text, directories)
        includes = [f"-I{d}" for d in directories]
        try:
            image, fds, cached = self.compiler.compile(text, [*includes, *cflags])
        except CompileError as exc:
            raise EngineError(
                f"{name}: BPF program failed to compile or load: {exc}. The compiler or "
                "verifier output is above; `otel-ebpf doctor` checks the usual causes"
            ) from exc
        if cached:  # one line per start: a restart that compiles is worth noticing
            log.info("%s: program from the compile cache, not compiled", name)
        return Program(name, image, fds)

    @staticmethod
    def release_compiler_memory() -> None:
        """Give the heap freed since start-up back to the system (glibc keeps it
        otherwise). The compiler's never was ours; this is start-up's own garbage, the
        kernel's parsed BTF among it."""
        kbtf.forget()
        memory.trim()

    def verify(self, name: str, cflags: Sequence[str], functions: Sequence[tuple[str, str]]
               ) -> None:
        """Compile and pass the verifier for each (function, kind), attaching nothing."""
        program = self.load(name, cflags)
        try:
            for fn_name, kind in functions:
                program.load_function(fn_name, kind)
        finally:
            program.close()
