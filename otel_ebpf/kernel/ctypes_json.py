"""ctypes types as JSON and back: how the key, value and event types BCC derives in the
compiler process (from the program's own table descriptions) reach the agent, which has no
BCC to derive them.

A type is a simple type's code ("Q", "I", "c", ...), ["array", element, length] or
["struct" | "union", name, pack, [[field, type] or [field, type, bits], ...], anonymous].
"""

from __future__ import annotations

import ctypes as ct
from typing import Any

_SIMPLE: dict[str, Any] = {t._type_: t for t in (
    ct.c_char, ct.c_byte, ct.c_ubyte, ct.c_short, ct.c_ushort, ct.c_int, ct.c_uint,
    ct.c_long, ct.c_ulong, ct.c_longlong, ct.c_ulonglong, ct.c_float, ct.c_double,
    ct.c_longdouble, ct.c_bool, ct.c_void_p, ct.c_char_p)}


def describe(ctype: Any) -> Any:
    """The JSON form of a ctypes type."""
    if isinstance(ctype, type) and issubclass(ctype, ct.Array):
        return ["array", describe(ctype._type_), ctype._length_]
    if isinstance(ctype, type) and issubclass(ctype, ct.Structure | ct.Union):
        kind = "union" if issubclass(ctype, ct.Union) else "struct"
        fields = [[f[0], describe(f[1]), *f[2:]] for f in ctype._fields_]
        return [kind, ctype.__name__, getattr(ctype, "_pack_", 0), fields,
                list(getattr(ctype, "_anonymous_", []))]
    code = getattr(ctype, "_type_", None)
    if isinstance(code, str) and _SIMPLE.get(code) is not None:
        return code
    raise TypeError(f"no JSON form for the ctypes type {ctype!r}")


def build(desc: Any) -> Any:
    """The ctypes type of a JSON form."""
    if isinstance(desc, str):
        return _SIMPLE[desc]
    if desc[0] == "array":
        return build(desc[1]) * int(desc[2])
    kind, name, pack, fields, anonymous = desc
    attrs: dict[str, Any] = {
        "_fields_": [(f[0], build(f[1]), *f[2:]) for f in fields],
        "_anonymous_": anonymous,
    }
    if pack:
        attrs["_pack_"] = pack
    base = ct.Union if kind == "union" else ct.Structure
    return type(str(name), (base,), attrs)
