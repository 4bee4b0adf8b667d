"""The records of an .eh_frame or .debug_frame section (CIEs, FDEs) and the DWARF
call-frame instructions in them, executed into rows of (pc, kind, CFA offset / 8, rbp
rule) for cfi.py to pack. x86_64 only: the CFA from rsp or rbp, rbp's rule, whether the
return address is undefined (the outermost frame); other registers are not followed.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# struct unwind_row kinds, as in probes/user_stack.h
CFA_NONE = 0  # no information: the unwinder steps with frame pointers
CFA_RSP = 1
CFA_RBP = 2
CFA_PLT = 3  # rsp + 8, + 8 more from the 11th (or 10th) byte of a 16-byte PLT entry on
CFA_END = 4  # the outermost frame (return address undefined): the stack ends here
CFA_UNSUPPORTED = 5  # a rule the unwinder cannot evaluate (an expression, another register)
KIND_NAMES = {CFA_NONE: "none", CFA_RSP: "rsp", CFA_RBP: "rbp", CFA_PLT: "plt",
              CFA_END: "end", CFA_UNSUPPORTED: "unsupported"}
RBP_SAME = 0  # rbp holds the caller's value
RBP_UNKNOWN = 127  # saved somewhere the unwinder does not follow: the caller's rbp is lost
FDE_ROW = struct.Struct("<QBHb")  # an FDE's row as parsed: pc, kind, CFA offset / 8, rbp
Fde = tuple[int, int, bytes]  # start, end, its rows (FDE_ROW each)
_RSP, _RBP, _RA = 7, 6, 16  # DWARF register numbers on x86_64
# DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_lit11 (or 10); DW_OP_ge;
# DW_OP_lit3; DW_OP_shl; DW_OP_plus: the CFA of a PLT entry, as binutils writes it
_PLT_HEAD, _PLT_TAIL = bytes.fromhex("770880003f1a"), bytes.fromhex("2a332422")


class _Cie(NamedTuple):
    code_align: int
    data_align: int
    ra_reg: int
    encoding: int  # of FDE addresses
    has_augmentation_data: bool
    initial: bytes


class _State:
    __slots__ = ("cfa_expr", "cfa_off", "cfa_reg", "ra_undefined", "rbp")

    def __init__(self) -> None:
        self.cfa_reg, self.cfa_off, self.cfa_expr = _RSP, 8, b""
        self.rbp: tuple[str, int] = ("same", 0)
        self.ra_undefined = False

    def copy(self) -> _State:
        other = _State()
        other.cfa_reg, other.cfa_off, other.cfa_expr = self.cfa_reg, self.cfa_off, self.cfa_expr
        other.rbp, other.ra_undefined = self.rbp, self.ra_undefined
        return other

    def encode(self) -> tuple[int, int, int]:
        """(kind, CFA offset / 8, rbp rule) as a row stores them."""
        if self.ra_undefined:
            return CFA_END, 0, 0
        rbp_kind, rbp_off = self.rbp
        if rbp_kind == "same":
            rbp8 = RBP_SAME
        elif rbp_kind == "offset" and rbp_off % 8 == 0 and -128 <= rbp_off // 8 < 0:
            rbp8 = rbp_off // 8
        else:
            rbp8 = RBP_UNKNOWN
        if self.cfa_expr:
            expr = self.cfa_expr
            if (len(expr) == 11 and expr.startswith(_PLT_HEAD) and expr.endswith(_PLT_TAIL)
                    and expr[6] in (0x3A, 0x3B)):
                return CFA_PLT, 1, expr[6] - 0x30  # threshold 10 or 11, in the rbp field
            return CFA_UNSUPPORTED, 0, 0
        off = self.cfa_off
        if self.cfa_reg not in (_RSP, _RBP) or off % 8 or not 0 <= off // 8 <= 0xFFFF:
            return CFA_UNSUPPORTED, 0, 0
        return (CFA_RSP if self.cfa_reg == _RSP else CFA_RBP), off // 8, rbp8


class Parser:
    """Walks the CIE and FDE records of one .eh_frame or .debug_frame section."""

    def __init__(self, data: bytes, address: int, eh_frame: bool) -> None:
        self.data, self.address, self.eh_frame = data, address, eh_frame
        self._cies: dict[int, _Cie | None] = {}

    def fdes(self) -> list[Fde]:
        """Every FDE's (start, end, rows packed as FDE_ROW)."""
        data, at, out = self.data, 0, []
        while at + 4 <= len(data):
            length = struct.unpack_from("<I", data, at)[0]
            body = at + 4
            if length == 0:
                if self.eh_frame:
                    break  # the terminator
                at = body
                continue
            if length == 0xFFFFFFFF:  # 64-bit DWARF
                length = struct.unpack_from("<Q", data, body)[0]
                body += 8
                id_size = 8
            else:
                id_size = 4
            end = body + length
            cie_id = int.from_bytes(data[body:body + id_size], "little")
            is_cie = cie_id == 0 if self.eh_frame else cie_id in (0xFFFFFFFF,
                                                                  0xFFFFFFFFFFFFFFFF)
            if not is_cie:
                cie_at = body - cie_id if self.eh_frame else cie_id
                cie = self._cie(cie_at)
                if cie is not None:
                    fde = self._fde(cie, body + id_size, end)
                    if fde is not None:
                        out.append(fde)
            at = end
        return out

    def _cie(self, at: int) -> _Cie | None:
        if at not in self._cies:
            try:
                self._cies[at] = self._read_cie(at)
            except (IndexError, struct.error, ValueError):
                self._cies[at] = None
        return self._cies[at]

    def _read_cie(self, at: int) -> _Cie | None:
        data = self.data
        length = struct.unpack_from("<I", data, at)[0]
        body, id_size = at + 4, 4
        if length == 0xFFFFFFFF:
            length = struct.unpack_from("<Q", data, body)[0]
            body, id_size = body + 8, 8
        end = body + length
        p = body + id_size
        version = data[p]
        p += 1
        aug_end = data.index(b"\0", p)
        augmentation = data[p:aug_end].decode("ascii", "replace")
        p = aug_end + 1
        if "eh" in augmentation:
            p += 8
        if version >= 4:
            p += 2  # address_size, segment_selector_size
        code_align, p = _uleb(data, p)
        data_align, p = _sleb(data, p)
        if version == 1:
            ra_reg, p = data[p], p + 1
        else:
            ra_reg, p = _uleb(data, p)
        encoding = 0x00  # absptr unless 'R' says otherwise
        has_z = augmentation.startswith("z")
        if has_z:
            aug_len, p = _uleb(data, p)
            aug_data_end = p + aug_len
            for ch in augmentation[1:]:
                if ch == "R":
                    encoding, p = data[p], p + 1
                elif ch == "L":
                    p += 1
                elif ch == "P":
                    personality_encoding = data[p]
                    _, p = self._pointer(personality_encoding, p + 1)
                elif ch in "SB":
                    continue
                else:
                    break
            p = aug_data_end
        elif augmentation not in ("", "eh"):
            return None  # an augmentation whose layout is unknown
        return _Cie(code_align, data_align, ra_reg, encoding, has_z, data[p:end])

    def _pointer(self, encoding: int, p: int) -> tuple[int, int]:
        """A pointer encoded per DW_EH_PE_* at p: (value, next position)."""
        data = self.data
        fmt = encoding & 0x0F
        if fmt == 0x00:
            value, size = struct.unpack_from("<Q", data, p)[0], 8
        elif fmt == 0x01:
            value, q = _uleb(data, p)
            size = q - p
        elif fmt == 0x02:
            value, size = struct.unpack_from("<H", data, p)[0], 2
        elif fmt == 0x03:
            value, size = struct.unpack_from("<I", data, p)[0], 4
        elif fmt == 0x04:
            value, size = struct.unpack_from("<Q", data, p)[0], 8
        elif fmt == 0x09:
            value, q = _sleb(data, p)
            size = q - p
        elif fmt == 0x0A:
            value, size = struct.unpack_from("<h", data, p)[0], 2
        elif fmt == 0x0B:
            value, size = struct.unpack_from("<i", data, p)[0], 4
        elif fmt == 0x0C:
            value, size = struct.unpack_from("<q", data, p)[0], 8
        else:
            raise ValueError(f"pointer encoding {encoding:#x}")
        if encoding & 0x70 == 0x10:  # pcrel
            value += self.address + p
        return value & 0xFFFFFFFFFFFFFFFF, p + size

    def _fde(self, cie: _Cie, p: int, end: int) -> Fde | None:
        try:
            start, p = self._pointer(cie.encoding, p)
            length, p = self._pointer(cie.encoding & 0x0F, p)
            if cie.has_augmentation_data:
                aug_len, p = _uleb(self.data, p)
                p += aug_len
            if start == 0 or length == 0:
                return None  # discarded by the linker
            initial = _State()
            _run(cie.initial, cie, initial, None, 0, [])
            rows: list[tuple[int, int, int, int]] = []
            state = initial.copy()
            _run(self.data[p:end], cie, state, initial, start, rows, self)
            # packed at once: a large library's rows as tuples took ~100 bytes each (30 MB
            # in flight for gRPC's), packed 12
            return start, start + length, b"".join(FDE_ROW.pack(*row) for row in rows)
        except (IndexError, struct.error, ValueError):
            return None


