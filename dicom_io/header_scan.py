"""A strict, minimal walk over a received Part 10 file's top-level elements.

Accepting a C-STORE needs four UIDs and the Instance Number, and the certainty that no element
claims more bytes than arrived (pydicom would silently shorten it). pydicom gives both, at
about 0.4 ms an instance, most of it building a Dataset nobody reads on the hot path. This walk
reads the same structure from the bytes the receiver already holds in memory (the file's first
bytes, see dicom_io.incoming) in a tenth of that.

It only ever vouches for the common case and answers None for anything else, and the caller
then reads the file with pydicom exactly as before: big endian or deflated syntaxes, unknown
syntaxes or VRs, items or delimiters out of place, undefined lengths it does not know, an
element running past the end of the file, or a walk that needs bytes beyond the ones in memory
before it reaches the exact end of the file (elements after the pixel data). So every file
it accepts is one pydicom would have parsed to the same values, and every rejection still
comes from pydicom with its reason.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from pydicom.uid import UID

PREAMBLE = 128
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
TRANSFER_SYNTAX = 0x00020010

# Explicit VRs (PS3.5 Table 6.2-1) and those with a 4-byte length (PS3.5 7.1.2).
_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


class _Unsure(Exception):
    """The walk cannot vouch for the file: the caller reads it with pydicom."""


class _Walk:
    def __init__(self, head: bytes | bytearray, size: int) -> None:
        self.buf = head
        self.have = len(head)
        self.size = size

    def need(self, end: int) -> None:
        if end > self.have:
            raise _Unsure

    def element(self, off: int, implicit: bool) -> tuple[int, int, int, bytes | None]:
        """(tag, offset of the value, length, VR or None) of the element header at ``off``."""
        self.need(off + 8)
        group, elem = _TAG.unpack_from(self.buf, off)
        if implicit or group == 0xFFFE:
            return (group << 16) | elem, off + 8, _U32.unpack_from(self.buf, off + 4)[0], None
        vr = bytes(self.buf[off + 4 : off + 6])
        if vr not in _KNOWN_VRS:
            raise _Unsure
        if vr in _LONG_VRS:
            self.need(off + 12)
            return (group << 16) | elem, off + 12, _U32.unpack_from(self.buf, off + 8)[0], vr
        return (group << 16) | elem, off + 8, _U16.unpack_from(self.buf, off + 6)[0], vr

    def skip_value(self, start: int, length: int) -> int:
        end = start + length
        if end > self.size:
            raise _Unsure  # declared past the end of the file: pydicom's check reports it
        return end

    def items(self, off: int, implicit: bool, fragments: bool) -> int:
        """Skip the items of an undefined-length sequence (or encapsulated pixel data);
        returns the offset after its delimiter."""
        while True:
            tag, start, length, _ = self.element(off, True)
            if tag == SEQUENCE_END:
                if length != 0:
                    raise _Unsure
                return start
            if tag != ITEM:
                raise _Unsure
            if length != UNDEFINED:
                off = self.skip_value(start, length)
            elif fragments:
                raise _Unsure
            else:
                off = self.dataset(start, implicit, nested=True)

    def dataset(
        self,
        off: int,
        implicit: bool,
        nested: bool,
        wanted: Collection[int] = (),
        found: dict[int, bytes] | None = None,
    ) -> int:
        """Walk data set elements from ``off``; nested data sets end at their item
        delimiter, the top level at the end of the file."""
        while True:
            if not nested and off == self.size:
                return off
            tag, start, length, vr = self.element(off, implicit)
            if tag == ITEM_END and nested:
                if length != 0:
                    raise _Unsure
                return start
            if tag >> 16 == 0xFFFE:
                raise _Unsure
            if length == UNDEFINED:
                if vr == b"SQ" or (implicit and tag != PIXEL_DATA):
                    off = self.items(start, implicit, fragments=False)
                elif tag == PIXEL_DATA and vr in (b"OB", b"OW") and not nested:
                    off = self.items(start, implicit, fragments=True)
                else:
                    raise _Unsure
                continue
            off = self.skip_value(start, length)
            if found is not None and tag in wanted:
                self.need(off)
                found[tag] = bytes(self.buf[start:off])

    def meta(self) -> tuple[int, str]:
        """(offset of the data set, transfer syntax UID) from the file meta group."""
        self.need(PREAMBLE + 4)
        if self.buf[PREAMBLE : PREAMBLE + 4] != b"DICM":
            raise _Unsure
        tag, start, length, vr = self.element(PREAMBLE + 4, False)
        if tag != 0x00020000 or vr != b"UL" or length != 4:
            raise _Unsure
        self.need(start + 4)
        end = start + 4 + _U32.unpack_from(self.buf, start)[0]
        self.need(end)
        off, syntax = start + 4, None
        while off < end:
            tag, start, length, vr = self.element(off, False)
            if tag >> 16 != 0x0002 or length == UNDEFINED:
                raise _Unsure
            off = start + length
            if tag == TRANSFER_SYNTAX:
                syntax = bytes(self.buf[start:off]).rstrip(b"\0 ").decode("ascii")
        if off != end or not syntax:
            raise _Unsure
        return end, syntax


def scan(head: bytes | bytearray, size: int, wanted: Collection[int]) -> dict[int, bytes] | None:
    """Raw values of the ``wanted`` top-level tags (as ints, e.g. 0x0020000D) of the Part 10
    file whose first bytes are ``head`` and whose length is ``size``; None when the walk cannot
    vouch for the file (see the module docstring). A wanted tag that is absent is absent from
    the result."""
    walk = _Walk(head, size)
    try:
        off, syntax = walk.meta()
        uid = UID(syntax)
        if not uid.is_transfer_syntax or not uid.is_little_endian or uid.is_deflated:
            return None
        found: dict[int, bytes] = {}
        walk.dataset(off, uid.is_implicit_VR, nested=False, wanted=wanted, found=found)
    except (_Unsure, struct.error, UnicodeDecodeError, ValueError):
        return None
    return found
