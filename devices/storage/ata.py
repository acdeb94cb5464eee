"""An ATA drive on an IDE channel: the command block, PIO, and the disk's command set.

Sources: ATA/ATAPI-6 (T13/1410D revision 3b), chapters 6 "Command
descriptions" (the status, error, device and device control registers),
8 "Command descriptions" and 9 "Protocols" (PIO data-in, PIO data-out,
non-data, DMA, device reset and diagnostics); where QEMU's hw/ide/core.c
(the drive firmware Linux's libata, SeaBIOS and GRUB are tested against)
chooses differently, the choice is named where it is made.

``Drive`` holds what every device on the cable has: the taskfile (each
register with its "previous content" byte for 48-bit addressing), status and
error, the PIO data buffer, the command timer, and the DMA request the
channel's bus master serves.  Its ``kind`` is "none" for an absent device:
it still latches register writes (both devices see every write on the cable)
but runs no commands.  ``AtaDisk`` is the hard disk; the CD-ROM is in
atapi.py.

Timing is virtual only.  A command written to the command register makes
the drive busy (BSY) and completes ``CMD_TICKS`` later, plus ``SECTOR_TICKS``
per 512 bytes a block or DMA transfer moves; the image is read or written
synchronously when the timer fires, so when an I/O happens is a function of
virtual time alone and needs no entry in the event log.  Two shapes follow
QEMU instead: the first DRQ block of a PIO data-out command (WRITE SECTORS,
WRITE MULTIPLE, and PACKET's command packet) is ready at once, with no BSY
period, and a DMA command raises DRQ and waits for the bus master without
BSY.

The block object behind a drive is duck-typed (devices never import host/):
``read(offset, n) -> bytes``, ``write(offset, data)``, ``flush()``, ``size``
in bytes and optionally ``writable``.  An exception out of it is a media
error for the guest (UNC for reads, ABRT for writes and flushes), never an
exception out of the device.
"""
from __future__ import annotations

from typing import Any, ClassVar

from devices.base import DeviceStateError
from devices.storage.bmdma import ERROR, OK

SECTOR = 512
CMD_TICKS = 1_000           # 10 us from command to completion
SECTOR_TICKS = 100          # 1 us per 512 bytes moved
MAX_MULT_SECTORS = 16       # QEMU's MAX_MULT_SECTORS: READ/WRITE MULTIPLE blocks
BUF_MAX = 0x10000

# Status register (ATA-6 6.2.12)
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
# Error register (ATA-6 6.2.4)
UNC, IDNF, ABRT = 0x40, 0x10, 0x04
# Device register: LBA mode and the device select bit; bits 7 and 5 are obsolete and read as one
DEV_LBA, DEV_SELECT, DEV_ALWAYS = 0x40, 0x10, 0xA0

REGS = ("feature", "nsector", "sector", "lcyl", "hcyl")

# command codes (ATA-6 table E.2)
READ_SECTORS, READ_SECTORS_NR, READ_SECTORS_EXT = 0x20, 0x21, 0x24
READ_DMA_EXT, READ_NATIVE_MAX_EXT, READ_MULTIPLE_EXT = 0x25, 0x27, 0x29
WRITE_SECTORS, WRITE_SECTORS_NR, WRITE_SECTORS_EXT = 0x30, 0x31, 0x34
WRITE_DMA_EXT, WRITE_MULTIPLE_EXT, WRITE_VERIFY = 0x35, 0x39, 0x3C
VERIFY, VERIFY_NR, VERIFY_EXT = 0x40, 0x41, 0x42
SEEK = 0x70
EXECUTE_DIAGNOSTIC, INITIALIZE_PARAMETERS = 0x90, 0x91
PACKET, IDENTIFY_PACKET = 0xA0, 0xA1
READ_MULTIPLE, WRITE_MULTIPLE, SET_MULTIPLE = 0xC4, 0xC5, 0xC6
READ_DMA, READ_DMA_NR, WRITE_DMA, WRITE_DMA_NR = 0xC8, 0xC9, 0xCA, 0xCB
CHECK_POWER_MODE, CHECK_POWER_MODE_OLD = 0xE5, 0x98
FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE7, 0xEA
IDENTIFY = 0xEC
SET_FEATURES = 0xEF
READ_NATIVE_MAX = 0xF8
DEVICE_RESET = 0x08
POWER_COMMANDS = (0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x94, 0x95, 0x96, 0x97, 0x99)   # standby/idle/sleep

