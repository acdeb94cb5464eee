/*
 * Watchpoints: part of the vCPU's C module (vmm.cpu._native), compiled after
 * core.c, mmu.c and deliver.c.
 *
 * Unicorn's memory hooks filter and report Unicorn-physical addresses (in the
 * shadow MMU, the host frame behind the EPT), while gdb and time travel watch
 * guest-linear ones.  The VMM (Engine.add_linear_watch) hooks the frames the
 * watched pages map to now and lists those pages here (vmm_core.watch_*); the
 * shadow MMU's fill (mmu.c, watch_moved) refuses a translation of a listed
 * page to another frame -- a CR3 switch, a changed and flushed PTE -- as it
 * refuses a #PF: the instruction has not run, the VMM moves its hooks and
 * enters again.  A TLB entry that is still valid keeps the old frame, as the
 * processor's own TLB would.
 *
 * A live run stops right after the instruction that hit: the hit sets
 * `stop_next`, and this code hook, present only while a watchpoint is set,
 * stops before the next instruction (a C check per instruction, where a
 * Python one cost ~1.5 us).
 */

static void next_insn_hook(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    vmm_core *c = ud;
    if (__builtin_expect(c->stop_next, 0)) {
        c->stop_next = 0;
        c->stop_flags |= VMM_STOP_WATCH;
        uc_emu_stop(uc);
    }
}

/* Add (on=1) or remove the stop-after-a-hit code hook.  0 or a uc_err. */
static int vmm_core_watch_stops(vmm_core *c, int on)
{
    if (on && !c->next_hook)
        return (int)uc_hook_add(c->uc, &c->next_hook, UC_HOOK_CODE, (void *)next_insn_hook, c, 1, 0);
    if (!on && c->next_hook) {
        int e = (int)uc_hook_del(c->uc, c->next_hook);
        c->next_hook = 0;
        c->stop_next = 0;
        return e;
    }
    return 0;
}
