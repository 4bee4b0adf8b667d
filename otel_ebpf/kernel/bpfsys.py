"""bpf(2) and perf_event_open(2) through ctypes: what the agent needs once its programs are
compiled, without libbcc (which links libLLVM and libclang: ~65 MB of RSS just to import).

Each call takes and returns plain bytes and ints; errors are OSError with the errno. The
attribute layouts are those of include/uapi/linux/bpf.h and perf_event.h, zero-filled
past the fields set, as the kernel requires.
"""

from __future__ import annotations

import ctypes as ct
import errno
import fcntl
import functools
import os
import platform
import struct

_NR = {"x86_64": {"bpf": 321, "perf_event_open": 298},
       "aarch64": {"bpf": 280, "perf_event_open": 241}}
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, OBJ_GET_INFO_BY_FD, RAW_TRACEPOINT_OPEN, BTF_LOAD = 5, 15, 17, 18
MAP_LOOKUP_AND_DELETE_BATCH, MAP_DELETE_BATCH = 25, 27

# enum bpf_prog_type
PROG_TYPES = {"tracepoint": 5, "perf_event": 7, "raw_tracepoint": 17}
# enum bpf_map_type, the ones handled apart
MAP_PERF_EVENT_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH = 4, 5, 6, 10
MAP_RINGBUF = 27
PERCPU_MAPS = frozenset({MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH})

# perf_event_open
PERF_TYPE_SOFTWARE, PERF_TYPE_TRACEPOINT = 1, 2
PERF_COUNT_SW_CPU_CLOCK, PERF_COUNT_SW_BPF_OUTPUT = 0, 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
IOC_ENABLE, IOC_DISABLE, IOC_SET_BPF = 0x2400, 0x2401, 0x40042408
_ATTR_DISABLED, _ATTR_FREQ = 1 << 0, 1 << 10
PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5

LOG_SIZE = 1 << 22  # the verifier's log, read only when a load failed


def _nr(name: str) -> int:
    try:
        return _NR[platform.machine()][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name}: no syscall number for {platform.machine()}"
                      ) from None


def _call(nr: int, *args: object) -> int:
    res = int(_libc.syscall(nr, *args))
    if res < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def bpf(cmd: int, attr: ct.Array[ct.c_char]) -> int:
    """bpf(cmd, attr): the result (often a new fd); OSError on failure."""
    return _call(_nr("bpf"), ct.c_int(cmd), attr, ct.c_uint(len(attr)))


def _attr(fmt: str, *values: object, size: int = 128) -> ct.Array[ct.c_char]:
    buf = ct.create_string_buffer(size)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def addr(buf: ct.Array[ct.c_char] | ct.Array[ct.c_ubyte] | ct._CData | None) -> int:
    return 0 if buf is None else ct.addressof(buf)


# -- map elements ---------------------------------------------------------------------------


def _found(cmd: int, attr: ct.Array[ct.c_char]) -> bool:
    """Run a map command; False where the kernel says the key is not there (ENOENT)."""
    try:
        bpf(cmd, attr)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(fd: int, key: ct._CData, value: ct._CData) -> bool:
    """Copy the value under key into `value`; False if there is none."""
    return _found(MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, addr(key), addr(value), 0))


def map_update(fd: int, key: ct._CData, value: ct._CData, flags: int = 0) -> None:
    bpf(MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, addr(key), addr(value), flags))


def map_delete(fd: int, key: ct._CData) -> bool:
    """False if the key was not there."""
    return _found(MAP_DELETE_ELEM, _attr("=IIQQQ", fd, 0, addr(key), 0, 0))


def map_next_key(fd: int, key: ct._CData | None, next_key: ct._CData) -> bool:
    """The key after `key` (the first key for None) into next_key; False at the end."""
    return _found(MAP_GET_NEXT_KEY, _attr("=IIQQQ", fd, 0, addr(key), addr(next_key), 0))


def map_lookup_and_delete_batch(fd: int, token_in: ct._CData | None, token_out: ct._CData,
                                keys: ct._CData, values: ct._CData, count: int
                                ) -> tuple[int, bool]:
    """(entries copied, whether the map is exhausted). OSError for what is not ENOENT."""
    attr = _attr("=QQQQIIQQ", addr(token_in), addr(token_out), addr(keys), addr(values),
                 count, fd, 0, 0)
    try:
        bpf(MAP_LOOKUP_AND_DELETE_BATCH, attr)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return struct.unpack_from("=I", attr, 32)[0], True
    return struct.unpack_from("=I", attr, 32)[0], False


def map_delete_batch(fd: int, keys: ct._CData, count: int) -> tuple[int, OSError | None]:
    """(keys deleted, the error that stopped the batch or None)."""
    attr = _attr("=QQQQIIQQ", 0, 0, addr(keys), 0, count, fd, 0, 0)
    try:
        bpf(MAP_DELETE_BATCH, attr)
    except OSError as exc:
        return struct.unpack_from("=I", attr, 32)[0], exc
    return count, None


# -- objects -------------------------------------------------------------------------------


def obj_info(fd: int, size: int = 128) -> bytes:
    """struct bpf_prog_info / bpf_map_info / bpf_btf_info of an fd (first `size` bytes)."""
    info = ct.create_string_buffer(size)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, addr(info)))
    return info.raw


