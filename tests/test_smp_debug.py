"""Debugging a multi-vCPU recording (issue 11): time travel per vCPU, and the
vCPUs as gdb threads over the remote protocol.

Every answer is held against a brute-force walk of the same recording: the
machine replayed one machine position at a time, noting each vCPU's icount,
PC and the shared counter at every position.  Two guests:

* the race guest of the machine-model tests (two vCPUs incrementing one
  counter without a lock, in quanta of 97 instructions);
* a ticking guest: vCPU 0 halts and wakes on timer interrupts, each handler
  incrementing the shared counter, while vCPU 1 increments it in a loop; vCPU
  0's turns end at its HLT, and every interrupt is delivered (no instruction
  retired) at the start of one of its turns.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest

from replay.debugtarget import LiveTarget, ReplayTarget
from replay.gdbstub import start_gdbstub_thread
from replay.session import record
from replay.timetravel import SW, WRITE, TimeTravel, pc_of
from tests.machine_helpers import AP_CODE, DONE1, EXIT0, LOAD, SHARED, flat_machine, race_image
from tests.test_gdbstub import Client, regs_of, stop_fields
from tools.guestkit import asm, gate32

QUANTUM = 97
TICKS = SHARED + 0x40
ISR = LOAD + 0x800            # the ticking guest's timer handler


TABLES = LOAD + 0x400          # the ticking guest's data: port writes, IDTR, IDT


def ticking_image(ticks: int = 3, divisor: int = 20, ap_loops: int = 1200) -> bytes:
    """vCPU 0 programs the 8259 pair (IRQ 0 only) and the PIT from a table of
    port writes, then halts until ``ticks`` timer interrupts came, waits for
    vCPU 1 and exits; vCPU 1 increments the shared counter ``ap_loops`` times."""
    writes = [(0x20, 0x11), (0xA0, 0x11), (0x21, 0x20), (0xA1, 0x28), (0x21, 4), (0xA1, 2), (0x21, 1),
              (0xA1, 1), (0x21, 0xFE), (0xA1, 0xFF), (0x43, 0x34), (0x40, divisor & 0xFF), (0x40, divisor >> 8)]
    idtr_at = TABLES + 2 * len(writes)
    idt_at = TABLES + 0x100
    bsp = f"""
        mov esp, 0x90000
        lidt [{idtr_at:#x}]
        mov esi, {TABLES:#x}
        mov ecx, {len(writes)}
    init:
        movzx edx, byte ptr [esi]
        mov al, [esi + 1]
        out dx, al
        add esi, 2
        loop init
        sti
    wait:
        hlt
        cmp dword ptr [{TICKS:#x}], {ticks}
        jb wait
        cli
    w0: cmp byte ptr [{DONE1:#x}], 1
        jne w0
    """ + EXIT0
    isr = f"""
        push eax
        inc dword ptr [{TICKS:#x}]
        mov eax, [{SHARED:#x}]
        inc eax
        mov [{SHARED:#x}], eax
        mov al, 0x20
        out 0x20, al
        pop eax
        iretd
    """
    ap = f"""
        mov ecx, {ap_loops}
    l1: mov eax, [{SHARED:#x}]
        inc eax
        mov [{SHARED:#x}], eax
        dec ecx
        jnz l1
        mov byte ptr [{DONE1:#x}], 1
        cli
    h1: hlt
        jmp h1
    """
    image = bytearray(AP_CODE - LOAD)
    code = asm(bsp, 32, LOAD)
    assert len(code) <= TABLES - LOAD
    image[:len(code)] = code
    image[TABLES - LOAD:idtr_at - LOAD] = bytes(b for w in writes for b in w)
    image[idtr_at - LOAD:idtr_at - LOAD + 6] = struct.pack("<HI", 0x21 * 8 - 1, idt_at)
    image[idt_at + 0x20 * 8 - LOAD:idt_at + 0x21 * 8 - LOAD] = struct.pack("<Q", gate32(0x10, ISR, 0xE, 0))
    image[ISR - LOAD:ISR - LOAD + 0x40] = asm(isr, 32, ISR).ljust(0x40, b"\x90")
    return bytes(image) + asm(ap, 32, AP_CODE)


def record_flat(tmp_path, name: str, image: bytes) -> str:
    img = tmp_path / f"{name}.bin"
    img.write_bytes(image)
    log = str(tmp_path / f"{name}.vmlog")
    res, _ = record(str(img), image, log, boot_kind="flat", vcpus=2, quantum=QUANTUM,
                    entries=[(1, AP_CODE)], max_instructions=5_000_000)
    assert res.reason.value == "exit" and res.status == 0, res
    return log


@dataclass
class Walk:
    """The recording, one machine position at a time (index = position)."""
    log: str
    counts: list[tuple[int, ...]]     # each vCPU's icount
    pcs: list[tuple[int, ...]]        # each vCPU's PC
    shared: list[int]                 # the shared counter

    @property
    def end(self) -> int:
        return len(self.counts) - 1

    def who(self, p: int) -> int:
        """The vCPU that retired the instruction taking the machine from p to p + 1."""
        d = [b - a for a, b in zip(self.counts[p], self.counts[p + 1])]
        assert sorted(d) == [0, 1], (p, d)
        return d.index(1)

    def stores(self) -> list[int]:
        """Positions p whose instruction changed the shared counter."""
        return [p for p in range(self.end) if self.shared[p + 1] != self.shared[p]]


def walk(log: str) -> Walk:
    tt = TimeTravel(log, interval=1 << 60)
    m = tt.m
    w = Walk(log, [], [], [])
    end = tt.end_icount
    for p in range(end + 1):
        if p:
            m.run(p)
        assert m.icount == p
        w.counts.append(tuple(v.icount for v in m.vcpus))
        w.pcs.append(tuple(pc_of(v) for v in m.vcpus))
        w.shared.append(m.memory.read_u32(SHARED))
    return w


@pytest.fixture(scope="module")
def race(tmp_path_factory) -> Walk:
    return walk(record_flat(tmp_path_factory.mktemp("race"), "race", race_image(400, 300)))


@pytest.fixture(scope="module")
def ticking(tmp_path_factory) -> Walk:
    return walk(record_flat(tmp_path_factory.mktemp("tick"), "tick", ticking_image()))


@pytest.fixture(params=["race", "ticking"])
def guest(request) -> Walk:
    return request.getfixturevalue(request.param)


def regs(m) -> list[dict[str, int]]:
    return [v.snapshot_regs() for v in m.vcpus]


def straight(log: str, position: int) -> list[dict[str, int]]:
    """Every vCPU's registers at ``position``, from a plain forward replay."""
    tt = TimeTravel(log, interval=1 << 60)
    tt.seek(position)
    return regs(tt.m)


# ---- the schedule map -------------------------------------------------------------------------

def test_the_schedule_names_the_vcpu_of_every_instruction(guest):
    tt = TimeTravel(guest.log, interval=1500)
    tt.seek(tt.end_icount)
    sched = tt.sched
    assert [sched.vcpu_at(p) for p in range(guest.end)] == [guest.who(p) for p in range(guest.end)]
    assert sched.vcpu_at(guest.end) is None
    for k in (0, 1):
        for n in range(1, guest.counts[-1][k] + 1):
            p = sched.before_insn(k, n)
            assert guest.counts[p][k] == n - 1 and guest.counts[p + 1][k] == n
        assert sched.before_insn(k, guest.counts[-1][k] + 1) is None
    # seeking back and forth (checkpoint restores) learns nothing twice
    turns = sched.turns(0, guest.end)
    for p in (guest.end // 3, 10, guest.end, guest.end // 2):
        tt.seek(p)
    assert sched.turns(0, guest.end) == turns
    assert len(turns) > 20 and {t[1] for t in turns} == {0, 1}


def test_ticking_guest_turns_end_at_halts(ticking):
    """vCPU 0's turns end early at its HLT; then vCPU 1 runs quantum after quantum
    (one stretch in the map) until a timer interrupt wakes vCPU 0."""
    tt = TimeTravel(ticking.log, interval=1500)
    tt.seek(tt.end_icount)
    turns = tt.sched.turns(0, ticking.end)
    short0 = [n for _, vid, _, n in turns[:-1] if vid == 0 and n < QUANTUM]
    long1 = [n for _, vid, _, n in turns if vid == 1 and n > QUANTUM]
    assert len(short0) >= 3 and len(long1) >= 2, turns


# ---- per-vCPU steps ---------------------------------------------------------------------------

def test_reverse_stepi_of_one_vcpu_lands_where_its_forward_step_started(guest):
    rng = random.Random(11)
    tt = TimeTravel(guest.log, interval=1500)
    last = {k: max(p for p in range(guest.end) if guest.who(p) == k) for k in (0, 1)}
    for _ in range(12):
        k = rng.randrange(2)
        start = rng.randrange(0, last[k])           # vCPU k still has an instruction to run
        tt.seek(start)
        mine = regs(tt.m)[k]
        c = tt.m.vcpus[k].icount
        fwd = tt.step(vcpu=k)
        after = tt.icount
        assert fwd.reason == "step" and fwd.vcpu == k
        # exactly one instruction of vCPU k, and it was the last one retired
        assert guest.counts[after][k] == c + 1 and guest.who(after - 1) == k
        assert all(guest.counts[p][k] == c for p in range(start, after))
        back = tt.reverse_step(vcpu=k)
        assert back.reason == "step" and back.vcpu == k and tt.icount == after - 1
        now = regs(tt.m)
        assert now[k] == mine                                  # vCPU k as before its step
        assert now == straight(guest.log, after - 1)           # the other vCPU as it was at that moment
        assert tt.step(vcpu=k).reason == "step" and tt.icount == after


def test_reverse_stepi_goes_back_to_a_vcpus_previous_turn(race):
    """vCPU 1's last instruction lies a whole turn of vCPU 0 back: reverse-stepi on vCPU 1
    un-executes vCPU 0's turn as well (the machine goes back to that moment)."""
    tt = TimeTravel(race.log, interval=1500)
    turn0 = next((pos, n) for pos, vid, _, n in _turns(tt, race) if vid == 0 and pos > 0)
    here = turn0[0] + turn0[1] // 2                # inside vCPU 0's turn, after one of vCPU 1
    tt.seek(here)
    s = tt.reverse_step(vcpu=1)
    assert tt.icount == turn0[0] - 1 and s.vcpu == 1
    assert regs(tt.m) == straight(race.log, turn0[0] - 1)
    assert tt.reverse_step(vcpu=0).reason == "step"
    assert race.who(tt.icount) == 0


def _turns(tt, w):
    tt.seek(w.end)
    return tt.sched.turns(0, w.end)


def test_a_vcpu_with_nothing_retired_cannot_step_back(race):
    tt = TimeTravel(race.log, interval=1500)
    tt.seek(QUANTUM // 2)                      # vCPU 1 has not run yet
    assert tt.vcpu_icounts() == [QUANTUM // 2, 0]
    s = tt.reverse_step(vcpu=1)
    assert s.reason == "start" and tt.icount == QUANTUM // 2
    assert tt.step(vcpu=1).reason == "step" and tt.vcpu_icounts() == [QUANTUM, 1]


def test_seek_by_a_vcpus_own_icount(guest):
    tt = TimeTravel(guest.log, interval=1500)
    for n in (1, 150, 400):
        tt.seek_vcpu(1, n)
        p = tt.icount
        assert guest.counts[p][1] == n and guest.counts[p - 1][1] == n - 1
    tt.seek_vcpu(1, 5)                         # backwards, through the map
    assert guest.counts[tt.icount][1] == 5 and guest.who(tt.icount - 1) == 1


# ---- hits name their vCPU ---------------------------------------------------------------------

def test_watchpoints_name_the_vcpu_of_the_store_both_ways(guest):
    stores = guest.stores()
    rng = random.Random(5)
    tt = TimeTravel(guest.log, interval=1500)
    tt.add_watchpoint(WRITE, SHARED, 4)
    other = 0
    for _ in range(10):
        here = rng.randrange(stores[0] + 1, guest.end)
        tt.seek(here)
        selected = rng.randrange(2)
        s = tt.reverse_cont()
        p = max(q for q in stores if q < here)
        assert s.reason == "watchpoint" and tt.icount == p and s.vcpu == guest.who(p)
        assert pc_of(tt.m.vcpus[s.vcpu]) == guest.pcs[p][s.vcpu]      # on the store, before it ran
        other += s.vcpu != selected
        tt.seek(here)
        s = tt.cont()
        later = [q for q in stores if q >= here]
        if later:
            assert s.reason == "watchpoint" and tt.icount == later[0] + 1 and s.vcpu == guest.who(later[0])
        else:
            assert s.reason == "end"
    assert other, "no stop was made by the vCPU not selected"


def test_breakpoints_name_the_vcpu_that_reached_them(ticking):
    """A breakpoint in each vCPU's code: vCPU 1's first instruction, and the timer
    handler's first one (reached right after an interrupt delivery, which comes
    first at that position)."""
    bps = {ISR: 0, AP_CODE: 1}
    tt = TimeTravel(ticking.log, interval=1500)
    for a in bps:
        tt.add_breakpoint(a)
    seen = {0: 0, 1: 0}
    while True:
        before = tt.icount
        s = tt.cont()
        if s.reason != "breakpoint":
            break
        assert pc_of(tt.m.vcpus[s.vcpu]) == s.hit.addr and bps[s.hit.addr] == s.vcpu
        assert s.hit.kind == SW and tt.icount >= before
        seen[s.vcpu] += 1
    assert seen == {0: 3, 1: 1}, seen
    # and backwards from the end: the same hits in reverse order
    tt.seek(ticking.end)
    back = []
    for _ in range(4):
        s = tt.reverse_cont()
        assert s.reason == "breakpoint", s
        assert pc_of(tt.m.vcpus[s.vcpu]) == s.hit.addr and bps[s.hit.addr] == s.vcpu
        back.append((tt.icount, s.vcpu))
    assert [b[0] for b in back] == sorted({b[0] for b in back}, reverse=True)
    assert [b[1] for b in back] == [0, 0, 0, 1]
    assert tt.reverse_cont().reason == "start"
    # a reverse hit is where a forward run stops too
    pos, vid = back[-1]
    tt.seek(pos - 1)
    s = tt.cont()
    assert (tt.icount, s.vcpu) == (pos, vid)


# ---- the remote protocol -------------------------------------------------------------------

def test_threads_over_the_remote_protocol(race):
    tt = TimeTravel(race.log, interval=1500)
    here = 3 * QUANTUM + 10                  # vCPU 1's second turn
    tt.seek(here)
    target = ReplayTarget(tt)
    stub = start_gdbstub_thread(target)
    c = Client(stub.port)
    try:
        c.request("qSupported:swbreak+;hwbreak+")
        assert stop_fields(c.request("?"))["thread"] == "01"
        assert c.request("qfThreadInfo") == "m01,02" and c.request("qsThreadInfo") == "l"
        assert c.request("qC") == "QC01"
        assert c.request("T2") == "OK" and c.request("T3") == "E01"
        assert bytes.fromhex(c.request("qThreadExtraInfo,2")) == b"vCPU 1, running"
        assert c.request("Hg3") == "E01"
        # Hg selects whose registers g and p read
        assert regs_of(c.request("g"))["eip"] == race.pcs[here][0]
        assert c.request("Hg2") == "OK" and c.request("qC") == "QC02"
        assert regs_of(c.request("g"))["eip"] == race.pcs[here][1]
        assert int.from_bytes(bytes.fromhex(c.request("p8")), "little") == race.pcs[here][1]
        # a step of thread 1 while vCPU 1's turn runs: vCPU 1 finishes its turn first
        f = stop_fields(c.request("vCont;s:1;c"))
        assert f["thread"] == "01" and c.request("qC") == "QC01"
        assert tt.vcpu_icounts()[0] == race.counts[here][0] + 1 and race.who(tt.icount - 1) == 0
        # Hc any + bs: the general thread steps back
        assert c.request("Hg2") == "OK" and c.request("Hc0") == "OK"
        at = tt.icount
        f = stop_fields(c.request("bs"))
        assert f["thread"] == "02" and race.who(tt.icount) == 1 and tt.icount < at
        assert tt.vcpu_icounts()[1] == race.counts[at][1] - 1
        # reverse-continue to the last store: its thread is named and selected
        stores = race.stores()
        tt.seek(here)
        assert c.request("Z2,200000,4") == "OK"
        f = stop_fields(c.request("bc"))
        p = max(q for q in stores if q < here)
        assert f["watch"] == "200000" and f["thread"] == f"{race.who(p) + 1:02x}"
        assert int.from_bytes(bytes.fromhex(f["08"]), "little") == race.pcs[p][race.who(p)]   # eip
        assert c.request("qC") == f"QC{race.who(p) + 1:02x}"
        out = c.request("qRcmd," + b"icount".hex())
        text = bytes.fromhex(out[1:]).decode()
        assert f"icount {p} of {race.end}" in text and f"vCPU 1: {race.counts[p][1]} instructions" in text
        assert c.read_frame() == b"OK"
    finally:
        c.close()
        stub.close()


def test_a_vcpu_that_never_runs_again_steps_to_the_end(tmp_path):
    """vCPU 0 halts with IF=0 at once: its thread says so, and a step of it
    runs the other vCPU to the end of the recording."""
    from tests.test_smp_model import halting_image

    img = tmp_path / "halt.bin"
    image = halting_image(0, 3000)
    img.write_bytes(image)
    log = str(tmp_path / "halt.vmlog")
    res, _ = record(str(img), image, log, boot_kind="flat", vcpus=2, quantum=QUANTUM,
                    entries=[(1, AP_CODE)], max_instructions=5_000_000)
    assert res.reason.value == "halted"
    tt = TimeTravel(log, interval=2000)
    target = ReplayTarget(tt)
    tt.seek(500)
    assert target.thread_info(0) == "vCPU 0, halted" and target.thread_info(1) == "vCPU 1, running"
    target.select(0)
    ev = target.step()
    assert ev.reason == "replay-end" and tt.icount == tt.end_icount
    ev = target.reverse_step()             # vCPU 0's hlt
    assert ev.reason == "step" and ev.vcpu == 0 and tt.vcpu_icounts()[0] == 1
    with pytest.raises(ValueError):
        target.select(2)


def test_live_target_steps_one_vcpu():
    m = flat_machine(race_image(400, 300), quantum=QUANTUM)
    target = LiveTarget(m)
    assert target.threads() == [0, 1]
    m.run(QUANTUM + 5)                       # inside vCPU 1's first turn
    target.select(0)
    before = [v.icount for v in m.vcpus]
    ev = target.step()
    assert ev.reason == "step" and ev.vcpu == 0
    assert m.vcpus[0].icount == before[0] + 1 and m.vcpus[1].icount == QUANTUM   # vCPU 1 ended its turn
    target.select(1)
    pc1 = target.read_registers()["eip"]
    assert pc1 == pc_of(m.vcpus[1])
    ev = target.step()
    assert ev.vcpu == 1 and m.vcpus[1].icount == QUANTUM + 1
    # a breakpoint in vCPU 1's loop is reported by vCPU 1
    target.add_breakpoint(0, pc1, 1)
    ev = target.resume(lambda: False)
    assert ev.reason == "breakpoint" and ev.vcpu == 1 and pc_of(m.vcpus[1]) == pc1
    assert "vCPU 1:" in target.monitor("icount")
