"""Event buffers read through mmap, as libbpf does: a BPF ring buffer map (one buffer for
all CPUs, 5.8+) or a perf event array (one perf buffer per CPU, any kernel).

Each consume() hands every pending record to `handle` as an instance of the event's
ctypes type (a copy) and never waits. Ordering: x86 keeps loads and stores in order, and
the positions are read before the records they cover and written after; the Python
interpreter adds no reordering of its own.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

from otel_ebpf.kernel import bpfsys

PAGE = mmap.PAGESIZE
_BUSY, _DISCARD = 1 << 31, 1 << 30  # ring buffer record header bits
_RECORD_LOST, _RECORD_SAMPLE = 2, 9  # perf_event_header.type
_DATA_HEAD, _DATA_TAIL = 1024, 1032  # offsets in struct perf_event_mmap_page


def _event(event_type: Any, data: bytes | memoryview) -> Any:
    size = ct.sizeof(event_type)
    raw = bytes(data[:size])
    return event_type.from_buffer_copy(raw.ljust(size, b"\0"))


class RingBuffer:
    """A BPF_MAP_TYPE_RINGBUF map: a consumer page we write, and the producer page plus
    the data pages (mapped twice in a row, so a record that wraps reads in one piece)."""

    def __init__(self, map_fd: int, size: int, event_type: Any,
                 handle: Callable[[Any], None]) -> None:
        self.fd = map_fd
        self._mask = size - 1
        self._event_type = event_type
        self._handle = handle
        self._consumer = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._producer = mmap.mmap(map_fd, PAGE + 2 * size, mmap.MAP_SHARED,
                                       mmap.PROT_READ, offset=PAGE)
        except OSError:
            self._consumer.close()
            raise
        self._data = memoryview(self._producer)[PAGE:]

    def consume(self) -> int:
        """Hand every complete record to the handler; how many."""
        consumer = struct.unpack_from("=Q", self._consumer, 0)[0]
        producer = struct.unpack_from("=Q", self._producer, 0)[0]
        handled = 0
        while consumer < producer:
            offset = consumer & self._mask
            length = struct.unpack_from("=I", self._data, offset)[0]
            if length & _BUSY:
                break  # reserved, not yet committed: the next consume gets it
            size = length & ~(_BUSY | _DISCARD)
            consumer += (size + 8 + 7) & ~7
            if not length & _DISCARD:
                self._handle(_event(self._event_type, self._data[offset + 8:offset + 8 + size]))
                handled += 1
            struct.pack_into("=Q", self._consumer, 0, consumer)
            if consumer >= producer:
                producer = struct.unpack_from("=Q", self._producer, 0)[0]
        return handled

    def close(self) -> None:
        self._data.release()
        self._producer.close()
        self._consumer.close()


class PerfBuffer:
    """A BPF_PERF_OUTPUT map: one PERF_COUNT_SW_BPF_OUTPUT event per online CPU, each with
    its own mmap'ed ring, put into the map under its CPU."""

    def __init__(self, map_fd: int, pages: int, event_type: Any,
                 handle: Callable[[Any], None], lost: Callable[[int], None]) -> None:
        self._event_type = event_type
        self._handle = handle
        self._lost = lost
        self._size = pages * PAGE
        self.readers: list[tuple[int, mmap.mmap]] = []
        try:
            for cpu in bpfsys.cpus("online"):
                fd = bpfsys.perf_event_open(
                    bpfsys.PERF_TYPE_SOFTWARE, bpfsys.PERF_COUNT_SW_BPF_OUTPUT, cpu,
                    sample_period=1, sample_type=bpfsys.PERF_SAMPLE_RAW, wakeup_events=1)
                try:
                    ring = mmap.mmap(fd, PAGE + self._size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError:
                    os.close(fd)
                    raise
                self.readers.append((fd, ring))
                bpfsys.map_update(map_fd, ct.c_int(cpu), ct.c_int(fd))
                bpfsys.perf_event_enable(fd)
        except OSError:
            self.close()
            raise

    @property
    def fds(self) -> list[int]:
        return [fd for fd, _ in self.readers]

    def consume(self) -> int:
        handled = 0
        for _, ring in self.readers:
            handled += self._consume_one(ring)
        return handled

    def _consume_one(self, ring: mmap.mmap) -> int:
        head = struct.unpack_from("=Q", ring, _DATA_HEAD)[0]
        tail = struct.unpack_from("=Q", ring, _DATA_TAIL)[0]
        handled = 0
        while tail < head:
            kind, _misc, size = struct.unpack("=IHH", self._read(ring, tail, 8))
            record = self._read(ring, tail + 8, size - 8)
            if kind == _RECORD_SAMPLE:
                raw_size = struct.unpack_from("=I", record)[0]
                self._handle(_event(self._event_type, record[4:4 + raw_size]))
                handled += 1
            elif kind == _RECORD_LOST:
                self._lost(struct.unpack_from("=QQ", record)[1])
            tail += size
        struct.pack_into("=Q", ring, _DATA_TAIL, tail)
        return handled

    def _read(self, ring: mmap.mmap, position: int, length: int) -> bytes:
        """`length` bytes of the data pages from `position`, across the wrap if need be."""
        start = position % self._size
        first = ring[PAGE + start:PAGE + min(start + length, self._size)]
        if len(first) == length:
            return first
        return first + ring[PAGE:PAGE + length - len(first)]

    def close(self) -> None:
        for fd, ring in self.readers:
            with contextlib.suppress(OSError):
                bpfsys.perf_event_disable(fd)
            ring.close()
            os.close(fd)
        self.readers = []