def map_info(fd: int) -> dict[str, int]:
    raw = obj_info(fd, 88)
    (map_type, map_id, key_size, value_size, max_entries,
     map_flags) = struct.unpack_from("=6I", raw)
    btf_vmlinux_value, = struct.unpack_from("=I", raw, 44)
    btf_id, btf_key, btf_value = struct.unpack_from("=3I", raw, 64)
    map_extra, = struct.unpack_from("=Q", raw, 80)
    return {"type": map_type, "id": map_id, "key_size": key_size, "value_size": value_size,
            "max_entries": max_entries, "flags": map_flags, "btf_id": btf_id,
            "btf_key_type_id": btf_key, "btf_value_type_id": btf_value,
            "btf_vmlinux_value_type_id": btf_vmlinux_value, "map_extra": map_extra}


def prog_id(fd: int) -> int:
    return int(struct.unpack_from("=I", obj_info(fd, 8), 4)[0])


def btf_info(fd: int) -> tuple[int, int]:
    """(id, size in bytes) of the BTF object behind fd (struct bpf_btf_info)."""
    size, btf_id = struct.unpack_from("=II", obj_info(fd, 32), 8)
    return btf_id, size


def btf_data(fd: int) -> bytes:
    """The raw BTF (types and strings) of the BTF object behind fd. Through the fd, which
    needs no more than the fd itself: by id (BPF_BTF_GET_FD_BY_ID) needs CAP_SYS_ADMIN."""
    _, size = btf_info(fd)
    data = ct.create_string_buffer(size)
    info = ct.create_string_buffer(32)  # struct bpf_btf_info: btf, btf_size, id, ...
    struct.pack_into("=QI", info, 0, addr(data), size)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, 32, addr(info)))
    return data.raw


def btf_load(data: bytes) -> int:
    blob = ct.create_string_buffer(data, len(data))
    return bpf(BTF_LOAD, _attr("=QQIII", addr(blob), 0, len(data), 0, 0))


def map_create(info: dict[str, int], name: str, btf_fd: int) -> int:
    """A map like the one `info` (map_info) describes, typed by btf_fd when it was."""
    has_btf = btf_fd >= 0 and info["btf_id"] != 0
    return bpf(MAP_CREATE, _attr(
        "=7I16s5IQ", info["type"], info["key_size"], info["value_size"], info["max_entries"],
        info["flags"], 0, 0, _obj_name(name), 0, btf_fd if has_btf else 0,
        info["btf_key_type_id"] if has_btf else 0, info["btf_value_type_id"] if has_btf else 0,
        info["btf_vmlinux_value_type_id"], info["map_extra"]))


def _obj_name(name: str) -> bytes:
    """BPF_OBJ_NAME_LEN: 15 characters of [A-Za-z0-9_.], as BCC names its programs."""
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:15].encode()


def prog_load(prog_type: int, insns: bytes, license_: str, name: str, btf_fd: int = 0,
              func_info: bytes = b"") -> tuple[int, str]:
    """(fd, "") or raises OSError; on failure the verifier's log is the OSError's
    filename (retried with a log, as libbpf does, so success costs no log buffer).
    func_info: (instruction offset, BTF type id) u32 pairs of btf_fd, one per function."""
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(license_.encode())
    info = ct.create_string_buffer(func_info, len(func_info)) if func_info else None

    def load(log: ct.Array[ct.c_char] | None) -> int:
        return bpf(PROG_LOAD, _attr(
            "=IIQQIIQII16sIIIIQI", prog_type, len(insns) // 8, addr(code), addr(lic),
            1 if log is not None else 0, len(log) if log is not None else 0, addr(log), 0, 0,
            _obj_name(name), 0, 0, btf_fd, 8 if info is not None else 0, addr(info),
            len(func_info) // 8))

    try:
        return load(None), ""
    except OSError:
        log = ct.create_string_buffer(LOG_SIZE)
        try:
            return load(log), ""
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, log.value.decode(errors="replace")
                          ) from None


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    tp = ct.create_string_buffer(name.encode())
    return bpf(RAW_TRACEPOINT_OPEN, _attr("=QI", addr(tp), prog_fd))


# -- perf events ---------------------------------------------------------------------------


def perf_event_open(type_: int, config: int, cpu: int, *, sample_freq: int = 0,
                    sample_period: int = 0, sample_type: int = 0, wakeup_events: int = 0,
                    disabled: bool = True) -> int:
    flags = (_ATTR_DISABLED if disabled else 0) | (_ATTR_FREQ if sample_freq else 0)
    attr = _attr("=IIQQQQQI", type_, PERF_ATTR_SIZE, config, sample_freq or sample_period,
                 sample_type, 0, flags, wakeup_events, size=PERF_ATTR_SIZE)
    return _call(_nr("perf_event_open"), attr, ct.c_int(-1), ct.c_int(cpu), ct.c_int(-1),
                 ct.c_ulong(PERF_FLAG_FD_CLOEXEC))


def perf_event_attach(fd: int, prog_fd: int) -> None:
    """Run prog_fd on every event of fd, from now on."""
    fcntl.ioctl(fd, IOC_SET_BPF, prog_fd)
    fcntl.ioctl(fd, IOC_ENABLE, 0)


def perf_event_enable(fd: int) -> None:
    fcntl.ioctl(fd, IOC_ENABLE, 0)


def perf_event_disable(fd: int) -> None:
    fcntl.ioctl(fd, IOC_DISABLE, 0)


@functools.cache
def possible_cpus() -> int:
    """How many slots a per-CPU map value has: the possible CPUs, fixed at boot (read once,
    not at every drain)."""
    return len(cpus("possible"))


def cpus(kind: str) -> list[int]:
    """The online or possible CPUs, from /sys/devices/system/cpu/<kind> ("0-3,5")."""
    with open(f"/sys/devices/system/cpu/{kind}") as f:
        text = f.read().strip()
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
