"""The APIC bus: how interrupt messages travel between local APICs, and from
I/O APICs (and PCI MSI writes) to local APICs.

On a P6 this was a three-wire serial bus; on a Pentium 4 and later the same
messages travel over the system bus.  Either way what a message means is
defined by the Intel SDM vol. 3A chapter 10 ("Advanced Programmable Interrupt
Controller"; chapter 11 in editions from 2023 on), and that is what is
implemented here, with delivery taking no time:

* 10.6.1 "Interrupt Command Register" and 82093AA "I/O Redirection Table
  Registers": the message fields (vector, delivery mode, destination mode,
  level, trigger mode, destination shorthand, destination);
* 10.6.2.1 "Physical Destination Mode" (an APIC ID; 0xFF broadcasts);
* 10.6.2.2 "Logical Destination Mode" with the flat and cluster models of the
  DFR, each receiver matching the message against its own LDR/DFR; 0xFF is
  a broadcast in either model (QEMU's apic_get_delivery_bitmask does the
  same, and Linux's flat-mode "all CPUs" mask relies on it);
* 10.6.1 destination shorthands: self, all including self, all excluding
  self (the destination field is then ignored);
* 10.6.2.4 "Lowest Priority Delivery Mode": one receiver among the targets,
  the software-enabled one with the lowest arbitration priority (the APR of
  the P6 formula given there), ties going to the lowest APIC ID (then to the
  first attached); focus-processor checking is not modelled (it is absent on Xeon
  processors too), so the choice depends only on the targets' registers and
  is deterministic;
* the other delivery modes (SMI, NMI, INIT, INIT level de-assert, Start-up,
  ExtINT) as the ICR's delivery mode field (10.6.1) describes them: they
  bypass IRR/ISR (10.8.4 note) and go to the receiving CPU's pins; INIT
  level de-assert only re-synchronises the arbitration IDs, which are not
  modelled, so it reaches nobody;
* 10.8.5 "Signaling Interrupt Servicing Completion": a local APIC that EOIs a
  level-triggered vector broadcasts the EOI to every I/O APIC (``eoi``);
* 10.11 "Message Signalled Interrupts": the address/data pair a PCI function
  writes to 0xFEExxxxx, decoded into the same message (``send_msi``).

A local APIC that is globally disabled (APIC base MSR bit 11 clear) is not on
the bus at all: it neither receives nor is counted as a target (10.4.3).  A
software-disabled one (SVR bit 8 clear) still takes NMI, SMI, INIT and SIPI
messages, but drops fixed and lowest-priority ones (10.4.7.2, as KVM does).

The bus holds no state of its own: nothing is ever in flight between two
guest-visible events, so there is nothing to save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Delivery modes, shared by the ICR, the LVT and the redirection table.
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_REMOTE_READ = 3  # 82489DX only; reserved on xAPIC and I/O APIC
DM_NMI = 4
DM_INIT = 5
DM_STARTUP = 6
DM_EXTINT = 7

# Destination shorthands (ICR bits 19:18).
SH_NONE = 0
SH_SELF = 1
SH_ALL = 2
SH_OTHERS = 3

BROADCAST = 0xFF

# DFR model field (bits 31:28): 1111b flat, 0000b cluster.
DFR_FLAT = 0xF
DFR_CLUSTER = 0x0


@dataclass(frozen=True)
class ApicMessage:
    """One interrupt message, as an ICR write or a redirection entry sends it."""

    vector: int
    delivery_mode: int = DM_FIXED
    dest: int = 0
    logical: bool = False
    level_triggered: bool = False
    # The ICR "level" bit: only an INIT with level 0 and the level trigger mode
    # means something different (INIT level de-assert).
    asserted: bool = True
    shorthand: int = SH_NONE

    @property
    def init_deassert(self) -> bool:
        return self.delivery_mode == DM_INIT and not self.asserted and self.level_triggered


class ApicBus:
    """Routes messages to local APICs and EOI broadcasts to I/O APICs.

    Local APICs and I/O APICs join with ``attach_lapic`` / ``attach_ioapic``;
    receivers are visited in the order they joined (the machine attaches them
    by vCPU id), never in hash order.
    """

    def __init__(self) -> None:
        self._lapics: list[Any] = []
        self._ioapics: list[Any] = []
        self.messages = 0  # statistics and tests

    # -- membership -----------------------------------------------------------
    def attach_lapic(self, lapic: Any) -> None:
        if any(x is lapic for x in self._lapics):
            raise ValueError("local APIC attached twice")
        self._lapics.append(lapic)

    def attach_ioapic(self, ioapic: Any) -> None:
        if any(x is ioapic for x in self._ioapics):
            raise ValueError("I/O APIC attached twice")
        self._ioapics.append(ioapic)

    @property
    def lapics(self) -> tuple[Any, ...]:
        return tuple(self._lapics)

    @property
    def ioapics(self) -> tuple[Any, ...]:
        return tuple(self._ioapics)

    # -- addressing (SDM 10.6.2) ----------------------------------------------
    def targets(self, dest: int, logical: bool, shorthand: int = SH_NONE,
                source: Any | None = None) -> list[Any]:
        """The local APICs a message addresses, in attachment order."""
        on_bus = [a for a in self._lapics if a.hw_enabled]
        if shorthand == SH_SELF:
            return [a for a in on_bus if a is source]
        if shorthand == SH_ALL:
            return on_bus
        if shorthand == SH_OTHERS:
            return [a for a in on_bus if a is not source]
        dest &= 0xFF
        if dest == BROADCAST:
            return on_bus
        if not logical:
            return [a for a in on_bus if a.apic_id == dest]
        return [a for a in on_bus if logical_match(dest, a.ldr_id, a.dfr_model)]

    # -- delivery ---------------------------------------------------------------
    def send(self, msg: ApicMessage, source: Any | None = None) -> list[Any]:
        """Deliver ``msg``; returns the local APICs that received it."""
        self.messages += 1
        if msg.init_deassert:
            # Arbitration IDs are not modelled (delivery is instantaneous and
            # lowest-priority ties go by APIC ID), so nothing is left to do.
            return []
        targets = self.targets(msg.dest, msg.logical, msg.shorthand, source)
        mode = msg.delivery_mode
        if mode == DM_LOWEST:
            chosen = lowest_priority(targets)
            targets = [] if chosen is None else [chosen]
            mode = DM_FIXED
        elif mode == DM_REMOTE_READ:
            return []
        for t in targets:
            t.receive(mode, msg.vector, msg.level_triggered)
        return targets

    def eoi(self, vector: int) -> None:
        """A local APIC EOIed a level-triggered ``vector`` (SDM 10.8.5)."""
        for io in self._ioapics:
            io.eoi(vector)

    def send_msi(self, address: int, data: int) -> list[Any]:
        """A 32-bit write of ``data`` to ``address`` in 0xFEE00000-0xFEEFFFFF (SDM 10.11).

        Address bits 19:12 are the destination, bit 2 the destination mode;
        the redirection hint (bit 3) is ignored, as QEMU ignores it.  Data
        bits 7:0 are the vector, 10:8 the delivery mode, 15 the trigger mode.
        """
        if address >> 20 != 0xFEE:
            return []
        msg = ApicMessage(
            vector=data & 0xFF,
            delivery_mode=(data >> 8) & 7,
            dest=(address >> 12) & 0xFF,
            logical=bool(address & 4),
            level_triggered=bool(data & 0x8000),
            asserted=bool(data & 0x4000) or not data & 0x8000,
        )
        return self.send(msg)


def logical_match(dest: int, ldr_id: int, model: int) -> bool:
    """Does a logical destination ``dest`` select an APIC whose LDR holds
    ``ldr_id`` (bits 31:24) under DFR ``model`` (SDM 10.6.2.2)?"""
    if model == DFR_FLAT:
        return bool(dest & ldr_id)
    if model == DFR_CLUSTER:
        return (dest >> 4) == (ldr_id >> 4) and bool(dest & ldr_id & 0xF)
    return False  # reserved models select nothing


def lowest_priority(targets: list[Any]) -> Any | None:
    """The receiver of a lowest-priority message among ``targets`` (SDM 10.6.2.4)."""
    best = None
    best_key: tuple[int, int] | None = None
    for t in targets:
        if not t.sw_enabled:
            continue
        key = (t.arbitration_priority(), t.apic_id)
        if best_key is None or key < best_key:
            best, best_key = t, key
    return best
