"""A high-level-emulation PC BIOS.

The IVT's BIOS vectors point into a trap range of the ROM segment
(F000:0100 + vector).  The vCPU's block hook stops before any block that
starts there, and the service runs here in Python while the vCPU is stopped;
it then resumes at an IRET in the ROM, so the guest sees an ordinary
interrupt return.  Results go in registers and in the FLAGS image on the
stack (CF, ZF), as the BIOS interface defines.

Services (IBM PC/AT BIOS technical reference, Ralf Brown's interrupt list):
INT 10h teletype, cursor, write char/string, mode queries (text goes to a VGA
text buffer at B8000h and to the machine's console); 11h equipment; 12h base
memory; 13h CHS read/write/params and the EDD extensions 41h-48h; 14h serial;
15h E820, E801, 88h, A20 2400h-2403h; 16h keyboard; 19h bootstrap; 1Ah ticks
and RTC time/date; IRQ0 (08h) keeps the BDA tick count and chains 1Ch; IRQ1
(09h) reads the 8042 and fills the BDA keyboard buffer.

A service's memory accesses are the CPU's: the guest's segments can put a
buffer anywhere in the 4 GiB space (unreal mode keeps a base loaded in
protected mode), and past RAM an access reaches the MMIO bus (a device's
registers, or unclaimed space that reads zeros and drops writes), never an
error in the VMM.  A protected-mode jump into the trap range is no BIOS call
(the services are real-mode and virtual-8086 interfaces): the CPU executes
what is at that address, the ROM's IRET or, under paging, the guest's own page.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from devices.storage.disk import DiskImage
from vmm.firmware import eltorito
from vmm.firmware.keymap import FROM_SCAN
from vmm.cpu.vcpu import CS, DS, ES, SS

if TYPE_CHECKING:
    from vmm.platform.pc import PcMachine

ROM_SEG = 0xF000
ROM_BASE = 0xF0000
IRET_OFF = 0x0000
WAIT16_OFF = 0x0010      # sti; hlt; jmp to the INT 16h trap: a blocking read waits here
WAIT86_OFF = 0x0020      # sti; hlt; jmp to the wait-check trap: INT 15h AH=86h waits here
WAIT_CHECK = 0xF0        # trap slot (not a BIOS vector) the INT 15h AH=86h wait loop jumps to
TRAP_OFF = 0x0100        # F000:0100 + vector
CONFIG_TABLE_OFF = 0x0E6F5

BDA = 0x400
EBDA_SEG = 0x9FC0        # 639 KiB of base memory; the EBDA takes the last KiB
KBD_BUF_START, KBD_BUF_END = 0x1E, 0x3E  # BDA offsets

EFLAGS_VM = 1 << 17
IRQ_VECTORS = list(range(0x08, 0x10)) + list(range(0x70, 0x78))
SERVICE_VECTORS = (0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C)


class Bios:
    def __init__(self, machine: PcMachine, disks: dict[int, DiskImage] | None = None):
        self.m = machine
        self.disks = disks or {}
        self.cdroms = eltorito.cd_drives(machine)     # E0h on: the IDE CD-ROMs, 2048-byte sectors
        self.cd_boot: tuple[int, eltorito.BootEntry] | None = None    # (drive, entry) of an El Torito boot
        self.calls: dict[int, int] = {}
        self.screen = bytearray()

    # -- saved state ----------------------------------------------------------------
    def save_state(self) -> dict:
        return {"kind": "hle-bios", "version": 1, "screen": bytes(self.screen),
                "calls": {str(k): v for k, v in sorted(self.calls.items())},
                "wait_until": getattr(self, "_wait_until", 0),
                "trap_lifted": getattr(self, "_trap_lifted", False),
                "disks": {str(d): {"sha256": img.sha256(), "overlay": {str(s): data for s, data in
                                                                        sorted(img.overlay.items())}}
                          for d, img in sorted(self.disks.items())}}

    def load_state(self, st: dict) -> None:
        from devices.base import DeviceStateError

        if not isinstance(st, dict) or st.get("kind") != "hle-bios" or st.get("version") != 1:
            raise DeviceStateError("firmware: not an HLE BIOS state of version 1")
        try:
            self.screen = bytearray(st["screen"])
            self.calls = {int(k): int(v) for k, v in st["calls"].items()}
            self._wait_until = int(st["wait_until"])
            self._trap_lifted = bool(st.get("trap_lifted", False))
            self.m.vcpu.set_trap_range(0 if self._trap_lifted else ROM_BASE + TRAP_OFF,
                                       0 if self._trap_lifted else 0x100)
            disks = st["disks"]
            if sorted(int(d) for d in disks) != sorted(self.disks):
                raise DeviceStateError("firmware: the saved disks are not this machine's")
            for d, img in self.disks.items():
                sd = disks[str(d)]
                if sd["sha256"] != img.sha256():
                    raise DeviceStateError(f"firmware: disk {d:#x} is not the image the state was saved with")
                ov = {int(s): bytes(v) for s, v in sd["overlay"].items()}
                if any(not 0 <= s < img.sectors or len(v) != 512 for s, v in ov.items()):
                    raise DeviceStateError(f"firmware: disk {d:#x} overlay has a bad sector")
                img.overlay = ov
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DeviceStateError(f"firmware: malformed state ({e})") from None

    def timer_restorers(self) -> dict:
        return {"bios-wait": self._wake, "bios-trap": self._restore_trap}

    def attach(self) -> None:
        """Take over the trap range without writing memory (restoring a saved machine)."""
        if not getattr(self, "_trap_lifted", False):
            self.m.vcpu.set_trap_range(ROM_BASE + TRAP_OFF, 0x100)
        self.m.firmware = self

    # -- installation ---------------------------------------------------------------
    def install(self) -> None:
        m = self.m
        mem = m.memory
        rom = bytearray(b"\xf4" * 0x10000)           # anything unexpected halts
        rom[IRET_OFF] = 0xCF
        rom[WAIT16_OFF:WAIT16_OFF + 2] = b"\xfb\xf4"  # sti; hlt
        rel = (TRAP_OFF + 0x16) - (WAIT16_OFF + 5)
        rom[WAIT16_OFF + 2:WAIT16_OFF + 5] = b"\xe9" + struct.pack("<h", rel)
        rel = (TRAP_OFF + WAIT_CHECK) - (WAIT86_OFF + 5)
        rom[WAIT86_OFF:WAIT86_OFF + 5] = b"\xfb\xf4\xe9" + struct.pack("<h", rel)
        rom[TRAP_OFF:TRAP_OFF + 0x100] = b"\xcf" * 0x100
        # system configuration table (INT 15h AH=C0): AT, 8259 cascade, RTC
        rom[CONFIG_TABLE_OFF:CONFIG_TABLE_OFF + 10] = struct.pack("<HBBBBBBBB", 8, 0xFC, 0, 1, 0x70, 0, 0, 0, 0)
        rom[0xFFF0:0xFFF5] = b"\xea" + struct.pack("<HH", TRAP_OFF + 0x19, ROM_SEG)  # reset -> INT 19h
        rom[0xFFFE] = 0xFC                           # model byte: AT
        mem.write(ROM_BASE, bytes(rom))
        # IVT: every vector to the IRET unless the BIOS serves it
        ivt = bytearray()
        for v in range(256):
            off = TRAP_OFF + v if (v in SERVICE_VECTORS or v in IRQ_VECTORS or v == 0x1C) else IRET_OFF
            if v == 0x1C:
                off = IRET_OFF  # the user timer hook does nothing until a program installs one
            ivt += struct.pack("<HH", off, ROM_SEG)
        mem.write(0, bytes(ivt))
        m.vcpu.set_trap_range(ROM_BASE + TRAP_OFF, 0x100)
        self._init_bda()
        # the PIT as a BIOS leaves it: channel 0, mode 3, 18.2 Hz
        m.io.write(0x43, 1, 0x36)
        m.io.write(0x40, 1, 0x00)
        m.io.write(0x40, 1, 0x00)
        m.firmware = self

    def _init_bda(self) -> None:
        mem = self.m.memory
        bda = bytearray(0x100)
        struct.pack_into("<HHHH", bda, 0x00, 0x3F8, 0x2F8 if self.m.com2 else 0, 0, 0)  # COM ports
        floppies = sum(1 for d in self.disks if d < 0x80)
        equip = 0x0020 | (1 << 9 if True else 0)  # 80x25 colour, one serial port
        if self.m.com2:
            equip = (equip & ~0x0E00) | (2 << 9)
        if floppies:
            equip |= 1 | ((floppies - 1) << 6)
        struct.pack_into("<H", bda, 0x10, equip)
        struct.pack_into("<H", bda, 0x13, EBDA_SEG >> 6)     # base memory in KiB (639)
        struct.pack_into("<HH", bda, 0x1A, KBD_BUF_START + BDA - 0x400, KBD_BUF_START + BDA - 0x400)
        bda[0x49] = 3                                         # video mode 3
        struct.pack_into("<H", bda, 0x4A, 80)
        struct.pack_into("<H", bda, 0x63, 0x3D4)
        bda[0x75] = sum(1 for d in self.disks if d >= 0x80)
        bda[0x84] = 24
        struct.pack_into("<HH", bda, 0x80, KBD_BUF_START, KBD_BUF_END)
        mem.write(BDA, bytes(bda))
        struct.pack_into("<H", bda, 0x0E, EBDA_SEG)
        mem.write(BDA + 0x0E, struct.pack("<H", EBDA_SEG))
        mem.write(EBDA_SEG << 4, b"\x01" + b"\0" * 0x3FF)    # EBDA size 1 KiB

    # -- register helpers ----------------------------------------------------------
    def _r(self, i: int) -> int:
        return self.m.vcpu.gpr(i)

    def _set16(self, i: int, v: int) -> None:
        cpu = self.m.vcpu
        cpu.set_u64(8 * i, (cpu.gpr(i) & ~0xFFFF) | (v & 0xFFFF))

    def _set8(self, i: int, high: bool, v: int) -> None:
        cpu = self.m.vcpu
        shift = 8 if high else 0
        cpu.set_u64(8 * i, (cpu.gpr(i) & ~(0xFF << shift)) | ((v & 0xFF) << shift))

    @property
    def ax(self) -> int:
        return self._r(0) & 0xFFFF

    @property
    def ah(self) -> int:
        return (self._r(0) >> 8) & 0xFF

    @property
    def al(self) -> int:
        return self._r(0) & 0xFF

    def _flags_addr(self) -> int:
        cpu = self.m.vcpu
        return cpu.seg(SS).base + ((cpu.rsp + 4) & 0xFFFF)

    def _set_flag(self, bit: int, on: bool) -> None:
        a = self._flags_addr()
        (f,) = struct.unpack("<H", self._read_buf(a, 2))
        self._write_buf(a, struct.pack("<H", (f | bit) if on else (f & ~bit)))

    def _set_cf(self, on: bool) -> None:
        self._set_flag(0x01, on)

    def _set_zf(self, on: bool) -> None:
        self._set_flag(0x40, on)

    def _fail(self, code: int = 0x86) -> None:
        self._set8(0, True, code)
        self._set_cf(True)

    def _ok(self) -> None:
        self._set_cf(False)

    def _lin(self, seg: int, off: int) -> int:
        return ((seg << 4) + off) & self.m.vcpu.a20_mask

    # -- the trap -----------------------------------------------------------------------
    def trap(self, machine, exit_) -> None:
        cpu = self.m.vcpu
        if cpu.cr0 & 1 and not cpu.rflags & EFLAGS_VM:
            self._pass_through()
            return
        lin = cpu.seg(CS).base + cpu.rip
        vector = lin - (ROM_BASE + TRAP_OFF)
        self.calls[vector] = self.calls.get(vector, 0) + 1
        # leave through the ROM's IRET unless the service says otherwise
        cpu.load_seg(CS, ROM_SEG, ROM_BASE, 0xFFFF, cpu.seg(CS).flags)
        cpu.rip = IRET_OFF
        handler = getattr(self, f"int_{vector:02x}", None)
        if handler is not None:
            handler()
        elif vector in IRQ_VECTORS:
            self._eoi(vector)
        else:
            self._fail()

    def _pass_through(self) -> None:
        """Protected mode reached the trap range: no service.  Lift the trap for one
        timer tick, so that the instruction there executes as the CPU finds it, then
        put it back (the timer is part of the machine's state, like every timer)."""
        self.m.vcpu.set_trap_range(0, 0)
        self._trap_lifted = True
        self.m.clock.schedule_in(1, self._restore_trap, "bios-trap")

    def _restore_trap(self, now: int) -> None:
        self._trap_lifted = False
        self.m.vcpu.set_trap_range(ROM_BASE + TRAP_OFF, 0x100)

    def _eoi(self, vector: int) -> None:
        if vector >= 0x70:
            self.m.io.write(0xA0, 1, 0x20)
        self.m.io.write(0x20, 1, 0x20)

    # -- IRQs -----------------------------------------------------------------------------
    def int_08(self) -> None:
        mem = self.m.memory
        ticks = mem.read_u32(BDA + 0x6C) + 1
        if ticks >= 0x1800B0:  # 24 hours of 18.2 Hz ticks
            ticks = 0
            mem.write_u8(BDA + 0x70, 1)
        mem.write_u32(BDA + 0x6C, ticks)
        self._eoi(0x08)
        ivt1c = mem.read_u32(0x1C * 4)
        if ivt1c != (ROM_SEG << 16) | IRET_OFF:
            # chain the user timer hook: it returns to our IRET, which returns from IRQ0
            self.m.delivery.deliver(0x1C, software=False)

    def int_09(self) -> None:
        mem = self.m.memory
        code = self.m.io.read(0x60, 1)
        flags = mem.read_u8(BDA + 0x17)
        if code in (0x2A, 0x36):
            flags |= 0x02 if code == 0x2A else 0x01
        elif code in (0xAA, 0xB6):
            flags &= ~(0x02 if code == 0xAA else 0x01)
        elif code == 0x1D:
            flags |= 0x04
        elif code == 0x9D:
            flags &= ~0x04
        elif code < 0x80 and code in FROM_SCAN:
            lo, hi = FROM_SCAN[code]
            ch = hi if flags & 0x03 else lo
            if flags & 0x04 and 0x61 <= (lo | 0x20) <= 0x7A:
                ch = (lo | 0x20) - 0x60
            self._kbd_push(code, ch)
        mem.write_u8(BDA + 0x17, flags)
        self._eoi(0x09)

    def _kbd_push(self, scan: int, ch: int) -> None:
        mem = self.m.memory
        head = mem.read_u16(BDA + 0x1A)
        tail = mem.read_u16(BDA + 0x1C)
        nxt = tail + 2
        if nxt >= KBD_BUF_END:
            nxt = KBD_BUF_START
        if nxt == head:
            return  # buffer full: the key is lost, as on a PC
        mem.write_u16(BDA + tail, (scan << 8) | ch)
        mem.write_u16(BDA + 0x1C, nxt)

    def int_70(self) -> None:
        self.m.io.write(0x70, 1, 0x0C)
        self.m.io.read(0x71, 1)
        self._eoi(0x70)

    # -- video ---------------------------------------------------------------------------
    def _cursor(self) -> tuple[int, int]:
        v = self.m.memory.read_u16(BDA + 0x50)
        return v >> 8, v & 0xFF

    def _set_cursor(self, row: int, col: int) -> None:
        self.m.memory.write_u16(BDA + 0x50, (row << 8) | col)
        vga = getattr(self.m, "vga", None)
        if vga is not None:
            vga.set_cursor(row, col)   # the CRTC's cursor, so the guest and the screen agree

    def _scroll(self) -> None:
        mem = self.m.memory
        text = mem.read(0xB8000 + 160, 160 * 24)
        mem.write(0xB8000, text + b"\x20\x07" * 80)

    def _put_char(self, ch: int, attr: int = 0x07, teletype: bool = True) -> None:
        mem = self.m.memory
        row, col = self._cursor()
        if teletype:
            self.screen.append(ch)
            out = self.m.on_console_output
            if out is not None:
                out(bytes((ch,)))
        if ch == 0x0D:
            col = 0
        elif ch == 0x0A:
            row += 1
        elif ch == 0x08:
            col = max(0, col - 1)
        elif ch == 0x07:
            pass
        else:
            mem.write(0xB8000 + (row * 80 + col) * 2, bytes((ch, attr)))
            col += 1
            if col >= 80:
                col = 0
                row += 1
        if row >= 25:
            self._scroll()
            row = 24
        self._set_cursor(row, col)

    def int_10(self) -> None:
        ah, al = self.ah, self.al
        bx, cx, dx = self._r(3) & 0xFFFF, self._r(1) & 0xFFFF, self._r(2) & 0xFFFF
        mem = self.m.memory
        if ah == 0x00:
            mem.write(0xB8000, b"\x20\x07" * 2000)
            self._set_cursor(0, 0)
            mem.write_u8(BDA + 0x49, al & 0x7F)
        elif ah == 0x01:
            mem.write_u16(BDA + 0x60, cx)
        elif ah == 0x02:
            self._set_cursor(dx >> 8, dx & 0xFF)
        elif ah == 0x03:
            row, col = self._cursor()
            self._set16(2, (row << 8) | col)
            self._set16(1, mem.read_u16(BDA + 0x60))
        elif ah == 0x05:
            mem.write_u8(BDA + 0x62, al)
        elif ah in (0x06, 0x07):
            if al == 0:
                mem.write(0xB8000, bytes((0x20, (bx >> 8) or 0x07)) * 2000)
            else:
                for _ in range(al):
                    self._scroll()
        elif ah == 0x08:
            row, col = self._cursor()
            self._set16(0, mem.read_u16(0xB8000 + (row * 80 + col) * 2))
        elif ah in (0x09, 0x0A):
            row, col = self._cursor()
            attr = bx & 0xFF if ah == 0x09 else mem.read_u8(0xB8000 + (row * 80 + col) * 2 + 1)
            for i in range(cx):
                pos = row * 80 + col + i
                if pos < 2000:
                    mem.write(0xB8000 + pos * 2, bytes((al, attr)))
        elif ah == 0x0E:
            self._put_char(al)
        elif ah == 0x0F:
            self._set16(0, (80 << 8) | mem.read_u8(BDA + 0x49))
            self._set8(3, True, mem.read_u8(BDA + 0x62))
        elif ah == 0x12 and (bx & 0xFF) == 0x10:
            self._set16(3, 0x0003)
            self._set16(1, 0x0009)
        elif ah == 0x13:
            cpu = self.m.vcpu
            base = cpu.seg(ES).base + (self._r(5) & 0xFFFF)
            row, col = dx >> 8, dx & 0xFF
            save = self._cursor()
            self._set_cursor(row, col)
            with_attr = al & 2
            step = 2 if with_attr else 1
            text = self._read_buf(base, cx * step)
            for i in range(cx):
                ch = text[i * step]
                attr = text[i * step + 1] if with_attr else bx & 0xFF
                self._put_char(ch, attr)
            if not al & 1:
                self._set_cursor(*save)
        elif ah == 0x1A and al == 0:
            self._set16(0, 0x001A)
            self._set16(3, 0x0008)

    # -- equipment, memory -----------------------------------------------------------------
    def int_11(self) -> None:
        self._set16(0, self.m.memory.read_u16(BDA + 0x10))

    def int_12(self) -> None:
        self._set16(0, self.m.memory.read_u16(BDA + 0x13))

    # -- disk ---------------------------------------------------------------------------------
    def _geometry(self, drive: int, disk: DiskImage) -> tuple[int, int, int]:
        """(cylinders, heads, sectors per track)."""
        if drive < 0x80:
            for c, h, s in ((80, 2, 18), (80, 2, 36), (80, 2, 9), (40, 2, 9), (80, 2, 15)):
                if c * h * s == disk.sectors:
                    return c, h, s
            return max(1, disk.sectors // 36), 2, 18
        heads, spt = 16, 63
        return max(1, min(1024, disk.sectors // (heads * spt))), heads, spt

    def _disk_status(self, drive: int, status: int) -> None:
        self.m.memory.write_u8(BDA + 0x41 if drive < 0x80 else BDA + 0x74, status)
        self._set8(0, True, status)
        self._set_cf(status != 0)

    def int_13(self) -> None:
        ah = self.ah
        dl = self._r(2) & 0xFF
        if dl in self.cdroms:
            self._int13_cd(ah, dl, self.cdroms[dl])
            return
        disk = self.disks.get(dl)
        mem = self.m.memory
        cpu = self.m.vcpu
        if ah == 0x00:
            self._disk_status(dl, 0 if disk else 0x01)
            return
        if ah == 0x01:
            self._set8(0, True, mem.read_u8(BDA + 0x41 if dl < 0x80 else BDA + 0x74))
            self._set_cf(False)
            return
        if disk is None:
            self._disk_status(dl, 0x01)
            if ah == 0x15:
                self._set8(0, True, 0)
            return
        cyls, heads, spt = self._geometry(dl, disk)
        if ah in (0x02, 0x03, 0x04):
            count = self.al
            cx, dx = self._r(1) & 0xFFFF, self._r(2) & 0xFFFF
            cyl = (cx >> 8) | ((cx & 0xC0) << 2)
            sector = cx & 0x3F
            head = dx >> 8
            if sector == 0 or sector > spt or head >= heads or count == 0:
                self._disk_status(dl, 0x01)
                self._set8(0, False, 0)
                return
            lba = (cyl * heads + head) * spt + sector - 1
            buf = cpu.seg(ES).base + (self._r(3) & 0xFFFF)
            if ah == 0x02:
                data = disk.read(lba, count)
                if data is None:
                    self._disk_status(dl, 0x04)
                    self._set8(0, False, 0)
                    return
                self._write_buf(buf, data)
            elif ah == 0x03:
                ok = disk.write(lba, self._read_buf(buf, count * 512))
                if not ok:
                    self._disk_status(dl, 0x04)
                    self._set8(0, False, 0)
                    return
            self._set8(0, False, count)
            self._disk_status(dl, 0)
            self._set8(0, False, count)
        elif ah == 0x08:
            maxc = cyls - 1
            self._set16(1, ((maxc & 0xFF) << 8) | ((maxc >> 2) & 0xC0) | spt)
            ndrives = sum(1 for d in self.disks if (d >= 0x80) == (dl >= 0x80))
            self._set16(2, ((heads - 1) << 8) | ndrives)
            if dl < 0x80:
                self._set8(3, False, 4)
                self._set16(7, 0)
            self._disk_status(dl, 0)
        elif ah == 0x15:
            if dl < 0x80:
                self._set8(0, True, 0x01)
            else:
                self._set8(0, True, 0x03)
                self._set16(1, disk.sectors >> 16)
                self._set16(2, disk.sectors & 0xFFFF)
            self._set_cf(False)
        elif ah == 0x41:
            if (self._r(3) & 0xFFFF) != 0x55AA:
                self._disk_status(dl, 0x01)
                return
            self._set16(3, 0xAA55)
            self._set8(0, True, 0x30)   # EDD 3.0
            self._set16(1, 0x0001)      # extended disk access functions
            self._set_cf(False)
        elif ah in (0x42, 0x43):
            dap = cpu.seg(DS).base + (self._r(6) & 0xFFFF)
            raw = self._read_buf(dap, 16)
            size, _, count, off, seg, lba = struct.unpack("<BBHHHQ", raw)
            if size < 16:
                self._disk_status(dl, 0x01)
                return
            buf = (seg << 4) + off
            if ah == 0x42:
                data = disk.read(lba, count)
                if data is None:
                    self._disk_status(dl, 0x04)
                    return
                self._write_buf(buf, data)
            else:
                if not disk.write(lba, self._read_buf(buf, count * 512)):
                    self._disk_status(dl, 0x04)
                    return
            self._disk_status(dl, 0)
        elif ah == 0x48:
            dst = cpu.seg(DS).base + (self._r(6) & 0xFFFF)
            (size,) = struct.unpack("<H", self._read_buf(dst, 2))
            info = struct.pack("<HHIIIQH", 0x1A, 0x02, cyls, heads, spt, disk.sectors, 512)
            self._write_buf(dst, info[:max(0, min(size, len(info)))])
            self._disk_status(dl, 0)
        else:
            self._disk_status(dl, 0x01)

    def _int13_cd(self, ah: int, dl: int, cd: eltorito.CdDrive) -> None:
        """INT 13h on a CD-ROM drive: the EDD functions in 2048-byte sectors, and El Torito's
        4Bh (vmm/firmware/eltorito.py); a CD is read-only (03h: write-protected)."""
        cpu = self.m.vcpu
        if ah == 0x00:
            self._disk_status(dl, 0)
        elif ah == 0x01:
            self._set8(0, True, self.m.memory.read_u8(BDA + 0x74))
            self._set_cf(False)
        elif not cd.present and ah != 0x4B:
            self._disk_status(dl, 0xAA)          # drive not ready: no disc, or the tray is open
        elif ah == 0x41:
            if (self._r(3) & 0xFFFF) != 0x55AA:
                self._disk_status(dl, 0x01)
                return
            self._set16(3, 0xAA55)
            self._set8(0, True, 0x30)
            self._set16(1, 0x0001 | 0x0002 | 0x0004)   # extended access, removable media, EDD
            self._set_cf(False)
        elif ah in (0x42, 0x43, 0x44):
            dap = cpu.seg(DS).base + (self._r(6) & 0xFFFF)
            size, _, count, off, seg, lba = struct.unpack("<BBHHHQ", self._read_buf(dap, 16))
            if size < 16:
                self._disk_status(dl, 0x01)
            elif ah == 0x43:
                self._disk_status(dl, 0x03)
            else:
                data = cd.read(lba, count)
                if data is None:
                    self._write_buf(dap + 2, b"\0\0")    # EDD: the count field says what was transferred
                    self._disk_status(dl, 0x04 if cd.present else 0xAA)
                    return
                if ah == 0x42:
                    self._write_buf((seg << 4) + off, data)
                self._disk_status(dl, 0)
        elif ah == 0x47:
            self._disk_status(dl, 0)
        elif ah == 0x48:
            dst = cpu.seg(DS).base + (self._r(6) & 0xFFFF)
            (size,) = struct.unpack("<H", self._read_buf(dst, 2))
            # flags: DMA boundary errors handled, removable, change line, lockable, geometry is maximum
            info = struct.pack("<HHIIIQH", 0x1A, 0x74, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF, cd.sectors,
                               eltorito.CD_SECTOR)
            self._write_buf(dst, info[:max(0, min(size, len(info)))])
            self._disk_status(dl, 0)
        elif ah == 0x4B and self.al in (0x00, 0x01):
            if self.cd_boot is None or self.cd_boot[0] != dl:
                self._disk_status(dl, 0x01)      # this drive was not booted the El Torito way
                return
            self._write_buf(cpu.seg(DS).base + (self._r(6) & 0xFFFF), eltorito.spec_packet(*self.cd_boot))
            self._disk_status(dl, 0)
        elif ah == 0x03 or ah == 0x05:
            self._disk_status(dl, 0x03)
        else:
            self._disk_status(dl, 0x01)

    def _pieces(self, lin: int, n: int):
        """(physical address, offset in the buffer, length) of a buffer at linear ``lin``:
        real-mode linear is physical, through the A20 gate, in a 32-bit space (split where
        the gate or the 4 GiB wrap breaks the run)."""
        mask = self.m.vcpu.a20_mask & 0xFFFF_FFFF
        i = 0
        while i < n:
            a = (lin + i) & 0xFFFF_FFFF
            k = min(n - i, (1 << 20) - (a & 0xFFFFF))      # to the next 1 MiB edge (A20's bit)
            yield a & mask, i, k
            i += k

    def _write_buf(self, lin: int, data: bytes) -> None:
        """Write as the CPU would: RAM, else the MMIO bus."""
        mem, size = self.m.memory, self.m.memory.size
        for pa, i, k in self._pieces(lin, len(data)):
            inside = max(0, min(k, size - pa))
            if inside:
                mem.write(pa, data[i:i + inside])
            if inside < k:
                self._bus_write(pa + inside, data[i + inside:i + k])

    def _read_buf(self, lin: int, n: int) -> bytes:
        """Read as the CPU would: RAM, else the MMIO bus (unclaimed space reads zeros)."""
        mem, size = self.m.memory, self.m.memory.size
        out = bytearray()
        for pa, _i, k in self._pieces(lin, n):
            inside = max(0, min(k, size - pa))
            if inside:
                out += mem.read(pa, inside)
            if inside < k:
                out += self._bus_read(pa + inside, k - inside)
        return bytes(out)

    def _bus_spans(self, pa: int, n: int):
        """(address, length, claimed) runs of [pa, pa+n) on the MMIO bus."""
        bus = self.m.mmio
        end = pa + n
        while pa < end:
            c = bus.find(pa)
            if c is not None:
                b = min(end, c.end)
            else:
                nxt = [x.base for x in bus.claims if x.base > pa]
                b = min([end] + nxt)
            yield pa, b - pa, c is not None
            pa = b

    def _bus_read(self, pa: int, n: int) -> bytes:
        bus, vid = self.m.mmio, self.m.vcpu.id
        out = bytearray()
        for a, k, claimed in self._bus_spans(pa, n):
            if not claimed:
                bus.unclaimed_reads += 1
                out += bytes(k)
                continue
            for off in range(0, k, 4):
                if (a + off) % 4 == 0 and k - off >= 4:
                    out += struct.pack("<I", bus.read(a + off, 4, vid))
                else:
                    for j in range(min(4, k - off)):
                        out.append(bus.read(a + off + j, 1, vid))
        return bytes(out)

    def _bus_write(self, pa: int, data: bytes) -> None:
        bus, vid = self.m.mmio, self.m.vcpu.id
        i = 0
        for a, k, claimed in self._bus_spans(pa, len(data)):
            if not claimed:
                bus.unclaimed_writes += 1
            else:
                for off in range(0, k, 4):
                    if (a + off) % 4 == 0 and k - off >= 4:
                        bus.write(a + off, 4, struct.unpack_from("<I", data, i + off)[0], vid)
                    else:
                        for j in range(min(4, k - off)):
                            bus.write(a + off + j, 1, data[i + off + j], vid)
            i += k

    # -- serial ---------------------------------------------------------------------------------
    def int_14(self) -> None:
        ah = self.ah
        dx = self._r(2) & 0xFFFF
        if dx != 0:
            self._set8(0, True, 0x80)
            return
        io = self.m.io
        if ah == 0x00:
            io.write(0x3FB, 1, 0x80)
            io.write(0x3F8, 1, 0x0C)
            io.write(0x3F9, 1, 0x00)
            io.write(0x3FB, 1, self.al & 0x1F)
            self._set16(0, (io.read(0x3FD, 1) << 8) | io.read(0x3FE, 1))
        elif ah == 0x01:
            io.write(0x3F8, 1, self.al)
            self._set8(0, True, io.read(0x3FD, 1))
        elif ah == 0x02:
            lsr = io.read(0x3FD, 1)
            if lsr & 1:
                self._set8(0, False, io.read(0x3F8, 1))
                self._set8(0, True, lsr & 0x1E)
            else:
                self._set8(0, True, 0x80)
        elif ah == 0x03:
            self._set16(0, (io.read(0x3FD, 1) << 8) | io.read(0x3FE, 1))

    # -- system services ------------------------------------------------------------------------
    def e820_map(self) -> list[tuple[int, int, int]]:
        """The machine's memory map (PcMachine.e820: RAM, the EBDA, the BIOS area)."""
        return self.m.e820()

    def int_15(self) -> None:
        ax, ah = self.ax, self.ah
        cpu = self.m.vcpu
        if (self._r(0) & 0xFFFF_FFFF) == 0xE820 and (self._r(2) & 0xFFFF_FFFF) == 0x534D4150:
            idx = self._r(3) & 0xFFFF_FFFF
            entries = self.e820_map()
            if idx >= len(entries):
                self._fail()
                return
            base, length, kind = entries[idx]
            dst = cpu.seg(ES).base + (self._r(7) & 0xFFFF)
            self._write_buf(dst, struct.pack("<QQI", base, length, kind))
            cpu.set_u64(0, 0x534D4150)
            cpu.set_u64(8, 20)
            cpu.set_u64(24, 0 if idx + 1 >= len(entries) else idx + 1)
            self._ok()
        elif ax == 0xE801:
            size = self.m.memory.size
            below16 = min(size, 16 << 20) - (1 << 20)
            above16 = max(0, size - (16 << 20))
            for reg in (0, 1):
                self._set16(reg, below16 >> 10)
            for reg in (3, 2):
                self._set16(reg, above16 >> 16)
            self._ok()
        elif ah == 0x88:
            self._set16(0, min(0xFFFF, (self.m.memory.size - (1 << 20)) >> 10))
            self._ok()
        elif ax in (0x2400, 0x2401):
            self.m.port92.io_write(0x92, 1, (self.m.port92.io_read(0x92, 1) & ~2) | (2 if ax == 0x2401 else 0))
            self.m.kbd.io_write(0x64, 1, 0xD1)
            self.m.kbd.io_write(0x60, 1, 0xDF if ax == 0x2401 else 0xDD)
            self._set8(0, True, 0)
            self._ok()
        elif ax == 0x2402:
            self._set8(0, False, 1 if self.m.a20_enabled else 0)
            self._set8(0, True, 0)
            self._ok()
        elif ax == 0x2403:
            self._set16(3, 0x0003)
            self._set8(0, True, 0)
            self._ok()
        elif ah == 0xC0:
            cpu.load_seg(ES, ROM_SEG, ROM_BASE, 0xFFFF, cpu.seg(ES).flags)
            self._set16(3, CONFIG_TABLE_OFF)
            self._set8(0, True, 0)
            self._ok()
        elif ah == 0x86:
            # wait CX:DX microseconds of virtual time with interrupts serviced,
            # as a BIOS does: the guest halts in the ROM until the deadline
            us = ((self._r(1) & 0xFFFF) << 16) | (self._r(2) & 0xFFFF)
            self._wait_until = self.m.clock.now() + us * (self.m.clock_hz // 1_000_000)
            self.m.clock.schedule(self._wait_until, self._wake, "bios-wait")
            self.m.vcpu.rip = WAIT86_OFF
        else:
            self._fail()

    def _wake(self, now: int) -> None:
        self.m.wake(0)  # the wait loop's HLT ends at the deadline even with no interrupt

    def int_f0(self) -> None:
        """The INT 15h AH=86h wait loop's check: done, or halt again."""
        if self.m.clock.now() >= getattr(self, "_wait_until", 0):
            self._set8(0, True, 0)
            self._ok()
        else:
            self.m.vcpu.rip = WAIT86_OFF

    def int_16(self) -> None:
        ah = self.ah
        mem = self.m.memory
        head = mem.read_u16(BDA + 0x1A)
        tail = mem.read_u16(BDA + 0x1C)
        if ah in (0x00, 0x10):
            if head == tail:
                # nothing typed yet: wait with interrupts on, then ask again
                self.m.vcpu.rip = WAIT16_OFF
                return
            key = mem.read_u16(BDA + head)
            nxt = head + 2
            mem.write_u16(BDA + 0x1A, KBD_BUF_START if nxt >= KBD_BUF_END else nxt)
            self._set16(0, key)
        elif ah in (0x01, 0x11):
            if head == tail:
                self._set_zf(True)
            else:
                self._set16(0, mem.read_u16(BDA + head))
                self._set_zf(False)
        elif ah in (0x02, 0x12):
            self._set8(0, False, mem.read_u8(BDA + 0x17))

    def int_17(self) -> None:
        self._set8(0, True, 0x30)  # no printer: "selected" + "out of paper" as an absent port reads

    def int_18(self) -> None:
        self.m.request_host_stop("no bootable device (INT 18h)")

    def int_19(self) -> None:
        drive = 0x80 if 0x80 in self.disks else (0x00 if 0x00 in self.disks else None)
        if drive is None:
            self.m.request_host_stop("no bootable device (INT 19h)")
            return
        boot = self.disks[drive].read(0, 1) or b""
        self.m.memory.write(0x7C00, boot)
        cpu = self.m.vcpu
        cpu.load_seg(CS, 0, 0, 0xFFFF, cpu.seg(CS).flags)
        cpu.rip = 0x7C00
        cpu.set_u64(16, drive)

    def int_1a(self) -> None:
        ah = self.ah
        mem = self.m.memory
        rtc = self.m.rtc
        if ah == 0x00:
            t = mem.read_u32(BDA + 0x6C)
            self._set16(1, t >> 16)
            self._set16(2, t & 0xFFFF)
            self._set8(0, False, mem.read_u8(BDA + 0x70))
            mem.write_u8(BDA + 0x70, 0)
        elif ah == 0x01:
            mem.write_u32(BDA + 0x6C, ((self._r(1) & 0xFFFF) << 16) | (self._r(2) & 0xFFFF))
        elif ah in (0x02, 0x04):
            def cmos(i: int) -> int:
                self.m.io.write(0x70, 1, i)
                return self.m.io.read(0x71, 1)
            bcd = not (cmos(0x0B) & 4)

            def as_bcd(v: int) -> int:
                return v if bcd else ((v // 10) << 4) | (v % 10)
            if ah == 0x02:
                self._set16(1, (as_bcd(cmos(4)) << 8) | as_bcd(cmos(2)))
                self._set16(2, as_bcd(cmos(0)) << 8)
            else:
                self._set16(1, (as_bcd(cmos(0x32)) << 8) | as_bcd(cmos(9)))
                self._set16(2, (as_bcd(cmos(8)) << 8) | as_bcd(cmos(7)))
            self._ok()
            del rtc
        else:
            self._fail()
