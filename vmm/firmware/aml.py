"""A small encoder for ACPI Machine Language (AML) and resource templates.

Everything here returns ``bytes``: an AML object is the bytes of its
encoding, and terms compose by passing them to the constructs that hold
them (``scope(name, *terms)``, ``device(...)``, ``method(...)``).  Python
ints given where a term is expected are encoded as integers in the shortest
form (``integer``); names must be given as names (``name_ref``) and strings
as strings (``string``), since a bare ``str`` could be either.

References, ACPI Specification 6.4:

* 20.2 "AML Grammar Definition": 20.2.2 name objects (NameSeg, NameString,
  RootChar, ParentPrefixChar, DualNamePrefix 0x2E, MultiNamePrefix 0x2F,
  NullName), 20.2.3 data objects (ZeroOp, OneOp, BytePrefix 0x0A,
  WordPrefix 0x0B, DWordPrefix 0x0C, QWordPrefix 0x0E, StringPrefix 0x0D),
  20.2.4 package length encoding (PkgLeadByte: bits 7-6 count of following
  bytes, bits 3-0 the low nibble; one byte alone holds 0-63), 20.2.5 term
  objects (NameOp 0x08, ScopeOp 0x10, BufferOp 0x11, PackageOp 0x12,
  MethodOp 0x14, ExtOpPrefix 0x5B with OpRegionOp 0x80, FieldOp 0x81,
  DeviceOp 0x82; StoreOp 0x70, AndOp 0x7B, OrOp 0x7D, ShiftRightOp 0x7A,
  SubtractOp 0x74, NotifyOp 0x86, CreateDWordFieldOp 0x8A, LAndOp 0x90,
  LOrOp 0x91, LNotOp 0x92, LEqualOp 0x93, LGreaterOp 0x94, LLessOp 0x95,
  IfOp 0xA0, ElseOp 0xA1, ReturnOp 0xA4; Local0-7 0x60-0x67, Arg0-6
  0x68-0x6E).
* 19.6.98 OperationRegion (region spaces: SystemMemory 0, SystemIO 1,
  PCI_Config 2), 19.6.48 Field (flags: AccessType bits 0-3, LockRule bit 4,
  UpdateRule bits 5-6; NamedField = NameSeg + bit count as a PkgLength,
  ReservedField = 0x00 + bit count), 19.6.85 Method (MethodFlags: ArgCount
  bits 0-2, SerializeFlag bit 3, SyncLevel bits 4-7).
* 6.4 "Resource Data Types for ACPI": 6.4.2.5 IO port descriptor (0x47),
  6.4.2.1 IRQ descriptor (0x22/0x23), 6.4.2.9 End Tag (0x79), 6.4.3.4
  32-bit fixed memory range (0x86), 6.4.3.5.1-3 QWord/DWord/Word address
  space descriptors (0x8A/0x87/0x88), 6.4.3.6 extended interrupt
  descriptor (0x89).
* 6.1.5 _HID: EISA IDs as a compressed 32-bit integer (three 5-bit letters
  and four hex digits, stored big-endian).
"""
from __future__ import annotations

import struct

# Region spaces (19.6.98)
SYSTEM_MEMORY = 0
SYSTEM_IO = 1
PCI_CONFIG = 2

# Field flags (19.6.48)
ANY_ACC, BYTE_ACC, WORD_ACC, DWORD_ACC, QWORD_ACC, BUFFER_ACC = range(6)
NO_LOCK, LOCK = 0, 1 << 4
PRESERVE, WRITE_AS_ONES, WRITE_AS_ZEROS = 0, 1 << 5, 2 << 5

_EXT = 0x5B


class AmlError(ValueError):
    """Something that cannot be encoded in AML."""


# -- names -----------------------------------------------------------------------------------

