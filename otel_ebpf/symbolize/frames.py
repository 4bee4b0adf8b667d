"""What a symbolized stack is made of: frames, each with the mapping it came from."""

from __future__ import annotations

from typing import NamedTuple

KERNEL = "kernel"
NATIVE = "native"
CPYTHON = "cpython"  # profile.frame.type values of the semantic conventions
V8JS = "v8js"
JVM = "jvm"


# Mapping and Frame are named tuples, not dataclasses: every sample's stack is hashed
# (merging samples, interning locations), and tuple hashing runs in C.
class Mapping(NamedTuple):
    start: int
    end: int
    file_offset: int
    path: str
    build_id: str | None


class Frame(NamedTuple):
    address: int
    function: str | None
    kind: str  # KERNEL | NATIVE | CPYTHON | V8JS | JVM
    mapping: Mapping | None
    offset_in_function: int  # 0 when function is None
    # interpreted code: its source file, the line (0: unknown) and the function's first line
    file: str | None = None
    line: int = 0
    start_line: int = 0
