"""The PC: the Machine plus its devices, wired as QEMU's i440FX/PIIX board is.

Four machine types (as QEMU versions its boards, so a recording made on one
replays on the same one):

* ``pc-4`` (the default): ``pc-3`` whose virtio-net cards offer TCP
  segmentation offload (HOST_TSO4) and batch transmits that follow one
  another within 1 ms of virtual time (devices/virtio/net.py ``tx_batch``).
* ``pc-3``: ``pc-2`` with a CPU that enumerates
  IA32_ARCH_CAPABILITIES and reports itself unaffected by Meltdown and the
  other flaws of speculative execution (vmm/cpu/cpuid.py), so Linux does not
  isolate its page tables.
* ``pc-2``: the platform real kernels probe.  A local APIC per
  vCPU at 0xFEE00000 and the 8259 pair on every LINT0 ("virtual wire"), an
  82093AA I/O APIC at 0xFEC00000, the HPET at 0xFED00000 with the legacy
  replacement route, the ACPI PM block at 0x600 (PM timer, power-off through
  SLP_TYP/SLP_EN) and the PIIX reset register at 0xCF9, PCI configuration
  mechanism #1 with the i440FX host bridge (00:00.0) and the PIIX3 ISA bridge
  (00:01.0), QEMU's fw_cfg at 0x510, VGA text mode at 0x3B0-0x3DF, and
  firmware tables (ACPI and MP) in guest memory.  Each ISA IRQ line is a
  wired OR of its sources (a device, the PIIX3's PIRQ routing) and reaches
  both the 8259 input and the I/O APIC pin of the same number, except IRQ0,
  which reaches pin 2 (the MADT's interrupt source override), as on QEMU.
* ``pc-1``: the PC/AT of the first recordings: the legacy devices only, the
  8259 pair as the BSP's interrupt controller.

Both: PIT -> IRQ0, keyboard -> IRQ1, COM2 -> IRQ3, COM1 -> IRQ4, RTC -> IRQ8,
mouse -> IRQ12.  A20 is the OR of the 8042 output port and port 0x92 and
really masks address bit 20 when off.

Console input (the terminal, a file, the replay log) enters through the
machine's boundary (vmm/boundary.py); it is polled on a virtual-time timer so
that *when* input reaches the guest is a function of virtual time only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from devices.apic.apicbus import ApicBus
from devices.apic.ioapic import IoApic
from devices.apic.lapic import LocalApic, LocalApicBank
from devices.base import IrqLine, IrqOr
from devices.display.vga import Vga
from devices.fw_cfg import FwCfg, qemu_x86_files, qemu_x86_items
from devices.legacy.debugports import DebugConsole, DebugExit, PostCode
from devices.legacy.i8042 import I8042, Port92
from devices.legacy.pic import Pic8259Pair
from devices.legacy.pit import Pit8254, SystemControlB
from devices.legacy.rtc import Rtc146818
from devices.legacy.uart import Uart16550
from devices.pci.config import ConfigMechanism1, PciBus
from devices.pci.i440fx import I440fx
from devices.pci.piix3 import Piix3
from devices.timers.acpi_pm import AcpiPm, PiixResetControl
from devices.timers.hpet import REG_MAIN_CNT, Hpet
from host.serial import NullBackend, SerialBackend
from vmm.boundary import CONSOLE, Boundary
from vmm.cpu.cpuid import ARCH_CAPABILITIES, pc2_cpuid
from vmm.digest import OutputStream
from vmm.firmware.acpi import HPET_BLOCK_ID, AcpiConfig, AcpiTables
from vmm.firmware.mptable import MpConfig, mptable
from vmm.firmware.mptable import search_areas as mp_search_areas
from vmm.machine import Machine
from vmm.memory.dma import DmaView

E820_RAM, E820_RESERVED, E820_ACPI = 1, 2, 3

DEFAULT_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z: guest wall-clock start unless told otherwise
INPUT_POLL_TICKS = 100_000     # 1 ms of virtual time: console input reaches the UART/8042 on these ticks
SOURCE_POLL_TICKS = 1_000_000  # 10 ms of virtual time: the input source (terminal, log) is asked on these


@dataclass
class PcConfig:
    mem_size: int = 32 << 20
    start_epoch: int = DEFAULT_EPOCH
    serial: SerialBackend = field(default_factory=NullBackend)
    com2: SerialBackend | None = None
    input_to: str = "serial"  # where console input goes: "serial" (COM1) or "keyboard" (8042)
    mmu: str = "shadow"       # "shadow" (C TLB fill: guest tables + EPT) or "nested" (Unicorn walks)
    vcpus: int = 1
    quantum: int | None = None  # instructions per vCPU turn (None: the machine's default)
    platform: str = "pc-4"      # the machine type (see the module docstring)
    debug_exit: tuple[int, int] = (0x501, 2)   # isa-debug-exit's iobase and iosize
    fw_cfg_files: dict[str, bytes] = field(default_factory=dict)   # more fw_cfg files: option ROMs
    # for a real BIOS ("vgaroms/NAME" a VGA BIOS, "genroms/NAME" others), as QEMU's rom_add_vga/option_rom


PLATFORMS = ("pc-4", "pc-3", "pc-2", "pc-1")     # newest first


def since(platform: str, first: str) -> bool:
    """Does machine type ``platform`` have what ``first`` brought (is it ``first`` or newer)?"""
    return PLATFORMS.index(platform) <= PLATFORMS.index(first)
LAPIC_BASE = 0xFEE0_0000
IOAPIC_BASE = 0xFEC0_0000
HPET_BASE = 0xFED0_0000
ACPI_RSDP = 0xE0000             # in the BIOS area, where the OS searches for it
ACPI_TABLES = 0xE0040           # the tables after it (64-byte aligned: the FACS comes first)
FIRMWARE_TABLES_END = 0xF0000   # the HLE BIOS's ROM starts here
MP_FLOATING = 0x9FC10           # first KB of the EBDA (BDA 0x40E), after the EBDA's size byte


class PcMachine(Machine):
    def __init__(self, config: PcConfig | None = None):
        config = config or PcConfig()
        if config.platform not in PLATFORMS:
            raise ValueError(f"unknown machine type {config.platform!r} (known: {', '.join(PLATFORMS)})")
        kw = {} if config.quantum is None else {"quantum": config.quantum}
        super().__init__(config.mem_size, mmu=config.mmu, vcpus=config.vcpus, **kw)
        self.config = config
        self.platform = config.platform
        clock = self.clock
        pic = Pic8259Pair()
        pic.program_like_pc_bios()
        self.pic = pic
        self.add_device(pic)
        legacy = self.platform == "pc-1"
        if not legacy:
            arch_cap = since(self.platform, "pc-3")
            for v in self.vcpus:
                v.cpuid = pc2_cpuid(v.id, len(self.vcpus), arch_capabilities=arch_cap)
            if arch_cap:
                self.engine.set_arch_capabilities(ARCH_CAPABILITIES)
        if legacy:
            self.set_interrupt_controller(pic)

            def isa_irq(n: int, name: str = "") -> IrqLine:
                return pic.irq_line(n)
        else:
            isa_irq = self._build_apics(pic)
        if legacy:
            pit_line, rtc_line = pic.irq_line(0), pic.irq_line(8)
        else:
            # the HPET's legacy replacement route takes IRQ0 and IRQ8 from the PIT and the RTC
            self.hpet = Hpet(clock, self._hpet_route, isa_irq(0, "hpet"), isa_irq(8, "hpet"))
            self.add_device(self.hpet)
            self.mmio.register(self.hpet, HPET_BASE, 0x400, "hpet")
            # the main counter read and an idle comparator written in C (a Linux boot
            # does each 40,000 times, in hpet_calibrate)
            first, stride, comparators, masks = self.hpet.comparator_sink()
            self.engine.set_tick_counter(HPET_BASE + REG_MAIN_CNT, self.hpet.counter_view,
                                         (HPET_BASE + first, stride, comparators, masks))
            self.hpet.on_view_change = self.engine.tick_counter_changed
            pit_line, rtc_line = IrqLine("pit-out"), IrqLine("rtc-out")
            pit_line.connect(self.hpet.pit_input)
            rtc_line.connect(self.hpet.rtc_input)
            self._wires = {"pit-out": pit_line, "rtc-out": rtc_line}
        self.pit = self.add_device(Pit8254(clock, pit_line))
        self.port61 = self.add_device(SystemControlB(self.pit))
        self.rtc = self.add_device(Rtc146818(clock, rtc_line, config.start_epoch))
        self.rtc.store_memory_size(config.mem_size)
        self.serial_out = bytearray()
        self.outputs = {"com1": OutputStream("com1"), "debugcon": OutputStream("debugcon")}
        self.com1 = self.add_device(Uart16550(0x3F8, isa_irq(4, "com1"), "com1", backend=config.serial,
                                              on_tx=self._serial_tx))
        self.com2 = None
        if config.com2 is not None:
            self.com2 = self.add_device(Uart16550(0x2F8, isa_irq(3, "com2"), "com2", backend=config.com2))
        self._a20_kbd = True
        self._a20_fast = False
        self.kbd = self.add_device(I8042(isa_irq(1, "kbd"), isa_irq(12, "mouse"), self._a20_from_kbd,
                                         self.request_reset))
        self.port92 = self.add_device(Port92(self._a20_from_92, self.request_reset))
        self._a20_kbd = self.kbd.a20_enabled
        self._a20_fast = self.port92.a20_enabled
        self._apply_a20()
        port, size = config.debug_exit
        self.debug_exit = self.add_device(DebugExit(self.request_exit, port=port, size=size))
        self.debugcon_out = bytearray()
        self.debugcon = self.add_device(DebugConsole(self._debugcon))
        self.postcode = self.add_device(PostCode())
        if not legacy:
            self._build_chipset(isa_irq)
        self.on_console_output: Callable[[bytes], None] | None = None
        self._input_pending = bytearray()
        self._input_timer = None
        self.boundary = Boundary()
        self.boundary.bind(self)
        self.polling = False
        self.pace_idle = False

    # -- the pc-2 board ------------------------------------------------------------------
    def _build_apics(self, pic: Pic8259Pair) -> Callable[[int, str], IrqLine]:
        clock = self.clock
        self.apic_bus = ApicBus()
        self.lapics = [LocalApic(clock, self.apic_bus, v.pins, apic_id=v.id, bsp=v.id == 0) for v in self.vcpus]
        self.lapic_bank = self.add_device(LocalApicBank(self.lapics))
        self.lapic_bank.attach_pic(pic)
        self.mmio.register(self.lapic_bank, LAPIC_BASE, 0x1000, "lapic")
        for lapic in self.lapics:
            lapic.on_base_change = self._lapic_moved
        self.ioapic = self.add_device(IoApic(clock, self.apic_bus))
        self.mmio.register(self.ioapic, IOAPIC_BASE, 0x1000, "ioapic")
        self.on_init = lambda v: self.lapics[v.id].init_reset()

        def gsi_sink(pin: int) -> Callable[[bool], None]:
            return lambda level: self.ioapic.set_irq(pin, level)

        def pic_sink(n: int) -> Callable[[bool], None]:
            return lambda level: pic.set_irq(n, level)

        # ISA IRQ n -> 8259 input n and I/O APIC pin n; IRQ0 -> pin 2 (the MADT's override);
        # nothing but the cascade uses IRQ2, whose pin belongs to IRQ0
        self.isa_irqs = []
        for n in range(16):
            sinks = [pic_sink(n)]
            if n == 0:
                sinks.append(gsi_sink(2))
            elif n != 2:
                sinks.append(gsi_sink(n))
            self.isa_irqs.append(IrqOr(f"isa-irq{n}", sinks))

        def isa_irq(n: int, name: str = "") -> IrqLine:
            return self.isa_irqs[n].input(name or None)
        return isa_irq

    def _hpet_route(self, pin: int) -> IrqLine | None:
        """An HPET timer routed to I/O APIC pin ``pin`` (outside legacy replacement)."""
        if not 0 <= pin < 24:
            return None
        line = IrqLine(f"hpet-gsi{pin}")
        line.connect(lambda level: self.ioapic.set_irq(pin, level))
        return line

    def _lapic_moved(self, old: int, new: int) -> None:
        if old != new:
            self.mmio.move(self.lapic_bank, old, new)

    def _build_chipset(self, isa_irq: Callable[[int, str], IrqLine]) -> None:
        clock = self.clock
        self.acpi_pm = self.add_device(AcpiPm(clock, isa_irq(9, "sci"), self.request_poweroff))
        self.reset_control = PiixResetControl(self.request_reset)
        self.add_device(self.reset_control, io=False)   # reached through the PCI config ports' byte lanes
        self.pci = PciBus()
        self.pci_config = self.add_device(ConfigMechanism1(self.pci, narrow=self.reset_control))
        self.i440fx = self.add_device(I440fx())
        self.pci.attach(self.i440fx, 0)
        self.piix3 = self.add_device(Piix3(lambda n: isa_irq(n, f"pirq-isa{n}")))
        self.pci.attach(self.piix3, 1)
        self.pci.set_intx_router(self.piix3)
        # the firmware's ISA IRQs for PCI, level-triggered in the ELCR (SeaBIOS's choice: 10, 10, 11, 11)
        for reg, irq in zip(range(0x60, 0x64), (10, 10, 11, 11)):
            self.piix3.config_write(reg, 1, irq)
        self.io.write(0x4D0, 1, 0x00)
        self.io.write(0x4D1, 1, (1 << 1) | (1 << 2) | (1 << 3))    # IRQ 9 (SCI), 10, 11: level
        self.acpi = AcpiTables(AcpiConfig(cpus=len(self.vcpus), pci_hole=(max(self.memory.size, 0xC000_0000),
                                                                          0xFEBF_FFFF)))
        self.fw_cfg = self.add_device(FwCfg(
            qemu_x86_items(ram_size=self.memory.size, cpus=len(self.vcpus), hpet_block_id=HPET_BLOCK_ID),
            qemu_x86_files(e820=self.e820(), extra={**self.acpi.fw_cfg_files(), **self.config.fw_cfg_files}),
            DmaView(self.ept, "fw_cfg")))
        self.vga = self.add_device(Vga(clock, DmaView(self.ept, "vga")))
        self.debugcon402 = self.add_device(DebugConsole(self._debugcon, port=0x402, name="debugcon-402"))

    # -- memory map and firmware tables ---------------------------------------------------
    def e820(self) -> list[tuple[int, int, int]]:
        """The memory map every boot path reports (BIOS E820, Multiboot, Linux, fw_cfg)."""
        size = self.memory.size
        ebda = 0x9FC00
        out = [(0, ebda, E820_RAM), (ebda, 0xA0000 - ebda, E820_RESERVED)]
        if self.platform == "pc-1":
            out.append((0xF0000, 0x10000, E820_RESERVED))
        else:
            out.append((0xE0000, FIRMWARE_TABLES_END - 0xE0000, E820_ACPI))
            out.append((FIRMWARE_TABLES_END, 0x100000 - FIRMWARE_TABLES_END, E820_RESERVED))
        out.append((0x100000, size - 0x100000, E820_RAM))
        return out

    def install_firmware_tables(self) -> None:
        """ACPI tables (RSDP at 0xE0000) and the MP tables (floating pointer in the EBDA)
        in guest memory, as a BIOS leaves them for the OS."""
        if self.platform == "pc-1":
            return
        blobs = self.acpi.place(ACPI_TABLES, ACPI_RSDP)
        end = ACPI_TABLES + self.acpi.size
        mp_config = (end + 15) & ~15
        mp = mptable(MP_FLOATING, mp_config,
                     MpConfig(cpus=len(self.vcpus), cpu_signature=0x000206A7, cpu_features=0x0781ABFD),
                     areas=mp_search_areas(ebda=0x9FC00))
        blobs += mp
        if mp_config + len(mp[1][1]) > FIRMWARE_TABLES_END:
            raise ValueError("the firmware tables do not fit below the BIOS ROM")
        for addr, blob in blobs:
            self.memory.write(addr, blob)
        self.acpi_rsdp = ACPI_RSDP

    # -- input: everything typed comes through the boundary, on virtual time --
    def set_boundary(self, boundary: Boundary) -> None:
        """Use another boundary (a recording's or a replay's); keeps the attached sources."""
        for ch, src in self.boundary.sources.items():
            boundary.attach(ch, src)
        self.boundary = boundary
        boundary.bind(self)

    def start_input_polling(self, source: Callable[[], bytes] | None = None, pace_idle: bool = False) -> None:
        """Ask the boundary for console input every SOURCE_POLL_TICKS of virtual time.

        Only *what* the boundary answers can differ between runs; *when* it is
        asked is a function of virtual time, which is what makes recording
        input (replay/) enough to reproduce a run.  ``source`` is the host
        source to attach to the console channel.  ``pace_idle`` sleeps the
        host briefly while the guest is halted, so an idle live guest does not
        spin; it changes nothing the guest can observe.
        """
        if source is not None:
            self.boundary.attach(CONSOLE, source)
        self.pace_idle = pace_idle
        if not self.polling:
            self.polling = True
            self.clock.schedule_in(SOURCE_POLL_TICKS, self._poll_source, "input-source")

    def _poll_source(self, now: int) -> None:
        if not self.polling:
            return
        data = self.boundary.input(CONSOLE)
        if data:
            self.console_input(data)
        if self.pace_idle and self.halted:
            import time

            time.sleep(0.002)
        if self.polling:
            self.clock.schedule_in(SOURCE_POLL_TICKS, self._poll_source, "input-source")

    def stop_input_polling(self) -> None:
        self.polling = False

    # -- A20 -------------------------------------------------------------------------
    def _a20_from_kbd(self, on: bool) -> None:
        self._a20_kbd = on
        self._apply_a20()

    def _a20_from_92(self, on: bool) -> None:
        self._a20_fast = on
        self._apply_a20()

    @property
    def a20_enabled(self) -> bool:
        return self._a20_kbd or self._a20_fast

    def _apply_a20(self) -> None:
        # the A20 gate is the board's: every CPU sees address bit 20 masked the same way
        mask = -1 if self.a20_enabled else ~(1 << 20)
        for v in self.vcpus:
            if v.a20_mask != mask:
                v.a20_mask = mask

    # -- output ---------------------------------------------------------------------
    def _serial_tx(self, byte: int) -> None:
        self.serial_out.append(byte)
        self.outputs["com1"].append(bytes((byte,)))

    def _debugcon(self, data: bytes) -> None:
        self.debugcon_out += data
        self.outputs["debugcon"].append(data)
        if self.on_console_output is not None:
            self.on_console_output(data)

    # -- input ------------------------------------------------------------------------
    def console_input(self, data: bytes) -> None:
        """Queue bytes typed at the console; they reach the guest on the next poll tick."""
        self._input_pending += data
        if self._input_timer is None or not self._input_timer.active:
            self._input_timer = self.clock.schedule_in(INPUT_POLL_TICKS, self._deliver_input, "console-input")

    def _deliver_input(self, now: int) -> None:
        if not self._input_pending:
            return
        if self.config.input_to == "keyboard":
            from vmm.firmware.keymap import ascii_to_set1

            data = bytes(self._input_pending)
            self._input_pending.clear()
            self.kbd.key_input(ascii_to_set1(data))
        else:
            room = self.com1.rx_space()
            if room > 0:
                chunk = bytes(self._input_pending[:room])
                del self._input_pending[:room]
                self.com1.receive(chunk)
        if self._input_pending:
            self._input_timer = self.clock.schedule_in(INPUT_POLL_TICKS, self._deliver_input, "console-input")

    # -- saved state ---------------------------------------------------------------------
    def _save_wires(self) -> dict:
        """The levels on the board's own interrupt wires (the ISA IRQ ORs, the PIT
        and RTC outputs into the HPET): a receiver only sees a change, so a level
        restored low under an input restored high would swallow the next edge."""
        if self.platform == "pc-1":
            return {}
        out: dict = {name: line.level for name, line in self._wires.items()}
        out.update({o.name: o.save_state() for o in self.isa_irqs})
        return out

    def _load_wires(self, st: dict) -> None:
        from devices.base import DeviceStateError

        if self.platform == "pc-1":
            return
        try:
            for name, line in self._wires.items():
                line.level = bool(st[name])
            for o in self.isa_irqs:
                o.load_state(st[o.name])
        except (KeyError, TypeError) as e:
            raise DeviceStateError(f"pc: the saved interrupt wiring is incomplete ({e})") from None

    def timer_restorers(self) -> dict[str, Callable[[int], None]]:
        return {"input-source": self._poll_source, "console-input": self._deliver_input}

    def save_state(self, ram: bool = True) -> dict:
        parts = super().save_state(ram)
        parts["platform"] = {
            "kind": "pc", "version": 1, "a20_kbd": self._a20_kbd, "a20_fast": self._a20_fast,
            "wires": self._save_wires(),
            "input_pending": bytes(self._input_pending), "polling": self.polling,
            "outputs": {k: o.save_state() for k, o in self.outputs.items()},
        }
        return parts

    def load_state(self, parts: dict, extra_restorers: dict | None = None) -> list[str]:
        from devices.base import DeviceStateError

        st = parts.get("platform")
        if not isinstance(st, dict) or st.get("kind") != "pc" or st.get("version") != 1:
            raise DeviceStateError("the saved state has no PC platform part of version 1")
        lost = super().load_state(parts, extra_restorers)
        try:
            self._a20_kbd = bool(st["a20_kbd"])
            self._a20_fast = bool(st["a20_fast"])
            self._input_pending = bytearray(st["input_pending"])
            self.polling = bool(st["polling"])
            for k, o in self.outputs.items():
                o.load_state(st["outputs"][k])
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceStateError(f"pc: malformed platform state ({e})") from None
        self._load_wires(st.get("wires", {}))
        self.serial_out[:] = self.outputs["com1"].data
        self.debugcon_out[:] = self.outputs["debugcon"].data
        self._input_timer = self.clock.find("console-input")
        self._apply_a20()
        return lost
