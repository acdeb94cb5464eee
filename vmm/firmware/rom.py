"""Real firmware: a BIOS ROM image mapped as QEMU's PC maps it, and the vCPU at reset.

``boot_rom(machine, rom)`` is what ``qemu-system-x86_64 -bios FILE`` does on
the i440FX board (QEMU's hw/i386/x86.c ``x86_bios_rom_init``):

* the whole image, read-only, at the top of the 32-bit space, ending at
  0xFFFFFFFF ("pc.bios").  Its pages are host frames of the EPT's pool,
  mapped R+X: no guest store reaches them.
* its last 128 KiB (or the whole image, if smaller) also at the top of the
  first MiB, ending at 0xFFFFF ("isa-bios"), under the i440FX's PAM registers
  (82441FX datasheet 3.2.18; QEMU's hw/pci-host/i440fx.c).  PAM0 bits 5:4
  govern 0xF0000-0xFFFFF, PAM1-PAM6 two 16 KiB segments each from 0xC0000,
  with RE (read enable) and WE (write enable) per segment: RE sends reads to
  the RAM below, else to the PCI side (the ROM there, or "pc.rom", QEMU's
  empty read-only option-ROM space at 0xC0000-0xDFFFF, which reads as zero
  here); WE sends writes to RAM, else they are dropped.  At reset every PAM
  is 0: the BIOS runs from ROM.  SeaBIOS (src/fw/shadow.c) sets RE+WE from
  code in the high copy, copies itself into the RAM below, and at the end of
  POST sets RE only, so its segments are read-only RAM.  The high copy stays
  pristine, which is what SeaBIOS relies on to reboot (it copies its image
  down from there again, ``qemu_prep_reset``).
* the bootstrap processor at the reset vector (SDM vol. 3A 9.1.4): real
  mode, CS selector F000h with base FFFF0000h, IP FFF0h, so the first fetch
  is at FFFFFFF0h, 16 bytes below the top of the image.

A file that cannot be a BIOS is refused with one line (``RomError``, a
``BootError``): a size that is not a positive multiple of 64 KiB or exceeds
16 MiB (QEMU's own checks), or no jump at the reset vector.  The machine must
have RAM at 0xE0000-0xFFFFF and none reaching the image.

Nothing else of the HLE BIOS (vmm/firmware/bios.py) is installed: the ROM is
the firmware, and it finds the board through its ports (fw_cfg, PCI, CMOS).
"""
from __future__ import annotations

import hashlib

import numpy as np

from vmm.cpu.vcpu import CS
from vmm.firmware.boot import BootError, BootInfo
from vmm.memory.ept import PAGE, VALID, EptError

KIB = 1024
ROM_ALIGN = 64 * KIB               # QEMU refuses a BIOS whose size is not a multiple of 64 KiB
ROM_MAX = 16 << 20                 # nor one over 16 MiB (it would run into the I/O APIC's window)
ISA_BIOS_SIZE = 128 * KIB          # the low alias: 0xE0000-0xFFFFF
ISA_BIOS_END = 0x100000
TOP = 1 << 32
RESET_CS = 0xF000
RESET_CS_BASE = 0xFFFF_0000
RESET_IP = 0xFFF0
ROM_PERMS = "rx"
SPARE_FRAMES = 16                  # pool frames beyond the image: pc.rom's zero page, private copies
LOW_FIRST = 0xC0                   # page of 0xC0000: the PAM range is pages 0xC0-0xFF
LOW_END = ISA_BIOS_END // 4096
SHADOW_TIMER = "bios-shadow"       # ends a one-instruction write to a read-only PAM page


