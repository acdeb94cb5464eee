"""An ATAPI CD-ROM: the PACKET protocol and the MMC commands guests probe and read with.

Sources: ATA/ATAPI-6 (T13/1410D) 8.23 PACKET, 8.16 IDENTIFY PACKET DEVICE,
9.8 and 9.9 (the packet protocols: the interrupt reason in the sector count
register, CoD bit 0 and IO bit 1, the byte count in LBA mid/high); SCSI
Primary Commands (SPC-3) for INQUIRY, REQUEST SENSE (fixed sense data) and
the sense keys; Multimedia Commands (MMC-5) for READ CAPACITY, READ(10)/(12),
READ CD, READ TOC/PMA/ATIP, GET CONFIGURATION, GET EVENT STATUS
NOTIFICATION, MODE SENSE (pages 01h, 0Eh, 2Ah), START STOP UNIT, PREVENT
ALLOW MEDIUM REMOVAL, MECHANISM STATUS.  The medium is an ISO image of
2048-byte sectors, one data track; replies are the ones QEMU's hw/ide/atapi.c
gives where MMC leaves a choice (mode page contents, the profile list, the
INQUIRY version bytes).

The packet phase follows QEMU: PACKET raises DRQ at once (IDENTIFY PACKET
DEVICE word 0 announces "accelerated DRQ", no interrupt), the twelve bytes
written make the drive busy, and the command runs ``CMD_TICKS`` later.  A
PIO reply goes out in DRQ blocks of at most the byte count limit the host
wrote to LBA mid/high before PACKET (an odd limit is rounded down, 0 and
FFFFh mean FFFEh: QEMU treats FFFFh so; 0, which the standard leaves
undefined, would otherwise never end), one interrupt per block; with the
DMA bit of the features register the whole reply goes through the bus
master.

Errors are reported as ATAPI does (status ERR, the sense key in the error
register's high nibble, the interrupt reason "command complete"), and the
sense data belongs to the last command (SPC: a command other than REQUEST
SENSE clears it first).  Closing the tray on a medium sets a unit attention
(MEDIUM MAY HAVE CHANGED) that the next command other than INQUIRY, REQUEST
SENSE, GET CONFIGURATION and GET EVENT STATUS NOTIFICATION reports, and a
media event for GET EVENT STATUS NOTIFICATION.
"""
from __future__ import annotations

from typing import Any, ClassVar

from devices.base import DeviceStateError
from devices.storage.ata import (
    BSY,
    BUF_MAX,
    CHECK_POWER_MODE,
    CHECK_POWER_MODE_OLD,
    CMD_TICKS,
    DEVICE_RESET,
    DRDY,
    DSC,
    ERR,
    EXECUTE_DIAGNOSTIC,
    FLUSH_CACHE,
    IDENTIFY,
    IDENTIFY_PACKET,
    PACKET,
    POWER_COMMANDS,
    READ_SECTORS,
    SECTOR_TICKS,
    SET_FEATURES,
    Drive,
    MediaError,
    identify_block,
    need_bool,
    need_int,
)

CD_SECTOR = 2048
CD_MAX_SECTORS = 80 * 60 * 75        # an 80-minute CD; larger media are reported as DVD-ROM
PACKET_SIZE = 12

IR_COD, IR_IO = 0x01, 0x02            # interrupt reason (sector count register)

# sense keys (SPC-3 table 27) and additional sense codes
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, UNIT_ATTENTION, ABORTED_COMMAND = 0, 2, 3, 5, 6, 0xB
ASC_READ_ERROR = 0x11
ASC_INVALID_OPCODE = 0x20
ASC_LBA_OUT_OF_RANGE = 0x21
ASC_INVALID_FIELD = 0x24
ASC_MEDIUM_CHANGED = 0x28
ASC_SAVING_NOT_SUPPORTED = 0x39
ASC_NO_MEDIUM = 0x3A
ASC_REMOVAL_PREVENTED = 0x53