LBA48_COMMANDS = frozenset((READ_SECTORS_EXT, READ_DMA_EXT, READ_NATIVE_MAX_EXT, READ_MULTIPLE_EXT,
                            WRITE_SECTORS_EXT, WRITE_DMA_EXT, WRITE_MULTIPLE_EXT, VERIFY_EXT, FLUSH_CACHE_EXT))

# SET FEATURES subcommands QEMU accepts and ignores (look-ahead, APM, acoustic, power-on defaults)
FEATURE_NOPS = frozenset((0xCC, 0x66, 0xAA, 0x55, 0x05, 0x85, 0x69, 0x67, 0x96, 0x9A, 0x42, 0xC2))


class MediaError(Exception):
    """The image behind a drive failed a read, write or flush."""


def ata_string(text: str, nbytes: int) -> bytes:
    """An IDENTIFY string field: space padded, two characters per word, first in the high byte."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    return b"".join(raw[i + 1:i + 2] + raw[i:i + 1] for i in range(0, nbytes, 2))


def identify_block(words: dict[int, int], strings: dict[int, tuple[str, int]]) -> bytes:
    """512 bytes of IDENTIFY data from word values and (text, bytes) strings at their first
    word; word 255 gets the integrity word (ATA-6 8.15.60: A5h and a checksum making the
    byte sum zero)."""
    out = bytearray(SECTOR)
    for w, v in words.items():
        out[2 * w:2 * w + 2] = (v & 0xFFFF).to_bytes(2, "little")
    for w, (text, n) in strings.items():
        out[2 * w:2 * w + n] = ata_string(text, n)
    out[510] = 0xA5
    out[511] = -sum(out[:511]) & 0xFF
    return bytes(out)


class Drive:
    """Device 0 or 1 on a channel.  ``channel`` gives the clock, the interrupt, the bus
    master and the timer naming (see ide.py); ``block`` is the medium or None."""

    kind = "none"
    ACTIONS: frozenset[str] = frozenset({"exec", "dma"})
    AFTERS: frozenset[str] = frozenset({"end"})
    COMMANDS: ClassVar[dict[int, str]] = {}
    IMMEDIATE: frozenset[int] = frozenset()

    def __init__(self, channel: Any, unit: int, block: Any = None, model: str = "", serial: str = "") -> None:
        self.channel = channel
        self.unit = unit
        self.block = block
        self.model = model
        self.serial = serial or f"VMM{channel.index}{unit}"
        self.firmware = "1.0"
        self.timer: Any = None
        self.timer_name = f"{channel.name}.{unit}.cmd"
        self.power_on()

    @property
    def present(self) -> bool:
        return self.kind != "none"

    # -- resets ---------------------------------------------------------------------------
    def power_on(self) -> None:
        """Hardware reset: registers, transfer and timer cleared; the drive ready at once."""
        self.status = 0
        self.power_on_defaults()
        self.clear_registers()
        self.status = DRDY | DSC
        self.configure_defaults()

    def clear_registers(self) -> None:
        """QEMU's ``ide_reset`` of the taskfile, then the signature."""
        self.cancel()
        for r in REGS:
            setattr(self, r, 0)
            setattr(self, "hob_" + r, 0)
        self.select = DEV_ALWAYS
        self.error = 0
        self.cmd = 0
        self.lba = self.count = 0
        self.per_block = 1
        self.lba48 = False
        self.dma = ""
        self.end_transfer()
        self.set_signature()

    def power_on_defaults(self) -> None:
        """Settings only a hardware reset puts back: QEMU keeps the transfer mode (and a
        disk's write cache) across soft resets, in its IDENTIFY buffer."""
        self.mode = 0

    def configure_defaults(self) -> None:
        """Settings every reset puts back (multiple count, translation...)."""

    def soft_reset_begin(self) -> None:
        """SRST asserted (ATA-6 9.2): whatever runs stops; BSY until SRST is released."""
        self.cancel()
        self.dma = ""
        self.end_transfer()
        self.status = BSY

    def diagnostic_result(self) -> None:
        """Registers as a reset or EXECUTE DEVICE DIAGNOSTIC leaves them (ATA-6 9.12)."""
        self.clear_registers()
        self.configure_defaults()
        self.status = self.post_reset_status()
        self.error = 0x01            # passed (device 0: device 1 passed or absent)

    def post_reset_status(self) -> int:
        return DRDY | DSC

    def set_signature(self) -> None:
        """ATA-6 9.12: sector count and LBA low 01h, LBA mid/high the device type."""
        self.select &= ~0x0F
        self.nsector = self.sector = 1
        self.lcyl, self.hcyl = self.signature()

    def signature(self) -> tuple[int, int]:
        return 0xFF, 0xFF         # QEMU's answer for a slot with no drive

    # -- timer ----------------------------------------------------------------------------
    def arm(self, action: str, delay: int) -> None:
        self.cancel()
        self.action = action
        self.deadline = self.channel.clock.now() + max(0, delay)
        self.seq = self.channel.next_seq()
        self.timer = self.channel.clock.schedule(self.deadline, self._fire, self.timer_name)

    def rearm(self, action: str, deadline: int, seq: int) -> None:
        self.action, self.deadline, self.seq = action, deadline, seq
        self.timer = self.channel.clock.schedule(deadline, self._fire, self.timer_name)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        self.action = ""
        self.deadline = self.seq = 0

    def _fire(self, now: int) -> None:
        action = self.action
        self.timer = None
        self.action = ""
        self.deadline = self.seq = 0
        getattr(self, "act_" + action)()

    # -- PIO ------------------------------------------------------------------------------
    def end_transfer(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.xfer = ""
        self.after = "end"
        self.status &= ~DRQ

    def start_in(self, data: bytes, after: str = "end") -> None:
        """Data for the host to read (a PIO data-in block): DRQ until it is all read."""
        self.buf, self.pos, self.xfer, self.after = bytearray(data), 0, "in", after
        self.status = (self.status | DRQ) & ~BSY

    def start_out(self, n: int, after: str) -> None:
        """Room for ``n`` bytes from the host (a PIO data-out block)."""
        self.buf, self.pos, self.xfer, self.after = bytearray(n), 0, "out", after
        self.status = (self.status | DRQ) & ~BSY

    def data_read(self, size: int) -> int:
        # QEMU: 0 without DRQ or in the wrong direction.  An access reaching past the end of
        # an odd-sized block (an ATAPI reply) gets the last bytes and zero padding, as ATA-6
        # 9.9 has the device pad; QEMU returns 0 there and never ends the block.
        if not self.status & DRQ or self.xfer != "in":
            return 0
        v = int.from_bytes(self.buf[self.pos:self.pos + size], "little")
        self.pos += size
        if self.pos >= len(self.buf):
            self._transfer_done()
        return v

    def data_write(self, size: int, value: int) -> None:
        if not self.status & DRQ or self.xfer != "out":
            return
        room = len(self.buf) - self.pos
        self.buf[self.pos:self.pos + min(size, room)] = value.to_bytes(size, "little")[:room]
        self.pos += size
        if self.pos >= len(self.buf):
            self._transfer_done()

    def _transfer_done(self) -> None:
        after = self.after
        data = bytes(self.buf)
        self.end_transfer()
        getattr(self, "after_" + after)(data)

    def after_end(self, data: bytes) -> None:
        """The last PIO block of a command went: nothing more (ATA-6 9.7: no interrupt)."""

    # -- commands -------------------------------------------------------------------------
    def command(self, op: int) -> None:
        """A write to the command register (the channel already lowered INTRQ)."""
        if not self.present:
            return          # QEMU: commands to an absent device are ignored
        if self.status & (BSY | DRQ) and not self.accepts_while_busy(op):
            return
        self.cmd = op
        self.error = 0
        self.lba48 = op in LBA48_COMMANDS
        if op in self.IMMEDIATE and op in self.COMMANDS:
            getattr(self, "cmd_" + self.COMMANDS[op])()
            return
        self.status = DRDY | BSY
        self.arm("exec", CMD_TICKS)

    def accepts_while_busy(self, op: int) -> bool:
        return False

    def act_exec(self) -> None:
        name = self.COMMANDS.get(self.cmd)
        if name is None:
            self.abort()
        else:
            getattr(self, "cmd_" + name)()

    def interrupt(self) -> None:
        self.channel.raise_irq()

    def abort(self, error: int = ABRT) -> None:
        """End the command with an error (QEMU's ``ide_abort_command`` plus the interrupt)."""
        self.cancel()
        self.end_transfer()
        self.dma = ""
        self.status = DRDY | ERR
        self.error = error
        self.interrupt()

    def done(self) -> None:
        self.status = DRDY | DSC
        self.interrupt()

    def cmd_nop(self) -> None:
        self.done()

    def cmd_diagnose(self) -> None:
        self.channel.diagnose()

    def cmd_set_features(self) -> None:
        if self.feature == 0x03:
            # transfer mode (ATA-6 8.36.10): 00h/01h PIO default, 08h+n PIO n, 10h+n single-word
            # DMA, 20h+n multiword DMA, 40h+n Ultra DMA; IDENTIFY words 62, 63 and 88 show it
            if self.nsector >> 3 not in (0, 1, 2, 4, 8):
                self.abort()
                return
            self.mode = self.nsector
        elif self.feature not in FEATURE_NOPS:
            self.abort()
            return
        self.done()

    def mode_words(self) -> dict[int, int]:
        """IDENTIFY words 62, 63 and 88: the DMA modes QEMU offers, with the selected one."""
        kind, n = self.mode >> 3, self.mode & 7
        return {62: 0x07 | (1 << (n + 8) if kind == 2 else 0),
                63: 0x07 | (1 << (n + 8) if kind == 4 else 0),
                88: 0x3F | (1 << (n + 8) if kind == 8 else 0)}

    def cmd_check_power_mode(self) -> None:
        self.nsector = 0xFF         # active or idle
        self.done()

    # -- addressing (ATA-6 6.2: LBA28, LBA48 with the "previous content" bytes, CHS) -----
    def take_count(self) -> None:
        """The sector count of the command: 0 means 256 (or 65536 for 48-bit commands)."""
        if self.lba48:
            self.count = (self.hob_nsector << 8 | self.nsector) or 0x10000
        else:
            self.count = self.nsector or 0x100

    def address(self) -> int | None:
        """The command's first sector, or None for a CHS address outside the translation."""
        if self.select & DEV_LBA:
            if self.lba48:
                return (self.hob_hcyl << 40 | self.hob_lcyl << 32 | self.hob_sector << 24
                        | self.hcyl << 16 | self.lcyl << 8 | self.sector)
            return (self.select & 0x0F) << 24 | self.hcyl << 16 | self.lcyl << 8 | self.sector
        heads, spt = self.chs_translation()
        head = self.select & 0x0F
        if not spt or not 1 <= self.sector <= spt or head >= heads:
            return None
        return ((self.hcyl << 8 | self.lcyl) * heads + head) * spt + self.sector - 1

    def set_address(self, lba: int) -> None:
        """Put ``lba`` back into the address registers (QEMU's ``ide_set_sector``)."""
        if self.select & DEV_LBA:
            if self.lba48:
                self.sector, self.lcyl, self.hcyl = lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF
                self.hob_sector, self.hob_lcyl, self.hob_hcyl = lba >> 24 & 0xFF, lba >> 32 & 0xFF, lba >> 40 & 0xFF
            else:
                self.select = (self.select & ~0x0F) | (lba >> 24 & 0x0F)
                self.hcyl, self.lcyl, self.sector = lba >> 16 & 0xFF, lba >> 8 & 0xFF, lba & 0xFF
            return
        heads, spt = self.chs_translation()
        if not heads or not spt:
            return
        cyl, r = divmod(lba, heads * spt)
        self.hcyl, self.lcyl = cyl >> 8 & 0xFF, cyl & 0xFF
        self.select = (self.select & ~0x0F) | (r // spt & 0x0F)
        self.sector = (r % spt + 1) & 0xFF

    def chs_translation(self) -> tuple[int, int]:
        return 0, 0

    def identify_strings(self) -> dict[int, tuple[str, int]]:
        return {10: (self.serial, 20), 23: (self.firmware, 8), 27: (self.model, 40)}

    # -- DMA ------------------------------------------------------------------------------
    def request_dma(self, kind: str) -> None:
        """Wait for the bus master (ATA-6 9.10: DRQ set, BSY clear)."""
        self.dma = kind
        self.status = DRDY | DSC | DRQ
        self.channel.dma_requested(self)

    def dma_bytes(self) -> int:
        return self.count * SECTOR

    def start_dma_timer(self) -> None:
        self.arm("dma", CMD_TICKS + SECTOR_TICKS * ((self.dma_bytes() + SECTOR - 1) // SECTOR))

    def act_dma(self) -> None:
        if not self.dma:
            return
        bm = self.channel.bm
        if not bm.active:
            return
        to_memory = self.dma != "write"
        try:
            t = bm.transfer(self.dma_bytes(), to_memory, source=self.dma_source if to_memory else None)
        except MediaError:
            bm.status &= ~0x01
            self.dma_failed(media=True)
            return
        if t.result == ERROR:
            self.dma_failed(media=False)
        elif t.result == OK:
            try:
                self.dma_complete(t.data)
            except MediaError:
                self.dma_failed(media=True)
        else:
            # the PRD table was too short: QEMU ends the command quietly, no interrupt
            self.dma = ""
            self.status = DRDY | DSC

    def dma_source(self) -> bytes:
        raise MediaError("no medium")

    def dma_complete(self, data: bytes) -> None:
        self.dma = ""
        self.done()

    def dma_failed(self, media: bool) -> None:
        self.abort(UNC if media and self.dma == "read" else ABRT)

    # -- image ----------------------------------------------------------------------------
    def read_media(self, offset: int, n: int) -> bytes:
        try:
            data = bytes(self.block.read(offset, n))
        except Exception as e:  # noqa: BLE001  (the image layer is outside the device: any failure is a media error)
            raise MediaError(str(e)) from None
        if len(data) != n:
            raise MediaError("short read")
        return data

    def write_media(self, offset: int, data: bytes) -> None:
        try:
            self.block.write(offset, data)
        except Exception as e:  # noqa: BLE001  (as above)
            raise MediaError(str(e)) from None

    def flush_media(self) -> None:
        try:
            self.block.flush()
        except Exception as e:  # noqa: BLE001  (as above)
            raise MediaError(str(e)) from None

    @property
    def writable(self) -> bool:
        return self.block is not None and bool(getattr(self.block, "writable", True))

    # -- state ----------------------------------------------------------------------------
    def save(self) -> dict:
        regs = [getattr(self, r) for r in REGS] + [getattr(self, "hob_" + r) for r in REGS] + [self.select]
        return {"kind": self.kind, "regs": regs, "status": self.status, "error": self.error, "cmd": self.cmd,
                "buf": bytes(self.buf), "pos": self.pos, "xfer": self.xfer, "after": self.after,
                "timer": [self.action, self.deadline, self.seq], "dma": self.dma,
                "lba": self.lba, "count": self.count, "per_block": self.per_block, "lba48": self.lba48,
                "mode": self.mode, **self.save_extra()}

    def save_extra(self) -> dict:
        return {}

    def parse(self, st: Any, where: str) -> dict:
        """Check a saved drive; return what ``apply`` takes.  Changes nothing."""
        if not isinstance(st, dict):
            raise DeviceStateError(f"{where}: must be a dict")
        if st.get("kind") != self.kind:
            raise DeviceStateError(f"{where}: a {st.get('kind')!r} drive, this slot has {self.kind!r}")
        regs = st.get("regs")
        if not isinstance(regs, list) or len(regs) != 11 or any(type(v) is not int or not 0 <= v <= 0xFF
                                                                for v in regs):
            raise DeviceStateError(f"{where}: regs must be 11 bytes")
        out: dict[str, Any] = {"regs": list(regs)}
        for key, hi in (("status", 0xFF), ("error", 0xFF), ("cmd", 0xFF), ("lba", (1 << 48) - 1),
                        ("count", 0x10000), ("per_block", MAX_MULT_SECTORS), ("mode", 0x47)):
            out[key] = need_int(st, key, 0, hi, where)
        out["lba48"] = need_bool(st, "lba48", where)
        buf = st.get("buf")
        if not isinstance(buf, bytes) or len(buf) > BUF_MAX:
            raise DeviceStateError(f"{where}: buf must be at most {BUF_MAX} bytes")
        out["buf"] = buf
        out["pos"] = need_int(st, "pos", 0, len(buf), where)
        out["xfer"] = need_choice(st, "xfer", ("", "in", "out"), where)
        out["after"] = need_choice(st, "after", tuple(self.AFTERS), where)
        out["dma"] = need_choice(st, "dma", ("", "read", "write", "atapi"), where)
        timer = st.get("timer")
        if (not isinstance(timer, list) or len(timer) != 3 or timer[0] not in ("", *self.ACTIONS)
                or any(type(v) is not int or v < 0 for v in timer[1:])):
            raise DeviceStateError(f"{where}: timer must be [action, deadline, seq]")
        out["timer"] = list(timer)
        out.update(self.parse_extra(st, where))
        return out

    def parse_extra(self, st: dict, where: str) -> dict:
        return {}

    def apply(self, p: dict) -> None:
        """Load a parsed state (the caller re-arms the timer, in saved order)."""
        self.cancel()
        regs = p["regs"]
        for i, r in enumerate(REGS):
            setattr(self, r, regs[i])
            setattr(self, "hob_" + r, regs[5 + i])
        self.select = regs[10]
        for key in ("status", "error", "cmd", "lba", "count", "per_block", "lba48", "pos", "xfer", "after", "dma",
                    "mode"):
            setattr(self, key, p[key])
        self.buf = bytearray(p["buf"])
        self.apply_extra(p)

    def apply_extra(self, p: dict) -> None:
        """Kind-specific fields of a parsed state."""


def need_int(st: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = st.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise DeviceStateError(f"{where}: {key} must be an int in {lo}..{hi}, got {v!r}")
    return v


def need_bool(st: dict, key: str, where: str) -> bool:
    v = st.get(key)
    if not isinstance(v, bool):
        raise DeviceStateError(f"{where}: {key} must be a bool, got {v!r}")
    return v


def need_choice(st: dict, key: str, choices: tuple, where: str) -> Any:
    v = st.get(key)
    if not isinstance(v, str) or v not in choices:
        raise DeviceStateError(f"{where}: {key} must be one of {choices}, got {v!r}")
    return v


class AtaDisk(Drive):
    """A hard disk: the general and 48-bit feature sets of ATA-6 that QEMU's IDE disk has."""

    kind = "disk"
    ACTIONS = frozenset({"exec", "dma", "read_block", "write_block"})
    AFTERS = frozenset({"end", "read_next", "write_block"})
    IMMEDIATE = frozenset((WRITE_SECTORS, WRITE_SECTORS_NR, WRITE_SECTORS_EXT, WRITE_VERIFY,
                           WRITE_MULTIPLE, WRITE_MULTIPLE_EXT))
    COMMANDS: ClassVar[dict[int, str]] = {
        IDENTIFY: "identify",
        READ_SECTORS: "read_pio", READ_SECTORS_NR: "read_pio", READ_SECTORS_EXT: "read_pio",
        READ_MULTIPLE: "read_multiple", READ_MULTIPLE_EXT: "read_multiple",
        WRITE_SECTORS: "write_pio", WRITE_SECTORS_NR: "write_pio", WRITE_SECTORS_EXT: "write_pio",
        WRITE_VERIFY: "write_pio",
        WRITE_MULTIPLE: "write_multiple", WRITE_MULTIPLE_EXT: "write_multiple",
        READ_DMA: "read_dma", READ_DMA_NR: "read_dma", READ_DMA_EXT: "read_dma",
        WRITE_DMA: "write_dma", WRITE_DMA_NR: "write_dma", WRITE_DMA_EXT: "write_dma",
        VERIFY: "verify", VERIFY_NR: "verify", VERIFY_EXT: "verify",
        FLUSH_CACHE: "flush", FLUSH_CACHE_EXT: "flush",
        SET_FEATURES: "set_features", SET_MULTIPLE: "set_multiple",
        INITIALIZE_PARAMETERS: "initialize_parameters", EXECUTE_DIAGNOSTIC: "diagnose",
        CHECK_POWER_MODE: "check_power_mode", CHECK_POWER_MODE_OLD: "check_power_mode",
        READ_NATIVE_MAX: "read_native_max", READ_NATIVE_MAX_EXT: "read_native_max",
        SEEK: "nop", **{op: "nop" for op in POWER_COMMANDS}, **{op: "nop" for op in range(0x10, 0x20)},
    }

    def __init__(self, channel: Any, unit: int, block: Any, model: str = "VMM HARDDISK", serial: str = "") -> None:
        self.sectors = int(block.size) // SECTOR
        # the default translation (QEMU's guess for a disk without a partition table hint):
        # 16 heads, 63 sectors per track, at most 16383 cylinders
        self.default_cylinders = max(1, min(16383, self.sectors // (16 * 63)))
        super().__init__(channel, unit, block, model, serial)

    def signature(self) -> tuple[int, int]:
        return 0x00, 0x00

    def power_on_defaults(self) -> None:
        super().power_on_defaults()
        self.wcache = True

    def configure_defaults(self) -> None:
        self.mult = MAX_MULT_SECTORS     # QEMU: multiple mode on at reset
        self.heads, self.spt = 16, 63

    def chs_translation(self) -> tuple[int, int]:
        return self.heads, self.spt

    def current_cylinders(self) -> int:
        if not self.heads or not self.spt:
            return 0
        if (self.heads, self.spt) == (16, 63):
            return self.default_cylinders
        return min(0xFFFF, self.sectors // (self.heads * self.spt))

    # -- IDENTIFY DEVICE (ATA-6 8.15; the word values QEMU's ide_identify gives) ---------------
    def identify_data(self) -> bytes:
        lba28 = min(self.sectors, 0x0FFF_FFFF)
        cyl = self.current_cylinders()
        chs = cyl * self.heads * self.spt
        words = {
            0: 0x0040,                                  # fixed device, not removable
            1: self.default_cylinders, 3: 16, 6: 63,    # default translation
            20: 3, 21: 512, 22: 4,                      # retired buffer fields QEMU fills
            47: 0x8000 | MAX_MULT_SECTORS,              # READ/WRITE MULTIPLE: up to 16 sectors
            48: 1,                                      # dword I/O (QEMU)
            49: 1 << 11 | 1 << 9 | 1 << 8,              # IORDY, LBA, DMA
            51: 0x200, 52: 0x200,
            53: 0x7,                                    # words 54-58, 64-70 and 88 valid
            54: cyl, 55: self.heads, 56: self.spt, 57: chs & 0xFFFF, 58: chs >> 16,
            59: (0x100 | self.mult) if self.mult else 0,
            60: lba28 & 0xFFFF, 61: lba28 >> 16,
            64: 0x03,                                   # PIO 3 and 4
            65: 120, 66: 120, 67: 120, 68: 120,
            80: 0xF0,                                   # ATA/ATAPI-4 to -7
            81: 0x16,
            82: 1 << 14 | 1 << 5,                       # write cache
            83: 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10,  # FLUSH CACHE EXT, FLUSH CACHE, 48-bit
            84: 1 << 14,
            85: 1 << 14 | (1 << 5 if self.wcache else 0),
            86: 1 << 13 | 1 << 12 | 1 << 10,
            87: 1 << 14,
            93: 1 << 14 | 1 << 13 | 1,
            100: self.sectors & 0xFFFF, 101: self.sectors >> 16 & 0xFFFF,
            102: self.sectors >> 32 & 0xFFFF, 103: self.sectors >> 48 & 0xFFFF,
        }
        words.update(self.mode_words())
        return identify_block(words, self.identify_strings())

    def cmd_identify(self) -> None:
        self.status = DRDY | DSC
        self.start_in(self.identify_data())
        self.interrupt()

    # -- PIO reads and writes -------------------------------------------------------------
    def _range(self) -> int | None:
        """The first sector of the command, after checking the whole range is on the disk."""
        self.take_count()
        lba = self.address()
        if lba is None or lba + self.count > self.sectors:
            return None
        self.lba = lba
        return lba

    def cmd_read_pio(self) -> None:
        self._start_read(1)

    def cmd_read_multiple(self) -> None:
        if not self.mult:
            self.abort()
            return
        self._start_read(self.mult)

    def _start_read(self, per_block: int) -> None:
        if self._range() is None:
            self.abort(IDNF)
            return
        self.per_block = per_block
        self.act_read_block()

    def act_read_block(self) -> None:
        n = min(self.count, self.per_block)
        try:
            data = self.read_media(self.lba * SECTOR, n * SECTOR)
        except MediaError:
            self.abort(UNC)
            return
        self.lba += n
        self.count -= n
        self.set_address(self.lba)
        self.nsector = self.count & 0xFF
        self.status = DRDY | DSC
        self.start_in(data, "read_next" if self.count else "end")
        self.interrupt()

    def after_read_next(self, data: bytes) -> None:
        self.status = DRDY | BSY
        self.arm("read_block", SECTOR_TICKS * min(self.count, self.per_block))

    def cmd_write_pio(self) -> None:
        self._start_write(1)

    def cmd_write_multiple(self) -> None:
        if not self.mult:
            self.abort()
            return
        self._start_write(self.mult)

    def _start_write(self, per_block: int) -> None:
        self.take_count()
        self.per_block = per_block
        self.status = DRDY | DSC
        self.start_out(min(self.count, per_block) * SECTOR, "write_block")

    def after_write_block(self, data: bytes) -> None:
        self.buf = bytearray(data)      # kept until the timer writes it
        self.status = DRDY | BSY
        self.arm("write_block", SECTOR_TICKS * (len(data) // SECTOR))

    def act_write_block(self) -> None:
        # QEMU checks the range block by block, as the sectors arrive (ide_sector_write)
        data = bytes(self.buf)
        self.buf = bytearray()
        lba = self.address()
        n = len(data) // SECTOR
        if lba is None or lba + n > self.sectors:
            self.abort(IDNF)
            return
        if not self.writable:
            self.abort()
            return
        try:
            self.write_media(lba * SECTOR, data)
        except MediaError:
            self.abort()
            return
        self.count -= n
        self.set_address(lba + n)
        self.nsector = self.count & 0xFF
        self.status = DRDY | DSC
        if self.count:
            self.start_out(min(self.count, self.per_block) * SECTOR, "write_block")
        self.interrupt()

    # -- DMA ------------------------------------------------------------------------------
    def cmd_read_dma(self) -> None:
        if self._range() is None:
            self.abort(IDNF)
            return
        self.request_dma("read")

    def cmd_write_dma(self) -> None:
        if self._range() is None:
            self.abort(IDNF)
            return
        if not self.writable:
            self.abort()
            return
        self.request_dma("write")

    def dma_source(self) -> bytes:
        return self.read_media(self.lba * SECTOR, self.count * SECTOR)

    def dma_complete(self, data: bytes) -> None:
        if self.dma == "write":
            self.write_media(self.lba * SECTOR, data)
        self.lba += self.count
        self.count = 0
        self.set_address(self.lba)
        self.nsector = 0
        super().dma_complete(data)

    # -- the rest of the command set ------------------------------------------------------
    def cmd_verify(self) -> None:
        if self._range() is None:
            self.abort(IDNF)
        else:
            self.done()

    def cmd_flush(self) -> None:
        try:
            self.flush_media()
        except MediaError:
            self.abort()
            return
        self.done()

    def cmd_set_features(self) -> None:
        if self.feature == 0x02:
            self.wcache = True
            self.done()
        elif self.feature == 0x82:
            # QEMU flushes when the write cache is turned off
            self.wcache = False
            self.cmd_flush()
        else:
            super().cmd_set_features()

    def cmd_set_multiple(self) -> None:
        n = self.nsector
        if n and (n > MAX_MULT_SECTORS or n & (n - 1)):
            self.abort()
            return
        self.mult = n
        self.done()

    def cmd_initialize_parameters(self) -> None:
        # ATA-6 8.16: heads from the device register, sectors per track from the count;
        # an unusable translation makes CHS accesses fail with IDNF until a good one is set
        self.heads = (self.select & 0x0F) + 1
        self.spt = self.nsector
        self.done()

    def cmd_read_native_max(self) -> None:
        self.set_address(max(0, self.sectors - 1))
        self.done()

    # -- state ----------------------------------------------------------------------------
    def save_extra(self) -> dict:
        return {"mult": self.mult, "heads": self.heads, "spt": self.spt, "wcache": self.wcache}

    def parse_extra(self, st: dict, where: str) -> dict:
        mult = need_int(st, "mult", 0, MAX_MULT_SECTORS, where)
        if mult & (mult - 1):
            raise DeviceStateError(f"{where}: mult must be 0 or a power of two")
        return {"mult": mult, "heads": need_int(st, "heads", 1, 16, where), "spt": need_int(st, "spt", 0, 255, where),
                "wcache": need_bool(st, "wcache", where)}

    def apply_extra(self, p: dict) -> None:
        self.mult, self.heads, self.spt, self.wcache = p["mult"], p["heads"], p["spt"], p["wcache"]
