"""The i440FX host bridge's PCI function (82441FX PMC) at 00:00.0.

Identity as QEMU's ``i440FX`` presents it (guests and ``lspci`` see these):
vendor 8086, device 1237, revision 02, class 060000 (host bridge), header
type 0, subsystem 1af4:1100.  The 82441FX datasheet (290549) has no
subsystem ids (0x2C-0x2F reserved, 0); QEMU fills in its default for every
function, so ``lspci -m`` in a guest shows the same line here as under QEMU.

Registers, from the 82441FX datasheet, section 3 "Register Description":

* PCICMD (04h), default 0006h: memory access enable (bit 1) and bus master
  enable (bit 2) are hardwired to 1 (the PMC always decodes memory and
  masters cycles for the CPU); parity error response (6) and SERR# enable
  (8) are read/write; the rest read 0.  (QEMU leaves these bits writable and
  resets them to 0; nothing a guest does depends on it.)
* PCISTS (06h), default 0280h: fast back-to-back capable and DEVSEL# medium,
  read-only; the error bits are write-1-to-clear and never set here.
* PAM0-PAM6 (59h-5Fh), default 00h: the Programmable Attribute Map for the
  0C0000-0FFFFF range, two regions per register, RE (bit 0/4) and WE (bit
  1/5) per region; PAM0's low nibble is reserved, and on the 82441FX the
  cache-enable bits (2/6) are reserved too (cacheability comes from the
  CPU's MTRRs), as are bits 3/7.  So PAM0 keeps bits 5:4 and PAM1-6 keep
  bits 5:4 and 1:0.
* SMRAM (72h), default 02h: C_BASE_SEG (2:0) hardwired to 010 (the A0000
  segment), G_SMRAME (3), D_LCK (4), D_CLS (5), D_OPEN (6); bit 7 reserved.
  Setting D_LCK clears D_OPEN and makes D_OPEN, D_LCK and G_SMRAME read-only
  until reset; D_CLS stays writable.  (QEMU does not implement D_LCK.)

What the PAM bits do to the memory map (shadow RAM versus ROM in
0C0000-0FFFFF) belongs to whoever owns that range: ``on_pam`` is called after
any write or reset that changes a PAM register.  With a real BIOS image
(vmm/firmware/rom.py) that is its ROM mapping; the HLE BIOS leaves RAM there
and the registers are storage it never reads.  SMRAM (A0000 as SMM memory)
is not modelled, there is no SMM; its register is kept as storage.
"""
from __future__ import annotations

from collections.abc import Callable

from devices.pci.function import (
    CMD_MASTER, CMD_MEMORY, CMD_PARITY, CMD_SERR, COMMAND, QEMU_SUBSYSTEM_ID, QEMU_SUBSYSTEM_VENDOR_ID,
    ST_DEVSEL_MEDIUM, ST_ERRORS_W1C, ST_FAST_BACK_TO_BACK, STATUS, VENDOR_INTEL, PciFunction,
)

DEVICE_82441 = 0x1237
REVISION = 0x02
CLASS_HOST_BRIDGE = 0x060000

PAM0 = 0x59
PAM_COUNT = 7
SMRAM = 0x72
SMRAM_C_BASE_SEG = 0x02
SMRAM_G_SMRAME = 0x08
SMRAM_D_LCK = 0x10
SMRAM_D_CLS = 0x20
SMRAM_D_OPEN = 0x40


class I440fx(PciFunction):
    """The 82441FX PMC's configuration space (PCI function 00:00.0)."""

    kind = "i440fx"
    VERSION = 1

    def __init__(self, name: str = "i440fx") -> None:
        super().__init__(name=name, vendor_id=VENDOR_INTEL, device_id=DEVICE_82441,
                         class_code=CLASS_HOST_BRIDGE, revision=REVISION,
                         subsystem_vendor_id=QEMU_SUBSYSTEM_VENDOR_ID, subsystem_id=QEMU_SUBSYSTEM_ID)
        self.define_register(COMMAND, 2, CMD_MEMORY | CMD_MASTER, wmask=CMD_PARITY | CMD_SERR)
        self.define_register(STATUS, 2, ST_FAST_BACK_TO_BACK | ST_DEVSEL_MEDIUM, w1c=ST_ERRORS_W1C)
        self.define_register(PAM0, 1, 0x00, wmask=0x30)
        for i in range(1, PAM_COUNT):
            self.define_register(PAM0 + i, 1, 0x00, wmask=0x33)
        self.define_register(SMRAM, 1, SMRAM_C_BASE_SEG,
                             wmask=SMRAM_G_SMRAME | SMRAM_D_LCK | SMRAM_D_CLS | SMRAM_D_OPEN)
        self.on_pam: Callable[[], None] | None = None   # a PAM register changed (the memory map's owner)

    def _pams(self) -> bytes:
        return bytes(self.config[PAM0:PAM0 + PAM_COUNT])

    def config_write(self, offset: int, size: int, value: int) -> None:
        pams = self._pams()
        self._config_write(offset, size, value)
        if self.on_pam is not None and self._pams() != pams:
            self.on_pam()

    def reset(self) -> None:
        pams = self._pams()
        super().reset()
        if self.on_pam is not None and self._pams() != pams:
            self.on_pam()

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if not offset <= SMRAM < offset + size:
            super().config_write(offset, size, value)
            return
        old = self.config[SMRAM]
        super().config_write(offset, size, value)
        new = self.config[SMRAM]
        if old & SMRAM_D_LCK:
            new = (old & ~SMRAM_D_CLS) | (new & SMRAM_D_CLS)
        elif new & SMRAM_D_LCK:
            new &= ~SMRAM_D_OPEN
        self.config[SMRAM] = new & 0xFF

    def pam(self, index: int) -> int:
        """PAM register ``index`` (0-6) as the guest programmed it."""
        return self.config[PAM0 + index]

    @property
    def smram(self) -> int:
        return self.config[SMRAM]