def name_seg(seg: str) -> bytes:
    """One NameSeg: a lead character A-Z or _, then A-Z, 0-9 or _, padded with _ to four."""
    if not 1 <= len(seg) <= 4 or not seg.isascii():
        raise AmlError(f"name segment {seg!r} must be 1-4 ASCII characters")
    if not (seg[0].isupper() or seg[0] == "_") or not all(c.isupper() or c.isdigit() or c == "_"
                                                          for c in seg):
        raise AmlError(f"name segment {seg!r}: A-Z and _ first, then A-Z, 0-9 or _")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional root (\\) or parent (^) prefixes, then dot-separated segments."""
    i = 0
    prefix = b""
    if path.startswith("\\"):
        prefix, i = b"\\", 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = b"^" * i
    rest = path[i:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + b"\x00"
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + b"\x2e" + segs[0] + segs[1]
    if len(segs) > 255:
        raise AmlError(f"name path {path!r} has too many segments")
    return prefix + b"\x2f" + bytes([len(segs)]) + b"".join(segs)


def name_ref(path: str) -> bytes:
    """A reference to a named object (a NameString used as a term or package element)."""
    return name_string(path)


# -- data objects ----------------------------------------------------------------------------

def _encode_length(value: int, extra: int) -> bytes:
    if extra == 0:
        return bytes([value])
    return bytes([(extra << 6) | (value & 0x0F)]) + (value >> 4).to_bytes(extra, "little")


def _length_bytes(value: int) -> int:
    """How many following bytes a PkgLength of ``value`` needs (0-3)."""
    if value < 0x40:
        return 0
    for extra in (1, 2, 3):
        if value < 1 << (4 + 8 * extra):
            return extra
    raise AmlError(f"{value} is too large for a PkgLength")


def pkg_length(content_len: int) -> bytes:
    """The PkgLength for ``content_len`` bytes that follow it; it counts itself too (20.2.4)."""
    for extra in range(4):
        total = content_len + 1 + extra
        if _length_bytes(total) == extra:
            return _encode_length(total, extra)
    raise AmlError(f"package of {content_len} bytes is too long for a PkgLength")


def integer(v: int) -> bytes:
    """An integer in its shortest encoding: Zero, One, then byte, word, dword, qword constants."""
    if type(v) is not int or not 0 <= v < 1 << 64:
        raise AmlError(f"{v!r} is not a 64-bit unsigned integer")
    if v == 0:
        return b"\x00"
    if v == 1:
        return b"\x01"
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if v < 1 << (8 * size):
            return bytes([prefix]) + v.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(s: str) -> bytes:
    """An ASCII string constant (StringPrefix, the characters, NUL)."""
    raw = s.encode("ascii")
    if b"\0" in raw:
        raise AmlError("AML strings cannot hold NUL")
    return b"\x0d" + raw + b"\x00"


def eisa_id(hid: str) -> bytes:
    """An EISA ID such as "PNP0A03" as the DWord integer _HID/_CID expect."""
    if len(hid) != 7 or not hid[:3].isalpha() or not hid[:3].isupper():
        raise AmlError(f"EISA ID {hid!r} must be three capitals and four hex digits")
    letters = [ord(c) - 0x40 for c in hid[:3]]
    vendor = letters[0] << 10 | letters[1] << 5 | letters[2]
    return b"\x0c" + vendor.to_bytes(2, "big") + int(hid[3:], 16).to_bytes(2, "big")


def _term(t: bytes | int) -> bytes:
    if isinstance(t, int) and not isinstance(t, bool):
        return integer(t)
    if isinstance(t, (bytes, bytearray)):
        return bytes(t)
    raise AmlError(f"{t!r} is not an AML term (use name_ref() or string() for text)")


def _terms(terms: tuple[bytes | int, ...]) -> bytes:
    return b"".join(_term(t) for t in terms)


def buffer(data: bytes) -> bytes:
    """Buffer(n) {data}."""
    body = integer(len(data)) + bytes(data)
    return b"\x11" + pkg_length(len(body)) + body


def package(*elements: bytes | int) -> bytes:
    """Package(n) {elements} (at most 255 elements)."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    body = bytes([len(elements)]) + _terms(elements)
    return b"\x12" + pkg_length(len(body)) + body


# -- named objects and scopes ----------------------------------------------------------------

def name(path: str, value: bytes | int) -> bytes:
    """Name(path, value)."""
    return b"\x08" + name_string(path) + _term(value)


def _block(op: bytes, path: str, head: bytes, terms: tuple[bytes | int, ...]) -> bytes:
    body = name_string(path) + head + _terms(terms)
    return op + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes | int) -> bytes:
    """Scope(path) {terms}."""
    return _block(b"\x10", path, b"", terms)


def device(path: str, *terms: bytes | int) -> bytes:
    """Device(path) {terms}."""
    return _block(bytes([_EXT, 0x82]), path, b"", terms)


