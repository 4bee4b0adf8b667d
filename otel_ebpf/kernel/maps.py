"""One BPF map, by fd: lookups, updates, deletes and drains with bpf(2) (otel_ebpf.kernel
.bpfsys), keys and values as the ctypes types BCC derived for the program."""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import logging
import struct
from collections.abc import Iterable, Sequence
from typing import Any, cast

from otel_ebpf.kernel import bpfsys

log = logging.getLogger(__name__)

_BATCH = 512  # entries per lookup-and-delete round: bounds the copy buffers
_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)
FILL_LIMIT = 0.75  # above this share of its capacity, a DrainAged map keeps one drain's keys


class BpfMap:
    """One BPF map of a loaded program. The fd stays its owner's (the Program closes it)."""

    def __init__(self, fd: int, key_type: Any, value_type: Any) -> None:
        self.fd = fd
        info = bpfsys.map_info(fd)
        self.map_type = info["type"]
        self.max_entries = info["max_entries"]
        self.key_type: type[ct.Structure] = key_type
        self.value_type: type[ct.Structure] = value_type
        self.key_size = ct.sizeof(self.key_type)
        self.value_size = ct.sizeof(self.value_type)
        self._batch_ok = True

    @functools.cached_property
    def _keys(self) -> ct.Array[Any]:
        """Batch buffers, made on first use: a stack map's values take 0.5 MB a batch."""
        return (self.key_type * _BATCH)()

    @functools.cached_property
    def _values(self) -> ct.Array[Any]:
        return (self.value_type * _BATCH)()

    def __len__(self) -> int:
        return self.max_entries

    # -- single entries --------------------------------------------------------------------

    def _key(self, key: Any) -> Any:
        return _fit(key, self.key_type, self.key_size)

    def get(self, key: Any) -> Any | None:
        """The value under key, or None."""
        value = self.value_type()
        return value if bpfsys.map_lookup(self.fd, self._key(key), value) else None

    def set(self, key: Any, value: Any) -> None:
        bpfsys.map_update(self.fd, self._key(key), _fit(value, self.value_type,
                                                         self.value_size))

    def delete(self, key: Any) -> bool:
        return bpfsys.map_delete(self.fd, self._key(key))

    def set_members(self, keys: Iterable[Any]) -> None:
        """Fill a hash used as a set (value 1), e.g. an in-kernel filter."""
        for key in keys:
            self.set(key, ct.c_uint8(1))

    def percpu_sums(self) -> list[int]:
        """For a per-CPU array of counters: the per-index totals over all CPUs."""
        ncpus = bpfsys.possible_cpus()
        stride = (self.value_size + 7) // 8 * 8
        buf = (ct.c_ubyte * (stride * ncpus))()
        sums = []
        for i in range(self.max_entries):
            if not bpfsys.map_lookup(self.fd, ct.c_uint32(i), buf):
                sums.append(0)
                continue
            value_type: Any = self.value_type  # an integer type here
            sums.append(sum(int(value_type.from_buffer(buf, cpu * stride).value)
                            for cpu in range(ncpus)))
        return sums

    # -- many entries ----------------------------------------------------------------------

    def keys(self) -> list[Any]:
        out: list[Any] = []
        key: Any = None
        while True:
            following = self.key_type()
            if not bpfsys.map_next_key(self.fd, key, following):
                return out
            out.append(following)
            key = following

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
        decoders that unpack many entries at C speed (struct.iter_unpack)."""
        if self._batch_ok:
            try:
                return self._drain_batched()
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                log.info("map batch operations unsupported (%s); using per-key reads", exc)
                self._batch_ok = False
        return self._drain_per_key()

    def _drain_batched(self) -> tuple[bytes, bytes]:
        token_in, token_out = ct.c_uint32(0), ct.c_uint32(0)
        ksize, vsize = self.key_size, self.value_size
        keys, values = bytearray(), bytearray()
        first = True
        while True:
            count, done = bpfsys.map_lookup_and_delete_batch(
                self.fd, None if first else token_in, token_out, self._keys, self._values,
                _BATCH)
            keys += memoryview(self._keys).cast("B")[: count * ksize]
            values += memoryview(self._values).cast("B")[: count * vsize]
            if done:
                return bytes(keys), bytes(values)
            token_in.value = token_out.value
            first = False

    def _drain_per_key(self) -> tuple[bytes, bytes]:
        keys, values = bytearray(), bytearray()
        for key in self.keys():
            value = self.get(key)
            if value is None or not self.delete(key):
                continue
            keys += bytes(key)
            values += bytes(value)
        return bytes(keys), bytes(values)

    def delete_many(self, keys: Sequence[Any]) -> None:
        """Delete these keys, in batches where the kernel has them (5.6+); absent keys are
        skipped."""
        pending = list(keys)
        while pending and self._batch_ok:
            chunk = pending[:_BATCH]
            for i, key in enumerate(chunk):
                self._keys[i] = key
            done, err = bpfsys.map_delete_batch(self.fd, self._keys, len(chunk))
            if err is not None:
                if err.errno in _UNSUPPORTED and done == 0:
                    self._batch_ok = False
                    break
                if err.errno != errno.ENOENT:
                    raise err
                done += 1  # the batch stopped at a key that is already gone
            pending = pending[done:]
        for key in pending:
            self.delete(key)


def _fit(obj: Any, ctype: Any, size: int) -> Any:
    """obj as a ctypes object of `size` bytes: as it is when it has that size, else
    converted (a Python int, or a simple ctypes value of another width)."""
    if isinstance(obj, int):
        return ctype(obj)
    if ct.sizeof(obj) == size:
        return obj
    value = getattr(obj, "value", None)
    if isinstance(value, int):
        return ctype(value)
    raise ValueError(f"a {type(obj).__name__} of {ct.sizeof(obj)} bytes where the map "
                     f"holds {size}")


class DrainAged:
    """The u64 keys user space holds in a content-addressed BPF hash (interned stacks):
    each one is deleted from the kernel once no drain used it for `retain_drains` drains,
    and above FILL_LIMIT of `capacity` every key the last drain did not use goes, so that
    new entries keep finding room."""

    def __init__(self, table: BpfMap, capacity: int, retain_drains: int) -> None:
        self.table, self.capacity, self.retain_drains = table, capacity, retain_drains
        self._last_used: dict[int, int] = {}  # key -> drain: the keys the kernel holds
        self._drain = 0

    def __len__(self) -> int:
        """The keys the kernel map holds."""
        return len(self._last_used)

    def use(self, key: int) -> None:
        self._last_used[key] = self._drain

    def age(self) -> list[int]:
        """End a drain: delete the kernel's entries no drain used lately; their keys."""
        retain = (self.retain_drains if len(self._last_used) < FILL_LIMIT * self.capacity
                  else 0)
        stale = [k for k, drain in self._last_used.items() if self._drain - drain > retain]
        if stale:
            self.table.delete_many([ct.c_uint64(k) for k in stale])
            for k in stale:
                del self._last_used[k]
        self._drain += 1
        return stale


