"""The Python API as a user meets it: `import vmm`, boot a guest, run it with
limits and breakpoints, look at registers and memory, record, replay, travel back."""
from __future__ import annotations

import pytest

import vmm
from vmm import Machine, StopReason

DEMO_END = b"[demo] all tasks done, exiting with status 0\r\n"


def test_import_vmm_gives_the_entry_points():
    assert vmm.Machine is Machine and callable(vmm.boot) and callable(vmm.record) and callable(vmm.replay)
    assert vmm.__version__ == "0.1.0"
    assert {"Machine", "boot", "record", "replay", "Introspector", "regress"} <= set(dir(vmm))
    with pytest.raises(AttributeError):
        vmm.no_such_thing  # noqa: B018


def test_boot_the_demo_and_assert_on_its_console():
    m = vmm.boot("demo")
    res = m.run()
    assert res.reason is StopReason.EXIT and res.status == 0
    assert m.console.endswith(DEMO_END)
    assert b"task B: step 3/3 (ring 3, sysenter)" in m.console


def test_a_boot_sector_prints_through_the_bios_onto_the_console():
    m = vmm.boot("hello")
    res = m.run()
    assert res.reason is StopReason.EXIT
    assert m.console == b"Hello from the boot sector!\r\n"     # INT 10h teletype, not COM1
    assert m.serial == b""


def test_limits_are_exact_and_resumable():
    m = vmm.boot("demo")
    assert m.run(1000).reason is StopReason.LIMIT and m.icount == 1000
    assert m.run(until=2500).reason is StopReason.LIMIT and m.icount == 2500
    assert m.step().icount == 2501
    whole = vmm.boot("demo")
    whole.run(2501)
    assert m.regs.dict() == whole.regs.dict()


def test_registers_and_memory_by_physical_and_virtual_address():
    m = vmm.boot("demo")
    assert m.regs.eax == 0x2BADB002 and m.regs["rip"] == m.regs.eip   # the Multiboot hand-over
    m.run(2_000_000)                                  # paging is on by now, user pages at 0x40000000
    pa = m.virt_to_phys(0x40000000)
    assert pa != 0x40000000 and m.read_virt(0x40000000, 16) == m.read(pa, 16)
    with pytest.raises(vmm.PageFault):
        m.read_virt(0, 4)                             # page 0 is left unmapped by the demo
    m.write(0x300000, b"hello")
    assert m.read(0x300000, 5) == b"hello"
    m.regs.ebx = 0x1234_5678
    assert m.regs.rbx & 0xFFFF_FFFF == 0x1234_5678


def test_breakpoints_stop_before_the_instruction_and_run_resumes_past_them(tmp_path):
    probe = vmm.boot("demo")
    entry = probe.regs.rip
    m = vmm.boot("demo")
    m.breakpoints.add(entry)
    first = m.run(100)
    assert first.reason is StopReason.BREAKPOINT and first.icount == 0 and m.regs.rip == entry
    rest = m.run()                                     # steps over it, never comes back to the entry
    assert rest.reason is StopReason.EXIT and m.console.endswith(DEMO_END)


def test_unknown_image_is_an_error_not_the_demo():
    with pytest.raises(FileNotFoundError):
        vmm.boot("/nonexistent/hello.img")


def test_snapshot_save_and_restore_continue_identically(tmp_path):
    m = vmm.boot("demo")
    m.run(3_000_000)
    m.save(tmp_path / "s.snap")
    a = vmm.Machine.restore(tmp_path / "s.snap")
    assert a.icount == 3_000_000
    ra, rm = a.run(), m.run()
    assert (ra.reason, ra.icount) == (rm.reason, rm.icount) and a.regs.dict() == m.regs.dict()


def test_record_then_replay_matches_and_time_travels(tmp_path):
    log = tmp_path / "demo.vmlog"
    rec = vmm.record("demo", log)
    assert rec.result.reason is StopReason.EXIT and rec.machine.console.endswith(DEMO_END)
    r = vmm.replay(log)
    res = r.run()
    assert res.icount == rec.result.icount and r.console == rec.machine.serial
    r.seek(1_000_000)
    regs = r.regs.dict()
    r.step()
    assert r.icount == 1_000_001
    assert r.reverse_step().icount == 1_000_000 and r.regs.dict() == regs


def test_find_the_store_that_broke_a_value_in_the_crash_recording():
    from guests.build import GUESTS_DIR

    r = vmm.replay(GUESTS_DIR / "recordings" / "crash.vmlog")
    r.breakpoints.add(0x1000FF)                       # the page-fault handler
    stop = r.cont()
    assert stop.reason == "breakpoint" and r.regs.cr2 == 0
    assert int.from_bytes(r.read_virt(0x100384, 4), "little") == 0x200000
    r.breakpoints.discard(0x1000FF)
    r.watch(0x200004, 4)                              # the retired buffer's next field, found zero
    stop = r.reverse_cont()
    assert stop.reason == "watchpoint" and r.regs.eip == 0x1000A9   # the worker's stale store
