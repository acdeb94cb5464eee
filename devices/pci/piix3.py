"""The PIIX3 PCI-to-ISA bridge (82371SB function 0) at 00:01.0, and PCI INTx routing.

Identity as QEMU's ``PIIX3`` presents it: vendor 8086, device 7000, revision
00, class 060100 (ISA bridge), header type 80h (multi-function: IDE and USB
are functions 1 and 2), subsystem 1af4:1100 (QEMU's default; the datasheet
has these reserved).

Registers, from the 82371FB/82371SB (PIIX/PIIX3) datasheet (290550),
"PCI to ISA Bridge Configuration Registers", with the datasheet's defaults
(QEMU's ``piix_reset`` uses the same values):

========  ======  =========================================================
offset    reset   register
========  ======  =========================================================
04h       0007h   PCICMD: I/O, memory and bus master hardwired on (the
                  bridge always forwards ISA cycles and masters DMA);
                  special cycle enable (3) and SERR# enable (8) writable
06h       0200h   PCISTS: DEVSEL# medium; error bits write-1-to-clear
4Ch       4Dh     IORT, ISA I/O recovery timer
4Eh-4Fh   0003h   XBCS, X-bus chip select enable (BIOS, keyboard, RTC...)
60h-63h   80h     PIRQRC[A:D], PIRQ route control (below)
69h       02h     TOM, top of memory
6Ah-6Bh   0000h   MSTAT, miscellaneous status
70h       80h     MBIRQ0, motherboard device IRQ route
76h-77h   0Ch     MBDMA0-1, motherboard device DMA
78h-79h   0002h   PCSC, programmable chip select control
80h       00h     APICBASE, I/O APIC base address relocation
82h       00h     DLC, deterministic latency control
A0h       08h     SMICNTL, SMI control
A2h-A3h   0000h   SMIEN, SMI enable
A4h-A7h   0       SEE, system event enable
A8h       0Fh     FTMR, fast off timer
AAh-ABh   0000h   SMIREQ, SMI request
ACh       00h     CTLTMR, clock scale STPCLK# low timer
AEh       00h     CTHTMR, clock scale STPCLK# high timer
========  ======  =========================================================

Only PIRQRC has an effect here; the others are read/write storage (QEMU
keeps them the same way), since there is no SMM, no X-bus and no ISA timing
to model, and firmware or Linux only program them and read them back.
Their reserved bits are stored as written, as QEMU does; PIRQRC's reserved
bits 6:4 read 0, because routing depends on them.

PIRQ routing (datasheet "PIRQRC[A:D]"): bit 7 set disables routing of that
PIRQ; otherwise bits 3:0 name the ISA IRQ it drives.  The datasheet reserves
IRQ 0, 1, 2, 8 and 13; QEMU routes to them anyway and so do we (a guest that
asks for them gets them).  PCI interrupts are level-triggered and shared: a
PIRQ is asserted while any function wired to it asserts INTx (wired-OR), and
an ISA IRQ line is driven high while any enabled PIRQ routed to it is
asserted.  The bridge keeps, per PIRQ, the sorted list of functions (devfn)
that assert it, so the outcome never depends on set iteration order.

Which PIRQ a slot's pin reaches is board wiring, which firmware describes to
the guest ($PIR table, ACPI _PRT, MP table).  We wire the board as QEMU's
``pc`` machine does (``pc_pci_slot_get_pirq``): INTA#-INTD# of slot s reach
PIRQ[(pin - 1 + s - 1) mod 4], the PCI-to-PCI bridge swizzle of PCI-to-PCI
Bridge Architecture 1.2, 9.1, with QEMU's slot offset of -1 (slot 1's INTA#
is PIRQA).  SeaBIOS's PIIX routing and QEMU's generated ACPI tables assume
exactly this, so guests booted with tables written for QEMU find their
interrupts; ``pirq_of`` is the one place it is decided.

The ISA IRQ lines are given at construction as ``isa_irq(n) -> IrqLine``
(called once for each n in 0-15).  Each returned line must be this bridge's
own input to ISA IRQ n (the machine ORs it with the ISA devices' lines and
feeds the 8259 and the I/O APIC pin n, as QEMU's i440FX board does): the
bridge drives it low whenever no routed PIRQ asserts it.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

from devices.base import DeviceStateError, IrqLine, State, check_state
from devices.pci.function import (
    CMD_IO, CMD_MASTER, CMD_MEMORY, CMD_SERR, CMD_SPECIAL_CYCLES, COMMAND,
    QEMU_SUBSYSTEM_ID, QEMU_SUBSYSTEM_VENDOR_ID, ST_DEVSEL_MEDIUM, STATUS, VENDOR_INTEL, PciFunction,
)

DEVICE_82371SB_0 = 0x7000
CLASS_ISA_BRIDGE = 0x060100

PIRQRC = 0x60
PIRQ_COUNT = 4
PIRQ_DISABLE = 0x80
PIRQ_IRQ_MASK = 0x0F
ISA_IRQS = 16

# (offset, size, reset value) of the registers kept as storage; see the module doc.
STORAGE_REGISTERS = (
    (0x4C, 1, 0x4D),        # IORT
    (0x4E, 2, 0x0003),      # XBCS
    (0x69, 1, 0x02),        # TOM
    (0x6A, 2, 0x0000),      # MSTAT
    (0x70, 1, 0x80),        # MBIRQ0
    (0x76, 2, 0x0C0C),      # MBDMA0, MBDMA1
    (0x78, 2, 0x0002),      # PCSC
    (0x80, 1, 0x00),        # APICBASE
    (0x82, 1, 0x00),        # DLC
    (0xA0, 1, 0x08),        # SMICNTL
    (0xA2, 2, 0x0000),      # SMIEN
    (0xA4, 4, 0x0000_0000),  # SEE
    (0xA8, 1, 0x0F),        # FTMR
    (0xAA, 2, 0x0000),      # SMIREQ
    (0xAC, 1, 0x00),        # CTLTMR
    (0xAE, 1, 0x00),        # CTHTMR
)


def pirq_of(slot: int, pin: int) -> int:
    """The PIRQ (0-3 = A-D) that pin ``pin`` (1-4 = INTA#-INTD#) of PCI slot ``slot`` drives."""
    return (pin - 1 + slot - 1) % PIRQ_COUNT


class Piix3(PciFunction):
    """PIIX3 function 0: the ISA bridge's configuration space and the PIRQ router.

    Attach it at 00:01.0 and make it the bus's router::

        piix3 = Piix3(isa_irq)
        pci.attach(piix3, 1, 0)
        pci.set_intx_router(piix3)
    """

    kind = "piix3"
    VERSION = 1

    def __init__(self, isa_irq: Callable[[int], IrqLine], name: str = "piix3") -> None:
        super().__init__(name=name, vendor_id=VENDOR_INTEL, device_id=DEVICE_82371SB_0,
                         class_code=CLASS_ISA_BRIDGE, multifunction=True,
                         subsystem_vendor_id=QEMU_SUBSYSTEM_VENDOR_ID, subsystem_id=QEMU_SUBSYSTEM_ID)
        self.define_register(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER,
                             wmask=CMD_SPECIAL_CYCLES | CMD_SERR)
        self.define_register(STATUS, 2, ST_DEVSEL_MEDIUM, w1c=0x7800)
        for p in range(PIRQ_COUNT):
            self.define_register(PIRQRC + p, 1, PIRQ_DISABLE, wmask=PIRQ_DISABLE | PIRQ_IRQ_MASK)
        for offset, size, reset in STORAGE_REGISTERS:
            self.define_register(offset, size, reset, wmask=(1 << (8 * size)) - 1)
        self._isa = [isa_irq(n) for n in range(ISA_IRQS)]
        self._sources: list[list[int]] = [[] for _ in range(PIRQ_COUNT)]   # sorted devfns asserting

    # -- routing ------------------------------------------------------------------------
    def pci_intx(self, slot: int, pin: int, devfn: int, level: bool) -> None:
        """An attached function's INTx output changed (called by the PciBus)."""
        if not 1 <= pin <= 4:
            return
        sources = self._sources[pirq_of(slot, pin)]
        i = bisect.bisect_left(sources, devfn)
        present = i < len(sources) and sources[i] == devfn
        if level and not present:
            sources.insert(i, devfn)
        elif not level and present:
            del sources[i]
        else:
            return
        self._drive_isa()

    def pirq_route(self, pirq: int) -> int | None:
        """The ISA IRQ PIRQ ``pirq`` (0-3) is routed to, or None when routing is disabled."""
        rc = self.config[PIRQRC + pirq]
        return None if rc & PIRQ_DISABLE else rc & PIRQ_IRQ_MASK

    def pirq_level(self, pirq: int) -> bool:
        return bool(self._sources[pirq])

    def isa_levels(self) -> list[bool]:
        """The level this bridge drives on each ISA IRQ line."""
        out = [False] * ISA_IRQS
        for p in range(PIRQ_COUNT):
            irq = self.pirq_route(p)
            if irq is not None and self._sources[p]:
                out[irq] = True
        return out

    def _drive_isa(self) -> None:
        for line, level in zip(self._isa, self.isa_levels()):
            line.set(level)

    def config_written(self, offset: int, size: int) -> None:
        if offset < PIRQRC + PIRQ_COUNT and PIRQRC < offset + size:
            self._drive_isa()

    # -- reset and state ------------------------------------------------------------------
    def reset(self) -> None:
        # The PIRQ inputs are the functions' wires, not this bridge's state: they
        # stay as they are (each function deasserts its own INTx on reset); only
        # the routing goes back to "disabled", which lowers every line.
        super().reset()
        self._drive_isa()

    def save_state(self) -> State:
        state = super().save_state()
        state["pirq_sources"] = [list(s) for s in self._sources]
        return state

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        pci = self.parse_pci_state(state)
        raw = state.get("pirq_sources")
        if not isinstance(raw, list) or len(raw) != PIRQ_COUNT:
            raise DeviceStateError(f"{self.kind}: pirq_sources must be {PIRQ_COUNT} lists")
        sources: list[list[int]] = []
        for s in raw:
            if not isinstance(s, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and 0 <= d <= 0xFF for d in s):
                raise DeviceStateError(f"{self.kind}: pirq_sources entries must be lists of devfn 0-255")
            if any(a >= b for a, b in zip(s, s[1:])):
                raise DeviceStateError(f"{self.kind}: pirq_sources entries must be sorted and distinct")
            sources.append(list(s))
        self.apply_pci_state(pci)
        self._sources = sources
        for line, level in zip(self._isa, self.isa_levels()):
            line.level = level          # silently: a restore raises no interrupt
