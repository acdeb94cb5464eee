"""The PIIX3 IDE controller (82371SB function 1) at 00:01.1, in compatibility mode.

Identity as QEMU's ``piix3-ide``: vendor 8086, device 7010, class 010180h
(mass storage, IDE, programming interface 80h: bus master capable, both
channels fixed in compatibility mode), revision 00, subsystem 1af4:1100, no
interrupt pin.  Configuration registers from the 82371FB/82371SB datasheet
(290550), "PCI Configuration Registers (IDE Interface)":

========  ======  =========================================================
offset    reset   register
========  ======  =========================================================
04h       0000h   PCICMD: I/O space (0) and bus master (2) enable, R/W
06h       0280h   PCISTS: DEVSEL# medium, fast back-to-back; bits 11-13
                  (target abort signalled/received, master abort) R/WC
0Dh       00h     MLT, master latency timer, bits 7:4 R/W
20h       1h      BMIBA (BAR4): 16 bytes of I/O for the bus-master
                  registers (bmdma.py), bits 15:4 R/W
40h-41h   0000h   IDETIM primary, 42h-43h secondary: bit 15 IDE decode
                  enable, 14 slave timing, 13:12 IORDY sample, 9:8
                  recovery, 7:0 per-drive timing bits (11:10 reserved)
44h       00h     SIDETIM, slave timing (PIIX3)
========  ======  =========================================================

The timing registers are storage: nothing here has cycle timing.  Linux's
ata_piix refuses a channel whose IDETIM decode-enable bit is clear ("port
disabled"), so firmware sets it; the HLE BIOS does not program PCI, hence
``program_like_firmware`` (what SeaBIOS's ``piix_ide_setup`` and its BAR
allocation leave behind), which ``attach_ide`` calls.

Ports.  The legacy command blocks are decoded whatever IDETIM and the command
register say, as QEMU does (the datasheet gates them on the decode-enable
bit; guests booted by firmware never see the difference, and the HLE BIOS
sets nothing): primary 1F0h-1F7h and 3F6h on ISA IRQ 14, secondary 170h-177h
and 376h on IRQ 15 (3F7h/377h stay with the floppy controller, as in QEMU).
Offset 0 is the data port, 16 or 32 bits wide (a byte access reads FFh and
is ignored on write, as QEMU); offsets 1-7 and the control port are bytes,
and a wider access is split into byte accesses.

Per channel (ATA/ATAPI-6 chapter 6 and QEMU's hw/ide/core.c where the
standard leaves room):

* writes to registers 1-6 reach both devices (each keeps its own copy and,
  for 48-bit commands, the previous value of each byte); they are ignored
  while the selected device is BSY or has DRQ set;
* reads come from the selected device; with HOB set in the device control
  register they return the previous values.  A channel with no device reads
  00h everywhere; an absent device 1 behind a present device 0 reads 00h for
  status and error and its latched registers otherwise (QEMU's values: Linux
  then classifies device 1 as a phantom and ignores it quietly);
* INTRQ: a device's completion sets the channel's interrupt pending; reading
  the status register or writing the command register clears it; the ISA
  line is high while an interrupt is pending and nIEN is clear (ATA-6
  6.2.6: a device with nIEN set releases INTRQ).  Each rise of the line sets
  the bus master's Interrupt bit, as QEMU's ``bmdma_irq`` does for every IDE
  interrupt, which is what Linux's idle-interrupt check reads;
* SRST (device control bit 2): both devices stop, report BSY until SRST is
  released and ``RESET_TICKS`` after that, then run their diagnostics
  (signature, error 01h, status 50h for a disk and 00h for a packet device);
  no interrupt, device 0 selected.

Timers are named ``ide<channel>.<unit>.cmd`` and ``ide<channel>.srst``; they
are re-armed by ``load_state`` in the order they were armed, so timers due
at the same tick fire in the same order after a restore.

State holds registers, transfer buffers and the bus masters, never sectors:
a disk's contents live in its image, which the machine names by hash
(``image_sha256``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError, Dma, IrqLine, State, check_state
from devices.pci.function import (
    CMD_IO,
    CMD_MASTER,
    COMMAND,
    QEMU_SUBSYSTEM_ID,
    QEMU_SUBSYSTEM_VENDOR_ID,
    STATUS,
    VENDOR_INTEL,
    PciFunction,
)
from devices.storage.ata import BSY, DEV_ALWAYS, DRQ, REGS, AtaDisk, Drive, need_bool, need_int
from devices.storage.atapi import AtapiCdrom
from devices.storage.bmdma import CMD_START, ST_INTERRUPT, BusMaster

DEVICE_82371SB_1 = 0x7010
CLASS_IDE_COMPAT = 0x010180
LATENCY_TIMER = 0x0D
IDETIM_PRIMARY, IDETIM_SECONDARY, SIDETIM = 0x40, 0x42, 0x44
IDETIM_DECODE = 0x8000
BMIBA_BAR = 4
BMIBA_SIZE = 16

LEGACY = ((0x1F0, 0x3F6, 14), (0x170, 0x376, 15))    # command block, control port, ISA IRQ
CTL_NIEN, CTL_SRST, CTL_HOB = 0x02, 0x04, 0x80
RESET_TICKS = 2_000            # 20 us of diagnostics after SRST is released

DRIVE_KINDS: dict[str, type[Drive]] = {"disk": AtaDisk, "cdrom": AtapiCdrom}


class IdeChannel:
    """One cable: two device slots, the command and control registers, INTRQ and the bus master."""

    def __init__(self, index: int, clock: Any, irq: IrqLine, dma: Dma, master_enabled: Callable[[], bool],
                 next_seq: Callable[[], int], specs: list[tuple[str, Any] | None]) -> None:
        self.index = index
        self.name = f"ide{index}"
        self.clock = clock
        self.irq = irq
        self.next_seq = next_seq
        self.bm = BusMaster(dma, master_enabled)
        self.drives: list[Drive] = []
        for unit, spec in enumerate(specs):
            if spec is None:
                self.drives.append(Drive(self, unit))
            else:
                kind, block = spec
                self.drives.append(DRIVE_KINDS[kind](self, unit, block))
        self.srst_timer: Any = None
        self.srst_at = self.srst_seq = 0
        self.power_on()

    def power_on(self) -> None:
        self.cancel_srst()
        for d in self.drives:
            d.power_on()
        self.bm.reset()
        self.unit = 0
        self.ctl = 0
        self.pending = False
        self.irq.set(False)

    @property
    def selected(self) -> Drive:
        return self.drives[self.unit]

    @property
    def populated(self) -> bool:
        return any(d.present for d in self.drives)

    # -- interrupt ------------------------------------------------------------------------
    def raise_irq(self) -> None:
        self.pending = True
        self.update_irq()

    def clear_irq(self) -> None:
        self.pending = False
        self.update_irq()

    def line_level(self) -> bool:
        return self.pending and not self.ctl & CTL_NIEN

    def update_irq(self) -> None:
        level = self.line_level()
        if level and not self.irq.level:
            self.bm.status |= ST_INTERRUPT
        self.irq.set(level)

    # -- command block ----------------------------------------------------------------------
    def read(self, reg: int) -> int:
        """Registers 1-7 (error ... status)."""
        d = self.selected
        if reg == 7:
            self.clear_irq()
        if not self.populated:
            return 0
        hob = self.ctl & CTL_HOB
        if reg == 1:
            return 0 if not d.present else (d.hob_feature if hob else d.error)
        if reg == 6:
            return d.select
        if reg == 7:
            return d.status if d.present else 0
        name = REGS[reg - 1]
        return getattr(d, ("hob_" if hob else "") + name) & 0xFF

    def write(self, reg: int, value: int) -> None:
        self.ctl &= ~CTL_HOB          # any write to the command block clears HOB
        if reg == 7:
            self.clear_irq()
            self.selected.command(value)
            return
        if self.selected.status & (BSY | DRQ):
            return
        for d in self.drives:
            if reg == 6:
                d.select = value | DEV_ALWAYS
            else:
                name = REGS[reg - 1]
                setattr(d, "hob_" + name, getattr(d, name))
                setattr(d, name, value)
        if reg == 6:
            self.unit = value >> 4 & 1

    def alt_status(self) -> int:
        d = self.selected
        return d.status if self.populated and d.present else 0

    def control(self, value: int) -> None:
        old, self.ctl = self.ctl, value
        if value & CTL_SRST and not old & CTL_SRST:
            self.cancel_srst()
            for d in self.drives:
                d.soft_reset_begin()
        elif old & CTL_SRST and not value & CTL_SRST:
            self.arm_srst(self.clock.now() + RESET_TICKS, self.next_seq())
        self.update_irq()

    def data_read(self, size: int) -> int:
        return self.selected.data_read(size)

    def data_write(self, size: int, value: int) -> None:
        self.selected.data_write(size, value)

    # -- resets ---------------------------------------------------------------------------
    def arm_srst(self, deadline: int, seq: int) -> None:
        self.cancel_srst()
        self.srst_at, self.srst_seq = deadline, seq
        self.srst_timer = self.clock.schedule(deadline, self._srst_done, f"{self.name}.srst")

    def cancel_srst(self) -> None:
        if self.srst_timer is not None:
            self.srst_timer.cancel()
        self.srst_timer = None
        self.srst_at = self.srst_seq = 0

    def _srst_done(self, now: int) -> None:
        self.srst_timer = None
        self.srst_at = self.srst_seq = 0
        for d in self.drives:
            d.diagnostic_result()
        self.unit = 0
        self.clear_irq()

    def diagnose(self) -> None:
        """EXECUTE DEVICE DIAGNOSTIC (ATA-6 8.11): both devices run it, device 0 interrupts."""
        for d in self.drives:
            if d.present:
                d.diagnostic_result()
        self.unit = 0
        self.raise_irq()

    # -- bus master -----------------------------------------------------------------------
    def dma_requested(self, drive: Drive) -> None:
        if self.bm.active:
            drive.start_dma_timer()

    def bm_read(self, offset: int) -> int:
        return self.bm.read(offset)

    def bm_write(self, offset: int, value: int) -> None:
        was_started = self.bm.cmd & CMD_START
        if self.bm.write(offset, value):
            for d in self.drives:
                if d.dma and not d.action:
                    d.start_dma_timer()
                    break
        elif offset == 0 and was_started and not self.bm.cmd & CMD_START:
            # a stop before the transfer: nothing moves; a new start picks the request up again
            for d in self.drives:
                if d.action == "dma":
                    d.cancel()

    # -- state ----------------------------------------------------------------------------
    def save(self) -> dict:
        return {"unit": self.unit, "ctl": self.ctl, "pending": self.pending,
                "srst": [self.srst_timer is not None, self.srst_at, self.srst_seq],
                "bm": self.bm.save(), "drives": [d.save() for d in self.drives]}

    def parse(self, st: Any, where: str) -> dict:
        if not isinstance(st, dict):
            raise DeviceStateError(f"{where}: must be a dict")
        out = {"unit": need_int(st, "unit", 0, 1, where), "ctl": need_int(st, "ctl", 0, 0xFF, where),
               "pending": need_bool(st, "pending", where), "bm": BusMaster.parse(st.get("bm"), where)}
        srst = st.get("srst")
        if (not isinstance(srst, list) or len(srst) != 3 or not isinstance(srst[0], bool)
                or any(type(v) is not int or v < 0 for v in srst[1:])):
            raise DeviceStateError(f"{where}: srst must be [armed, deadline, seq]")
        out["srst"] = list(srst)
        drives = st.get("drives")
        if not isinstance(drives, list) or len(drives) != 2:
            raise DeviceStateError(f"{where}: drives must be a list of two")
        out["drives"] = [d.parse(s, f"{where}.{u}") for u, (d, s) in enumerate(zip(self.drives, drives))]
        return out

    def apply(self, p: dict) -> list[tuple[int, Callable[[], None]]]:
        """Load a parsed state; return (seq, re-arm) for the timers to put back."""
        self.cancel_srst()
        self.unit, self.ctl, self.pending = p["unit"], p["ctl"], p["pending"]
        self.bm.apply(p["bm"])
        timers: list[tuple[int, Callable[[], None]]] = []
        for d, dp in zip(self.drives, p["drives"]):
            d.apply(dp)
            action, deadline, seq = dp["timer"]
            if action:
                timers.append((seq, lambda d=d, a=action, t=deadline, s=seq: d.rearm(a, t, s)))
        armed, deadline, seq = p["srst"]
        if armed:
            timers.append((seq, lambda t=deadline, s=seq: self.arm_srst(t, s)))
        self.irq.level = self.line_level()     # silently: a restore raises no interrupt
        return timers


class _BusMasterWindow:
    """What BAR4 maps: the two channels' bus-master blocks, byte by byte."""

    def __init__(self, channels: list[IdeChannel]) -> None:
        self.channels = channels
        self.name = "ide-bmdma"

    def io_read(self, offset: int, size: int) -> int:
        v = 0
        for i in range(size):
            o = offset + i
            b = self.channels[o >> 3].bm_read(o & 7) if o < BMIBA_SIZE else 0xFF
            v |= b << (8 * i)
        return v

    def io_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            o = offset + i
            if o < BMIBA_SIZE:
                self.channels[o >> 3].bm_write(o & 7, value >> (8 * i) & 0xFF)