# packet commands: name, and whether it needs a medium (MMC "not ready" conditions)
# or may run while a unit attention is pending
NEEDS_MEDIUM, ALLOW_UA = 1, 2
PACKET_COMMANDS: dict[int, tuple[str, int]] = {
    0x00: ("test_unit_ready", NEEDS_MEDIUM),
    0x03: ("request_sense", ALLOW_UA),
    0x12: ("inquiry", ALLOW_UA),
    0x1A: ("mode_sense", 0),
    0x1B: ("start_stop_unit", 0),
    0x1E: ("prevent_allow", 0),
    0x25: ("read_capacity", NEEDS_MEDIUM),
    0x28: ("read", NEEDS_MEDIUM),
    0x2B: ("seek", NEEDS_MEDIUM),
    0x43: ("read_toc", NEEDS_MEDIUM),
    0x46: ("get_configuration", ALLOW_UA),
    0x4A: ("event_status", ALLOW_UA),
    0x5A: ("mode_sense", 0),
    0xA8: ("read", NEEDS_MEDIUM),
    0xBB: ("nop", 0),                  # SET CD SPEED
    0xBD: ("mechanism_status", 0),
    0xBE: ("read_cd", NEEDS_MEDIUM),
}

PROFILE_CD_ROM, PROFILE_DVD_ROM = 0x0008, 0x0010


def be16(v: int) -> bytes:
    return (v & 0xFFFF).to_bytes(2, "big")


def be32(v: int) -> bytes:
    return (v & 0xFFFF_FFFF).to_bytes(4, "big")