def method(path: str, nargs: int, *terms: bytes | int, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """Method(path, nargs, NotSerialized|Serialized) {terms}."""
    if not 0 <= nargs <= 7 or not 0 <= sync_level <= 15:
        raise AmlError("a method takes 0-7 arguments and a sync level of 0-15")
    flags = nargs | (0x08 if serialized else 0) | sync_level << 4
    return _block(b"\x14", path, bytes([flags]), terms)


def op_region(path: str, space: int, offset: int, length: int) -> bytes:
    """OperationRegion(path, space, offset, length)."""
    return bytes([_EXT, 0x80]) + name_string(path) + bytes([space]) + integer(offset) + integer(length)


def field(region: str, fields: list[tuple[str | None, int]], access: int = BYTE_ACC, lock: int = NO_LOCK,
          update: int = PRESERVE) -> bytes:
    """Field(region, access, lock, update) {name, bits, ...}; a None name reserves the bits."""
    body = name_string(region) + bytes([access | lock | update])
    for fname, bits in fields:
        if not 1 <= bits < 1 << 28:
            raise AmlError(f"field {fname!r} of {bits} bits")
        # a field's width is a PkgLength holding the bit count itself (it does not count its own bytes)
        body += (b"\x00" if fname is None else name_seg(fname)) + _encode_length(bits, _length_bytes(bits))
    return bytes([_EXT, 0x81]) + pkg_length(len(body)) + body


# -- statements and expressions --------------------------------------------------------------

def arg(n: int) -> bytes:
    if not 0 <= n <= 6:
        raise AmlError("Arg0-Arg6")
    return bytes([0x68 + n])


def local(n: int) -> bytes:
    if not 0 <= n <= 7:
        raise AmlError("Local0-Local7")
    return bytes([0x60 + n])


NULL_TARGET = b"\x00"


def ret(value: bytes | int) -> bytes:
    """Return(value)."""
    return b"\xa4" + _term(value)


def store(src: bytes | int, dst: bytes) -> bytes:
    """Store(src, dst)."""
    return b"\x70" + _term(src) + dst


def _binary(op: int, a: bytes | int, b: bytes | int, target: bytes) -> bytes:
    return bytes([op]) + _term(a) + _term(b) + target


def and_(a: bytes | int, b: bytes | int, target: bytes = NULL_TARGET) -> bytes:
    return _binary(0x7B, a, b, target)


def or_(a: bytes | int, b: bytes | int, target: bytes = NULL_TARGET) -> bytes:
    return _binary(0x7D, a, b, target)


def shift_right(a: bytes | int, b: bytes | int, target: bytes = NULL_TARGET) -> bytes:
    return _binary(0x7A, a, b, target)


def subtract(a: bytes | int, b: bytes | int, target: bytes = NULL_TARGET) -> bytes:
    return _binary(0x74, a, b, target)


def land(a: bytes | int, b: bytes | int) -> bytes:
    return b"\x90" + _term(a) + _term(b)


def lor(a: bytes | int, b: bytes | int) -> bytes:
    return b"\x91" + _term(a) + _term(b)


def lnot(a: bytes | int) -> bytes:
    return b"\x92" + _term(a)


def lequal(a: bytes | int, b: bytes | int) -> bytes:
    return b"\x93" + _term(a) + _term(b)


def lgreater(a: bytes | int, b: bytes | int) -> bytes:
    return b"\x94" + _term(a) + _term(b)


def lless(a: bytes | int, b: bytes | int) -> bytes:
    return b"\x95" + _term(a) + _term(b)


def if_(predicate: bytes | int, *terms: bytes | int) -> bytes:
    """If(predicate) {terms}."""
    body = _term(predicate) + _terms(terms)
    return b"\xa0" + pkg_length(len(body)) + body


def else_(*terms: bytes | int) -> bytes:
    """Else {terms} (must directly follow an If)."""
    body = _terms(terms)
    return b"\xa1" + pkg_length(len(body)) + body


def notify(obj: bytes, value: bytes | int) -> bytes:
    return b"\x86" + obj + _term(value)


def create_dword_field(source: bytes, byte_index: bytes | int, path: str) -> bytes:
    """CreateDWordField(source, index, path)."""
    return b"\x8a" + source + _term(byte_index) + name_string(path)


def call(path: str, *args: bytes | int) -> bytes:
    """A method invocation: its name followed by its arguments."""
    return name_string(path) + _terms(args)


# -- resource templates (6.4) -----------------------------------------------------------------

def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate() {descriptors}: a Buffer ending with an End Tag (checksum 0 = none)."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO(Decode16|Decode10, min, max, alignment, length) (6.4.2.5)."""
    return struct.pack("<BBHHBB", 0x47, int(decode16), minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags() {irqs}: edge-triggered, active-high, exclusive ISA interrupts (6.4.2.1)."""
    mask = 0
    for n in irqs:
        if not 0 <= n <= 15:
            raise AmlError(f"IRQ {n} is not an ISA interrupt")
        mask |= 1 << n
    return struct.pack("<BH", 0x22, mask)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite|ReadOnly, base, length) (6.4.3.4)."""
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def interrupt(*gsis: int, consumer: bool = True, edge: bool = False, active_low: bool = False,
              shared: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis} (6.4.3.6)."""
    if not 1 <= len(gsis) <= 255:
        raise AmlError("an Interrupt descriptor lists 1-255 interrupts")
    flags = int(consumer) | int(edge) << 1 | int(active_low) << 2 | int(shared) << 3
    body = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", 0x89, len(body)) + body


_RES_MEMORY, _RES_IO, _RES_BUS = 0, 1, 2


def _address_space(tag: int, fmt: str, res_type: int, type_flags: int, granularity: int, minimum: int,
                   maximum: int, translation: int, length: int, consumer: bool, min_fixed: bool,
                   max_fixed: bool, subtractive: bool) -> bytes:
    general = int(consumer) | int(subtractive) << 1 | int(min_fixed) << 2 | int(max_fixed) << 3
    body = struct.pack("<BBB", res_type, general, type_flags) + struct.pack(
        "<" + fmt * 5, granularity, minimum, maximum, translation, length)
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(minimum: int, maximum: int, length: int | None = None, *, granularity: int = 0,
                    translation: int = 0, consumer: bool = False, min_fixed: bool = True,
                    max_fixed: bool = True) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, ...) (6.4.3.5.3)."""
    length = maximum - minimum + 1 if length is None else length
    return _address_space(0x88, "H", _RES_BUS, 0, granularity, minimum, maximum, translation, length,
                          consumer, min_fixed, max_fixed, False)


def word_io(minimum: int, maximum: int, length: int | None = None, *, granularity: int = 0,
            translation: int = 0, consumer: bool = False, min_fixed: bool = True, max_fixed: bool = True,
            isa_ranges: int = 3) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...) (6.4.3.5.3);
    ``isa_ranges``: 1 NonISAOnlyRanges, 2 ISAOnlyRanges, 3 EntireRange."""
    length = maximum - minimum + 1 if length is None else length
    return _address_space(0x88, "H", _RES_IO, isa_ranges & 3, granularity, minimum, maximum, translation,
                          length, consumer, min_fixed, max_fixed, False)


CACHE_NON_CACHEABLE, CACHE_CACHEABLE, CACHE_WRITE_COMBINING, CACHE_PREFETCHABLE = range(4)


def dword_memory(minimum: int, maximum: int, length: int | None = None, *,
                 cacheable: int = CACHE_NON_CACHEABLE, writable: bool = True, granularity: int = 0,
                 translation: int = 0, consumer: bool = False, min_fixed: bool = True,
                 max_fixed: bool = True) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, <cacheable>, ReadWrite, ...)
    (6.4.3.5.2)."""
    length = maximum - minimum + 1 if length is None else length
    flags = int(writable) | (cacheable & 3) << 1
    return _address_space(0x87, "I", _RES_MEMORY, flags, granularity, minimum, maximum, translation, length,
                          consumer, min_fixed, max_fixed, False)


def qword_memory(minimum: int, maximum: int, length: int | None = None, *,
                 cacheable: int = CACHE_NON_CACHEABLE, writable: bool = True, granularity: int = 0,
                 translation: int = 0, consumer: bool = False, min_fixed: bool = True,
                 max_fixed: bool = True) -> bytes:
    """QWordMemory(...) (6.4.3.5.1): a window above 4 GiB."""
    length = maximum - minimum + 1 if length is None else length
    flags = int(writable) | (cacheable & 3) << 1
    return _address_space(0x8A, "Q", _RES_MEMORY, flags, granularity, minimum, maximum, translation, length,
                          consumer, min_fixed, max_fixed, False)
