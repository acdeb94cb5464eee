"""Where a loader may put a block of boot information in guest RAM.

A loader that writes its own structures (the Multiboot information block, a
Linux zero page) must not put them on top of what it has already loaded.
``find_free`` answers one question: the lowest-risk page-aligned place for a
block of ``size`` bytes, given the ranges already taken.

The order of preference follows the PC memory map the guests expect (the
Multiboot Specification 0.6.96 section 3.3 leaves the information block's
address to the boot loader; Linux's boot.rst, "Memory Layout", asks loaders
to keep to conventional memory below the EBDA):

1. ``preferred``, if the block fits there: a loader that always used one
   address keeps using it, so what earlier runs put in memory is unchanged;
2. the highest free page-aligned block in conventional memory, between
   ``LOW_START`` (past the real-mode IVT, the BIOS data area and the boot
   GDT) and the EBDA at ``LOW_END``;
3. the first page after the highest taken range, if it ends within RAM.
"""
from __future__ import annotations

from collections.abc import Iterable

PAGE = 0x1000
LOW_START = 0x1000      # the IVT, BIOS data area and boot.py's GDT at 0x800 lie below
LOW_END = 0x9FC00       # the EBDA (bios.py: EBDA_SEG 0x9FC0) and the legacy hole lie above


class PlacementError(ValueError):
    """No free place for a block of boot information."""


def _overlaps(start: int, size: int, taken: list[tuple[int, int]]) -> bool:
    return any(start < t_start + t_size and t_start < start + size for t_start, t_size in taken if t_size > 0)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def find_free(size: int, taken: Iterable[tuple[int, int]], mem_size: int, preferred: int | None = None,
              align: int = PAGE) -> int:
    """A page-aligned guest-physical address for ``size`` bytes that overlaps no ``(start, size)`` in
    ``taken`` and lies within RAM of ``mem_size`` bytes; raises PlacementError if there is none."""
    if size <= 0:
        raise PlacementError(f"cannot place a block of {size} bytes")
    if align <= 0 or align & (align - 1):
        raise PlacementError(f"alignment {align:#x} is not a power of two")
    ranges = sorted((s, n) for s, n in taken if n > 0)
    if preferred is not None and preferred % align == 0 and 0 <= preferred and preferred + size <= mem_size \
            and not _overlaps(preferred, size, ranges):
        return preferred
    low_top = min(LOW_END, mem_size)
    addr = (low_top - size) & ~(align - 1)
    while addr >= LOW_START:
        clash = [(s, n) for s, n in ranges if addr < s + n and s < addr + size]
        if not clash:
            return addr
        # jump below the lowest clashing range rather than stepping a page at a time
        addr = (min(s for s, _ in clash) - size) & ~(align - 1)
    end = max((s + n for s, n in ranges), default=0)
    addr = _align_up(max(end, LOW_START), align)
    if addr + size <= mem_size:
        return addr
    raise PlacementError(f"no room for {size} bytes of boot information: conventional memory is taken "
                         f"and RAM ends at {mem_size:#x}, before {addr + size:#x}")


MULTIBOOT_INFO_ADDR = 0x9000   # where boot.py has always put the Multiboot information block


def multiboot_info_base(taken: Iterable[tuple[int, int]], mem_size: int, size: int = PAGE) -> int:
    """Where the Multiboot information block (and the memory map, command line, module list and
    strings boot.py keeps beside it, ``size`` bytes in all) may go: at 0x9000 as before unless a
    loaded segment, a module or boot.py's GDT is there, else per ``find_free``."""
    return find_free(_align_up(size, PAGE), taken, mem_size, preferred=MULTIBOOT_INFO_ADDR)
