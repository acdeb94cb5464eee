"""Bus-master IDE: one channel's command, status and PRD table pointer.

Implements the "Bus Master IDE Registers" of the 82371FB/82371SB (PIIX/PIIX3)
datasheet (290550), which follow SFF-8038i "Programming Interface for Bus
Master IDE Controller", revision 1.0.  Each channel has eight bytes of the
function's BMIBA (BAR4) I/O block: primary at +0, secondary at +8.

=======  ======  =============================================================
offset   name    bits
=======  ======  =============================================================
+0       BMICX   bit 0 SSBM start/stop bus master (R/W); bit 3 RWCON (R/W),
                 1 = the bus master writes memory (a device-to-memory
                 transfer); the rest read 0
+1       --      reserved (reads FFh, as QEMU answers)
+2       BMISX   bit 0 BMIDEA bus master active (RO); bit 1 IDE DMA error and
                 bit 2 IDE interrupt status (R/WC: a 1 written clears);
                 bits 5, 6 drive 0/1 DMA capable (R/W storage for the
                 firmware); bit 7 simplex only (RO 0: PIIX3 runs both
                 channels at once)
+3       --      reserved (FFh)
+4..+7   BMIDTPX PRD table base address, bits 31:2 (bits 1:0 read 0)
=======  ======  =============================================================

Physical Region Descriptor table (SFF-8038i 1.2 "Physical Region
Descriptor"): entries of two dwords, the first the memory region's address
(bit 0 reserved, 0), the second the byte count in bits 15:1 (0 means 64 KiB)
and End Of Table in bit 31.  A transfer walks the table from the entry after
the last one used; as in QEMU, the walk gives up after 4 KiB of table (512
entries), so a table without an EOT bit ends, it does not run on through
memory.

The outcome of a transfer sets the status bits as SFF-8038i's table of the
Interrupt and Active bits says:

* the table is exactly as long as the device's transfer: Active clears, the
  device's interrupt sets Interrupt;
* the table is longer: Active stays set beside Interrupt;
* the table is shorter: nothing moves, Active clears and no interrupt comes
  (QEMU's ``ide_dma_cb`` does the same: the guest times out and resets);
* a descriptor or a region outside the guest's RAM (the DMA view raises
  ``DmaError``), or bus mastering disabled in the PCI command register: the
  PIIX3's master abort, which sets the Error bit and clears Active; the
  device ends its command with an error and interrupts.

The direction bit is not checked against the command: QEMU moves data the
way the ATA command says, and so do we.
"""
from __future__ import annotations

from dataclasses import dataclass

from devices.base import DeviceStateError, Dma, DmaError

CMD_START = 0x01
CMD_WRITE = 0x08            # RWCON: the bus master writes memory (device to memory)
CMD_MASK = CMD_START | CMD_WRITE

ST_ACTIVE = 0x01
ST_ERROR = 0x02
ST_INTERRUPT = 0x04
ST_DRIVE_DMA = 0x60         # drive 0 / drive 1 DMA capable
ST_W1C = ST_ERROR | ST_INTERRUPT

PRD_EOT = 0x8000_0000
PRD_TABLE_LIMIT = 4096      # bytes of table walked at the most (QEMU's fail-safe)
REGION_MAX = 0x10000

OK, SHORT, ERROR = "ok", "short", "error"


@dataclass
class Transfer:
    """The outcome of one bus-master transfer: ``result`` is OK, SHORT or ERROR;
    ``data`` the bytes read from memory (memory-to-device transfers)."""

    result: str
    data: bytes = b""