def update_set_map(table: BpfMap, current: set[int], wanted: set[int]) -> set[int]:
    """Make a u64-keyed set map hold exactly `wanted`; returns the new content."""
    table.set_members(ct.c_uint64(k) for k in wanted - current)
    for k in current - wanted:
        table.delete(ct.c_uint64(k))
    return set(wanted)


def unpacker(ctype: type[ct.Structure], fields: Sequence[str]) -> struct.Struct:
    """A struct.Struct that unpacks entries of `ctype` (a map's key or value type, as BCC
    derived it from the C) into the values of `fields`, for decoders that unpack many
    entries at C speed. The C stays the one source of truth of the layout: offsets and
    sizes come from it, and ValueError says so when its members are not `fields`."""
    names = [field[0] for field in ctype._fields_]
    if names != list(fields):
        raise ValueError(f"struct {ctype.__name__} has members {names}; the decoder reads "
                         f"{list(fields)}")
    codes, at = ["="], 0
    for field in ctype._fields_:
        name, member = field[0], cast(Any, field[1])
        offset = getattr(ctype, name).offset
        codes.append(f"{offset - at}x" if offset > at else "")
        size = ct.sizeof(member)
        if issubclass(member, ct.Array) and member._type_ is ct.c_char:
            codes.append(f"{member._length_}s")
        elif size in (1, 2, 4, 8) and isinstance(getattr(member, "_type_", None), str):
            code = {1: "b", 2: "h", 4: "i", 8: "q"}[size]
            codes.append(code.upper() if member._type_.isupper() else code)
        else:
            raise ValueError(f"struct {ctype.__name__}.{name}: no unpacking for {member}")
        at = offset + size
    codes.append(f"{ct.sizeof(ctype) - at}x" if ct.sizeof(ctype) > at else "")
    return struct.Struct("".join(codes))
