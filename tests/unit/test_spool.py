"""The on-disk spool: files come back oldest first, across a restart too; the byte bound
drops the oldest files and counts their items by whose they were; damaged, truncated or
half-written files are counted and removed, never raised; one agent a directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otel_ebpf.export.queue import SPOOL_CORRUPT, SPOOL_FULL, Attrs, DropLedger
from otel_ebpf.export.spool import PREFIX, UNKNOWN, Spool, SpoolError

NGINX: Attrs = frozenset({("service.name", "nginx"), ("process.executable.name", "nginx")})
REDIS: Attrs = frozenset({("service.name", "redis")})
ONE = PREFIX + 1000 + 200  # a file of put(): more than its payload and meta, not twice


def opened(directory: Path, max_bytes: int = 1 << 20,
           ledger: DropLedger | None = None) -> Spool:
    spool = Spool(directory, "spans", max_bytes, ledger or DropLedger())
    spool.open()
    return spool


def put(spool: Spool, n: int, whose: Attrs = NGINX, size: int = 1000) -> bool:
    """A batch whose payload names it: b'<n>' padded to `size` bytes, of n items."""
    return spool.append(str(n).encode().ljust(size, b"."), n, {whose: n})


def drain(spool: Spool) -> list[int]:
    out = []
    while (spooled := spool.oldest()) is not None:
        out.append(int(spooled.payload.rstrip(b".")))
        spool.settle(spooled)
    return out


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "lock")


def test_batches_come_back_oldest_first_and_leave_once_delivered(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in (3, 1, 4, 1, 5):
        assert put(spool, n)
    assert (len(spool), spool.items) == (5, 14)
    first = spool.oldest()
    assert first is not None and first.shares == {NGINX: 3}
    spool.settle(first, keep=True)  # a failed attempt: it stays, still the oldest
    assert drain(spool) == [3, 1, 4, 1, 5]
    assert (len(spool), spool.items, spool.nbytes) == (0, 0, 0)
    assert files(tmp_path) == []


def test_a_batch_put_back_at_the_head_goes_first(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    put(spool, 2)
    put(spool, 3)
    spool.append(b"1", 1, {REDIS: 1}, front=True)
    assert drain(spool) == [1, 2, 3]


def test_a_restarted_agent_finds_the_spool_in_order_and_appends_after_it(
        tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in (7, 8, 9):
        put(spool, n)
    in_flight = spool.oldest()  # the agent stops with a file in flight: it stays
    assert in_flight is not None
    spool.close()
    again = opened(tmp_path)
    assert (len(again), again.items) == (3, 24)
    put(again, 10)
    assert drain(again) == [7, 8, 9, 10]


def test_past_the_byte_bound_the_oldest_files_go_counted_by_whose(tmp_path: Path) -> None:
    ledger = DropLedger()
    spool = opened(tmp_path, max_bytes=3 * ONE, ledger=ledger)
    put(spool, 1, REDIS)
    for n in (2, 3, 4, 5):
        assert put(spool, n)
    assert spool.nbytes <= 3 * ONE
    assert drain(spool) == [3, 4, 5]
    assert ledger.take() == {(SPOOL_FULL, REDIS): 1, (SPOOL_FULL, NGINX): 2}


def test_the_file_in_flight_is_never_evicted_and_an_oversized_batch_is_dropped(
        tmp_path: Path) -> None:
    ledger = DropLedger()
    spool = opened(tmp_path, max_bytes=2 * ONE, ledger=ledger)
    put(spool, 1)
    in_flight = spool.oldest()
    assert in_flight is not None
    put(spool, 2)
    put(spool, 3)  # room is made from 2, not from 1 in flight
    spool.settle(in_flight)
    assert drain(spool) == [3]
    assert not put(spool, 4, REDIS, size=1 << 20)  # larger than the whole spool
    assert ledger.take() == {(SPOOL_FULL, NGINX): 2, (SPOOL_FULL, REDIS): 4}
    assert files(tmp_path) == []


def test_damaged_files_are_counted_and_removed_and_the_rest_delivered(
        tmp_path: Path) -> None:
    ledger = DropLedger()
    spool = opened(tmp_path, ledger=ledger)
    for n in (1, 2, 3, 4, 5):
        put(spool, n, REDIS if n == 2 else NGINX)
    spool.close()
    names = files(tmp_path)
    # 1: truncated mid-body (a power loss); 2: a flipped payload byte; 3: garbage
    path = tmp_path / names[0]
    path.write_bytes(path.read_bytes()[:-10])
    path = tmp_path / names[1]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    (tmp_path / names[2]).write_bytes(b"not a spool file")
    (tmp_path / ".tmp-999").write_bytes(b"half a write")  # a crash mid-write
    (tmp_path / "README").write_text("not ours: left alone")
    again = opened(tmp_path, ledger=ledger)
    # the truncated and the garbage file are caught at start (sizes, header checksum)
    assert files(tmp_path) == sorted([names[1], names[3], names[4], "README"])
    assert drain(again) == [4, 5]  # the flipped byte is caught when read
    assert ledger.take() == {(SPOOL_CORRUPT, NGINX): 1, (SPOOL_CORRUPT, REDIS): 2,
                             (SPOOL_CORRUPT, UNKNOWN): 1}
    assert files(tmp_path) == ["README"]


def test_a_file_removed_behind_the_spools_back_is_counted_not_raised(tmp_path: Path) -> None:
    ledger = DropLedger()
    spool = opened(tmp_path, ledger=ledger)
    put(spool, 6)
    put(spool, 7)
    os.unlink(tmp_path / files(tmp_path)[0])
    assert drain(spool) == [7]
    assert ledger.take() == {(SPOOL_CORRUPT, UNKNOWN): 6}


def test_one_agent_a_directory_and_an_unusable_one_says_why(tmp_path: Path) -> None:
    opened(tmp_path)
    with pytest.raises(SpoolError, match="in use by another otel-ebpf"):
        opened(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match=r"cannot use .*file/spans"):
        opened(blocker / "spans")
