"""Extents of the unwind row array (tables.py): which runs of rows hold a file's table."""

from __future__ import annotations


class RowArea:
    """Extents of the row array: first-fit allocation, freed extents merged."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (first, count), sorted

    def allocate(self, count: int) -> int | None:
        for i, (first, free) in enumerate(self._free):
            if free >= count:
                if free == count:
                    del self._free[i]
                else:
                    self._free[i] = (first + count, free - count)
                return first
        return None

    def release(self, first: int, count: int) -> None:
        self._free.append((first, count))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        self._free = merged

    @property
    def used(self) -> int:
        return self.size - sum(n for _, n in self._free)