class BusMaster:
    """One channel's bus-master registers and PRD walker."""

    def __init__(self, dma: Dma, master_enabled=lambda: True) -> None:
        self.dma = dma
        self.master_enabled = master_enabled   # PCI command bit 2, asked at transfer time
        self.transfers = 0                     # statistics (not state): transfers done, bytes moved
        self.bytes = 0
        self.reset()

    def reset(self) -> None:
        self.cmd = 0
        self.status = 0
        self.prd = 0
        self.cur = 0              # the next PRD entry to fetch

    @property
    def active(self) -> bool:
        return bool(self.status & ST_ACTIVE)

    # -- registers (offsets 0-7 of the channel's block) ----------------------------------
    def read(self, offset: int) -> int:
        if offset == 0:
            return self.cmd
        if offset == 2:
            return self.status
        if 4 <= offset <= 7:
            return (self.prd >> (8 * (offset - 4))) & 0xFF
        return 0xFF

    def write(self, offset: int, value: int) -> bool:
        """Write one byte; True when the start bit went from 0 to 1 (the caller may
        have a device waiting for the bus master)."""
        value &= 0xFF
        if offset == 0:
            started = False
            if (value ^ self.cmd) & CMD_START:
                if value & CMD_START:
                    self.cur = self.prd
                    if not self.status & ST_ACTIVE:
                        self.status |= ST_ACTIVE
                        started = True
                else:
                    self.status &= ~ST_ACTIVE
            self.cmd = value & CMD_MASK
            return started
        if offset == 2:
            self.status = (self.status & ST_ACTIVE) | (value & ST_DRIVE_DMA) | (self.status & ~value & ST_W1C)
        elif 4 <= offset <= 7:
            shift = 8 * (offset - 4)
            self.prd = (self.prd & ~(0xFF << shift)) | (value << shift)
            self.prd &= 0xFFFF_FFFC
        return False

    # -- transfers ------------------------------------------------------------------------
    def _regions(self, nbytes: int) -> tuple[list[tuple[int, int]], bool, int] | None:
        """The (address, length) pieces that carry ``nbytes``, whether the table
        goes on past them, and the next entry's address; None if it is too short.
        Raises DmaError for a descriptor outside RAM."""
        pieces: list[tuple[int, int]] = []
        need = nbytes
        at = self.cur
        last = False
        while need > 0:
            if last or (at - self.prd) & 0xFFFF_FFFF >= PRD_TABLE_LIMIT:
                return None
            addr = self.dma.read_u32(at)
            ctl = self.dma.read_u32(at + 4)
            at += 8
            last = bool(ctl & PRD_EOT)
            size = (ctl & 0xFFFE) or REGION_MAX
            take = min(size, need)
            pieces.append((addr & 0xFFFF_FFFE, take))
            need -= take
            if take < size:
                return pieces, True, at
        return pieces, not last, at

    def transfer(self, nbytes: int, to_memory: bool, data: bytes = b"",
                 source=None) -> Transfer:
        """Move ``nbytes`` through the PRD table: into memory from ``data`` (or from
        ``source()``, called only once the table is known to cover the transfer),
        or out of memory.  Sets the Active and Error bits; the caller raises the
        device's interrupt, which sets the Interrupt bit."""
        if not self.master_enabled():
            return self._fail()
        try:
            found = self._regions(nbytes)
        except DmaError:
            return self._fail()
        if found is None:
            self.status &= ~ST_ACTIVE
            return Transfer(SHORT)
        pieces, more, self.cur = found
        check = getattr(self.dma, "check", None)
        if check is not None and not all(check(a, n, to_memory) for a, n in pieces):
            return self._fail()
        try:
            if to_memory:
                if source is not None:
                    data = source()
                pos = 0
                for addr, n in pieces:
                    self.dma.write(addr, data[pos:pos + n])
                    pos += n
                out = Transfer(OK)
            else:
                out = Transfer(OK, b"".join(self.dma.read(addr, n) for addr, n in pieces))
        except DmaError:
            return self._fail()
        if not more:
            self.status &= ~ST_ACTIVE
        self.transfers += 1
        self.bytes += nbytes
        return out

    def _fail(self) -> Transfer:
        self.status = (self.status & ~ST_ACTIVE) | ST_ERROR
        return Transfer(ERROR)

    # -- state ----------------------------------------------------------------------------
    def save(self) -> dict:
        return {"cmd": self.cmd, "status": self.status, "prd": self.prd, "cur": self.cur}

    @staticmethod
    def parse(state: object, where: str) -> dict:
        """Check a saved block; return it as the fields ``apply`` takes."""
        if not isinstance(state, dict):
            raise DeviceStateError(f"{where}: bus master state must be a dict")
        out = {}
        for key, limit, mask in (("cmd", 0xFF, CMD_MASK), ("status", 0xFF, ST_ACTIVE | ST_W1C | ST_DRIVE_DMA),
                                 ("prd", 0xFFFF_FFFF, 0xFFFF_FFFC), ("cur", 0x1_FFFF_FFFF, None)):
            v = state.get(key)
            if type(v) is not int or not 0 <= v <= limit or (mask is not None and v & ~mask):
                raise DeviceStateError(f"{where}: bus master {key} = {v!r} is out of range")
            out[key] = v
        return out

    def apply(self, fields: dict) -> None:
        self.cmd, self.status, self.prd, self.cur = fields["cmd"], fields["status"], fields["prd"], fields["cur"]
