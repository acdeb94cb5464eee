"""Watchpoints on linear addresses that are not identity mapped (issue 15).

gdb's addresses are linear; Unicorn's memory hooks see physical ones (the
frames behind the EPT).  The guest here maps linear 0x200000 to physical
0x300000 under one CR3 and to 0x340000 under another, and stores to
0x200004 five times, switches CR3, and stores three more times.  A watch on
linear 0x200004 must stop at every one of those stores, right after it, on a
replay and on a live run, following the page across the CR3 switch (no
identity mapping reaches either frame, so a watch on the wrong address sees
nothing at all).
"""
from __future__ import annotations

import pytest

from replay.session import build_machine, machine_config, record
from replay.target import WATCH_WRITE
from replay.timetravel import WRITE, TimeTravel
from tools.guestkit import asm

LOAD = 0x100000
WATCHED = 0x200004
STORES = [5, 4, 3, 2, 1, 3, 2, 1]   # the values the guest stores, in order


def paging_guest() -> bytes:
    return asm(f"""
        mov edi, 0x81000
        mov eax, 3
        mov ecx, 1024
    fill:
        mov [edi], eax
        mov [edi + 0x2000], eax
        add eax, 0x1000
        add edi, 4
        dec ecx
        jnz fill
        mov dword ptr [{0x81000 + 0x200 * 4:#x}], 0x300003
        mov dword ptr [{0x81000 + 0x300 * 4:#x}], 0
        mov dword ptr [{0x83000 + 0x200 * 4:#x}], 0x340003
        mov dword ptr [{0x83000 + 0x300 * 4:#x}], 0
        mov dword ptr [{0x83000 + 0x340 * 4:#x}], 0
        mov dword ptr [0x80000], 0x81003
        mov dword ptr [0x82000], 0x83003
        mov eax, 0x80000
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80000000
        mov cr0, eax
        mov ecx, 5
    a:
        mov [{WATCHED:#x}], ecx
        dec ecx
        jnz a
        mov eax, 0x82000
        mov cr3, eax
        mov ecx, 3
    b:
        mov [{WATCHED:#x}], ecx
        dec ecx
        jnz b
        xor eax, eax
        mov dx, 0x501
        out dx, al
    """, 32, LOAD)


def store_addresses() -> set[int]:
    """Linear addresses right after the two stores to WATCHED."""
    image = paging_guest()
    store = bytes.fromhex("890d") + WATCHED.to_bytes(4, "little")   # mov [disp32], ecx
    out, at = set(), image.find(store)
    while at >= 0:
        out.add(LOAD + at + len(store))
        at = image.find(store, at + 1)
    assert len(out) == 2
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    d = tmp_path_factory.mktemp("watch")
    image = paging_guest()
    img = d / "paging.bin"
    img.write_bytes(image)
    log = str(d / "paging.vmlog")
    res, _m = record(str(img), image, log, boot_kind="flat", load_addr=LOAD)
    assert res.reason.value == "exit" and res.status == 0, res
    return log


def value_at(m) -> int:
    return int.from_bytes(m.vcpu.read_linear(WATCHED, 4), "little")


def test_replay_watch_stops_at_every_store_through_a_remapped_page(recording):
    tt = TimeTravel(recording)
    tt.add_watchpoint(WRITE, WATCHED, 4)
    seen, rips = [], set()
    for _ in range(len(STORES) + 2):
        s = tt.cont()
        if s.reason != "watchpoint":
            break
        seen.append(value_at(tt.m))
        rips.add(tt.m.vcpu.rip)
    assert seen == STORES
    assert rips == store_addresses()


def test_replay_watch_going_back_finds_the_store_before(recording):
    tt = TimeTravel(recording)
    tt.add_watchpoint(WRITE, WATCHED, 4)
    for _ in range(len(STORES)):
        assert tt.cont().reason == "watchpoint"
    last = tt.icount
    s = tt.reverse_cont()
    assert s.reason == "watchpoint" and tt.icount < last
    assert value_at(tt.m) == STORES[-2]


def test_live_watch_stops_right_after_each_store_and_across_the_cr3_switch():
    from host.serial import NullBackend
    from replay.debugtarget import LiveTarget

    image = paging_guest()
    m = build_machine(machine_config(32 << 20, 1_767_225_600, "paging.bin", image, "flat", "", LOAD, "none"),
                      image, NullBackend())
    target = LiveTarget(m)
    target.add_breakpoint(WATCH_WRITE, WATCHED, 4)
    seen, rips = [], set()
    for _ in range(len(STORES) + 2):
        ev = target.resume(lambda: False)
        if ev.reason != "watchpoint":
            break
        assert ev.addr == WATCHED
        seen.append(value_at(m))
        rips.add(m.vcpu.rip)
    assert seen == STORES
    assert rips == store_addresses()
    target.remove_breakpoint(WATCH_WRITE, WATCHED, 4)
    assert target.resume(lambda: False).reason == "exited"