def pam_bits(pams: bytes, gpn: int) -> tuple[bool, bool]:
    """(RE, WE) of the PAM segment holding page ``gpn`` (0xC0-0xFF) for PAM0-PAM6 ``pams``."""
    if gpn >= 0xF0:
        v = pams[0] >> 4
    else:
        i = gpn - LOW_FIRST
        v = pams[1 + i // 8] >> (4 if i % 8 >= 4 else 0)
    return bool(v & 1), bool(v & 2)
DEFAULT_BOOT_ORDER = "cad"         # QEMU's default -boot order: disk, floppy, CD-ROM
CMOS_BOOT_ORDER_12 = 0x3D          # the first two boot devices (QEMU/Bochs BIOS convention)
CMOS_BOOT_ORDER_3 = 0x38           # the third, and bit 0: skip the floppy signature check
# Instructions per vCPU turn for a BIOS on more than one vCPU.  SeaBIOS's AP hand-off (src/fw/smp.c)
# has the BSP free SMPLock for one instruction of an 8-instruction loop while the APs spin on it; with
# the machine's default quantum (100000, a multiple of 8) the BSP's turn always ends at the same point
# of that loop, never the free one, and the APs never get the lock.  QEMU's TCG ends a vCPU's turn at
# PAUSE (helper_pause); vmm/cpu cannot see PAUSE, so a BIOS run takes a prime quantum instead: the
# BSP's turn then ends at each point of any short loop in turn.  It is part of the recorded recipe.
SMP_QUANTUM = 100_003


class RomError(BootError):
    """A file that is not a plausible BIOS image, or a machine it cannot be mapped into."""


def _reset_jump(tail: bytes) -> bool:
    """The 16 bytes at the reset vector start with a jump (after optional NOPs, as OVMF's do):
    far (EAh ptr16:16), near (E9h rel16) or short (EBh rel8)."""
    i = 0
    while i < 4 and tail[i] == 0x90:
        i += 1
    op = tail[i]
    return op == 0xEA or op == 0xE9 or op == 0xEB


def check_rom(rom: bytes, name: str = "BIOS") -> None:
    """Raise RomError unless ``rom`` could be a PC BIOS image."""
    size = len(rom)
    if size == 0 or size % ROM_ALIGN:
        raise RomError(f"{name}: {size} bytes is not a BIOS image (its size must be a non-zero multiple of 64 KiB)")
    if size > ROM_MAX:
        raise RomError(f"{name}: {size >> 20} MiB is too big for a BIOS image (at most 16 MiB)")
    if not _reset_jump(rom[-16:]):
        raise RomError(f"{name}: no jump at the reset vector (the image's last 16 bytes start with "
                       f"{rom[-16:-12].hex(' ')}), so it is not a BIOS image")


def rom_base(size: int) -> int:
    """Guest-physical address of the first byte of a ROM of ``size`` bytes."""
    return TOP - size



def _boot_nibbles(order: str) -> list[int]:
    """QEMU's -boot order letters as the CMOS nibbles SeaBIOS reads (a/b floppy, c disk, d CD, n net)."""
    codes = {"a": 1, "b": 1, "c": 2, "d": 3, "n": 4}
    if not 1 <= len(order) <= 3 or any(ch not in codes for ch in order):
        raise RomError(f"boot order {order!r}: give up to three of a (floppy), c (disk), d (CD-ROM), n (network)")
    return [codes[ch] for ch in order] + [0] * (3 - len(order))


def set_boot_order(machine, order: str = DEFAULT_BOOT_ORDER, floppy_sig_check: bool = True) -> None:
    """Write the boot order into CMOS as QEMU's PC does for ``-boot order=...`` (hw/i386/pc.c,
    ``set_boot_dev``): 3Dh = second device << 4 | first, 38h = third << 4 | (1 to skip the
    floppy boot-signature check).  SeaBIOS takes its default boot priorities from there
    (src/boot.c ``boot_init``); with both bytes 0, as a fresh CMOS has them, it tries the
    floppy first."""
    n = _boot_nibbles(order)
    machine.rtc.set_cmos(CMOS_BOOT_ORDER_12, (n[1] << 4) | n[0])
    machine.rtc.set_cmos(CMOS_BOOT_ORDER_3, (n[2] << 4) | (0 if floppy_sig_check else 1))


class _RomWindow:
    """One page of the ROM on the MMIO bus: reads give the image's bytes, writes go nowhere."""

    def __init__(self, fw: RomFirmware, gpn: int):
        self.fw = fw
        self.gpn = gpn
        self.name = f"bios-rom@{gpn * PAGE:#x}"
        self.offset = gpn * PAGE - fw.base

    def mmio_read(self, offset: int, size: int) -> int:
        at = self.offset + offset
        return int.from_bytes(self.fw.rom[at:at + size], "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.fw.dropped_writes += 1


class RomFirmware:
    """A BIOS image mapped into a machine, and the policy that keeps it read-only.

    No code of ours runs as firmware: the guest runs the image.  What is here
    is the memory behaviour of a ROM.  Its pages are mapped R+X, so a guest
    store there is an EPT violation, which ``_violation`` answers as a ROM
    does, by dropping the store: the page moves to the MMIO bus (a
    ``_RomWindow``, which reads as the image and ignores writes), and the
    store is retried there.  Data accesses to the page then go through the
    bus, exactly as a ROM answers them (a read-modify-write such as ``inc``
    reads the image and its write is lost), until the next instruction
    fetch from the page: the window cannot be executed (a violation in
    either MMU mode), so the page is mapped R+X again.  One case would
    bounce for ever, code in the ROM storing into its own page: the store
    moves the page to the bus, the retried fetch moves it back.  The second
    store of one instruction there maps a private copy of the page (R+W+X)
    instead; the instruction completes, and the copy is dropped once it
    retired (a timer one tick later; or at a violation elsewhere in the ROM
    first).  Device DMA writes meet the same
    policy (DmaView offers them to the violation handlers first); a DMA read
    of a page that is on the bus at that moment is refused, as DMA to MMIO is.

    (A mapping that dropped writes in the MMU itself would need the shadow
    MMU's TLB fill to point write accesses of such a page at a sink, and has
    no equivalent in the nested MMU, where Unicorn's TLB lets any access
    through once one was allowed.)

    Below 1 MiB the pages under the PAM registers are RAM pages, which cannot
    move to the MMIO bus, so a store to one that is not writable RAM (PAM
    without WE, or WE without RE) gets the page for exactly one instruction:
    a scratch copy of what it reads (the store is lost with the copy) or, WE
    without RE, the RAM below (where the store belongs); a timer one tick
    later maps the page as PAM says again.

    Saved state: the image's hash, where its frames are, which pages are on
    the bus or copied, the PAM values the low pages are mapped for and any
    one-instruction page; the EPT saves the mappings and pool frames, the
    clock that timer.
    """

    VERSION = 2

    def __init__(self, machine, rom: bytes, name: str = "BIOS"):
        self.machine = machine
        self.rom = bytes(rom)
        self.name = name
        self.sha256 = hashlib.sha256(self.rom).hexdigest()
        self.size = len(rom)
        self.base = rom_base(self.size)
        self.first_gpn = self.base // PAGE
        self.pages = self.size // PAGE
        self.rom_hfn = -1          # host frame of the image's first page (its frames are consecutive)
        self.windows: dict[int, _RomWindow] = {}   # ROM pages (gpn) on the MMIO bus now
        self.copies: dict[int, int] = {}           # ROM page (gpn) -> its private copy's frame
        self._restored: tuple[int, int] | None = None   # (gpn, icount) of the last page mapped back
        self.dropped_writes = 0
        self.zero_hfn = -1         # pc.rom: what a PAM segment's reads give below the ISA alias
        self.pams = bytes(7)       # the PAM registers the low pages are mapped for
        self.low_tmp: dict[int, int] = {}   # PAM page written this instruction -> scratch frame (-1: RAM)
        self._low_timer = None

    # -- mapping ---------------------------------------------------------------------
    def map(self) -> None:
        """Map the image read-only below 4 GiB (frames from the EPT's pool) and take its violations."""
        m = self.machine
        ept = m.ept
        if m.memory.size > self.base:
            raise RomError(f"{self.name}: the machine's RAM ({m.memory.size >> 20} MiB) reaches the BIOS "
                           f"at {self.base:#x}")
        if ept.npages * PAGE < TOP:
            raise RomError(f"{self.name}: the guest-physical space does not reach 4 GiB")
        taken = ept.entries[self.first_gpn:self.first_gpn + self.pages] & np.uint64(VALID)
        if taken.any():
            at = (self.first_gpn + int(np.flatnonzero(taken)[0])) * PAGE
            raise RomError(f"{self.name}: {at:#x} is taken, so a {self.size // KIB} KiB BIOS cannot be "
                           f"mapped below 4 GiB")
        if ept.pool is None:
            ept.add_pool(self.pages + SPARE_FRAMES)
        try:
            frames = [ept.alloc_frame() for _ in range(self.pages)]
        except EptError as e:
            raise RomError(f"{self.name}: no room for the BIOS in the EPT's frame pool ({e})") from None
        if frames != list(range(frames[0], frames[0] + self.pages)):
            raise RomError(f"{self.name}: the EPT's frame pool has no contiguous room for the BIOS")
        self.rom_hfn = frames[0]
        for i, hfn in enumerate(frames):
            ept.frame(hfn)[:] = np.frombuffer(self.rom, dtype=np.uint8, count=PAGE, offset=i * PAGE)
        ept.map(self.base, self.rom_hfn, ROM_PERMS, self.pages)
        try:
            self.zero_hfn = ept.alloc_frame()
        except EptError as e:
            raise RomError(f"{self.name}: no room for pc.rom in the EPT's frame pool ({e})") from None
        self.attach()
        self._pam_changed(full=True)

    def _host_bridge(self):
        return getattr(self.machine, "i440fx", None)

    def attach(self) -> None:
        """Take the EPT violations of the image's pages (also for a machine restored from a saved state)."""
        m = self.machine
        if self._violation not in m.ept.handlers:
            m.ept.handlers.append(self._violation)
        m.firmware = self
        hb = self._host_bridge()
        if hb is not None:
            hb.on_pam = self._pam_changed

    # -- the PAM range: 0xC0000-0xFFFFF ------------------------------------------------
    def _pci_frame(self, gpn: int) -> int:
        """What a low page reads with its segment's RE off: the ROM's alias, or pc.rom."""
        low = min(self.size, ISA_BIOS_SIZE) // PAGE
        if gpn >= LOW_END - low:
            return self.rom_hfn + self.pages - (LOW_END - gpn)
        return self.zero_hfn

    def _map_low(self, gpn: int) -> None:
        re, we = pam_bits(self.pams, gpn)
        if re:
            self.machine.ept.map(gpn * PAGE, gpn, "rwx" if we else "rx")
        else:
            self.machine.ept.map(gpn * PAGE, self._pci_frame(gpn), "rx")

    def _pam_changed(self, full: bool = False) -> None:
        """Map the low pages as the host bridge's PAM registers say (all of them at boot, then
        those whose segment changed)."""
        hb = self._host_bridge()
        pams = bytes(hb.pam(i) for i in range(7)) if hb is not None else bytes(7)
        self._end_low_writes()
        old, self.pams = self.pams, pams
        for gpn in range(LOW_FIRST, LOW_END):
            if full or pam_bits(old, gpn) != pam_bits(pams, gpn):
                self._map_low(gpn)

    def _low_write(self, gpn: int) -> bool:
        """A store to a PAM page that is not writable RAM: for this one instruction the page is
        a scratch copy of what it reads (RE, or neither: the store is dropped afterwards) or the
        RAM below (WE without RE: the store lands there), then mapped as PAM says again."""
        if gpn in self.low_tmp:
            return False
        ept = self.machine.ept
        re, we = pam_bits(self.pams, gpn)
        if we:
            ept.map(gpn * PAGE, gpn, "rwx")
            self.low_tmp[gpn] = -1
        else:
            try:
                copy = ept.alloc_frame()
            except EptError:
                return False
            ept.frame(copy)[:] = ept.frame(gpn if re else self._pci_frame(gpn))
            ept.map(gpn * PAGE, copy, "rwx")
            self.low_tmp[gpn] = copy
            self.dropped_writes += 1
        self._arm_tick()
        return True

    def _arm_tick(self) -> None:
        """End every one-instruction page after the instruction now retrying retires."""
        if self._low_timer is None or not self._low_timer.active:
            self._low_timer = self.machine.clock.schedule_in(1, self._low_writes_done, SHADOW_TIMER)

    def _low_writes_done(self, now: int) -> None:
        self._low_timer = None
        self._end_low_writes()
        for gpn in list(self.copies):
            self._to_memory(gpn)

    def _end_low_writes(self) -> None:
        tmp, self.low_tmp = self.low_tmp, {}
        for gpn, frame in sorted(tmp.items()):
            self._map_low(gpn)
            if frame >= 0:
                self.machine.ept.free_frame(frame)

    def timer_restorers(self) -> dict:
        def restore(now: int) -> None:
            self._low_writes_done(now)
        return {SHADOW_TIMER: restore}

    # -- the ROM's memory behaviour -----------------------------------------------------
    def _rom_frame(self, gpn: int) -> int:
        return self.rom_hfn + gpn - self.first_gpn

    def _to_bus(self, gpn: int) -> None:
        # the page leaves the memory map first: in nested mode an MMIO region cannot
        # be laid over a mapped page
        self.machine.ept.unmap(gpn * PAGE, trap=False)
        w = _RomWindow(self, gpn)
        self.windows[gpn] = w
        self.machine.mmio.register(w, gpn * PAGE, PAGE, w.name)

    def _to_memory(self, gpn: int) -> None:
        """Map the page as the image again (from the bus, or from a private copy)."""
        ept = self.machine.ept
        w = self.windows.pop(gpn, None)
        if w is not None:
            self.machine.mmio.unregister(w, gpn * PAGE)
        copy = self.copies.pop(gpn, None)
        ept.map(gpn * PAGE, self._rom_frame(gpn), ROM_PERMS)
        if copy is not None:
            ept.free_frame(copy)

    def _violation(self, v) -> bool:
        gpn = v.gpa // PAGE
        if LOW_FIRST <= gpn < LOW_END and self.zero_hfn >= 0:
            return v.access == "w" and self._low_write(gpn)
        if not self.first_gpn <= gpn < self.first_gpn + self.pages:
            return False
        for other in [g for g in self.copies if g != gpn]:
            self._to_memory(other)
        ept = self.machine.ept
        now = self.machine.icount
        as_rom = int(ept.entries[gpn]) >> 12 == self._rom_frame(gpn) and gpn not in self.copies
        if v.access == "x" and gpn in self.windows:
            self._to_memory(gpn)
            self._restored = (gpn, now)
            return True
        if v.access != "w" or not as_rom:
            return False
        if self._restored == (gpn, now):
            # the instruction fetched from this page after its store went to the bus: a private copy
            try:
                copy = ept.alloc_frame()
            except EptError:
                return False
            ept.frame(copy)[:] = ept.frame(self._rom_frame(gpn))
            self.copies[gpn] = copy
            ept.map(gpn * PAGE, copy, "rwx")
            self.dropped_writes += 1
            self._arm_tick()
        else:
            self._to_bus(gpn)
        self._restored = None
        return True

    # -- saved state ---------------------------------------------------------------------
    def save_state(self) -> dict:
        return {"kind": "rom", "version": self.VERSION, "sha256": self.sha256, "size": self.size,
                "rom_hfn": self.rom_hfn, "windows": sorted(self.windows),
                "copies": {str(g): f for g, f in sorted(self.copies.items())},
                "dropped_writes": self.dropped_writes, "zero_hfn": self.zero_hfn, "pams": list(self.pams),
                "low_tmp": {str(g): f for g, f in sorted(self.low_tmp.items())}}

    def load_state(self, st: dict) -> None:
        """Put the policy back after the machine's EPT was loaded (the ROM's pages on the bus
        are not in the EPT's saved state: claims are their owners' to restore)."""
        from devices.base import DeviceStateError

        if not isinstance(st, dict) or st.get("kind") != "rom" or st.get("version") != self.VERSION:
            raise DeviceStateError(f"firmware: not a BIOS ROM state of version {self.VERSION}")
        if st.get("sha256") != self.sha256 or st.get("size") != self.size:
            raise DeviceStateError("firmware: the saved machine ran another BIOS image")
        try:
            rom_hfn = int(st["rom_hfn"])
            windows = sorted(int(g) for g in st["windows"])
            copies = {int(g): int(f) for g, f in dict(st["copies"]).items()}
            dropped = int(st["dropped_writes"])
            zero_hfn = int(st["zero_hfn"])
            pams = bytes(int(b) for b in st["pams"])
            low_tmp = {int(g): int(f) for g, f in dict(st["low_tmp"]).items()}
            if len(pams) != 7 or any(not LOW_FIRST <= g < LOW_END for g in low_tmp):
                raise ValueError("PAM state out of range")
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceStateError(f"firmware: malformed BIOS ROM state ({e})") from None
        pages = range(self.first_gpn, self.first_gpn + self.pages)
        if any(g not in pages for g in [*windows, *copies]):
            raise DeviceStateError("firmware: saved BIOS pages outside the image")
        ept = self.machine.ept
        try:
            image = b"".join(ept.frame(rom_hfn + i).tobytes() for i in range(self.pages))
            for f in [*copies.values(), zero_hfn, *(f for f in low_tmp.values() if f >= 0)]:
                ept.frame(f)
        except EptError:
            raise DeviceStateError("firmware: the saved BIOS frames are not in this machine's pool") from None
        if image != self.rom:
            raise DeviceStateError("firmware: the saved pool frames do not hold the BIOS image")
        for g in list(self.windows):
            self.machine.mmio.unregister(self.windows.pop(g), g * PAGE)
        self.rom_hfn, self.copies, self.dropped_writes = rom_hfn, copies, dropped
        self.zero_hfn, self.pams, self.low_tmp = zero_hfn, pams, low_tmp
        if self._low_timer is not None:
            self._low_timer.cancel()
        self._low_timer = None       # a pending one-instruction write comes back through timer_restorers
        self._restored = None
        for g in windows:
            self._to_bus(g)


def attach_rom(machine, rom: bytes, name: str = "BIOS") -> RomFirmware:
    """The firmware of a machine that is restored rather than booted: the BIOS policy,
    writing nothing (the saved EPT and pool hold the mapped image)."""
    check_rom(rom, name)
    fw = RomFirmware(machine, rom, name)
    fw.attach()
    return fw


def boot_rom(machine, rom: bytes, name: str = "BIOS", boot_order: str = DEFAULT_BOOT_ORDER) -> BootInfo:
    """Map a BIOS image as QEMU's PC does, set the CMOS boot order, and put the bootstrap
    processor at the reset vector."""
    check_rom(rom, name)
    _boot_nibbles(boot_order)
    if machine.memory.size < ISA_BIOS_END:
        raise RomError(f"{name}: the machine needs at least 1 MiB of RAM for the BIOS area at 0xE0000")
    fw = RomFirmware(machine, rom, name)
    fw.map()
    low = min(fw.size, ISA_BIOS_SIZE)
    if hasattr(machine, "rtc"):
        set_boot_order(machine, boot_order)
    cpu = machine.vcpu
    cpu.reset()
    cpu.load_seg(CS, RESET_CS, RESET_CS_BASE, 0xFFFF, 0x9B00)
    cpu.rip = RESET_IP
    cpu.invalidate_code()
    return BootInfo("bios", RESET_CS_BASE + RESET_IP,
                    f"{name}: BIOS image of {fw.size // KIB} KiB at {fw.base:#x}, its last "
                    f"{low // KIB} KiB also at {ISA_BIOS_END - low:#x}")