class IdeFunction(PciFunction):
    """The PIIX3 IDE function with its two channels.

    ``drives`` maps (channel, unit) to ("disk" | "cdrom", block); a CD-ROM's
    block may be None (an empty drive).  ``irqs`` are the ISA IRQ 14 and 15
    lines, ``dma`` the machine's DMA view, ``io_bus`` the machine's I/O bus
    (for BAR4).
    """

    kind = "piix3-ide"
    VERSION = 1

    def __init__(self, clock: Any, dma: Dma, irqs: tuple[IrqLine, IrqLine],
                 drives: dict[tuple[int, int], tuple[str, Any]], io_bus: Any, name: str = "ide") -> None:
        super().__init__(name=name, vendor_id=VENDOR_INTEL, device_id=DEVICE_82371SB_1,
                         class_code=CLASS_IDE_COMPAT, io_bus=io_bus,
                         subsystem_vendor_id=QEMU_SUBSYSTEM_VENDOR_ID, subsystem_id=QEMU_SUBSYSTEM_ID)
        specs: list[list[tuple[str, Any] | None]] = [[None, None], [None, None]]
        for key, spec in drives.items():
            if (not isinstance(key, tuple) or len(key) != 2 or key[0] not in (0, 1) or key[1] not in (0, 1)):
                raise ValueError(f"{name}: drive slot {key!r} is not (channel 0-1, unit 0-1)")
            kind, block = spec
            if kind not in DRIVE_KINDS:
                raise ValueError(f"{name}: drive kind {kind!r} is not 'disk' or 'cdrom'")
            if block is None and kind == "disk":
                raise ValueError(f"{name}: the disk at {key} has no image")
            specs[key[0]][key[1]] = (kind, block)
        self.define_register(COMMAND, 2, 0, wmask=CMD_IO | CMD_MASTER)
        self.define_register(STATUS, 2, 0x0280, w1c=0x3800)
        self.define_register(LATENCY_TIMER, 1, 0, wmask=0xF0)
        self.define_register(IDETIM_PRIMARY, 2, 0, wmask=0xF3FF)
        self.define_register(IDETIM_SECONDARY, 2, 0, wmask=0xF3FF)
        self.define_register(SIDETIM, 1, 0, wmask=0xFF)
        self._seq = 0
        self.channels = [IdeChannel(i, clock, irqs[i], dma, self._master_enabled, self._next_seq, specs[i])
                         for i in range(2)]
        self.add_bar(BMIBA_BAR, BMIBA_SIZE, _BusMasterWindow(self.channels), io=True)
        self.io_ranges: list[tuple[int, int]] = []
        for cmd, ctl, _ in LEGACY:
            self.io_ranges += [(cmd, 8), (ctl, 1)]

    def _master_enabled(self) -> bool:
        return bool(self.command & CMD_MASTER)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def program_like_firmware(self, bmdma_base: int = 0xC000) -> None:
        """What SeaBIOS leaves: both channels' decode enabled, BAR4 at ``bmdma_base``,
        I/O decode and bus mastering on."""
        self.config_write(IDETIM_PRIMARY, 2, IDETIM_DECODE)
        self.config_write(IDETIM_SECONDARY, 2, IDETIM_DECODE)
        self.config_write(0x10 + 4 * BMIBA_BAR, 4, bmdma_base | 1)
        self.config_write(COMMAND, 2, CMD_IO | CMD_MASTER)

    # -- legacy ports ---------------------------------------------------------------------
    def _where(self, port: int) -> tuple[IdeChannel, int] | None:
        """(channel, register): 0-7 in the command block, 8 the control port."""
        for ch, (cmd, ctl, _) in zip(self.channels, LEGACY):
            if cmd <= port < cmd + 8:
                return ch, port - cmd
            if port == ctl:
                return ch, 8
        return None

    def io_read(self, port: int, size: int) -> int:
        at = self._where(port)
        if at is not None and at[1] == 0 and size in (2, 4):
            return at[0].data_read(size)
        v = 0
        for i in range(size):
            v |= self._read_byte(port + i) << (8 * i)
        return v

    def _read_byte(self, port: int) -> int:
        at = self._where(port)
        if at is None or at[1] == 0:
            return 0xFF
        ch, reg = at
        return ch.alt_status() if reg == 8 else ch.read(reg)

    def io_write(self, port: int, size: int, value: int) -> None:
        at = self._where(port)
        if at is not None and at[1] == 0 and size in (2, 4):
            at[0].data_write(size, value)
            return
        for i in range(size):
            at = self._where(port + i)
            if at is None or at[1] == 0:
                continue
            ch, reg = at
            b = value >> (8 * i) & 0xFF
            if reg == 8:
                ch.control(b)
            else:
                ch.write(reg, b)

    # -- the machine's view ---------------------------------------------------------------
    def drive(self, channel: int, unit: int) -> Drive:
        return self.channels[channel].drives[unit]

    def images(self) -> dict[str, Any]:
        """The media attached, by slot name ("ide0.0" ...)."""
        return {f"ide{c}.{u}": self.drive(c, u).block for c in range(2) for u in range(2)
                if self.drive(c, u).block is not None}

    def image_sha256(self) -> dict[str, str]:
        """The SHA-256 of every attached medium's guest-visible content, by slot name, for a
        recording's or snapshot's header (reads each whole image: call it once, up front)."""
        out = {}
        for slot, block in self.images().items():
            digest = getattr(block, "sha256", None)
            if digest is None:
                raise TypeError(f"{slot}: the image object has no sha256()")
            out[slot] = digest()
        return out

    # -- reset and state ------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        for ch in self.channels:
            ch.power_on()

    def save_state(self) -> State:
        state = super().save_state()
        state["seq"] = self._seq
        state["channels"] = [ch.save() for ch in self.channels]
        return state

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        pci = self.parse_pci_state(state)
        seq = state.get("seq")
        if type(seq) is not int or seq < 0:
            raise DeviceStateError(f"{self.kind}: seq must be a non-negative int")
        chans = state.get("channels")
        if not isinstance(chans, list) or len(chans) != 2:
            raise DeviceStateError(f"{self.kind}: channels must be a list of two")
        parsed = [ch.parse(s, f"{self.kind}.ide{i}") for i, (ch, s) in enumerate(zip(self.channels, chans))]
        self.apply_pci_state(pci)
        self._seq = seq
        timers = []
        for ch, p in zip(self.channels, parsed):
            timers += ch.apply(p)
        for _, rearm in sorted(timers, key=lambda t: t[0]):
            rearm()


def attach_ide(machine: Any, drives: dict[tuple[int, int], tuple[str, Any]], bmdma_base: int = 0xC000,
               name: str = "ide") -> IdeFunction:
    """Build the PIIX3 IDE function with ``drives`` ((channel, unit) -> ("disk" | "cdrom",
    block)), wire it to ISA IRQ 14/15 and the machine's DMA view, put it at 00:01.1 and
    set it up as firmware would (``program_like_firmware``).  Needs the pc-2 board."""
    if getattr(machine, "pci", None) is None or getattr(machine, "isa_irqs", None) is None:
        raise ValueError("IDE needs the pc-2 board (PCI and the ISA IRQ lines)")
    irqs = (machine.isa_irqs[14].input(f"{name}0"), machine.isa_irqs[15].input(f"{name}1"))
    ide = IdeFunction(machine.clock, machine.dma, irqs, drives, machine.io, name=name)
    machine.add_device(ide)
    machine.pci.attach(ide, 1, 1)
    ide.program_like_firmware(bmdma_base)
    return ide
