"""Where the engine finds the .bpf.c sources and rate_limit.h, short of a real install
(tests/e2e/test_installed.py builds and installs a wheel)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from otel_ebpf.kernel.engine import (
    BPF_PACKAGE,
    MAIN_FILE,
    bpf_source,
    bpf_source_dir,
    inline_headers,
)

PROBES = Path(__file__).resolve().parents[2] / "probes"
PRINT_DIR = "from otel_ebpf.kernel.engine import bpf_source_dir; print(bpf_source_dir())"


def test_the_checkout_resolves_through_the_import_system() -> None:
    # a regular package (a namespace one has no origin): the way a wheel resolves it
    spec = importlib.util.find_spec(BPF_PACKAGE)
    assert spec is not None and spec.origin == str(PROBES / "__init__.py")
    assert bpf_source_dir() == PROBES
    assert (bpf_source_dir() / "rate_limit.h").is_file()
    assert '#include "rate_limit.h"' in bpf_source("syscall_latency")


def test_a_source_tree_that_nothing_installed_uses_its_probes_dir() -> None:
    # -S: no site-packages, so neither the editable install nor any other is seen
    proc = subprocess.run([sys.executable, "-S", "-c", PRINT_DIR], cwd=PROBES.parent,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == str(PROBES)


def test_shared_headers_are_pasted_into_the_program(tmp_path: Path) -> None:
    # BCC rewrites map calls only in the file it compiles: a shared helper that calls a
    # map must be in it, and compiler messages still name the header
    (tmp_path / "outer.h").write_text('#include "inner.h"\nint outer;\n')
    (tmp_path / "inner.h").write_text("int inner;\n")
    text = inline_headers('#include <linux/sched.h>\n#include "outer.h"\n'
                          '#include "absent.h"\nint main_line;\n', [tmp_path])
    assert text.splitlines() == [
        "#include <linux/sched.h>",
        '#line 1 "outer.h"', '#line 1 "inner.h"', "int inner;", '#line 2 "outer.h"',
        "int outer;", f'#line 3 "{MAIN_FILE}"',
        '#include "absent.h"', "int main_line;"]
    program = inline_headers(bpf_source("cpu_profile"), [bpf_source_dir()])
    assert '#include "probe_stats.h"' not in program
    assert "probe_stats.lookup(&stat)" in program


def test_a_bulk_decoder_takes_its_layout_from_the_c() -> None:
    import ctypes as ct
    import re

    from otel_ebpf.kernel.maps import unpacker
    from otel_ebpf.probes.cpu_profile import SAMPLE_KEY_FIELDS, SAMPLE_VALUE_FIELDS

    class Key(ct.Structure):  # as BCC describes a C struct: padding and arrays included
        _fields_ = [("tgid", ct.c_uint), ("id", ct.c_ulonglong), ("err", ct.c_int),
                    ("comm", ct.c_char * 5)]

    layout = unpacker(Key, ("tgid", "id", "err", "comm"))
    assert layout.size == ct.sizeof(Key) == 32  # 4 + 4 padding + 8 + 4 + 5 + 7 padding
    raw = bytes(Key(7, 1 << 40, -14, b"abc"))
    assert layout.unpack(raw) == (7, 1 << 40, -14, b"abc\0\0")
    with pytest.raises(ValueError, match="the decoder reads"):
        unpacker(Key, ("id", "tgid", "err", "comm"))  # reordered: refused, not misread
    # the fields cpu_profile's decoder reads are the C struct's members, in order
    source = bpf_source("cpu_profile")
    for struct_name, fields in (("sample_key", SAMPLE_KEY_FIELDS),
                                ("sample_value", SAMPLE_VALUE_FIELDS)):
        body = re.search(rf"struct {struct_name} {{(.*?)}};", source, re.S)
        assert body is not None
        assert tuple(re.findall(r"^\s*\w+ (\w+)(?:\[\w+\])?;", body.group(1), re.M)) == fields
