"""Introspection from outside the guest (VMsafe's idea): watch guest memory, trap
system calls and address-space switches, read a process's memory through its
page tables, as Python callbacks on a live run or a replay.

Nothing here changes what the guest sees.  Memory watches are Unicorn memory
hooks and system-call traps ride on the VM exits the VMM takes anyway (SYSCALL
and SYSENTER are emulated by the VMM, INT n is delivered by it); page-table
walks are done by the VMM with the accessed/dirty bits left alone; hooks never
patch guest memory.  The instruction clock is exact whatever hooks are
installed, so a replay with an Introspector attached still matches its
recording digest for digest (tests/test_introspect.py).  A callback that writes
guest memory or registers would change the run: that is its own business.

    from vmm.introspect import Introspector
    spy = Introspector(pc)                       # a PcMachine (vmm.Machine.pc, a replay's .pc)
    spy.on_syscall(lambda e: print(e.number, e.mechanism))
    spy.watch_virtual(0x200004, 4, lambda a: print(a.rip, a.value))
    spy.on_cr3_switch(lambda e: print(f"{e.old:#x} -> {e.new:#x}"))
    text = spy.read_string(addr, cr3=some_process_cr3)

Memory hooks: Unicorn 2.1.4 calls them with the guest-physical address of an
access and matches their ranges against it (its memory hooks work on physical
addresses), so ``watch_physical`` is one bounded hook, and ``watch_virtual``
hooks the frames the linear range maps to when it is set.

CR3 switches: MOV to CR3 does not leave the CPU core, so a switch is seen at
the first VM exit after it (an interrupt, a system call, port I/O, a timer
deadline); ``Cr3Switch.icount`` is where it was seen, not where it happened.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmm.exits import ExitReason, VmExit
from vmm.memory.paging import CR0_PG, PageFault
from vmm.memory.paging import translate as _walk

__all__ = ["Introspector", "MemoryAccess", "Syscall", "Cr3Switch", "translate", "read_virtual", "PageFault"]


def translate(pc, lin: int, cr3: int | None = None, vcpu: int = 0, access: str = "r", user: bool = False) -> int:
    """The guest-physical address of linear ``lin`` under vCPU ``vcpu``'s paging mode and
    the page tables at ``cr3`` (default: the vCPU's own), accessed and dirty bits left
    alone; PageFault if it is not mapped."""
    v = pc.vcpus[vcpu]
    t = _walk(pc.engine.walk_phys, lin, access, user, v.cr0, v.cr3 if cr3 is None else cr3, v.cr4, v.efer,
              set_ad=False, a20_mask=v.a20_mask)
    return t.phys


def read_virtual(pc, lin: int, n: int, cr3: int | None = None, vcpu: int = 0) -> bytes:
    """``n`` bytes at linear ``lin`` through the page tables (see ``translate``)."""
    out = bytearray()
    while n > 0:
        chunk = min(n, 0x1000 - (lin & 0xFFF))
        out += pc.memory.read(translate(pc, lin, cr3, vcpu), chunk)
        lin += chunk
        n -= chunk
    return bytes(out)


@dataclass
class MemoryAccess:
    """One guest data access inside a watched range (the callback runs before a store lands)."""

    kind: str          # "read" or "write"
    address: int | None   # linear address (None from watch_physical with paging on)
    physical: int      # guest-physical address
    size: int
    value: int         # the value stored (writes; 0 for reads)
    icount: int        # instructions retired before the accessing one
    rip: int           # the accessing instruction
    vcpu: int
    cr3: int
    cpl: int


@dataclass
class Syscall:
    """A system call entering the kernel: SYSCALL, SYSENTER or INT n (a software interrupt
    on a trapped vector).  The callback runs before the VMM emulates the entry, so the
    registers are still the caller's (``number`` is RAX/EAX)."""

    mechanism: str     # "syscall", "sysenter" or "int 0x80" (the vector trapped)
    number: int
    args: tuple[int, ...]  # rdi, rsi, rdx, r10, r8, r9 (SYSCALL); ebx, ecx, edx, esi, edi, ebp (others)
    icount: int
    rip: int
    vcpu: int
    cr3: int
    cpl: int


@dataclass
class Cr3Switch:
    old: int
    new: int
    icount: int        # where the switch was seen (the first VM exit after it)
    vcpu: int


_ARGS64 = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_ARGS32 = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp")


class Introspector:
    """Callbacks on one machine (a PcMachine, or any vmm.machine.Machine).

    Each ``watch_*``/``on_*`` returns a handle for ``remove``.  ``stop()`` from a
    callback ends the current ``run`` after the exit being handled (reason HOST),
    for a live run; a replay must run to its end to be checked, so stop a replay
    by ``Replay.run(until=...)`` instead."""

    def __init__(self, pc) -> None:
        self.pc = pc
        self._mem: dict[int, list] = {}      # handle -> its Unicorn memory hooks
        self._syscalls: dict[int, tuple[Callable[[Syscall], None], frozenset[int]]] = {}
        self._cr3: dict[int, Callable[[Cr3Switch], None]] = {}
        self._exits: dict[int, Callable[[VmExit, int], None]] = {}
        self._next = 1
        self._chained = None
        self._installed = False
        self._last_cr3 = [v.cr3 for v in pc.vcpus]

    # -- memory ------------------------------------------------------------------------
    def _handle(self) -> int:
        h = self._next
        self._next += 1
        return h

    def _event(self, access: int, pa: int, lin: int | None, size: int, value: int) -> MemoryAccess:
        v = self.pc.current
        write = access == v.ACCESS_WRITE
        return MemoryAccess("write" if write else "read", lin, pa, size, value if write else 0,
                            v.current_icount(), v.rip, v.id, v.cr3, v.cpl)

    def watch_physical(self, addr: int, length: int, callback: Callable[[MemoryAccess], None],
                       kind: str = "write") -> int:
        """Call ``callback`` for every guest CPU access ("write", "read" or "access") that
        lands in guest-physical [addr, addr+length), through whatever linear address, at
        any privilege level.  (Device DMA is not a CPU access and is not seen.)  The
        event's ``address`` is None when paging is on: the frame is known, not the alias."""
        v = self.pc.vcpu
        kinds = self._kinds(kind)

        def hook(access, address, size, value):
            cur = self.pc.current
            callback(self._event(access, address, None if cur.cr0 & CR0_PG else address, size, value))

        h = self._handle()
        self._mem[h] = [v.add_watch_hook(kinds, addr, addr + length - 1, hook)]
        return h

    def watch_virtual(self, addr: int, length: int, callback: Callable[[MemoryAccess], None],
                      kind: str = "write", cr3: int | None = None) -> int:
        """Call ``callback`` for every guest access ("write", "read" or "access") to linear
        [addr, addr+length) as the page tables at ``cr3`` (default: the ones loaded now)
        map it when the watch is set: a process's memory, from any privilege level and
        through any alias of the same frames.  Pages not mapped then are not watched;
        a watch does not follow a later remapping (set it again)."""
        v = self.pc.vcpu
        kinds = self._kinds(kind)
        hooks = []
        end = addr + length
        page = addr
        while page < end:
            chunk_end = min(end, (page & ~0xFFF) + 0x1000)
            try:
                pa = translate(self.pc, page, cr3)
            except PageFault:
                page = chunk_end
                continue

            def hook(access, address, size, value, lin0=page, pa0=pa):
                callback(self._event(access, address, lin0 + (address - pa0), size, value))

            hooks.append(v.add_watch_hook(kinds, pa, pa + (chunk_end - page) - 1, hook))
            page = chunk_end
        h = self._handle()
        self._mem[h] = hooks
        return h

    def _kinds(self, kind: str) -> int:
        v = self.pc.vcpu
        try:
            return {"write": v.WATCH_WRITE, "read": v.WATCH_READ, "access": v.WATCH_READ | v.WATCH_WRITE}[kind]
        except KeyError:
            raise ValueError(f"a watch is for 'write', 'read' or 'access', not {kind!r}") from None

    # -- exits: system calls and CR3 --------------------------------------------------------
    def _install(self) -> None:
        if self._installed:
            return
        self._chained = self.pc.trace
        self.pc.trace = self._on_exit
        self._installed = True

    def on_syscall(self, callback: Callable[[Syscall], None], vectors=(0x80,)) -> int:
        """Call ``callback`` at every system call: SYSCALL, SYSENTER, and INT n for each
        vector in ``vectors`` (Linux's i386 ``int 0x80`` by default)."""
        h = self._handle()
        self._syscalls[h] = (callback, frozenset(vectors))
        self._install()
        return h

    def on_exit(self, callback: Callable[[VmExit, int], None]) -> int:
        """Call ``callback(exit, vcpu)`` at every VM exit the VMM handles (``exit.reason``:
        exception, I/O, HLT, SYSCALL, a timer deadline ...; ``exit.rip``, ``exit.icount``,
        ``exit.vector`` for exceptions), before the VMM handles it."""
        h = self._handle()
        self._exits[h] = callback
        self._install()
        return h

    def on_cr3_switch(self, callback: Callable[[Cr3Switch], None]) -> int:
        """Call ``callback`` when a vCPU's CR3 has changed (seen at the next VM exit)."""
        h = self._handle()
        self._last_cr3 = [v.cr3 for v in self.pc.vcpus]
        self._cr3[h] = callback
        self._install()
        return h

    def _on_exit(self, x: VmExit) -> None:
        if self._chained is not None:
            self._chained(x)
        pc = self.pc
        v = pc.current
        for cb in list(self._exits.values()):
            cb(x, v.id)
        if self._cr3:
            cr3 = v.cr3
            old = self._last_cr3[v.id]
            if cr3 != old:
                self._last_cr3[v.id] = cr3
                sw = Cr3Switch(old, cr3, v.icount, v.id)
                for cb in list(self._cr3.values()):
                    cb(sw)
        if not self._syscalls:
            return
        r = x.reason
        if r is ExitReason.SYSCALL:
            mech, names = "syscall", _ARGS64
        elif r is ExitReason.SYSENTER:
            mech, names = "sysenter", _ARGS32
        elif r is ExitReason.EXCEPTION and x.software and x.vector >= 0:
            mech, names = f"int {x.vector:#x}", _ARGS32
        else:
            return
        wide = v.long_mode and v.code_bits == 64
        mask = (1 << 64) - 1 if wide else 0xFFFF_FFFF
        call = Syscall(mech, v.reg("rax") & mask, tuple(v.reg(n) & mask for n in names), v.icount, v.rip, v.id,
                       v.cr3, v.cpl)
        for cb, vectors in list(self._syscalls.values()):
            if mech.startswith("int") and x.vector not in vectors:
                continue
            cb(call)

    # -- handles ----------------------------------------------------------------------------
    def remove(self, handle: int) -> None:
        """Remove one watch or trap."""
        for hook in self._mem.pop(handle, ()):
            self.pc.vcpu.remove_hook(hook)
        self._syscalls.pop(handle, None)
        self._cr3.pop(handle, None)
        self._exits.pop(handle, None)
        if not self._syscalls and not self._cr3 and not self._exits and self._installed:
            self.pc.trace = self._chained
            self._installed = False

    def close(self) -> None:
        """Remove everything this Introspector installed."""
        for h in list(self._mem) + list(self._syscalls) + list(self._cr3) + list(self._exits):
            self.remove(h)

    def stop(self, message: str = "stopped by introspection") -> None:
        """End the current live run after the exit being handled."""
        self.pc.request_host_stop(message)

    # -- reading ------------------------------------------------------------------------
    def read(self, lin: int, n: int, cr3: int | None = None, vcpu: int = 0) -> bytes:
        """``n`` bytes of a process's memory: linear ``lin`` through the page tables at
        ``cr3`` (default: the ones the vCPU uses now)."""
        return read_virtual(self.pc, lin, n, cr3, vcpu)

    def read_string(self, lin: int, cr3: int | None = None, vcpu: int = 0, limit: int = 4096) -> bytes:
        """A NUL-terminated string at linear ``lin`` (without the NUL), at most ``limit`` bytes."""
        out = bytearray()
        while len(out) < limit:
            chunk = read_virtual(self.pc, lin, min(limit - len(out), 0x1000 - (lin & 0xFFF)), cr3, vcpu)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return bytes(out + chunk[:nul])
            out += chunk
            lin += len(chunk)
        return bytes(out)

    def translate(self, lin: int, cr3: int | None = None, vcpu: int = 0) -> int:
        return translate(self.pc, lin, cr3, vcpu)
