"""Resuming after a breakpoint steps over it (gdb's `continue`): the machine run
loop's own rule, for the raw Machine and for the vmm.Machine facade."""
from __future__ import annotations

from replay.session import build_machine, machine_config
from host.serial import NullBackend
from tools.guestkit import asm
from vmm.machine import StopReason

LOAD = 0x100000
# count eax from 0 to 5 around a loop whose first instruction is the breakpoint,
# then leave through the debug-exit port with eax as the status
LOOP = """
    xor eax, eax
top:
    inc eax
    cmp eax, 5
    jne top
    mov dx, 0x501
    out dx, al
"""


def _machine():
    image = asm(LOOP, 32, LOAD)
    cfg = machine_config(32 << 20, 1_767_225_600, "loop.bin", image, "flat", "", LOAD, "none")
    return build_machine(cfg, image, NullBackend()), LOAD + 2   # `inc eax` follows the 2-byte xor


def test_run_after_a_breakpoint_continues_to_the_next_hit():
    m, bp = _machine()
    m.vcpu.set_breakpoints({bp})
    seen = []
    for _ in range(10):
        res = m.run(10_000)
        if res.reason is not StopReason.BREAKPOINT:
            break
        assert m.vcpu.rip == bp
        seen.append((m.vcpu.reg("rax"), res.icount))
    # five hits, one per pass, each before `inc eax` executes; then the guest exits with 5
    assert [eax for eax, _ in seen] == [0, 1, 2, 3, 4]
    assert [ic for _, ic in seen] == [1, 4, 7, 10, 13]
    assert res.reason is StopReason.EXIT and res.status == 5


def test_a_limit_of_zero_room_does_not_step_over():
    m, bp = _machine()
    m.vcpu.set_breakpoints({bp})
    first = m.run(10_000)
    assert first.reason is StopReason.BREAKPOINT
    again = m.run(first.icount)          # no room to run: stays on the breakpoint
    assert again.reason is StopReason.LIMIT and m.vcpu.rip == bp
    nxt = m.run(10_000)                  # still steps over it when it can run
    assert nxt.reason is StopReason.BREAKPOINT and nxt.icount == first.icount + 3


def test_moving_rip_away_cancels_the_step_over():
    m, bp = _machine()
    m.vcpu.set_breakpoints({bp})
    assert m.run(10_000).reason is StopReason.BREAKPOINT
    m.vcpu.rip = LOAD                   # back to `xor eax, eax`: the next arrival is a new hit
    m.vcpu.invalidate_code()
    res = m.run(10_000)
    assert res.reason is StopReason.BREAKPOINT and m.vcpu.reg("rax") == 0 and res.icount == 2


def test_a_breakpoint_in_an_sti_shadow_with_an_interrupt_waiting_is_stepped_over():
    from tests.test_delivery_protected import EOI_MASTER, EXIT, G, addr_after, poke, with_pic
    from tools.guestkit import CODE

    # IRQ3 is raised while IF=0; STI's shadow holds it off for one more instruction, the nop
    code = "cli\n" + poke(3) + "sti\nnop\nmov ebx, 0x22\n" + EXIT
    g = G()
    g.protected_mode(code)
    with_pic(g)
    g.idt32(0x0B, "mov esi, 0x33\n" + EOI_MASTER + "iretd")
    nop = addr_after(code, 5, CODE)
    g.cpu.set_breakpoints({nop})
    g.cpu.invalidate_code()
    res = g.m.run(1000)
    assert res.reason is StopReason.BREAKPOINT and g.cpu.rip == nop
    res = g.m.run(1000)                  # the nop runs, then the interrupt, then on to the exit
    assert res.reason is StopReason.EXIT and g.cpu.gpr(6) == 0x33 and g.cpu.gpr(3) == 0x22