def msf(lba: int) -> bytes:
    """An MSF address field (MMC: LBA 0 is 00:02:00)."""
    lba += 150
    return bytes((0, lba // 75 // 60 & 0xFF, lba // 75 % 60, lba % 75))


class AtapiCdrom(Drive):
    """A CD/DVD-ROM drive; ``block`` is the ISO image (or None for an empty drive)."""

    kind = "cdrom"
    ACTIONS = frozenset({"exec", "dma", "packet", "atapi_block"})
    AFTERS = frozenset({"end", "packet", "atapi_next"})
    IMMEDIATE = frozenset((PACKET, DEVICE_RESET))
    COMMANDS: ClassVar[dict[int, str]] = {
        IDENTIFY: "identify_ata", READ_SECTORS: "identify_ata",
        IDENTIFY_PACKET: "identify_packet", PACKET: "packet", DEVICE_RESET: "device_reset",
        EXECUTE_DIAGNOSTIC: "diagnose", SET_FEATURES: "set_features", FLUSH_CACHE: "nop",
        CHECK_POWER_MODE: "check_power_mode", CHECK_POWER_MODE_OLD: "check_power_mode",
        **{op: "nop" for op in POWER_COMMANDS},
    }

    def __init__(self, channel: Any, unit: int, block: Any = None, model: str = "VMM DVD-ROM",
                 serial: str = "") -> None:
        self.sectors = int(block.size) // CD_SECTOR if block is not None else 0
        self.tray_open = False
        self.locked = False
        self.ua = False
        self.new_media = False
        self.sense = (NO_SENSE, 0, 0)
        super().__init__(channel, unit, block, model, serial)

    def signature(self) -> tuple[int, int]:
        return 0x14, 0xEB

    def post_reset_status(self) -> int:
        # ATA-6 9.12 (and QEMU's cmd_exec_dev_diagnostic): a packet device reports 00h, DRDY clear
        return 0

    def configure_defaults(self) -> None:
        self.atapi_dma = False
        self.bcl = 0
        self.packet = bytes(PACKET_SIZE)
        self.r_data = b""
        self.r_lba = -1
        self.r_total = self.r_done = 0

    def power_on_defaults(self) -> None:
        super().power_on_defaults()
        self.tray_open = self.locked = self.ua = self.new_media = False
        self.sense = (NO_SENSE, 0, 0)

    @property
    def medium(self) -> bool:
        return self.block is not None and not self.tray_open

    def accepts_while_busy(self, op: int) -> bool:
        return op == DEVICE_RESET         # ATA-6 8.10: the way out of a hung packet command

    # -- ATA commands a packet device answers ---------------------------------------------
    def cmd_identify_ata(self) -> None:
        # ATA-4 8.27.5.2 (QEMU): a packet device aborts these and shows its signature
        self.set_signature()
        self.abort()

    def identify_data(self) -> bytes:
        words = {
            0: 2 << 14 | 5 << 8 | 1 << 7 | 2 << 5,      # ATAPI, CD-ROM, removable, accelerated DRQ, 12-byte packets
            20: 3, 21: 512, 22: 4,
            48: 1,
            49: 1 << 9 | 1 << 8,                         # LBA, DMA
            53: 0x7,
            64: 0x03,
            65: 0xB4, 66: 0xB4, 67: 0x12C, 68: 0xB4,
            71: 30, 72: 30,
            80: 0x1E,                                    # ATA/ATAPI-1 to -4
        }
        words.update(self.mode_words())
        return identify_block(words, self.identify_strings())

    def cmd_identify_packet(self) -> None:
        self.status = DRDY | DSC
        self.start_in(self.identify_data())
        self.interrupt()

    def cmd_device_reset(self) -> None:
        # ATA-6 8.10; QEMU leaves the status 00h and raises no interrupt
        self.diagnostic_result()

    def cmd_packet(self) -> None:
        if self.feature & 0x02:           # overlapped commands are not supported
            self.abort()
            return
        self.atapi_dma = bool(self.feature & 0x01)
        self.bcl = self.hcyl << 8 | self.lcyl
        self.status = DRDY | DSC
        self.nsector = (self.nsector & ~7) | IR_COD
        self.start_out(PACKET_SIZE, "packet")

    def after_packet(self, data: bytes) -> None:
        self.packet = data
        self.status = DRDY | BSY
        self.arm("packet", CMD_TICKS)

    # -- outcomes -------------------------------------------------------------------------
    def ok(self) -> None:
        self.error = 0
        self.status = DRDY | DSC
        self.nsector = (self.nsector & ~7) | IR_IO | IR_COD
        self.interrupt()

    def check(self, key: int, asc: int, ascq: int = 0) -> None:
        """CHECK CONDITION: the command ends with ERR and sense data for REQUEST SENSE."""
        self.cancel()
        self.end_transfer()
        self.dma = ""
        self.sense = (key, asc, ascq)
        self.error = key << 4
        self.status = DRDY | ERR
        self.nsector = (self.nsector & ~7) | IR_IO | IR_COD
        self.interrupt()

    def reply(self, data: bytes, alloc: int) -> None:
        data = bytes(data[:alloc])
        if not data:
            self.ok()
        else:
            self.start_data(len(data), data=data)

    def start_data(self, total: int, data: bytes = b"", lba: int = -1) -> None:
        self.r_data, self.r_lba, self.r_total, self.r_done = data, lba, total, 0
        if self.atapi_dma:
            self.request_dma("atapi")
        else:
            self.act_atapi_block()

    def chunk(self, start: int, n: int) -> bytes:
        if self.r_lba < 0:
            return self.r_data[start:start + n]
        return self.read_media(self.r_lba * CD_SECTOR + start, n)

    def act_atapi_block(self) -> None:
        limit = self.bcl if self.bcl not in (0, 0xFFFF) else 0xFFFE
        size = self.r_total - self.r_done
        if size > limit:
            size = max(2, limit & ~1)
        try:
            data = self.chunk(self.r_done, size)
        except MediaError:
            self.check(MEDIUM_ERROR, ASC_READ_ERROR)
            return
        self.r_done += size
        self.lcyl, self.hcyl = size & 0xFF, size >> 8 & 0xFF
        self.nsector = (self.nsector & ~7) | IR_IO
        self.status = DRDY | DSC
        self.start_in(data, "atapi_next")
        self.interrupt()

    def after_atapi_next(self, data: bytes) -> None:
        if self.r_done < self.r_total:
            self.status = DRDY | BSY
            self.arm("atapi_block", SECTOR_TICKS * (min(self.r_total - self.r_done, 0xFFFE) // 512 + 1))
        else:
            self.ok()

    def dma_bytes(self) -> int:
        return self.r_total

    def dma_source(self) -> bytes:
        return self.chunk(0, self.r_total)

    def dma_complete(self, data: bytes) -> None:
        self.dma = ""
        self.r_done = self.r_total
        self.ok()

    def dma_failed(self, media: bool) -> None:
        if media:
            self.check(MEDIUM_ERROR, ASC_READ_ERROR)
        else:
            self.check(ABORTED_COMMAND, 0)

    # -- packet commands ------------------------------------------------------------------
    def act_packet(self) -> None:
        p = self.packet
        name, flags = PACKET_COMMANDS.get(p[0], ("", 0))
        if self.ua and not flags & ALLOW_UA:
            self.ua = False
            self.check(UNIT_ATTENTION, ASC_MEDIUM_CHANGED)
            return
        if name != "request_sense":
            self.sense = (NO_SENSE, 0, 0)
        if not name:
            self.check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        elif flags & NEEDS_MEDIUM and not self.medium:
            self.check(NOT_READY, ASC_NO_MEDIUM, 2 if self.tray_open else 1)
        else:
            getattr(self, "pkt_" + name)(p)

    def pkt_nop(self, p: bytes) -> None:
        self.ok()

    def pkt_test_unit_ready(self, p: bytes) -> None:
        self.ok()

    def pkt_request_sense(self, p: bytes) -> None:
        key, asc, ascq = self.sense
        self.sense = (NO_SENSE, 0, 0)
        data = bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))
        self.reply(data, p[4])

    def pkt_inquiry(self, p: bytes) -> None:
        if p[1] & 0x01:                   # no vital product data pages
            self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            return
        data = (bytes((0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0)) + b"VMM".ljust(8) + self.model.encode()[:16].ljust(16)
                + self.firmware.encode()[:4].ljust(4))
        self.reply(data, p[3] << 8 | p[4])

    def pkt_read_capacity(self, p: bytes) -> None:
        self.reply(be32(self.sectors - 1) + be32(CD_SECTOR), 8)

    def pkt_read(self, p: bytes) -> None:
        lba = int.from_bytes(p[2:6], "big")
        count = int.from_bytes(p[7:9], "big") if p[0] == 0x28 else int.from_bytes(p[6:10], "big")
        self._read(lba, count)

    def pkt_read_cd(self, p: bytes) -> None:
        lba = int.from_bytes(p[2:6], "big")
        count = int.from_bytes(p[6:9], "big")
        fields = p[9] & 0xF8
        if fields == 0x00 or count == 0:
            self.ok()
        elif fields == 0x10:              # user data only: the 2048 bytes of a mode 1 sector
            self._read(lba, count)
        else:
            self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)

    def _read(self, lba: int, count: int) -> None:
        if lba + count > self.sectors:
            self.check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        elif count == 0:
            self.ok()
        else:
            self.start_data(count * CD_SECTOR, lba=lba)

    def pkt_seek(self, p: bytes) -> None:
        if int.from_bytes(p[2:6], "big") >= self.sectors:
            self.check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        else:
            self.ok()

    def pkt_read_toc(self, p: bytes) -> None:
        time = bool(p[1] & 0x02)
        fmt = p[2] & 0x0F or p[9] >> 6    # MMC's format field, or SFF-8020's in the control byte
        alloc = p[7] << 8 | p[8]
        if fmt == 0:
            track = p[6]
            if track > 1 and track != 0xAA:
                self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
                return
            body = b""
            if track <= 1:
                body += bytes((0, 0x14, 1, 0)) + (msf(0) if time else be32(0))
            body += bytes((0, 0x14, 0xAA, 0)) + (msf(self.sectors) if time else be32(self.sectors))
            self.reply(be16(len(body) + 2) + bytes((1, 1)) + body, alloc)
        elif fmt == 1:                     # session information: one session
            self.reply(be16(10) + bytes((1, 1, 0, 0x14, 1, 0)) + be32(0), alloc)
        else:
            self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)

    def pkt_get_configuration(self, p: bytes) -> None:
        rt, start, alloc = p[1] & 0x03, p[2] << 8 | p[3], p[7] << 8 | p[8]
        if rt == 3:
            self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            return
        current = 0
        if self.medium:
            current = PROFILE_DVD_ROM if self.sectors > CD_MAX_SECTORS else PROFILE_CD_ROM
        profiles = b"".join(be16(code) + bytes((int(code == current), 0))
                            for code in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
        features = {
            0x0000: profiles,                          # profile list
            0x0001: be32(2),                           # core: ATAPI
            0x0003: bytes((1 << 5 | 1 << 3 | 1, 0, 0, 0)),   # removable medium: tray, eject, lock
        }
        body = b"".join(be16(code) + bytes((0x03, len(data))) + data for code, data in features.items()
                        if (code == start if rt == 2 else code >= start))
        self.reply(be32(len(body) + 4) + bytes(2) + be16(current) + body, alloc)

    def pkt_event_status(self, p: bytes) -> None:
        if not p[1] & 0x01:               # only polled operation (QEMU too)
            self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            return
        alloc = p[7] << 8 | p[8]
        if p[4] & 0x10:                   # media class
            event = 2 if self.new_media else 0
            self.new_media = False
            state = 1 if self.tray_open else (2 if self.medium else 0)
            self.reply(bytes((0, 6, 0x04, 0x10, event, state, 0, 0)), alloc)
        else:
            self.reply(bytes((0, 2, 0x80, 0x10)), alloc)

    def mode_pages(self, changeable: bool) -> dict[int, bytes]:
        caps = bytes((0x2A, 0x12, 0x00, 0x00, 0x71, 0x60,
                      1 << 5 | 1 << 3 | (1 << 1 if self.locked else 0) | 1, 0))
        caps += be16(706) + be16(2) + be16(512) + be16(706) + bytes(4)
        pages = {0x01: bytes((0x01, 0x06, 0x00, 0x05, 0, 0, 0, 0)),
                 0x0E: bytes((0x0E, 0x0E)) + bytes(14),
                 0x2A: caps}
        if changeable:
            pages = {k: v[:2] + bytes(len(v) - 2) for k, v in pages.items()}
        return pages

    def pkt_mode_sense(self, p: bytes) -> None:
        control, code = p[2] >> 6, p[2] & 0x3F
        if control == 3:
            self.check(ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED)
            return
        pages = self.mode_pages(control == 1)
        if code == 0x3F:
            body = b"".join(pages.values())
        elif code in pages:
            body = pages[code]
        else:
            self.check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            return
        if p[0] == 0x5A:
            self.reply(be16(len(body) + 6) + bytes((0x70, 0, 0, 0, 0, 0)) + body, p[7] << 8 | p[8])
        else:
            self.reply(bytes((len(body) + 3, 0x70, 0, 0)) + body, p[4])

    def pkt_start_stop_unit(self, p: bytes) -> None:
        load_eject, start = p[4] & 0x02, p[4] & 0x01
        if load_eject and not start:
            if self.locked:
                self.check(ILLEGAL_REQUEST if self.medium else NOT_READY, ASC_REMOVAL_PREVENTED, 2)
                return
            self.tray_open = True
        elif load_eject and self.tray_open:
            self.tray_open = False
            if self.block is not None:
                self.new_media = self.ua = True
        self.ok()

    def pkt_prevent_allow(self, p: bytes) -> None:
        self.locked = bool(p[4] & 0x01)
        self.ok()

    def pkt_mechanism_status(self, p: bytes) -> None:
        self.reply(bytes((0, 0, 0, 0, 0, 1, 0, 0)), p[8] << 8 | p[9])

    # -- state ----------------------------------------------------------------------------
    def save_extra(self) -> dict:
        return {"tray_open": self.tray_open, "locked": self.locked, "ua": self.ua, "new_media": self.new_media,
                "sense": list(self.sense), "atapi_dma": self.atapi_dma, "bcl": self.bcl, "packet": self.packet,
                "reply": [self.r_data, self.r_lba, self.r_total, self.r_done]}

    def parse_extra(self, st: dict, where: str) -> dict:
        out: dict[str, Any] = {k: need_bool(st, k, where) for k in ("tray_open", "locked", "ua", "new_media",
                                                                     "atapi_dma")}
        out["bcl"] = need_int(st, "bcl", 0, 0xFFFF, where)
        sense = st.get("sense")
        if not isinstance(sense, list) or len(sense) != 3 or any(type(v) is not int or not 0 <= v <= 0xFF
                                                                 for v in sense) or sense[0] > 0xF:
            raise DeviceStateError(f"{where}: sense must be [key, asc, ascq]")
        out["sense"] = tuple(sense)
        packet = st.get("packet")
        if not isinstance(packet, bytes) or len(packet) != PACKET_SIZE:
            raise DeviceStateError(f"{where}: packet must be {PACKET_SIZE} bytes")
        out["packet"] = packet
        reply = st.get("reply")
        if (not isinstance(reply, list) or len(reply) != 4 or not isinstance(reply[0], bytes)
                or len(reply[0]) > BUF_MAX or any(type(v) is not int for v in reply[1:])):
            raise DeviceStateError(f"{where}: reply must be [data, lba, total, done]")
        data, lba, total, done = reply
        limit = len(data) if lba < 0 else (self.sectors - lba) * CD_SECTOR
        if lba < -1 or not 0 <= done <= total <= limit:
            raise DeviceStateError(f"{where}: reply {lba}, {done}/{total} is outside the medium")
        out["reply"] = (data, lba, total, done)
        return out

    def apply_extra(self, p: dict) -> None:
        for k in ("tray_open", "locked", "ua", "new_media", "atapi_dma", "bcl", "sense", "packet"):
            setattr(self, k, p[k])
        self.r_data, self.r_lba, self.r_total, self.r_done = p["reply"]
