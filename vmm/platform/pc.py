"""An idealized PC: the Machine plus its legacy devices, wired as on a PC/AT.

IRQ routing: PIT -> IRQ0, keyboard -> IRQ1, COM2 -> IRQ3, COM1 -> IRQ4,
RTC -> IRQ8, mouse -> IRQ12, all through the 8259A pair.  A20 is the OR of
the 8042 output port and port 0x92 and really masks address bit 20 when off.

Console input (the terminal, a file, later the replay log) enters through
``console_input``; it is polled on a virtual-time timer so that *when* input
reaches the guest is a function of virtual time only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from devices.legacy.debugports import DebugConsole, DebugExit, PostCode
from devices.legacy.i8042 import I8042, Port92
from devices.legacy.pic import Pic8259Pair
from devices.legacy.pit import Pit8254, SystemControlB
from devices.legacy.rtc import Rtc146818
from host.serial import NullBackend, SerialBackend
from devices.legacy.uart import Uart16550
from vmm.boundary import CONSOLE, Boundary
from vmm.digest import OutputStream
from vmm.machine import Machine

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


class PcMachine(Machine):
    def __init__(self, config: PcConfig | None = None):
        config = config or PcConfig()
        kw = {} if config.quantum is None else {"quantum": config.quantum}
        super().__init__(config.mem_size, mmu=config.mmu, vcpus=config.vcpus, **kw)
        self.config = config
        clock = self.clock
        pic = Pic8259Pair()
        pic.program_like_pc_bios()
        self.pic = pic
        self.add_device(pic)
        self.set_interrupt_controller(pic)
        self.pit = self.add_device(Pit8254(clock, pic.irq_line(0)))
        self.port61 = self.add_device(SystemControlB(self.pit))
        self.rtc = self.add_device(Rtc146818(clock, pic.irq_line(8), config.start_epoch))
        self.rtc.store_memory_size(config.mem_size)
        self.serial_out = bytearray()
        self.outputs = {"com1": OutputStream("com1"), "debugcon": OutputStream("debugcon")}
        self.com1 = self.add_device(Uart16550(0x3F8, pic.irq_line(4), "com1", backend=config.serial,
                                              on_tx=self._serial_tx))
        self.com2 = None
        if config.com2 is not None:
            self.com2 = self.add_device(Uart16550(0x2F8, pic.irq_line(3), "com2", backend=config.com2))
        self._a20_kbd = True
        self._a20_fast = False
        self.kbd = self.add_device(I8042(pic.irq_line(1), pic.irq_line(12), self._a20_from_kbd, self.request_reset))
        self.port92 = self.add_device(Port92(self._a20_from_92, self.request_reset))
        self._a20_kbd = self.kbd.a20_enabled
        self._a20_fast = self.port92.a20_enabled
        self._apply_a20()
        self.debug_exit = self.add_device(DebugExit(self.request_exit))
        self.debugcon_out = bytearray()
        self.debugcon = self.add_device(DebugConsole(self._debugcon))
        self.postcode = self.add_device(PostCode())
        self.on_console_output: Callable[[bytes], None] | None = None
        self._input_pending = bytearray()
        self._input_timer = None
        self.boundary = Boundary()
        self.boundary.bind(self)
        self.polling = False
        self.pace_idle = False

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
    def timer_restorers(self) -> dict[str, Callable[[int], None]]:
        return {"input-source": self._poll_source, "console-input": self._deliver_input}

    def save_state(self, ram: bool = True) -> dict:
        parts = super().save_state(ram)
        parts["platform"] = {
            "kind": "pc", "version": 1, "a20_kbd": self._a20_kbd, "a20_fast": self._a20_fast,
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
        self.serial_out[:] = self.outputs["com1"].data
        self.debugcon_out[:] = self.outputs["debugcon"].data
        self._input_timer = self.clock.find("console-input")
        self._apply_a20()
        return lost
