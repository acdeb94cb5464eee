"""Symbol files for the bundled guests, so gdb can name their code.

The guests are flat nasm binaries (``-f bin``): no linker, so no symbol table
travels with the image.  guests/build.py asks nasm for a map of the symbols
(``[map symbols FILE]``) while it assembles a guest, and this module turns
that map into a small ELF32 i386 file next to the image (``demo.elf`` ->
``demo.sym``): section headers only (SHT_NOBITS, no bytes of the guest) and a
symbol table with every label at its load address.  In gdb::

    (gdb) symbol-file guests/build/demo.sym
    (gdb) break task_a
    (gdb) x/4i $pc          # shows <label+offset>

Labels of code sections are STT_FUNC, those of .data/.rodata/.bss STT_OBJECT;
nasm's ``equ`` constants (no section) are left out, so port numbers and flags
never show up as addresses.  The output depends only on the map's symbol
lines, so it is as reproducible as the image.

A section the guest runs at another address than it is loaded at (the demo's
ring-3 tasks, loaded after .data and mapped at USER_VA) says so in its source
with a comment nasm ignores::

    ; gdb symbols: section .user runs at USER_VA

(USER_VA an ``equ`` of the source, or a number): its labels keep their
offsets from the section's first label and move to that address, where the
CPU executes them and where gdb's breakpoints must be.
"""
from __future__ import annotations

import re
import struct

DATA_SECTIONS = {".data", ".rodata", ".bss"}

_SECTION = re.compile(r"^---- Section (\S+) -+$")
_SYMBOL = re.compile(r"^\s*([0-9A-Fa-f]+)\s+([0-9A-Fa-f]+)\s+(\S+)\s*$")
_CONSTANT = re.compile(r"^([0-9A-Fa-f]+)\s+(\S+)\s*$")
_RUNS_AT = re.compile(r"^\s*;\s*gdb symbols: section (\S+) runs at (\w+)", re.M)

SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
STB_LOCAL, STB_GLOBAL, STT_OBJECT, STT_FUNC = 0, 1, 1, 2


def parse_map(text: str) -> dict[str, list[tuple[int, str]]]:
    """{section: [(virtual address, name), ...]} from a nasm map's symbol part."""
    out: dict[str, list[tuple[int, str]]] = {}
    section: str | None = None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            out.setdefault(section, [])
            continue
        if line.startswith("---- No Section") or line.startswith("-- "):
            section = None
            continue
        if section is None:
            continue
        m = _SYMBOL.match(line)
        if m:
            out[section].append((int(m.group(2), 16), m.group(3)))
    return {k: v for k, v in out.items() if v}


def parse_constants(text: str) -> dict[str, int]:
    """The ``equ`` constants of a nasm map (its "No Section" part)."""
    out: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("---- "):
            inside = line.startswith("---- No Section")
            continue
        m = _CONSTANT.match(line) if inside else None
        if m:
            out[m.group(2)] = int(m.group(1), 16)
    return out


def relocate(sections: dict[str, list[tuple[int, str]]], source: str,
             constants: dict[str, int]) -> dict[str, list[tuple[int, str]]]:
    """Move the sections the source says run elsewhere (``; gdb symbols: section S runs at X``)."""
    out = dict(sections)
    for sec, where in _RUNS_AT.findall(source):
        if sec not in out:
            raise ValueError(f"gdb symbols: no labels in section {sec}")
        if where in constants:
            at = constants[where]
        else:
            try:
                at = int(where, 0)
            except ValueError:
                raise ValueError(f"gdb symbols: {where} is neither a number nor an equ of the source") from None
        base = min(a for a, _ in out[sec])
        out[sec] = [(at + a - base, n) for a, n in out[sec]]
    return out


def elf_symbols(sections: dict[str, list[tuple[int, str]]]) -> bytes:
    """An ELF32 i386 file holding only section headers and a symbol table."""
    names = sorted(sections)
    shstr = bytearray(b"\0")
    strtab = bytearray(b"\0")

    def shname(s: str) -> int:
        off = len(shstr)
        shstr.extend(s.encode() + b"\0")
        return off

    headers = [b"\0" * 40]      # section 0
    local_syms = bytearray()
    global_syms = bytearray()
    for index, sec in enumerate(names, start=1):
        syms = sorted(sections[sec], key=lambda s: s[0])   # stable: source order within an address
        lo, hi = syms[0][0], syms[-1][0]
        data = sec in DATA_SECTIONS
        flags = SHF_ALLOC | (SHF_WRITE if sec in (".data", ".bss") else 0) | (0 if data else SHF_EXECINSTR)
        headers.append(struct.pack("<10I", shname(sec), SHT_NOBITS, flags, lo, 0, hi - lo + 1, 0, 0, 16, 0))
        kind = STT_OBJECT if data else STT_FUNC
        for i, (addr, name) in enumerate(syms):
            # several labels at one address (user_begin: task_a:): gdb names the address
            # by its global symbol, so the last one, nearest the code, is global
            last = i + 1 == len(syms) or syms[i + 1][0] != addr
            entry = struct.pack("<IIIBBH", len(strtab), addr, 0, ((STB_GLOBAL if last else STB_LOCAL) << 4) | kind,
                                0, index)
            (global_syms if last else local_syms).extend(entry)
            strtab.extend(name.encode() + b"\0")
    symtab = bytearray(b"\0" * 16) + local_syms + global_syms
    first_global = 1 + len(local_syms) // 16
    nsec = len(names)
    sym_name, str_name, shs_name = shname(".symtab"), shname(".strtab"), shname(".shstrtab")
    # layout: ELF header, .symtab, .strtab, .shstrtab, section headers
    off_sym = 52
    off_str = off_sym + len(symtab)
    off_shs = off_str + len(strtab)
    off_sh = (off_shs + len(shstr) + 3) & ~3
    headers.append(struct.pack("<10I", sym_name, SHT_SYMTAB, 0, 0, off_sym, len(symtab), nsec + 2, first_global,
                               4, 16))
    headers.append(struct.pack("<10I", str_name, SHT_STRTAB, 0, 0, off_str, len(strtab), 0, 0, 1, 0))
    headers.append(struct.pack("<10I", shs_name, SHT_STRTAB, 0, 0, off_shs, len(shstr), 0, 0, 1, 0))
    ident = b"\x7fELF" + bytes([1, 1, 1]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0, 0, off_sh, 0, 52, 0, 0, 40, len(headers),
                               len(headers) - 1)
    body = ehdr + bytes(symtab) + bytes(strtab) + bytes(shstr)
    return body.ljust(off_sh, b"\0") + b"".join(headers)


def symbols_from_map(text: str, source: str = "") -> bytes:
    """The symbol file for a guest, from nasm's map (and the guest's source, for relocated sections)."""
    return elf_symbols(relocate(parse_map(text), source, parse_constants(text)))