def _run(code: bytes, cie: _Cie, state: _State, initial: _State | None, loc: int,
         rows: list[tuple[int, int, int, int]], parser: Parser | None = None) -> None:
    """Execute CFA instructions; with `initial` (an FDE's), append a row at each location
    (loc, kind, CFA offset / 8, rbp rule) and one at the end."""
    stack: list[_State] = []
    p, n = 0, len(code)
    ca, da = cie.code_align, cie.data_align

    def emit() -> None:
        if initial is not None:
            kind, cfa8, rbp8 = state.encode()
            if rows and rows[-1][0] == loc:
                rows[-1] = (loc, kind, cfa8, rbp8)
            else:
                rows.append((loc, kind, cfa8, rbp8))

    while p < n:
        op = code[p]
        p += 1
        high, low = op & 0xC0, op & 0x3F
        if high == 0x40:  # advance_loc
            emit()
            loc += low * ca
            continue
        if high == 0x80:  # offset
            off, p = _uleb(code, p)
            _set_offset(state, cie, low, off * da)
            continue
        if high == 0xC0:  # restore
            _restore(state, initial, cie, low)
            continue
        if op == 0x00:  # nop
            continue
        if op in (0x02, 0x03, 0x04):  # advance_loc1/2/4
            size = {0x02: 1, 0x03: 2, 0x04: 4}[op]
            emit()
            loc += int.from_bytes(code[p:p + size], "little") * ca
            p += size
        elif op == 0x01:  # set_loc
            emit()
            loc = struct.unpack_from("<Q", code, p)[0]
            p += 8
        elif op in (0x05, 0x11, 0x2F):  # offset_extended, _sf, GNU_negative_offset
            reg, p = _uleb(code, p)
            if op == 0x11:
                soff, p = _sleb(code, p)
                _set_offset(state, cie, reg, soff * da)
            else:
                off, p = _uleb(code, p)
                _set_offset(state, cie, reg, (-off if op == 0x2F else off) * da)
        elif op == 0x06:  # restore_extended
            reg, p = _uleb(code, p)
            _restore(state, initial, cie, reg)
        elif op in (0x07, 0x08):  # undefined, same_value
            reg, p = _uleb(code, p)
            if reg == _RBP:
                state.rbp = ("same", 0) if op == 0x08 else ("other", 0)
            elif reg == cie.ra_reg:
                state.ra_undefined = op == 0x07
        elif op == 0x09:  # register
            reg, p = _uleb(code, p)
            _, p = _uleb(code, p)
            _set_other(state, cie, reg)
        elif op == 0x0A:  # remember_state
            stack.append(state.copy())
        elif op == 0x0B:  # restore_state
            if stack:
                saved = stack.pop()
                # the CFA is not part of the remembered rules in practice either way
                state.cfa_reg, state.cfa_off, state.cfa_expr = (
                    saved.cfa_reg, saved.cfa_off, saved.cfa_expr)
                state.rbp, state.ra_undefined = saved.rbp, saved.ra_undefined
        elif op in (0x0C, 0x12):  # def_cfa, def_cfa_sf
            state.cfa_reg, p = _uleb(code, p)
            if op == 0x0C:
                state.cfa_off, p = _uleb(code, p)
            else:
                soff, p = _sleb(code, p)
                state.cfa_off = soff * da
            state.cfa_expr = b""
        elif op == 0x0D:  # def_cfa_register
            state.cfa_reg, p = _uleb(code, p)
            state.cfa_expr = b""
        elif op in (0x0E, 0x13):  # def_cfa_offset, _sf
            if op == 0x0E:
                state.cfa_off, p = _uleb(code, p)
            else:
                soff, p = _sleb(code, p)
                state.cfa_off = soff * da
        elif op == 0x0F:  # def_cfa_expression
            size, p = _uleb(code, p)
            state.cfa_expr = code[p:p + size] or b"\0"
            p += size
        elif op in (0x10, 0x16):  # expression, val_expression
            reg, p = _uleb(code, p)
            size, p = _uleb(code, p)
            p += size
            _set_other(state, cie, reg)
        elif op in (0x14, 0x15):  # val_offset, _sf
            reg, p = _uleb(code, p)
            _, p = (_uleb if op == 0x14 else _sleb)(code, p)
            _set_other(state, cie, reg)
        elif op == 0x2E:  # GNU_args_size
            _, p = _uleb(code, p)
        elif op == 0x2D:  # GNU_window_save: SPARC / AArch64 only
            continue
        else:
            raise ValueError(f"unknown CFA instruction {op:#x}")
    emit()


def _set_offset(state: _State, cie: _Cie, reg: int, off: int) -> None:
    if reg == _RBP:
        state.rbp = ("offset", off)
    elif reg == cie.ra_reg:
        state.ra_undefined = False


def _set_other(state: _State, cie: _Cie, reg: int) -> None:
    if reg == _RBP:
        state.rbp = ("other", 0)
    elif reg == cie.ra_reg:
        state.ra_undefined = False


def _restore(state: _State, initial: _State | None, cie: _Cie, reg: int) -> None:
    if initial is None:
        return
    if reg == _RBP:
        state.rbp = initial.rbp
    elif reg == cie.ra_reg:
        state.ra_undefined = initial.ra_undefined


def _uleb(data: bytes, p: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[p]
        p += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, p
        shift += 7


def _sleb(data: bytes, p: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[p]
        p += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if byte & 0x40:
                result -= 1 << shift
            return result, p
