"""The Intel 82540EM gigabit Ethernet controller (PCI 8086:100E), QEMU's ``e1000``.

Implements, from the "PCI/PCI-X Family of Gigabit Ethernet Controllers
Software Developer's Manual" (the 8254x SDM), what Linux's e1000 driver and
other drivers written against QEMU use, and behaves like QEMU's
hw/net/e1000.c where QEMU departs from the manual and guests rely on it (each
such place says so).

PCI function: vendor 8086, device 100E, revision 03, class 020000 (Ethernet
controller), INTA#, subsystem 1af4:1100 (QEMU's default for functions that
name none).  BAR 0 is the 128 KiB register space (32-bit memory), BAR 1 a
64-byte I/O window (QEMU's size) holding IOADDR (offset 0) and IODATA
(offset 4): IODATA reaches the register IOADDR names ("IOADDR/IODATA",
I/O-mapped internal register access).  QEMU leaves that window dead; the
manual's behaviour costs nothing and no driver depends on the difference.

Registers (the manual's "Register Descriptions"; every register is 32 bits;
byte and word accesses reach the bytes of the containing register; offsets
nobody implements read 0 and ignore writes, as on QEMU):

* CTRL: stored.  RST resets the MAC (every register to its power-on value,
  RAL0/RAH0 reloaded from the EEPROM, the transmit and receive units idle,
  the interrupt deasserted) but not the PHY, and clears itself.  QEMU only
  clears the bit; Linux resets the MAC and then programs every register it
  uses, so the manual's reset is what it expects.  PHY_RST is accepted and
  ignored, as on QEMU (the PHY keeps its state and its link).
* STATUS (read only): full duplex, link up (LU) while the PHY has link,
  1000 Mb/s, and the bits QEMU shows.
* EECD: the Microwire EEPROM (64 words: the 82540EM's 93C46, EECD.SIZE
  reads 0).  Software owns the interface by REQ and is granted it at once
  (GNT); it drives CS, SK and DI and reads DO.  A READ (start bit + opcode
  "110", then six address bits) shifts out the addressed word most
  significant bit first, one bit per falling SK edge, running on into the
  next words while CS stays high.  No dummy zero bit precedes the data, as
  on QEMU (Linux's shift-in expects none).  EERD: a word by register
  (START, DONE, address in bits 15:8, data in 31:16), answered at once.
  The EEPROM holds the MAC address (words 0-2), the identifiers QEMU
  presents, and a checksum word making words 0-63 sum to BABAh.
* MDIC: the PHY at MDI address 1 (any other address sets ERROR).  Reads
  and writes complete at once (READY); INT_EN raises the MDAC cause.  The
  PHY is the Marvell 88E1011 the 82540EM carries, as QEMU models it:
  control, status, identifiers 0141h/0C20h, autonegotiation advertisement,
  link partner ability and expansion, 1000BASE-T control and status, and
  the Marvell specific control, status, extended control and receive error
  registers.  Other registers set MDIC.ERROR, as on QEMU.  Restarting
  autonegotiation takes the link down for 500 ms of virtual time (QEMU's
  timing); then autonegotiation is complete, the link is up and the link
  status change cause (LSC) is raised.  Loopback (control bit 14) turns
  transmitted frames back into the receiver, as on QEMU.
* ICR/ICS/IMS/IMC: ICR holds the causes and reads clear it; a write of 1
  clears a cause; ICS sets causes and reads as ICR without clearing (real
  hardware, and QEMU, do this; the manual calls ICS write-only); IMS sets
  and reads the mask, IMC clears it.  INTA# is asserted while ICR & IMS is
  non-zero, subject to throttling.
* Interrupt throttling as QEMU models it: a rising edge of ICR & IMS raises
  INTA# at once and opens a mitigation window; edges inside the window wait
  for its end.  The window is the least non-zero of ITR, TADV x 4 (when a
  descriptor with IDE was processed and a transmit cause is pending) and
  RADV x 4 (when RDTR is non-zero and RXT0 is pending), in 256 ns units,
  but never below 500 units (128 us), QEMU's floor: the manual's "at most
  7813 interrupts per second".  RDTR/TIDV packet timers are not modelled
  (QEMU neither).
* RCTL: EN, SBP, UPE, MPE, LPE, RDMTS, MO, BAM, BSIZE/BSEX, VFE, SECRC.
  TCTL: EN and PSP (short frames are padded to 60 bytes).
* Receive address filtering: 16 exact addresses (RAL/RAH with AV), the
  4096-bit multicast table (MO selects the hashed bits), broadcast (BAM),
  unicast and multicast promiscuous modes (UPE, MPE), the VLAN filter table
  (VFE) when CTRL.VME strips tags (VET, 8100h).
* Descriptor rings: RDBAL/RDBAH/RDLEN/RDH/RDT and TDBAL/TDBAH/TDLEN/TDH/TDT,
  legacy receive descriptors and all three transmit descriptor kinds
  (legacy, TCP/IP context, TCP/IP data), with checksum insertion and TCP
  segmentation (TSE: the header copied to each segment, IP length and
  identification, TCP sequence number, PSH/FIN only on the last segment,
  pseudo-header length, IP and TCP/UDP checksums), as QEMU performs them.
  Transmit runs when TDT or TCTL is written, synchronously, as on QEMU.
  Receive checksum offload (RXCSUM IPOFL/TUOFL): IPv4 header and TCP/UDP
  checksums are checked and reported (IPCS/TCPCS, IPE/TCPE errors); with
  neither enabled, descriptors carry IXSM ("ignore checksum indication").
  QEMU always reports IXSM; the manual's checking saves the guest its own.
* Statistics: every counter of the manual's statistics block counts up to
  all ones and clears when read; a 64-bit octet counter clears when its
  high half is read, as on QEMU.  QEMU leaves CRCERRS-MPC and a few others
  uncleared; Linux adds them up at every read, so the manual's clearing is
  what it expects.

Hostile rings.  Every descriptor and buffer is reached through the ``Dma``
view; a transfer outside RAM raises ``DmaError`` before a byte moves, and
the device then does what a PCI master that gets a master abort does: sets
the Received Master Abort bit of its PCI status register, and drops what it
was moving (a receive buffer that cannot be written leaves its descriptor
with the RX data error bit, so the driver drops the frame and reuses the
buffer; a transmit buffer that cannot be read drops that packet; a
descriptor that cannot be fetched stops the ring where it is).  The receiver
uses only descriptors between head and tail, stops after one trip round the
ring, and counts frames that find no descriptor (RNBC, MPC, cause RXO).
The transmitter processes at most one trip round the ring per doorbell, as
QEMU does, and at most TX_BUDGET_FRAMES frames or TX_BUDGET_BYTES bytes
before it yields to virtual time (a timer resumes it 1 ms later), so a
guest asking TSO for one-byte segments cannot stall the machine.  Frames
shorter than an Ethernet header count as undersized (RUC) and are dropped;
shorter ones are padded to 60 bytes, as QEMU does for frames from the host,
which come without padding; oversized ones (over 1518 bytes, or 16380 with
LPE, unless SBP) count in ROC and are dropped.  Receive appends the frame's
real CRC-32 unless RCTL.SECRC strips it (QEMU counts four bytes it never
writes).

Not modelled: flow control frames, wake-up and manageability filters (their
registers are storage), the receive/transmit delay timers other than the
mitigation above, the packet buffer memory, and the legacy transmit
descriptor's checksum insertion (CSO/CSS), which neither QEMU nor Linux uses.

Time: the mitigation window, autonegotiation and a yielded transmit are
timers on the machine's virtual clock, named ``<name>.mit``,
``<name>.autoneg`` and ``<name>.tx``.  The device keeps no host state: the
wire it sends to and the frames it is handed come from its owner.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError, DmaError, State, check_state
from devices.clock import NS_PER_TICK
from devices.net import ETH_HEADER, ETH_ZLEN, MAX_FRAME, ones_sum, parse_mac
from devices.net import fold as _fold
from devices.pci import function as pci
from devices.pci.function import PciFunction

DEVICE_82540EM = 0x100E
REVISION = 0x03
CLASS_ETHERNET = 0x020000
MMIO_SIZE = 0x20000
IO_SIZE = 0x40
DEFAULT_MAC = bytes.fromhex("525400123456")     # QEMU's first NIC
PCI_ST_RECEIVED_MASTER_ABORT = 0x2000

# -- register offsets (SDM "Register Descriptions") ----------------------------------------------
CTRL, STATUS, EECD, EERD, CTRL_EXT, MDIC = 0x0000, 0x0008, 0x0010, 0x0014, 0x0018, 0x0020
FCAL, FCAH, FCT, VET = 0x0028, 0x002C, 0x0030, 0x0038
ICR, ITR, ICS, IMS, IMC = 0x00C0, 0x00C4, 0x00C8, 0x00D0, 0x00D8
RCTL, FCTTV, TXCW, RXCW = 0x0100, 0x0170, 0x0178, 0x0180
TCTL, TIPG, AIT = 0x0400, 0x0410, 0x0458
LEDCTL, PBA = 0x0E00, 0x1000
FCRTL, FCRTH = 0x2160, 0x2168
RDBAL, RDBAH, RDLEN, RDH, RDT, RDTR, RXDCTL, RADV, RSRPD = (
    0x2800, 0x2804, 0x2808, 0x2810, 0x2818, 0x2820, 0x2828, 0x282C, 0x2C00)
TXDMAC, TDFH, TDFT, TDFHS, TDFTS, TDFPC = 0x3000, 0x3410, 0x3418, 0x3420, 0x3428, 0x3430
RDFH, RDFT, RDFHS, RDFTS, RDFPC = 0x2410, 0x2418, 0x2420, 0x2428, 0x2430
TDBAL, TDBAH, TDLEN, TDH, TDT, TIDV, TXDCTL, TADV, TSPMT = (
    0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x3820, 0x3828, 0x382C, 0x3830)
RXCSUM, MTA, RA, VFTA = 0x5000, 0x5200, 0x5400, 0x5600
WUC, WUFC, WUS, MANC, IPAV, IP4AT, IP6AT, WUPL, WUPM = (
    0x5800, 0x5808, 0x5810, 0x5820, 0x5838, 0x5840, 0x5880, 0x5900, 0x5A00)
FFLT, FFMT, FFVT = 0x5F00, 0x9000, 0x9800

# statistics (all clear on read)
CRCERRS, ALGNERRC, SYMERRS, RXERRC, MPC = 0x4000, 0x4004, 0x4008, 0x400C, 0x4010
PRC64, PRC127, PRC255, PRC511, PRC1023, PRC1522 = 0x405C, 0x4060, 0x4064, 0x4068, 0x406C, 0x4070
GPRC, BPRC, MPRC, GPTC = 0x4074, 0x4078, 0x407C, 0x4080
GORCL, GORCH, GOTCL, GOTCH = 0x4088, 0x408C, 0x4090, 0x4094
RNBC, RUC, RFC, ROC, RJC = 0x40A0, 0x40A4, 0x40A8, 0x40AC, 0x40B0
TORL, TORH, TOTL, TOTH, TPR, TPT = 0x40C0, 0x40C4, 0x40C8, 0x40CC, 0x40D0, 0x40D4
PTC64, PTC127, PTC255, PTC511, PTC1023, PTC1522 = 0x40D8, 0x40DC, 0x40E0, 0x40E4, 0x40E8, 0x40EC
MPTC, BPTC, TSCTC, TSCTFC = 0x40F0, 0x40F4, 0x40F8, 0x40FC
STATS_FIRST, STATS_LAST = 0x4000, 0x40FC
STATS_GAPS = (0x4024, 0x402C, 0x4044, 0x4084, 0x4098, 0x409C)   # reserved dwords in the block
HIGH_HALVES = {GORCH: GORCL, GOTCH: GOTCL, TORH: TORL, TOTH: TOTL}

# -- register bits ------------------------------------------------------------------------
CTRL_FD, CTRL_SLU, CTRL_SPD_1000 = 1 << 0, 1 << 6, 1 << 9
CTRL_SWDPIN0, CTRL_SWDPIN2 = 1 << 18, 1 << 20
CTRL_RST, CTRL_VME, CTRL_PHY_RST = 1 << 26, 1 << 30, 1 << 31
CTRL_EXT_EE_RST = 1 << 13

ST_FD, ST_LU, ST_SPEED_1000, ST_ASDV, ST_MTXCKOK, ST_GIO_MASTER = 0x1, 0x2, 0x80, 0x300, 0x400, 0x80000

EECD_SK, EECD_CS, EECD_DI, EECD_DO, EECD_FWE, EECD_REQ, EECD_GNT, EECD_PRES = (
    0x1, 0x2, 0x4, 0x8, 0x30, 0x40, 0x80, 0x100)
EERD_START, EERD_DONE = 0x1, 0x10
EEPROM_WORDS = 64
EEPROM_CHECKSUM_WORD = 0x3F
EEPROM_SUM = 0xBABA
MICROWIRE_READ = 0b110                 # start bit + READ opcode

MDIC_DATA, MDIC_OP_WRITE, MDIC_OP_READ = 0xFFFF, 1 << 26, 1 << 27
MDIC_READY, MDIC_INT_EN, MDIC_ERROR = 1 << 28, 1 << 29, 1 << 30

ICR_TXDW, ICR_TXQE, ICR_LSC, ICR_RXSEQ, ICR_RXDMT0 = 0x1, 0x2, 0x4, 0x8, 0x10
ICR_RXO, ICR_RXT0, ICR_MDAC = 0x40, 0x80, 0x200

RCTL_EN, RCTL_SBP, RCTL_UPE, RCTL_MPE, RCTL_LPE = 0x2, 0x4, 0x8, 0x10, 0x20
RCTL_RDMTS_SHIFT, RCTL_MO_SHIFT, RCTL_BAM = 8, 12, 1 << 15
RCTL_BSIZE_SHIFT, RCTL_VFE, RCTL_BSEX, RCTL_SECRC = 16, 1 << 18, 1 << 25, 1 << 26
TCTL_EN, TCTL_PSP = 0x2, 0x8
RAH_AV = 1 << 31
RXCSUM_IPOFL, RXCSUM_TUOFL = 1 << 8, 1 << 9

# descriptors (SDM "Receive Descriptor Format", "Transmit Descriptors")
RXD_STAT_DD, RXD_STAT_EOP, RXD_STAT_IXSM, RXD_STAT_VP = 0x1, 0x2, 0x4, 0x8
RXD_STAT_TCPCS, RXD_STAT_IPCS = 0x20, 0x40
RXD_ERR_TCPE, RXD_ERR_IPE, RXD_ERR_RXE = 0x20, 0x40, 0x80
TXD_CMD_EOP, TXD_CMD_IFCS, TXD_CMD_IC, TXD_CMD_RS = 1 << 24, 1 << 25, 1 << 26, 1 << 27
TXD_CMD_RPS, TXD_CMD_DEXT, TXD_CMD_VLE, TXD_CMD_IDE = 1 << 28, 1 << 29, 1 << 30, 1 << 31
TXD_DTYP_D = 1 << 20
TXD_CMD_TCP, TXD_CMD_IP, TXD_CMD_TSE = 1 << 24, 1 << 25, 1 << 26
TXD_POPTS_IXSM, TXD_POPTS_TXSM = 0x1, 0x2
TXD_STAT_DD, TXD_STAT_EC, TXD_STAT_LC, TXD_STAT_TU = 0x1, 0x2, 0x4, 0x8

# PHY (IEEE 802.3 clause 22 registers and the Marvell 88E1011's own)
PHY_ADDRESS = 1
BMCR, BMSR, PHYID1, PHYID2, ANAR, ANLPAR, ANER, CTRL1000, STAT1000 = 0, 1, 2, 3, 4, 5, 6, 9, 10
M88_SPEC_CTRL, M88_SPEC_STATUS, M88_EXT_SPEC_CTRL, M88_RX_ERR_CNTR = 0x10, 0x11, 0x14, 0x15
BMCR_SPEED1000, BMCR_FD, BMCR_ANRESTART, BMCR_AUTOEN = 0x0040, 0x0100, 0x0200, 0x1000
BMCR_LOOPBACK, BMCR_RESET = 0x4000, 0x8000
BMSR_LINK_ST, BMSR_AN_COMP = 0x0004, 0x0020
ANLPAR_ACK = 0x4000
PHY_READABLE = frozenset({BMCR, BMSR, PHYID1, PHYID2, ANAR, ANLPAR, ANER, CTRL1000, STAT1000,
                          M88_SPEC_CTRL, M88_SPEC_STATUS, M88_EXT_SPEC_CTRL, M88_RX_ERR_CNTR})
PHY_WRITABLE = frozenset({BMCR, ANAR, CTRL1000, M88_SPEC_CTRL, M88_EXT_SPEC_CTRL})
PHY_RESET = {
    BMCR: BMCR_SPEED1000 | BMCR_FD | BMCR_AUTOEN,
    # extended capability, link up, autonegotiation able (not yet complete), preamble
    # suppression, extended status, 10/100 half and full duplex
    BMSR: 0x794D,
    PHYID1: 0x0141, PHYID2: 0x0C20,
    ANAR: 0x0DE1,           # 802.3, 10/100 half and full, pause, asymmetric pause
    ANLPAR: 0x01E0,         # the partner: 10/100 half and full
    CTRL1000: 0x0E00,       # 1000BASE-T half and full, multi-port, master
    STAT1000: 0x3C00,       # partner 1000BASE-T half and full, local and remote receiver OK
    M88_SPEC_CTRL: 0x0360,
    M88_SPEC_STATUS: 0xAC00,  # 1000 Mb/s, full duplex, resolved, link
    M88_EXT_SPEC_CTRL: 0x0D60,
}
AUTONEG_TICKS = 500_000_000 // NS_PER_TICK     # 500 ms, QEMU's autonegotiation time

MIT_UNIT_NS = 256
MIT_FLOOR = 500                 # QEMU's minimum mitigation window, in 256 ns units
TX_BUFFER = 0x10000             # the packet being assembled (QEMU's limit)
TX_BUDGET_FRAMES = 16384
TX_BUDGET_BYTES = 32 << 20
TX_RESUME_TICKS = 1_000_000 // NS_PER_TICK      # 1 ms
MAX_SHORT_FRAME = 1518          # header, VLAN tag, 1500-byte payload (without FCS)
MAX_LONG_FRAME = 16384 - 4

U32 = 0xFFFF_FFFF

# Registers that are plain storage (offset -> writable bits); the ones with behaviour are
# in _READS/_WRITES below and keep their value in the same array.
_STORAGE: dict[int, int] = {
    CTRL: U32, EERD: U32, CTRL_EXT: U32 & ~CTRL_EXT_EE_RST, MDIC: U32,
    FCAL: U32, FCAH: 0xFFFF, FCT: 0xFFFF, VET: 0xFFFF, FCTTV: 0xFFFF, TXCW: U32,
    ITR: 0xFFFF, IMS: U32, ICS: U32, ICR: U32, RCTL: U32, TCTL: U32, TIPG: 0x3FFF_FFFF, AIT: 0xFFFF,
    LEDCTL: U32, PBA: U32, FCRTL: 0x8000_FFF8, FCRTH: 0xFFF8,
    RDBAL: 0xFFFF_FFF0, RDBAH: U32, RDLEN: 0xFFF80, RDH: 0xFFFF, RDT: 0xFFFF, RDTR: 0xFFFF,
    RXDCTL: U32, RADV: 0xFFFF, RSRPD: 0xFFF,
    RDFH: 0x1FFF, RDFT: 0x1FFF, RDFHS: 0x1FFF, RDFTS: 0x1FFF, RDFPC: 0x1FFF,
    TXDMAC: 0x1, TDFH: 0x7FF, TDFT: 0x7FF, TDFHS: 0x1FFF, TDFTS: 0x1FFF, TDFPC: 0x1FFF,
    TDBAL: 0xFFFF_FFF0, TDBAH: U32, TDLEN: 0xFFF80, TDH: 0xFFFF, TDT: 0xFFFF, TIDV: 0xFFFF,
    TXDCTL: U32, TADV: 0xFFFF, TSPMT: U32,
    RXCSUM: 0x3FF, WUC: 0xF, WUFC: 0xF00FF, WUS: 0xF00FF, MANC: U32, IPAV: 0x10001, WUPL: 0xFFF,
    STATUS: 0,
}
for _i in range(128):
    _STORAGE[MTA + 4 * _i] = U32
    _STORAGE[VFTA + 4 * _i] = U32
    _STORAGE[FFMT + 8 * _i] = 0xF
    _STORAGE[FFVT + 8 * _i] = 0xFF
for _i in range(16):
    _STORAGE[RA + 8 * _i] = U32
    _STORAGE[RA + 8 * _i + 4] = RAH_AV | 0x3_FFFF
for _i in range(7):
    _STORAGE[IP4AT + 8 * _i] = U32
for _i in range(4):
    _STORAGE[IP6AT + 4 * _i] = U32
    _STORAGE[FFLT + 8 * _i] = 0x7FF
for _i in range(32):
    _STORAGE[WUPM + 4 * _i] = U32
STATS = frozenset(o for o in range(STATS_FIRST, STATS_LAST + 4, 4) if o not in STATS_GAPS)
_KEPT = frozenset(_STORAGE) | STATS       # offsets whose value the device keeps (and saves)
# bits a saved value may have: what software may write, and what the device sets itself
_LOADABLE = {**{off: U32 for off in STATS}, **_STORAGE, STATUS: U32}

# power-on values (QEMU's, which show the state after the EEPROM load and a link up)
_RESET_VALUES = {
    CTRL: CTRL_SWDPIN2 | CTRL_SWDPIN0 | CTRL_SPD_1000 | CTRL_SLU,
    STATUS: 0x8000_0000 | ST_GIO_MASTER | ST_ASDV | ST_MTXCKOK | ST_SPEED_1000 | ST_FD | ST_LU,
    LEDCTL: 0x0000_0602, PBA: 0x0010_0030, VET: 0x8100,
}

# EEPROM words besides the MAC address and the checksum (SDM "EEPROM Address Map"), as
# QEMU presents them: compatibility, PBA number, initialization control words, identifiers
_EEPROM_WORDS = {
    0x03: 0x0000, 0x05: 0x0000, 0x06: 0x0000, 0x07: 0x0000, 0x08: 0x3000, 0x09: 0x1000,
    0x0A: 0x6403, 0x0B: DEVICE_82540EM, 0x0C: pci.VENDOR_INTEL, 0x0D: DEVICE_82540EM, 0x0E: pci.VENDOR_INTEL,
    0x0F: 0x3040,
}


def eeprom_image(mac: bytes) -> list[int]:
    """The 64 EEPROM words for a NIC with address ``mac`` (words 0-63 sum to BABAh)."""
    words = [0xFFFF] * EEPROM_WORDS
    for i in range(3):
        words[i] = mac[2 * i] | mac[2 * i + 1] << 8
    for w, v in _EEPROM_WORDS.items():
        words[w] = v
    words[EEPROM_CHECKSUM_WORD] = (EEPROM_SUM - sum(words[:EEPROM_CHECKSUM_WORD])) & 0xFFFF
    return words


class TxContext:
    """The offload parameters of a TCP/IP context descriptor (SDM "TCP/IP Context Descriptor")."""

    __slots__ = ("hdr_len", "ip", "ipcse", "ipcso", "ipcss", "mss", "paylen", "tcp", "tse", "tucse", "tucso",
                 "tucss")
    FIELDS = ("ipcss", "ipcso", "ipcse", "tucss", "tucso", "tucse", "paylen", "hdr_len", "mss", "ip", "tcp", "tse")
    LIMITS = (0xFF, 0xFF, 0xFFFF, 0xFF, 0xFF, 0xFFFF, 0xFFFFF, 0xFF, 0xFFFF, 1, 1, 1)

    def __init__(self, values: list[int] | None = None) -> None:
        for f, v in zip(self.FIELDS, values or [0] * len(self.FIELDS)):
            setattr(self, f, v)

    @classmethod
    def from_descriptor(cls, desc: bytes) -> TxContext:
        ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd, _status, hdr_len, mss = struct.unpack("<BBHBBHIBBH", desc)
        return cls([ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd & 0xFFFFF, hdr_len, mss,
                    int(bool(cmd & TXD_CMD_IP)), int(bool(cmd & TXD_CMD_TCP)), int(bool(cmd & TXD_CMD_TSE))])

    def values(self) -> list[int]:
        return [getattr(self, f) for f in self.FIELDS]


class E1000IoWindow:
    """BAR 1: IOADDR at offset 0, IODATA at offset 4 (the rest of the 64 bytes reads 0)."""

    io_sizes = (1, 2, 4)

    def __init__(self, nic: E1000) -> None:
        self.nic = nic
        self.name = f"{nic.name}.io"

    def io_read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if offset + size <= 4:
            return (self.nic.ioaddr >> (8 * offset)) & mask
        if 4 <= offset and offset + size <= 8:
            return self.nic.mmio_read((self.nic.ioaddr & ~3) + offset - 4, size) & mask
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset + size <= 4:
            shift = 8 * offset
            keep = self.nic.ioaddr & ~(((1 << (8 * size)) - 1) << shift)
            self.nic.ioaddr = (keep | value << shift) & (MMIO_SIZE - 1)
        elif 4 <= offset and offset + size <= 8:
            self.nic.mmio_write((self.nic.ioaddr & ~3) + offset - 4, size, value)


class E1000(PciFunction):
    """An 82540EM: build it with the machine's clock, a ``Dma`` view and its buses, give it a
    wire (``send(frame)``), and hand it received frames with ``deliver``."""

    kind = "e1000"
    VERSION = 1
    mmio_sizes = (1, 2, 4)

    def __init__(self, clock: Any, dma: Any, wire: Any = None, mac: bytes | str = DEFAULT_MAC, *,
                 io_bus: Any, mmio_bus: Any, name: str = "e1000") -> None:
        super().__init__(name=name, vendor_id=pci.VENDOR_INTEL, device_id=DEVICE_82540EM, class_code=CLASS_ETHERNET,
                         revision=REVISION, subsystem_vendor_id=pci.QEMU_SUBSYSTEM_VENDOR_ID,
                         subsystem_id=pci.QEMU_SUBSYSTEM_ID, interrupt_pin=1, io_bus=io_bus, mmio_bus=mmio_bus)
        self.clock = clock
        self.dma = dma
        self.wire = wire
        self.mac_address = parse_mac(mac)
        self.eeprom = eeprom_image(self.mac_address)
        self.io_window = E1000IoWindow(self)
        self.add_bar(0, MMIO_SIZE, self)
        self.add_bar(1, IO_SIZE, self.io_window, io=True)
        self.on_rx_ready: Callable[[], None] | None = None   # told when RDT gives the receiver room
        self.dma_errors = 0          # transfers refused by the DMA view (each also a master abort)
        self.tx_dropped = 0          # packets dropped because a buffer could not be read
        self._mit_timer = None
        self._autoneg_timer = None
        self._tx_timer = None
        self._tx_busy = False
        self._power_on()

    # -- state that is not the configuration space ----------------------------------------------
    def _power_on(self) -> None:
        self.phy = [0] * 32
        for r, v in PHY_RESET.items():
            self.phy[r] = v
        self.ioaddr = 0
        self._mac_reset()

    def _mac_reset(self) -> None:
        """Every MAC register to its power-on value, the EEPROM's address in RA[0] (CTRL.RST)."""
        self.regs = [0] * (MMIO_SIZE // 4)
        for off, v in _RESET_VALUES.items():
            self.regs[off >> 2] = v
        ra = self.eeprom[0] | self.eeprom[1] << 16
        self.regs[RA >> 2] = ra
        self.regs[(RA + 4) >> 2] = self.eeprom[2] | RAH_AV
        if not self.phy[BMSR] & BMSR_LINK_ST:
            self.regs[STATUS >> 2] &= ~ST_LU
        # EEPROM interface: CS, SK, DI, FWE and REQ as last written, the shift state
        self.ee_lines = 0
        self.ee_in = 0
        self.ee_bits = 0
        self.ee_out = 0
        self.ee_reading = False
        # interrupt mitigation (QEMU's model: see the module doc)
        self.mit_level = False
        self.mit_ide = False
        self._cancel("_mit_timer")
        self._cancel("_tx_timer")
        # the packet being assembled by the transmitter
        self.tx_data = bytearray()
        self.tx_header = b""
        self.tx_sum_needed = 0
        self.tx_cptse = False
        self.tx_vlan = b""
        self.tx_error = False
        self.tx_props = TxContext()
        self.tx_tso = TxContext()
        self.tx_tso_frames = 0
        self._budget_frames = TX_BUDGET_FRAMES
        self._budget_bytes = TX_BUDGET_BYTES
        self.set_irq(False)

    def _cancel(self, attr: str) -> None:
        t = getattr(self, attr, None)
        if t is not None:
            t.cancel()
        setattr(self, attr, None)

    def reset(self) -> None:
        """PCI RST#: configuration space, MAC and PHY to power-on values; autonegotiation idle."""
        self._cancel("_autoneg_timer")
        super().reset()
        self._power_on()

    # -- register access -------------------------------------------------------------------------
    def reg(self, offset: int) -> int:
        """A register's stored value, without the side effects of a guest read."""
        return self.regs[offset >> 2]

    def mmio_read(self, offset: int, size: int) -> int:
        off = offset & ~3
        if not 0 <= off < MMIO_SIZE:
            return 0
        handler = _READS.get(off)
        if handler is not None:
            v = handler(self, off)
        elif off in _KEPT:
            v = self.regs[off >> 2]
        else:
            v = 0
        if size == 4:
            return v
        return (v >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        off = offset & ~3
        if not 0 <= off < MMIO_SIZE:
            return
        if size != 4:
            shift = 8 * (offset & 3)
            mask = ((1 << (8 * size)) - 1) << shift
            value = (value << shift) & mask
            if off not in _WRITE_ONES:
                # the other bytes keep what the register holds (byte enables)
                value |= self.regs[off >> 2] & ~mask & U32
        handler = _WRITES.get(off)
        if handler is not None:
            handler(self, off, value & U32)
        elif off in _STORAGE:
            self.regs[off >> 2] = value & _STORAGE[off]

    def _store(self, off: int, value: int) -> None:
        self.regs[off >> 2] = value & _STORAGE[off]

    # CTRL
    def _write_ctrl(self, off: int, value: int) -> None:
        if value & CTRL_RST:
            self._mac_reset()
            return
        self.regs[CTRL >> 2] = value & ~(CTRL_RST | CTRL_PHY_RST)

    # EEPROM (Microwire) and EERD
    def _read_eecd(self, off: int) -> int:
        v = EECD_PRES | EECD_GNT | self.ee_lines
        if not self.ee_reading:
            return v | EECD_DO
        word = self.eeprom[(self.ee_out >> 4) & (EEPROM_WORDS - 1)]
        return v | (EECD_DO if word >> (15 - (self.ee_out & 15)) & 1 else 0)

    def _write_eecd(self, off: int, value: int) -> None:
        old = self.ee_lines
        self.ee_lines = value & (EECD_SK | EECD_CS | EECD_DI | EECD_FWE | EECD_REQ)
        if not value & EECD_CS:
            return
        if (value ^ old) & EECD_CS:          # chip select rises: a new command
            self.ee_in = self.ee_bits = self.ee_out = 0
            self.ee_reading = False
        if not (value ^ old) & EECD_SK:
            return
        if not value & EECD_SK:              # falling clock: the next data bit
            self.ee_out = (self.ee_out + 1) & 0xFFFF
            return
        self.ee_in = ((self.ee_in << 1) | (1 if value & EECD_DI else 0)) & 0x1FF
        if self.ee_bits < 9:
            self.ee_bits += 1
            if self.ee_bits == 9:            # start bit + opcode + six address bits
                self.ee_out = (((self.ee_in & 0x3F) << 4) - 1) & 0xFFFF
                self.ee_reading = (self.ee_in >> 6) & 7 == MICROWIRE_READ

    def _read_eerd(self, off: int) -> int:
        v = self.regs[EERD >> 2]
        if not v & EERD_START:
            return v
        addr = (v >> 8) & 0xFF
        low = v & 0xFF00 | EERD_DONE
        if addr >= EEPROM_WORDS:
            return low
        return self.eeprom[addr] << 16 | low

    # MDIC and the PHY
    def _write_mdic(self, off: int, value: int) -> None:
        reg = (value >> 16) & 0x1F
        data = value & MDIC_DATA
        if (value >> 21) & 0x1F != PHY_ADDRESS:
            value = self.regs[MDIC >> 2] | MDIC_ERROR
        elif value & MDIC_OP_READ:
            if reg in PHY_READABLE:
                value = (value & ~MDIC_DATA) | self.phy[reg]
            else:
                value |= MDIC_ERROR
        elif value & MDIC_OP_WRITE:
            if reg in PHY_WRITABLE:
                self._phy_write(reg, data)
            else:
                value |= MDIC_ERROR
        self.regs[MDIC >> 2] = (value | MDIC_READY) & U32
        if value & MDIC_INT_EN:
            self._set_ics(ICR_MDAC)

    def _phy_write(self, reg: int, data: int) -> None:
        if reg != BMCR:
            self.phy[reg] = data
            return
        # reset and restart are self-clearing; bits 5:0 are reserved (as QEMU keeps them)
        self.phy[BMCR] = data & ~(0x3F | BMCR_RESET | BMCR_ANRESTART)
        if data & BMCR_ANRESTART and self.phy[BMCR] & BMCR_AUTOEN:
            self._link_down()
            self._cancel("_autoneg_timer")
            self._autoneg_timer = self.clock.schedule_in(AUTONEG_TICKS, self._autoneg_done,
                                                         f"{self.name}.autoneg")

    def _link_down(self) -> None:
        self.regs[STATUS >> 2] &= ~ST_LU
        self.phy[BMSR] &= ~(BMSR_LINK_ST | BMSR_AN_COMP)
        self.phy[ANLPAR] &= ~ANLPAR_ACK

    def _autoneg_done(self, now: int) -> None:
        self._autoneg_timer = None
        self.regs[STATUS >> 2] |= ST_LU
        self.phy[BMSR] |= BMSR_LINK_ST | BMSR_AN_COMP
        self.phy[ANLPAR] |= ANLPAR_ACK
        self._set_ics(ICR_LSC)
        self._rx_ready_changed()

    @property
    def link_up(self) -> bool:
        return bool(self.regs[STATUS >> 2] & ST_LU)

    # interrupts
    def _read_icr(self, off: int) -> int:
        v = self.regs[ICR >> 2]
        self._set_cause(0)
        return v

    def _read_ics(self, off: int) -> int:
        return self.regs[ICR >> 2]

    def _write_icr(self, off: int, value: int) -> None:
        self._set_cause(self.regs[ICR >> 2] & ~value)

    def _write_ics(self, off: int, value: int) -> None:
        self._set_ics(value)

    def _write_ims(self, off: int, value: int) -> None:
        self.regs[IMS >> 2] |= value
        self._set_ics(0)

    def _write_imc(self, off: int, value: int) -> None:
        self.regs[IMS >> 2] &= ~value
        self._set_ics(0)

    def _set_ics(self, causes: int) -> None:
        self._set_cause(self.regs[ICR >> 2] | causes)

    def _set_cause(self, icr: int) -> None:
        """ICR takes ``icr``; INTA# follows ICR & IMS through the mitigation window (module doc)."""
        icr &= U32
        self.regs[ICR >> 2] = icr
        self.regs[ICS >> 2] = icr
        pending = icr & self.regs[IMS >> 2]
        if pending and not self.mit_level:
            if self._mit_timer is not None:
                return                     # a rising edge inside the window waits for its end
            delay = 0

            def shorter(units: int) -> None:
                nonlocal delay
                if units and (delay == 0 or units < delay):
                    delay = units
            if self.mit_ide and pending & (ICR_TXQE | ICR_TXDW):
                shorter(self.regs[TADV >> 2] * 4)
            if self.regs[RDTR >> 2] and pending & ICR_RXT0:
                shorter(self.regs[RADV >> 2] * 4)
            shorter(self.regs[ITR >> 2])
            delay = max(delay, MIT_FLOOR)
            ticks = delay * MIT_UNIT_NS // NS_PER_TICK
            self._mit_timer = self.clock.schedule_in(ticks, self._mit_end, f"{self.name}.mit")
            self.mit_ide = False
        self.mit_level = pending != 0
        self.set_irq(self.mit_level)

    def _mit_end(self, now: int) -> None:
        self._mit_timer = None
        self._set_cause(self.regs[ICR >> 2])

    # receive control and ring registers
    def _write_rdt(self, off: int, value: int) -> None:
        self.regs[RDT >> 2] = value & 0xFFFF
        self._rx_ready_changed()

    def _write_rctl(self, off: int, value: int) -> None:
        self.regs[RCTL >> 2] = value
        self._rx_ready_changed()

    def _rx_ready_changed(self) -> None:
        if self.on_rx_ready is not None and self.can_receive():
            self.on_rx_ready()

    def _write_tctl(self, off: int, value: int) -> None:
        self.regs[off >> 2] = value & _STORAGE[off]
        self._start_xmit()

    # statistics: clear on read; a high half clears its pair
    def _read_stat(self, off: int) -> int:
        v = self.regs[off >> 2]
        self.regs[off >> 2] = 0
        low = HIGH_HALVES.get(off)
        if low is not None:
            self.regs[low >> 2] = 0
        return v

    def _read_low_half(self, off: int) -> int:
        return self.regs[off >> 2]

    def _count(self, off: int, n: int = 1) -> None:
        i = off >> 2
        self.regs[i] = min(self.regs[i] + n, U32)

    def _count64(self, low: int, n: int) -> None:
        i = low >> 2
        v = min((self.regs[i] | self.regs[i + 1] << 32) + n, (1 << 64) - 1)
        self.regs[i] = v & U32
        self.regs[i + 1] = v >> 32

    def _count_size(self, first: int, size: int) -> None:
        """The 64/127/255/511/1023/1522 size bins starting at ``first`` (size includes the FCS)."""
        if size >= 1024:
            self._count(first + 20)
        elif size >= 512:
            self._count(first + 16)
        elif size >= 256:
            self._count(first + 12)
        elif size >= 128:
            self._count(first + 8)
        elif size >= 65:
            self._count(first + 4)
        elif size == 64:
            self._count(first)

    def _master_abort(self) -> None:
        """A DMA the machine refused: PCI status "received master abort" (W1C), and count it."""
        self.dma_errors += 1
        self.config[pci.STATUS + 1] |= PCI_ST_RECEIVED_MASTER_ABORT >> 8

    # -- transmit (SDM "Transmit Descriptors", "TCP Segmentation") -----------------------------
    def _bus_master(self) -> bool:
        return bool(self.command & pci.CMD_MASTER)

    def _start_xmit(self, now: int | None = None) -> None:
        if now is not None:
            self._tx_timer = None
        if not self.regs[TCTL >> 2] & TCTL_EN or not self._bus_master() or self._tx_busy:
            return
        if self._tx_timer is not None:
            return                      # yielded: the timer resumes in order
        self._tx_busy = True
        try:
            cause = ICR_TXQE
            regs = self.regs
            ring = regs[TDLEN >> 2] // 16
            base = (regs[TDBAH >> 2] << 32) | regs[TDBAL >> 2]
            start = regs[TDH >> 2]
            self._budget_frames = TX_BUDGET_FRAMES
            self._budget_bytes = TX_BUDGET_BYTES
            while regs[TDH >> 2] != regs[TDT >> 2]:
                at = base + 16 * regs[TDH >> 2]
                try:
                    desc = self.dma.read(at, 16)
                except DmaError:
                    self._master_abort()
                    break
                cause |= self._tx_descriptor(desc, at)
                head = regs[TDH >> 2] + 1
                regs[TDH >> 2] = 0 if head * 16 >= regs[TDLEN >> 2] else head
                # one trip round the ring per doorbell (QEMU): a tail outside the ring or a head
                # started outside it cannot make the loop go on
                if regs[TDH >> 2] == start or start >= ring:
                    break
                if (self._budget_frames <= 0 or self._budget_bytes <= 0) and regs[TDH >> 2] != regs[TDT >> 2]:
                    self._tx_timer = self.clock.schedule_in(TX_RESUME_TICKS, self._start_xmit, f"{self.name}.tx")
                    break
        finally:
            self._tx_busy = False
        self._set_ics(cause)

    def _tx_descriptor(self, desc: bytes, at: int) -> int:
        addr, lower, upper = struct.unpack("<QII", desc)
        dtype = lower & (TXD_CMD_DEXT | TXD_DTYP_D)
        if lower & TXD_CMD_IDE:
            self.mit_ide = True
        if dtype == TXD_CMD_DEXT:                       # context descriptor
            ctx = TxContext.from_descriptor(desc)
            if ctx.tse:
                self.tx_tso = ctx
                self.tx_tso_frames = 0
            else:
                self.tx_props = ctx
            return self._tx_writeback(lower, upper, at)
        if dtype == TXD_CMD_DEXT | TXD_DTYP_D:          # data descriptor
            if not self.tx_data:
                self.tx_sum_needed = (upper >> 8) & 0xFF
            self.tx_cptse = bool(lower & TXD_CMD_TSE)
        else:                                           # legacy descriptor
            self.tx_cptse = False
        if self.regs[CTRL >> 2] & CTRL_VME and lower & TXD_CMD_VLE and (self.tx_cptse or lower & TXD_CMD_EOP):
            self.tx_vlan = struct.pack(">HH", self.regs[VET >> 2] & 0xFFFF, upper >> 16)
        length = lower & 0xFFFF
        if self.tx_cptse:
            tso = self.tx_tso
            msh = tso.hdr_len + tso.mss
            while True:
                if len(self.tx_data) >= msh:
                    break
                n = min(length, msh - len(self.tx_data), TX_BUFFER - len(self.tx_data))
                had = len(self.tx_data)
                self._tx_fetch(addr, n)
                addr += n
                if had < tso.hdr_len <= len(self.tx_data):
                    self.tx_header = bytes(self.tx_data[:tso.hdr_len])
                if len(self.tx_data) == msh:
                    self._xmit_segment()
                    self.tx_data = bytearray(self.tx_header)
                length -= n
                if not n or not length:
                    break
        else:
            self._tx_fetch(addr, min(length, TX_BUFFER - len(self.tx_data)))
        if lower & TXD_CMD_EOP:
            # TSO: the rest after the last full segment, if there is any (QEMU also sends a
            # header-only segment when the payload is a multiple of the MSS; no driver needs it)
            if not self.tx_cptse or len(self.tx_data) > self.tx_tso.hdr_len \
                    or (len(self.tx_data) == self.tx_tso.hdr_len and not self.tx_tso_frames):
                self._xmit_segment()
            self.tx_data = bytearray()
            self.tx_tso_frames = 0
            self.tx_sum_needed = 0
            self.tx_vlan = b""
            self.tx_cptse = False
            self.tx_error = False
        return self._tx_writeback(lower, upper, at)

    def _tx_fetch(self, addr: int, n: int) -> None:
        if n <= 0:
            return
        try:
            self.tx_data += self.dma.read(addr, n)
        except DmaError:
            self._master_abort()
            self.tx_error = True
            self.tx_data += bytes(n)     # keep the offsets of what follows; the packet is dropped

    def _tx_writeback(self, lower: int, upper: int, at: int) -> int:
        if not lower & (TXD_CMD_RS | TXD_CMD_RPS):
            return 0
        upper = (upper | TXD_STAT_DD) & ~(TXD_STAT_EC | TXD_STAT_LC | TXD_STAT_TU)
        try:
            self.dma.write_u32(at + 12, upper & U32)
        except DmaError:
            self._master_abort()
        return ICR_TXDW

    def _xmit_segment(self) -> None:
        """Send what the transmitter holds, with the offloads asked for (QEMU's ``xmit_seg``)."""
        data = self.tx_data
        size = len(data)
        props = self.tx_tso if self.tx_cptse else self.tx_props
        if self.tx_cptse:
            css = props.ipcss
            if props.ip:
                _put16(data, css + 2, size - css)                                  # total length
                _put16(data, css + 4, _get16(data, css + 4) + self.tx_tso_frames)   # identification
            else:
                _put16(data, css + 4, size - css)                                  # IPv6 payload length
            css = props.tucss
            length = size - css
            if props.tcp:
                sofar = self.tx_tso_frames * props.mss
                _put32(data, css + 4, _get32(data, css + 4) + sofar)               # sequence number
                if props.paylen - sofar > props.mss:
                    if css + 13 < size:
                        data[css + 13] &= ~0x09                                    # PSH and FIN: last only
                elif self.tx_tso_frames:
                    self._count(TSCTC)
            else:
                _put16(data, css + 4, length)                                      # UDP length
            if self.tx_sum_needed & TXD_POPTS_TXSM:
                _put16(data, props.tucso, _fold(_get16(data, props.tucso) + length))   # pseudo-header length
            self.tx_tso_frames += 1
        if self.tx_sum_needed & TXD_POPTS_TXSM:
            _putsum(data, props.tucso, props.tucss, props.tucse)
        if self.tx_sum_needed & TXD_POPTS_IXSM:
            _putsum(data, props.ipcso, props.ipcss, props.ipcse)
        if self.tx_error:
            self.tx_dropped += 1
            return
        frame = bytes(data[:12]) + self.tx_vlan + bytes(data[12:]) if self.tx_vlan else bytes(data)
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        if not frame:
            return                       # nothing to put on the wire
        if len(frame) < ETH_ZLEN and self.regs[TCTL >> 2] & TCTL_PSP:
            frame += bytes(ETH_ZLEN - len(frame))
        self._budget_frames -= 1
        self._budget_bytes -= len(frame)
        if frame[0] & 1:
            self._count(BPTC if frame[:6] == b"\xff" * 6 else MPTC)
        self._count_size(PTC64, len(frame) + 4)
        self._count(TPT)
        self._count(GPTC)
        self._count64(TOTL, len(frame) + 4)
        self._count64(GOTCL, len(frame) + 4)
        if self.phy[BMCR] & BMCR_LOOPBACK:
            self._receive(frame)
        elif self.wire is not None:
            self.wire.send(frame)

    # -- receive (SDM "Receive Descriptor Format", "Receive Address Filtering") -----------------
    def _rx_enabled(self) -> bool:
        regs = self.regs
        return bool(regs[STATUS >> 2] & ST_LU and regs[RCTL >> 2] & RCTL_EN) and self._bus_master()

    def can_receive(self, size: int = 0) -> bool:
        """Would a frame find a descriptor now (link up, receiver on, head != tail)?  ``size`` is
        not looked at: a frame that needs more descriptors than are free is an overrun (RXO)."""
        return self._rx_enabled() and self.regs[RDH >> 2] != self.regs[RDT >> 2]

    def rx_buffer_size(self) -> int:
        rctl = self.regs[RCTL >> 2]
        bsize = (rctl >> RCTL_BSIZE_SHIFT) & 3
        if rctl & RCTL_BSEX:
            return (2048, 16384, 8192, 4096)[bsize]
        return (2048, 1024, 512, 256)[bsize]

    def _rx_has_buffers(self, total: int, bufsize: int) -> bool:
        regs = self.regs
        head, tail = regs[RDH >> 2], regs[RDT >> 2]
        if total <= bufsize:
            return head != tail
        if head < tail:
            n = tail - head
        elif head > tail:
            n = regs[RDLEN >> 2] // 16 + tail - head
        else:
            return False
        return total <= n * bufsize

    def deliver(self, frame: bytes) -> None:
        """A frame from the wire (destination address first, no FCS)."""
        self._receive(bytes(frame))

    def _accepts(self, dest: bytes) -> bool:
        regs = self.regs
        rctl = regs[RCTL >> 2]
        if dest == b"\xff" * 6:
            if rctl & RCTL_BAM:
                return True
        elif dest[0] & 1:
            if rctl & RCTL_MPE:
                return True
        elif rctl & RCTL_UPE:
            return True
        lo = int.from_bytes(dest[:4], "little")
        hi = dest[4] | dest[5] << 8
        for i in range(RA >> 2, (RA >> 2) + 32, 2):
            if regs[i + 1] & RAH_AV and regs[i] == lo and regs[i + 1] & 0xFFFF == hi:
                return True
        shift = (4, 3, 2, 0)[(rctl >> RCTL_MO_SHIFT) & 3]
        bit = ((dest[5] << 8 | dest[4]) >> shift) & 0xFFF
        return bool(regs[(MTA >> 2) + (bit >> 5)] >> (bit & 31) & 1)

    def _receive(self, frame: bytes) -> bool:
        regs = self.regs
        if not self._rx_enabled():
            return False
        if len(frame) < ETH_HEADER:
            self._count(RUC)                 # a runt: not even an Ethernet header
            return False
        if len(frame) > MAX_FRAME:
            self._count(ROC)
            return False
        if len(frame) < ETH_ZLEN:
            frame += bytes(ETH_ZLEN - len(frame))
        rctl = regs[RCTL >> 2]
        size = len(frame)
        if (size > MAX_LONG_FRAME or size > MAX_SHORT_FRAME and not rctl & RCTL_LPE) and not rctl & RCTL_SBP:
            self._count(ROC)
            return False
        vet = regs[VET >> 2] & 0xFFFF
        tagged = _get16(frame, 12) == vet
        if tagged and rctl & RCTL_VFE:
            vid = _get16(frame, 14) & 0xFFF
            if not regs[(VFTA >> 2) + (vid >> 5)] >> (vid & 31) & 1:
                return False
        if not self._accepts(frame[:6]):
            return False
        special = 0
        status = 0
        if tagged and regs[CTRL >> 2] & CTRL_VME:
            special = _get16(frame, 14)
            frame = frame[:12] + frame[16:]
            status |= RXD_STAT_VP
            size -= 4
        csum_status, csum_errors = self._rx_checksum(frame)
        payload = frame if rctl & RCTL_SECRC else frame + zlib.crc32(frame).to_bytes(4, "little")
        total = len(payload)
        bufsize = self.rx_buffer_size()
        if not self._rx_has_buffers(total, bufsize):
            self._overrun()
            return False
        base = regs[RDBAH >> 2] << 32 | regs[RDBAL >> 2]
        ring = regs[RDLEN >> 2] // 16
        start = regs[RDH >> 2]
        offset = 0
        first = True
        while True:
            if regs[RDH >> 2] == regs[RDT >> 2] and not first:
                self._overrun()              # only descriptors between head and tail are the device's
                return False
            first = False
            at = base + 16 * regs[RDH >> 2]
            try:
                buffer = int.from_bytes(self.dma.read(at, 8), "little")
            except DmaError:
                self._master_abort()
                self._overrun()
                return False
            length = errors = 0
            st = status
            if buffer:
                n = min(bufsize, total - offset)
                try:
                    self.dma.write(buffer, payload[offset:offset + n])
                except DmaError:
                    self._master_abort()
                    errors |= RXD_ERR_RXE
                offset += n
                length = n
                if offset >= total:
                    st |= RXD_STAT_EOP | csum_status
                    errors |= csum_errors
            # a descriptor without a buffer is skipped (SDM), handed back with DD and no data
            try:
                self.dma.write(at + 8, struct.pack("<HHBBH", length, 0, st | RXD_STAT_DD, errors, special))
            except DmaError:
                self._master_abort()
            head = regs[RDH >> 2] + 1
            regs[RDH >> 2] = 0 if head * 16 >= regs[RDLEN >> 2] else head
            if regs[RDH >> 2] == start or start >= ring:
                self._overrun()
                return False
            if offset >= total:
                break
        self._count_size(PRC64, total)
        self._count(TPR)
        self._count(GPRC)
        self._count64(TORL, size + 4)
        self._count64(GORCL, size + 4)
        if frame[0] & 1:
            self._count(BPRC if frame[:6] == b"\xff" * 6 else MPRC)
        causes = ICR_RXT0
        tail = regs[RDT >> 2]
        head = regs[RDH >> 2]
        if tail < head:
            tail += ring
        min_shift = ((rctl >> RCTL_RDMTS_SHIFT) & 3) + 1
        if (tail - head) * 16 <= regs[RDLEN >> 2] >> min_shift:
            causes |= ICR_RXDMT0
        self._set_ics(causes)
        return True

    def _overrun(self) -> None:
        self._count(RNBC)
        self._count(MPC)
        self._set_ics(ICR_RXO)

    def _rx_checksum(self, frame: bytes) -> tuple[int, int]:
        """(status, errors) of receive checksum offload for this frame (VLAN tag already removed)."""
        rxcsum = self.regs[RXCSUM >> 2]
        if not rxcsum & (RXCSUM_IPOFL | RXCSUM_TUOFL):
            return RXD_STAT_IXSM, 0
        if _get16(frame, 12) != 0x0800 or len(frame) < ETH_HEADER + 20:
            return 0, 0
        ip = ETH_HEADER
        ihl = (frame[ip] & 0x0F) * 4
        total = _get16(frame, ip + 2)
        if frame[ip] >> 4 != 4 or ihl < 20 or total < ihl or ip + total > len(frame):
            return 0, 0
        status = errors = 0
        if rxcsum & RXCSUM_IPOFL:
            status |= RXD_STAT_IPCS
            if ones_sum(frame[ip:ip + ihl]) != 0xFFFF:
                errors |= RXD_ERR_IPE
        proto = frame[ip + 9]
        fragment = _get16(frame, ip + 6) & 0x3FFF
        if rxcsum & RXCSUM_TUOFL and proto in (6, 17) and not fragment:
            l4 = frame[ip + ihl:ip + total]
            if proto == 17 and len(l4) >= 8 and _get16(l4, 6) == 0:
                return status | RXD_STAT_TCPCS, errors          # UDP without a checksum
            if len(l4) >= (20 if proto == 6 else 8):
                status |= RXD_STAT_TCPCS
                pseudo = frame[ip + 12:ip + 20] + bytes((0, proto)) + len(l4).to_bytes(2, "big")
                if _fold(ones_sum(pseudo) + ones_sum(l4)) != 0xFFFF:
                    errors |= RXD_ERR_TCPE
        return status, errors

    # -- state --------------------------------------------------------------------------------------
    def _timer_deadline(self, attr: str) -> int | None:
        t = getattr(self, attr)
        return t.deadline if t is not None and t.active else None

    def save_state(self) -> State:
        state = super().save_state()
        state.update({
            "regs": [[off, self.regs[off >> 2]] for off in sorted(_KEPT) if self.regs[off >> 2]],
            "phy": list(self.phy),
            "eeprom": list(self.eeprom),
            "ioaddr": self.ioaddr,
            "eecd": [self.ee_lines, self.ee_in, self.ee_bits, self.ee_out, self.ee_reading],
            "mit": [self.mit_level, self.mit_ide],
            "timers": {"mit": self._timer_deadline("_mit_timer"),
                       "autoneg": self._timer_deadline("_autoneg_timer"),
                       "tx": self._timer_deadline("_tx_timer")},
            "tx": {"data": bytes(self.tx_data), "header": self.tx_header, "sum_needed": self.tx_sum_needed,
                   "cptse": self.tx_cptse, "vlan": self.tx_vlan, "error": self.tx_error,
                   "props": self.tx_props.values(), "tso": self.tx_tso.values(),
                   "tso_frames": self.tx_tso_frames},
        })
        return state

    def load_state(self, state: State) -> None:
        check_state(state, self.kind, self.VERSION)
        pci = self.parse_pci_state(state)
        parsed = _parse_state(self.kind, state)
        self.apply_pci_state(pci)
        (regs, phy, eeprom, ioaddr, eecd, mit, timers, tx) = parsed
        self.regs = regs
        self.phy = phy
        self.eeprom = eeprom
        self.mac_address = bytes(b for w in eeprom[:3] for b in (w & 0xFF, w >> 8))
        self.ioaddr = ioaddr
        self.ee_lines, self.ee_in, self.ee_bits, self.ee_out, self.ee_reading = eecd
        self.mit_level, self.mit_ide = mit
        (self.tx_data, self.tx_header, self.tx_sum_needed, self.tx_cptse, self.tx_vlan, self.tx_error,
         self.tx_props, self.tx_tso, self.tx_tso_frames) = tx
        for attr in ("_autoneg_timer", "_mit_timer", "_tx_timer"):
            self._cancel(attr)
        if timers["autoneg"] is not None:
            self._autoneg_timer = self.clock.schedule(timers["autoneg"], self._autoneg_done, f"{self.name}.autoneg")
        if timers["mit"] is not None:
            self._mit_timer = self.clock.schedule(timers["mit"], self._mit_end, f"{self.name}.mit")
        if timers["tx"] is not None:
            self._tx_timer = self.clock.schedule(timers["tx"], self._start_xmit, f"{self.name}.tx")


def _get16(b: bytes | bytearray, at: int) -> int:
    return int.from_bytes(b[at:at + 2].ljust(2, b"\0"), "big")


def _put16(b: bytearray, at: int, v: int) -> None:
    if 0 <= at and at + 2 <= len(b):
        b[at:at + 2] = (v & 0xFFFF).to_bytes(2, "big")


def _get32(b: bytes | bytearray, at: int) -> int:
    return int.from_bytes(b[at:at + 4].ljust(4, b"\0"), "big")


def _put32(b: bytearray, at: int, v: int) -> None:
    if 0 <= at and at + 4 <= len(b):
        b[at:at + 4] = (v & U32).to_bytes(4, "big")


def _putsum(data: bytearray, sloc: int, css: int, cse: int) -> None:
    """Store at ``sloc`` the checksum of data[css..cse] (to the end when cse is 0), as QEMU's putsum."""
    n = len(data)
    if cse and cse < n:
        n = cse + 1
    if sloc < n - 1:
        s = ~ones_sum(data[css:n]) & 0xFFFF
        _put16(data, sloc, s or 0xFFFF)


def _is_u32(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U32


def _parse_state(kind: str, state: State) -> tuple:
    """Check every field of an e1000 state (beyond the PCI part); return them ready to apply."""
    def bad(why: str) -> DeviceStateError:
        return DeviceStateError(f"{kind}: {why}")

    def field(name: str) -> Any:
        if name not in state:
            raise bad(f"the state has no {name!r}")
        return state[name]

    raw = field("regs")
    if not isinstance(raw, list):
        raise bad("regs must be a list of [offset, value]")
    regs = [0] * (MMIO_SIZE // 4)
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and _is_u32(item[0]) and item[0] in _KEPT
                and _is_u32(item[1])):
            raise bad(f"bad register entry {item!r}")
        regs[item[0] >> 2] = item[1] & _LOADABLE[item[0]]
    phy = field("phy")
    if not (isinstance(phy, list) and len(phy) == 32 and all(_is_u32(v) and v <= 0xFFFF for v in phy)):
        raise bad("phy must be 32 16-bit registers")
    eeprom = field("eeprom")
    if not (isinstance(eeprom, list) and len(eeprom) == EEPROM_WORDS
            and all(_is_u32(v) and v <= 0xFFFF for v in eeprom)):
        raise bad(f"eeprom must be {EEPROM_WORDS} 16-bit words")
    ioaddr = field("ioaddr")
    if not (_is_u32(ioaddr) and ioaddr < MMIO_SIZE):
        raise bad("ioaddr must be an offset in the register space")
    eecd = field("eecd")
    if not (isinstance(eecd, list) and len(eecd) == 5 and all(_is_u32(v) for v in eecd[:4])
            and isinstance(eecd[4], bool) and eecd[0] <= 0x7F and eecd[1] <= 0x1FF and eecd[2] <= 9
            and eecd[3] <= 0xFFFF):
        raise bad("eecd must be [lines, shift-in, bits, out position, reading]")
    mit = field("mit")
    if not (isinstance(mit, list) and len(mit) == 2 and all(isinstance(v, bool) for v in mit)):
        raise bad("mit must be [irq level, ide seen]")
    timers = field("timers")
    if not (isinstance(timers, dict) and set(timers) == {"mit", "autoneg", "tx"}
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63)
                    for v in timers.values())):
        raise bad("timers must be {'mit', 'autoneg', 'tx'}: deadline or None")
    tx = field("tx")
    keys = {"data", "header", "sum_needed", "cptse", "vlan", "error", "props", "tso", "tso_frames"}
    if not (isinstance(tx, dict) and set(tx) == keys):
        raise bad(f"tx must have the fields {sorted(keys)}")
    if not (isinstance(tx["data"], bytes) and len(tx["data"]) <= TX_BUFFER and isinstance(tx["header"], bytes)
            and len(tx["header"]) <= 0xFF and isinstance(tx["vlan"], bytes) and len(tx["vlan"]) in (0, 4)
            and _is_u32(tx["sum_needed"]) and tx["sum_needed"] <= 0xFF and isinstance(tx["cptse"], bool)
            and isinstance(tx["error"], bool) and _is_u32(tx["tso_frames"])):
        raise bad("malformed transmit state")
    contexts = []
    for key in ("props", "tso"):
        v = tx[key]
        if not (isinstance(v, list) and len(v) == len(TxContext.FIELDS)
                and all(_is_u32(x) and x <= lim for x, lim in zip(v, TxContext.LIMITS))):
            raise bad(f"tx {key} must be a context of {len(TxContext.FIELDS)} fields")
        contexts.append(TxContext(list(v)))
    txs = (bytearray(tx["data"]), tx["header"], tx["sum_needed"], tx["cptse"], tx["vlan"], tx["error"],
           contexts[0], contexts[1], tx["tso_frames"])
    return (regs, list(phy), list(eeprom), ioaddr, [eecd[0], eecd[1], eecd[2], eecd[3], eecd[4]],
            list(mit), dict(timers), txs)


# register behaviour: offset -> handler (registers not listed are storage or unimplemented)
_READS: dict[int, Callable[[E1000, int], int]] = {
    EECD: E1000._read_eecd, EERD: E1000._read_eerd, ICR: E1000._read_icr, ICS: E1000._read_ics,
    IMC: lambda self, off: 0,
}
for _off in STATS:
    _READS[_off] = E1000._read_stat
for _off in HIGH_HALVES.values():
    _READS[_off] = E1000._read_low_half
_WRITES: dict[int, Callable[[E1000, int, int], None]] = {
    CTRL: E1000._write_ctrl, EECD: E1000._write_eecd, MDIC: E1000._write_mdic, ICR: E1000._write_icr,
    ICS: E1000._write_ics, IMS: E1000._write_ims, IMC: E1000._write_imc, RCTL: E1000._write_rctl,
    RDT: E1000._write_rdt, TCTL: E1000._write_tctl, TDT: E1000._write_tctl,
    STATUS: lambda self, off, value: None,
}
for _off in STATS:
    _WRITES[_off] = lambda self, off, value: None      # counters are read-only
# registers where a narrow write sets only its own bytes (the others written as 0, not kept)
_WRITE_ONES = frozenset({ICR, ICS, IMS, IMC})
