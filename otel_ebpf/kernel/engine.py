"""The BCC engine: the one place that imports `bcc`.

Probes ask it to compile a program with some cflags, attach tracepoints or perf events,
and drain maps. They get back plain ctypes values, so nothing above this module needs BCC
to be importable (unit tests, `otel-ebpf --help`, config validation).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from otel_ebpf.kernel.headers import HeaderSource

log = logging.getLogger(__name__)

BPF_PACKAGE = "otel_ebpf.bpf"  # probes/, shipped inside the package
_BATCH = 512  # entries per lookup-and-delete round: bounds the copy buffers


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


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise EngineError(
            "the BCC Python module is not importable. Fix: install Debian's python3-bpfcc "
            "and run from a venv made with --system-site-packages (make setup does both)"
        ) from exc
    return bcc


class BpfMap:
    """One BPF map of a loaded program, by name."""

    def __init__(self, table: Any, lib: Any) -> None:
        self._table = table
        self._lib = lib
        self.key_type: type[ct.Structure] = table.Key
        self.value_type: type[ct.Structure] = table.Leaf
        self.key_size = ct.sizeof(self.key_type)
        self.value_size = ct.sizeof(self.value_type)
        self._keys = (self.key_type * _BATCH)()
        self._values = (self.value_type * _BATCH)()
        self._batch_ok = True

    def drain(self) -> list[tuple[Any, Any]]:
        """Look up and delete every entry: (key, value) ctypes structs."""
        keys, values = self.drain_bytes()
        ksize, vsize = self.key_size, self.value_size
        return [(self.key_type.from_buffer_copy(keys, i * ksize),
                 self.value_type.from_buffer_copy(values, i * vsize))
                for i in range(len(keys) // ksize)]

    def drain_bytes(self) -> tuple[bytes, bytes]:
        """Look up and delete every entry, in batches where the kernel has them (5.6+): the
        keys and the values, each packed back to back as the kernel lays them out, for
        decoders that unpack many entries at C speed (struct.iter_unpack).

        Our own loop rather than BCC's: BCC 0.26 shares one integer between the batch
        token and the count, and allocates max_entries-sized buffers on every call.
        """
        if self._batch_ok:
            try:
                return self._drain_batched()
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                log.info("map batch operations unsupported (%s); using per-key reads", exc)
                self._batch_ok = False
        return self._drain_per_key()

    def _drain_batched(self) -> tuple[bytes, bytes]:
        token_in, token_out, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        ksize, vsize = self.key_size, self.value_size
        keys, values = bytearray(), bytearray()
        first = True
        while True:
            count.value = _BATCH
            res = self._lib.bpf_lookup_and_delete_batch(
                self._table.map_fd,
                None if first else ct.byref(token_in),
                ct.byref(token_out),
                ct.byref(self._keys),
                ct.byref(self._values),
                ct.byref(count),
            )
            err = ct.get_errno()
            keys += memoryview(self._keys).cast("B")[: count.value * ksize]
            values += memoryview(self._values).cast("B")[: count.value * vsize]
            if res != 0:
                if err == errno.ENOENT:
                    return bytes(keys), bytes(values)
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
            token_in.value = token_out.value
            first = False

    def _drain_per_key(self) -> tuple[bytes, bytes]:
        keys, values = bytearray(), bytearray()
        for key in list(self._table.keys()):
            try:
                value = self._table[key]
                del self._table[key]
            except KeyError:
                continue
            keys += bytes(key)
            values += bytes(value)
        return bytes(keys), bytes(values)

    def percpu_sums(self) -> list[int]:
        """For a per-CPU array of counters: the per-index totals over all CPUs."""
        return [int(sum(self._table[ct.c_int(i)])) for i in range(len(self._table))]

    def set(self, key: Any, value: Any) -> None:
        self._table[key] = value

    def delete(self, key: Any) -> bool:
        try:
            del self._table[key]
        except KeyError:
            return False
        return True

    def get(self, key: Any) -> Any | None:
        """The value under key, or None."""
        try:
            return self._table[key]
        except KeyError:
            return None

    def delete_many(self, keys: Sequence[Any]) -> None:
        """Delete these keys, in batches where the kernel has them (5.6+); absent keys are
        skipped."""
        pending = list(keys)
        while pending and self._batch_ok:
            chunk = pending[:_BATCH]
            for i, key in enumerate(chunk):
                self._keys[i] = key
            count = ct.c_uint32(len(chunk))
            res = self._lib.bpf_delete_batch(self._table.map_fd, ct.byref(self._keys),
                                             ct.byref(count))
            err = ct.get_errno()
            done = count.value
            if res != 0:
                if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) and done == 0:
                    self._batch_ok = False
                    break
                if err != errno.ENOENT:
                    raise OSError(err, f"BPF_MAP_DELETE_BATCH: {os.strerror(err)}")
                done += 1  # the batch stopped at a key that is already gone
            pending = pending[done:]
        for key in pending:
            self.delete(key)

    def set_members(self, keys: Iterable[Any]) -> None:
        """Fill a hash used as a set (value 1), e.g. an in-kernel filter."""
        for key in keys:
            self._table[key] = ct.c_uint8(1)


def update_set_map(table: BpfMap, current: set[int], wanted: set[int]) -> set[int]:
    """Make a u64-keyed set map hold exactly `wanted`; returns the new content."""
    table.set_members(ct.c_uint64(k) for k in wanted - current)
    for k in current - wanted:
        table.delete(ct.c_uint64(k))
    return set(wanted)


class Program:
    """A compiled and loaded BPF object. `close()` detaches everything it attached."""

    def __init__(self, bpf: Any, bcc: Any, name: str) -> None:
        self._bpf = bpf
        self._bcc = bcc
        self._lib = bcc.libbcc.lib
        self.name = name
        self._maps: dict[str, BpfMap] = {}
        self._ring_tables: list[Any] = []
        self._perf_tables: list[Any] = []
        self.perf_lost = 0  # samples the perf buffer reported lost (ring buffers count in BPF)

    def attach_raw_tracepoint(self, tracepoint: str, fn_name: str) -> None:
        try:
            self._bpf.attach_raw_tracepoint(tp=tracepoint.encode(), fn_name=fn_name.encode())
        except Exception as exc:
            raise EngineError(
                f"{self.name}: cannot attach raw tracepoint {tracepoint}: {exc}. "
                "Run `otel-ebpf doctor` for what is missing"
            ) from exc

    def attach_tracepoint(self, tracepoint: str, fn_name: str) -> None:
        try:
            self._bpf.attach_tracepoint(tp=tracepoint.encode(), fn_name=fn_name.encode())
        except Exception as exc:
            raise EngineError(
                f"{self.name}: cannot attach tracepoint {tracepoint}: {exc}. "
                "Run `otel-ebpf doctor` for what is missing"
            ) from exc

    def attach_cpu_clock(self, fn_name: str, frequency_hz: int) -> None:
        """Run fn_name on the software cpu-clock of every online CPU (no PMU needed)."""
        bcc = self._bcc
        try:
            self._bpf.attach_perf_event(
                ev_type=bcc.PerfType.SOFTWARE, ev_config=bcc.PerfSWConfig.CPU_CLOCK,
                fn_name=fn_name.encode(), sample_freq=frequency_hz, cpu=-1)
        except Exception as exc:
            raise EngineError(
                f"{self.name}: cannot open cpu-clock perf events at {frequency_hz} Hz: "
                f"{exc}. Check perf_event_paranoid and CAP_PERFMON (`otel-ebpf doctor`)"
            ) from exc

    def program_ids(self) -> list[int]:
        """Kernel ids of the loaded programs (as `bpftool prog show` lists them)."""
        ids = []
        for fn in getattr(self._bpf, "funcs", {}).values():
            info = (ct.c_uint8 * 256)()  # struct bpf_prog_info: type, id, ...
            length = ct.c_uint32(ct.sizeof(info))
            if self._lib.bpf_obj_get_info(fn.fd, ct.byref(info), ct.byref(length)) == 0:
                ids.append(int.from_bytes(bytes(info[4:8]), "little"))
        return sorted(ids)

    def load_function(self, fn_name: str, kind: str) -> None:
        prog_type = {"raw_tracepoint": self._bcc.BPF.RAW_TRACEPOINT,
                     "tracepoint": self._bcc.BPF.TRACEPOINT,
                     "perf_event": self._bcc.BPF.PERF_EVENT}[kind]
        try:
            self._bpf.load_func(fn_name.encode(), prog_type)
        except Exception as exc:
            raise EngineError(f"{self.name}: the verifier refused {fn_name}: {exc}") from exc

    def map(self, name: str) -> BpfMap:
        if name not in self._maps:
            self._maps[name] = BpfMap(self._bpf.get_table(name.encode()), self._lib)
        return self._maps[name]

    def open_event_buffer(self, name: str, handle: Callable[[Any], None], *, perf: bool,
                          pages: int = 64) -> None:
        """Deliver each event of a BPF_RINGBUF_OUTPUT (or BPF_PERF_OUTPUT) map to `handle`
        as a ctypes struct that is only valid during the call: copy what you keep."""
        table = self._bpf[name.encode()]
        if perf:
            def on_perf(_cpu: int, data: Any, _size: int) -> None:
                handle(table.event(data))

            def on_lost(count: int) -> None:
                self.perf_lost += count

            table.open_perf_buffer(on_perf, page_cnt=pages, lost_cb=on_lost)
            self._perf_tables.append(table)
        else:
            def on_ring(_ctx: Any, data: Any, _size: int) -> int:
                handle(table.event(data))
                return 0

            table.open_ring_buffer(on_ring)
            self._ring_tables.append(table)

    def event_fds(self) -> list[int]:
        """File descriptors that poll readable when an event buffer holds events (ring
        buffer maps, per-CPU perf buffers), for a reader that sleeps in epoll."""
        fds = [table.map_fd for table in self._ring_tables]
        perf_ids = {id(table) for table in self._perf_tables}
        for (table_id, _cpu), reader in self._bpf.perf_buffers.items():
            if table_id in perf_ids:
                fds.append(int(self._lib.perf_reader_fd(reader)))
        return fds

    def poll_event_buffers(self) -> None:
        """Hand every pending event to its handler, without waiting for more."""
        if self._ring_tables:
            self._bpf.ring_buffer_consume()
        if self._perf_tables:
            # consume, not poll(0): a perf event's readiness is reported once (perf_poll
            # clears it), so after the daemon's epoll saw it a poll() here finds nothing
            self._bpf.perf_buffer_consume()

    def close(self) -> None:
        """Detach and unload; safe to call twice."""
        if self._bpf is not None:
            # Close per-CPU perf buffers while their map is still open: BCC's own
            # destructor would try it after cleanup() and raise on the closed map.
            for table in self._perf_tables:
                for cpu in list(table._open_key_fds):
                    del table[cpu]
            self._perf_tables = []
            self._bpf.cleanup()
            self._bpf = None


class Engine:
    """Compiles and loads BPF programs with the header tree chosen by discovery."""

    def __init__(self, headers: HeaderSource | None) -> None:
        self.headers = headers
        if headers is not None and headers.bcc_kernel_source is not None:
            # BCC reads this when it compiles; set once, before the first program.
            os.environ["BCC_KERNEL_SOURCE"] = str(headers.bcc_kernel_source)

    def load(self, name: str, cflags: Sequence[str] = ()) -> Program:
        bcc = _import_bcc()
        if self.headers is None:
            raise EngineError(
                "no kernel headers found for BCC. Fix: install the kernel headers package "
                "(Debian: linux-headers-amd64; `make setup` links them) or set "
                "BCC_KERNEL_SOURCE; `otel-ebpf doctor` shows what was searched"
            )
        text = bpf_source(name)
        # shared headers (rate_limit.h) sit beside the sources
        include = f"-I{bpf_source_dir()}"
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=[include, *cflags])
        except Exception as exc:
            raise EngineError(
                f"{name}: BPF program failed to compile or load: {exc}. The compiler or "
                "verifier output is above; `otel-ebpf doctor` checks the usual causes"
            ) from exc
        return Program(bpf, bcc, name)

    @staticmethod
    def release_compiler_memory() -> None:
        """Give the heap that BCC's in-process clang/LLVM freed back to the system: about
        70 MB after three programs here, which glibc would otherwise keep. Call it once the
        programs are loaded; a no-op without glibc."""
        with contextlib.suppress(AttributeError, OSError):
            ct.CDLL(None).malloc_trim(0)

    def verify(self, name: str, cflags: Sequence[str], functions: Sequence[tuple[str, str]]
               ) -> None:
        """Compile and pass the verifier for each (function, kind), attaching nothing."""
        program = self.load(name, cflags)
        try:
            for fn_name, kind in functions:
                program.load_function(fn_name, kind)
        finally:
            program.close()
