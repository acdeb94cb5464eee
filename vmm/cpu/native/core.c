/*
 * The vCPU's C fast path (vmm.cpu._native), built by cffi at install time
 * (vmm/cpu/native_build.py).
 *
 * What runs in C, and why (measurements in ../shared/UNICORN.md section 5 and
 * benchmarks/):
 *
 * * the block hook that keeps the exact instruction clock: a direct-mapped cache
 *   of translation-block instruction counts, the budget check that stops the
 *   vCPU before a block that would run past the next deadline, and the trap
 *   range check used by the HLE BIOS;
 * * the IN/OUT hooks, which call the Python port bus and, when the bus asks for
 *   it, stop the vCPU *exactly after* the I/O instruction.  Unicorn's own
 *   `uc_emu_stop` only takes effect at the end of the translation block, so
 *   the hook sets EIP to the next instruction and leaves the CPU loop with
 *   Unicorn's exported `cpu_loop_exit` (a longjmp back into `cpu_exec`,
 *   taken only after the Python callback has returned);
 * * SYSCALL and SYSENTER are done in their hooks from the MSRs (deliver.c);
 *   the cases left to Python stop exactly *at* the instruction the same way,
 *   so the VMM emulates them while the vCPU is stopped;
 * * the interrupt and invalid-instruction hooks deliver the common exceptions
 *   in C (deliver.c), and record any other and stop;
 * * RDTSC/RDTSCP (the Python binding refuses these hooks) and CPUID call back
 *   into Python and skip the native instruction.
 *
 * Python keeps the reference versions (vmm/cpu/vcpu.py) that tests compare to.
 */
#include <stdint.h>
#include <stdlib.h>
#include <setjmp.h>
#include <string.h>
#include <sys/mman.h>
#include <unicorn/unicorn.h>

#define TBC_BITS 17
#define TBC_SIZE (1u << TBC_BITS)
/* index by address only, so the entry load does not wait for the hflags load;
   the shadow MMU's per-page invalidation (mmu.c) uses the same macro */
#define TBC_INDEX(addr) (((addr) ^ ((addr) >> TBC_BITS)) & (TBC_SIZE - 1))

#define VMM_STOP_BUDGET   0x01u
#define VMM_STOP_TRAP     0x02u
#define VMM_STOP_IO       0x04u
#define VMM_STOP_IO_LATE  0x08u
#define VMM_STOP_EXC      0x10u
#define VMM_STOP_UD       0x20u
#define VMM_STOP_INSN     0x40u
#define VMM_STOP_IRQWIN   0x80u
#define VMM_STOP_MMIO     0x100u  /* an MMIO access asked for a stop: EIP is back at its instruction */
#define VMM_STOP_SMC      0x200u  /* a store rewrote the block that ran it: count what of it retired */
#define VMM_STOP_WATCH    0x400u  /* a watchpoint hit: stopped before the instruction after the access */
#define VMM_WATCH_PAGES   64      /* linear pages whose translation a watch follows */

#define VMM_IO_STOP       0x1
#define VMM_IRQ_WAITING   0x200u /* irq_pending's value: EFLAGS.IF, which the block hook tests against it */
#define VMM_SLOW_SMC      0x4   /* a block was cut by its own store: stop before the next one */
#define VMM_SLOW_FORCED   0x8   /* the next block is the k-instruction block of an exact stop */
#define VMM_FORCED_MAX    511u  /* k is less than the refused block's count, at most TCG_MAX_INSNS (512) */

#define VMM_EV_RDTSC      1
#define VMM_EV_RDTSCP     2
#define VMM_EV_CPUID      3

#define VMM_INSN_SYSCALL  1
#define VMM_INSN_SYSENTER 2

/* CPUX86State field offsets (QEMU 5 as built into Unicorn 2.1.4); checked at
   attach time against values written through the public API. */
#define ENV_EIP        128
#define ENV_EFLAGS     136
#define IF_MASK        0x200u
#define RF_MASK        0x10000u
#define ENV_HFLAGS     176
#define ENV_SEG_CS     (184 + 24 * 1)
#define ENV_ERROR_CODE 5384
#define ENV_EXC_IS_INT 5388
#define ENV_OLD_EXC    5496
#define ENV_TSC_AUX    4896   /* IA32_TSC_AUX: the guest's WRMSR sets it (QEMU's helper_wrmsr) */
#define VMM_ENV_TSC_AUX ENV_TSC_AUX

#define HF_CS32 (1u << 4)
#define HF_CS64 (1u << 15)
#define HF_INHIBIT_IRQ_MASK (1u << 3)
#define EFLAGS_TF (1ull << 8)
#define TBC_TRAP (1u << 30)   /* in a block-count entry's mode: the block starts in the trap range */

typedef struct {
    uint64_t pc;
    uint32_t size;
    uint32_t icount;
    uint32_t mode;
    uint32_t succ;        /* the index of the block that ran after this one last (a prefetch hint) */
    uint32_t xoff;        /* 1 + offset in the block of an exception's EIP whose retired count is xn (0: none) */
    uint32_t xn;
} vmm_tbc_entry;

#define VMM_MMIO_LOG 16

typedef struct {
    uint64_t gpa;
    uint64_t value;
    uint64_t host_pc;     /* where in translated code the access was made (CPUState::mem_io_pc) */
    uint32_t size;
    uint32_t is_write;
} vmm_mmio_rec;

typedef struct vmm_mmio_region {
    struct vmm_core *core;
    uint64_t base;
    uint64_t size;
} vmm_mmio_region;

typedef struct vmm_core {
    void *uc;
    void *cpu;
    uint8_t *env;
    uint64_t icount;      /* retired instructions, counting the current block in full */
    uint64_t budget;      /* stop before a block that would end past this count */
    vmm_tbc_entry *cur;   /* the block now running (its pc, size, count), or NULL */
    uint32_t slow;        /* nonzero when the block hook must look closer: SLOW_SMC | SLOW_FORCED */
    uint32_t stop_flags;
    int32_t exc_vector;
    uint64_t exc_eip;
    uint32_t exc_error;
    uint32_t exc_is_int;
    uint64_t trap_lo;     /* blocks starting in [trap_lo, trap_lo+trap_len) stop */
    uint64_t trap_len;
    uint64_t io_count;
    uint64_t tb_count;
    uint64_t tb_misses;
    uint64_t stop_eip;
    uint32_t trap_kind;
    uint32_t io_late_stops;
    uint32_t irq_pending; /* VMM_IRQ_WAITING: an interrupt waits for IF=1, stop at the first block with IF set */
    void *handle;
    void (*loop_exit)(void *cpu);
    uc_hook hooks[10];
    void *mmu;            /* vmm_mmu: the EPT and host frames (mmu.c) */
    void *shadow;         /* vmm_shadow in --mmu shadow, NULL in nested mode */
    uc_hook mem_hook;
    /* MMIO: the accesses made since the current block started (for an exact
       stop), and the ones to hand back when the stopped instruction runs again */
    uint64_t mmio_count;
    uint32_t mmio_log_len;
    uint32_t mmio_replay_len;
    uint32_t mmio_replay_pos;
    uint32_t mmio_aborts;
    uint64_t mmio_pc_off;        /* offset of CPUState::mem_io_pc, 0 if unknown */
    bool (*restore_state)(void *cpu, uintptr_t host_pc, bool will_exit);
    void (*tb_invalidate_range)(void *uc, uint64_t start, uint64_t end);
    uint64_t (*ram_addr_from_host)(void *uc, void *ptr);
    uint64_t (*tb_invalidations)(void *tcg_ctx);
    void *tcg_ctx;
    uint64_t code_invalidations;
    void **jmp_cache;            /* CPUState::tb_jmp_cache, NULL if unknown */
    uint64_t smc_pc;             /* VMM_STOP_SMC: the block that was cut ... */
    uint64_t smc_cut;            /* ... at this instruction (which runs again) */
    uint64_t smc_restarts;
    uint32_t smc_pending;
    vmm_tbc_entry smc_entry;     /* the store's one-instruction block */
    uint32_t watch_inval;        /* nested MMU: no fills see code rewritten, watch QEMU's count */
    uint64_t seen_inval;         /* ... of invalidated blocks, as of the last block */
    /* QEMU's count of invalidated blocks (TCGContext::tb_phys_invalidate_count), read in
       place by the block hook's common case, which is taken only while it equals fast_seen,
       the count block_hook_full last saw: a block cut by its own store, and code rewritten
       under the nested MMU, both invalidate a block first.  Where the field was not found
       it points at inval_none (1), fast_seen stays 0, and every block takes the full hook. */
    const uint64_t *inval_ctr;
    uint64_t fast_seen;
    uint64_t inval_none;
    uint64_t budget_pc;   /* the block a budget stop refused (its linear pc and size), for the exact stop */
    uint32_t budget_size;
    uint32_t forced;      /* instructions of the block vmm_core_force_block asked for */
    uint32_t forced_rf;   /* RFLAGS.RF was set when that block started */
    uint64_t cflags_off;  /* offset of CPUState::cflags_next_tb, 0 if unknown */
    vmm_tbc_entry forced_tb;   /* that block, once running (cur points here) */
    /* Watchpoints on linear addresses (watch.c): Unicorn's memory hooks see physical
       addresses, so the VMM hooks the frames the watched pages map to now; a TLB fill
       that maps one of them elsewhere fails (VMM_PEND_WATCH) so the VMM re-hooks first */
    uint32_t watch_n;
    uint64_t watch_lin[VMM_WATCH_PAGES];    /* linear page */
    uint64_t watch_phys[VMM_WATCH_PAGES];   /* the Unicorn-physical page it maps to, ~0: none */
    uint64_t watch_moves;
    uint32_t stop_next;                     /* stop before the next instruction (set by a hit) */
    uc_hook next_hook;
    uint32_t tsc_fast;           /* RDTSC/RDTSCP answered in the hook: TSC = tsc_offset + retired count */
    uint64_t tsc_offset;
    uint64_t tsc_hits;           /* RDTSC/RDTSCP answered in C ... */
    uint64_t tsc_misses;         /* ... and by Python (the count at EIP not known without decoding) */
    /* A memory-mapped counter of guest ticks (the HPET main counter) read in C on
       the same terms as RDTSC: at tick `now` (tsc_offset + retired count) it reads
       ctr_base + now - ctr_sync (ctr_base if now <= ctr_sync or ctr_frozen), while
       now < ctr_limit, the first tick at which the device has an event to account
       for; from there on, or at any other address, the device in Python answers.
       ctr_gpa 0: none.  The VMM refreshes these after every access the device takes. */
    uint64_t ctr_gpa;
    uint64_t ctr_base;
    uint64_t ctr_sync;
    uint64_t ctr_limit;
    uint32_t ctr_frozen;
    uint64_t ctr_hits;           /* counter reads answered in C ... */
    uint64_t ctr_misses;         /* ... and left to the device (the count at EIP not known) */
    /* The same device's comparators (cmp_n of them, cmp_stride apart from cmp_gpa): a
       write to one of a timer in cmp_inert (bit n; one whose events nobody can see: an
       edge, one-shot, its interrupt off) is stored into cmp_val[n], the device's own
       storage, on the same terms as a counter read (now < ctr_limit); in cmp_mode32
       only the low half is there.  cmp_gpa 0: none. */
    uint64_t cmp_gpa;
    uint32_t cmp_stride;
    uint32_t cmp_n;
    uint32_t cmp_inert;
    uint32_t cmp_mode32;
    uint64_t *cmp_val;
    uint64_t cmp_hits;           /* comparator writes taken in C */
    uint32_t fast;               /* FD_* (deliver.c): exceptions delivered in the hooks */
    uint64_t fast_delivered;     /* exceptions delivered in C */
    uint64_t fast_misses;        /* ... tried in C and left to Python */
    uint64_t irq_delivered;      /* external interrupts delivered in C (vmm_core_deliver_irq) */
    uint64_t irq_misses;         /* ... tried in C and left to Python */
    uint64_t fast_syscalls;      /* SYSCALLs done in the hook (deliver.c fast_sysinsn) ... */
    uint64_t fast_sysenters;     /* ... and SYSENTERs */
    uint64_t mmio_store_stops;   /* MMIO writes that stopped right after their MOV (mmio_store_stop) */
    uint32_t mmio_store_stop_off; /* 1: every such stop goes through mmio_abort (the reference) */
    uint64_t arch_cap;           /* IA32_ARCH_CAPABILITIES as RDMSR reads it (msr.c), if arch_cap_on */
    uint32_t arch_cap_on;
    vmm_mmio_rec mmio_log[VMM_MMIO_LOG];
    vmm_mmio_rec mmio_replay[VMM_MMIO_LOG];
    vmm_tbc_entry tbc[TBC_SIZE];
} vmm_core;

static int vmm_code_read(vmm_core *c, uint64_t addr, uint8_t *buf, size_t n);
static void vmm_mmu_run_start(vmm_core *c);
static void vmm_mmu_run_end(vmm_core *c);
static int fast_deliver(vmm_core *c, int vector, int sw, uint32_t error);
static int fast_page_fault(vmm_core *c);
static int fast_sysinsn(vmm_core *c, int kind);
static int64_t fd_retired(vmm_core *c, uint64_t lin);
static __thread vmm_core *vmm_cur_core;   /* the core inside uc_emu_start on this thread (msr.c) */

static int vmm_py_io(void *handle, int is_write, uint32_t port, int size,
                     uint32_t value, uint32_t *result);
static int vmm_py_event(void *handle, int kind);
static int vmm_py_mmio(void *handle, int is_write, uint64_t gpa, int size, uint64_t value, uint64_t *result);

static vmm_core *vmm_core_new(void)
{
    vmm_core *c = calloc(1, sizeof(vmm_core));
    if (c) {
        c->budget = UINT64_MAX;
        c->exc_vector = -1;
        c->inval_none = 1;
        c->inval_ctr = &c->inval_none;
    }
    return c;
}

static void vmm_core_free(vmm_core *c) { free(c); }

static void vmm_core_flush_tbc(vmm_core *c)
{
    memset(c->tbc, 0, sizeof(c->tbc));
}

static inline uint32_t code_mode(vmm_core *c)
{
    return *(uint32_t *)(c->env + ENV_HFLAGS) & (HF_CS32 | HF_CS64);
}

static uint32_t tbc_fill(vmm_core *c, uc_engine *uc, vmm_tbc_entry *e, uint64_t addr, uint32_t size,
                         uint32_t mode)
{
    uc_tb tb;
    if (c->slow & VMM_SLOW_FORCED)
        return 0;   /* the cut block: forced_block counts it; Unicorn would answer for the whole block */
    c->tb_misses++;
    if (uc_ctl(uc, UC_CTL_READ_WRITE(UC_CTL_TB_REQUEST_CACHE, 2), addr, &tb) != UC_ERR_OK)
        tb.icount = 0;  /* cannot happen for a block that is executing; the exit correction repairs it */
    e->pc = addr; e->size = size; e->icount = tb.icount;
    e->mode = mode | (addr - c->trap_lo < c->trap_len ? TBC_TRAP : 0);
    e->xoff = 0;
    return tb.icount;
}

/* Mark (on) or unmark the cached blocks that start in [lo, lo+len) as trap-range
   blocks. */
static void tbc_mark_traps(vmm_core *c, uint64_t lo, uint64_t len, int on)
{
    uint64_t i;
    if (len >= TBC_SIZE) {
        for (i = 0; i < TBC_SIZE; i++)
            if (c->tbc[i].pc - lo < len)
                c->tbc[i].mode = on ? c->tbc[i].mode | TBC_TRAP : c->tbc[i].mode & ~TBC_TRAP;
        return;
    }
    for (i = 0; i < len; i++) {
        vmm_tbc_entry *e = &c->tbc[TBC_INDEX(lo + i)];
        if (e->pc == lo + i)
            e->mode = on ? e->mode | TBC_TRAP : e->mode & ~TBC_TRAP;
    }
}

/* Blocks starting in [lo, lo+len) stop before they run (VMM_STOP_TRAP).  The
   block hook's common case sees this only through the TBC_TRAP mark its cache
   entries carry, so the marks follow the range. */
static void vmm_core_set_trap_range(vmm_core *c, uint64_t lo, uint64_t len)
{
    tbc_mark_traps(c, c->trap_lo, c->trap_len, 0);
    c->trap_lo = lo;
    c->trap_len = len;
    tbc_mark_traps(c, lo, len, 1);
}

/* The rare cases, out of the hot path: returns 1 if the vCPU must stop
   before this block. */
static int block_slow(vmm_core *c, uc_engine *uc, uint64_t addr, uint32_t size, uint32_t n)
{
    uint32_t why = 0;
    if (c->slow & VMM_SLOW_SMC) {
        c->slow &= ~VMM_SLOW_SMC;
        why = VMM_STOP_SMC;
    }
    else if (addr - c->trap_lo < c->trap_len)
        why = VMM_STOP_TRAP;
    /* IF only goes from 0 to 1 through instructions that end their block
       (STI, POPF, IRET, ...), so a block boundary is the first boundary at
       which a waiting interrupt can be taken; the STI/MOV SS shadow is
       honoured by the VMM, which single-steps when hflags still inhibit. */
    else if (*(uint64_t *)(c->env + ENV_EFLAGS) & c->irq_pending)
        why = VMM_STOP_IRQWIN;
    else if (c->icount + n > c->budget) {
        why = VMM_STOP_BUDGET;
        c->budget_pc = addr;
        c->budget_size = size;
    }
    if (!why)
        return 0;
    if (c->forced_rf) {
        /* TCG clears RF at the end of every block; the cut block ended where the
           whole block goes on with RF as it was (a breakpoint on the faulting
           instruction stays suppressed exactly as without the cut) */
        *(uint64_t *)(c->env + ENV_EFLAGS) |= RF_MASK;
        c->forced_rf = 0;
    }
    c->stop_flags |= why;
    c->cur = NULL;  /* nothing of this block ran */
    uc_emu_stop(uc);
    return 1;
}

/* QEMU's answer to a store into the block that is running it (a TB whose
   own code a store of it rewrites, tb_invalidate_phys_page_range__locked):
   the instructions before the store retired, EIP goes back to the store, and
   the store runs again alone in a one-instruction block (cflags count 1), so
   the counted block did not run in full.  The one-instruction block is the
   one the CPU loop just looked up, so it sits in tb_jmp_cache (TranslationBlock
   of Unicorn 2.1.4: pc at 0, size at 20, cflags at 24; CF_COUNT_MASK 0x7fff).
   A block that merely jumps back into itself is a full-size block with
   cflags 0 and does not match. */
static int smc_restart(vmm_core *c, uint64_t addr, uint32_t size)
{
    uint64_t tmp = addr ^ (addr >> 6);
    uint8_t *tb;
    if (!c->jmp_cache)
        return 0;
    tb = c->jmp_cache[((tmp >> 6) & 0xFC0) | (tmp & 0x3F)];
    return tb && *(uint64_t *)tb == addr && *(uint16_t *)(tb + 20) == size &&
           (*(uint32_t *)(tb + 24) & 0x7FFF) == 1;
}

/* Under the nested MMU nothing tells the VMM that a guest store rewrote
   translated code elsewhere (the shadow MMU sees it through its write
   protection), and a block retranslated at the same address with the same
   size and mode would hit the block-count cache with its old count.  QEMU
   counts the blocks it invalidates; when that count moved, the cache is
   dropped, all but the entry of the block that just ran (the exit accounting
   reads it; a block that rewrote itself went through smc_restart). */
static void tbc_check_invalidations(vmm_core *c)
{
    uint64_t k = c->tcg_ctx ? c->tb_invalidations(c->tcg_ctx) : 0;
    if (__builtin_expect(k == c->seen_inval, 1))
        return;
    c->seen_inval = k;
    if (c->cur != NULL && c->cur >= c->tbc && c->cur < c->tbc + TBC_SIZE) {
        vmm_tbc_entry keep = *c->cur;
        memset(c->tbc, 0, sizeof(c->tbc));
        *c->cur = keep;
    } else {
        memset(c->tbc, 0, sizeof(c->tbc));
    }
    c->code_invalidations++;
}

/* The first block of a run after vmm_core_force_block: TCG translated it with
   at most `forced` instructions (cflags_next_tb), and it holds exactly that
   many, as the block the budget refused held more from the same address.
   Its count is not asked of Unicorn (which would answer for the whole
   block) nor kept in the block-count cache. */
static void forced_block(vmm_core *c, uc_engine *uc, uint64_t addr, uint32_t size)
{
    vmm_tbc_entry *e = &c->forced_tb;
    uint32_t n = c->forced;
    c->slow &= ~VMM_SLOW_FORCED;
    c->forced = 0;
    e->pc = addr; e->size = size; e->mode = code_mode(c); e->icount = n;
    e->xoff = 0;
    c->forced_rf = (*(uint64_t *)(c->env + ENV_EFLAGS) & RF_MASK) != 0;
    if (((c->icount + n) > c->budget) | c->slow | (addr - c->trap_lo < c->trap_len) |
        ((*(uint64_t *)(c->env + ENV_EFLAGS) & c->irq_pending) != 0)) {
        if (block_slow(c, uc, addr, size, n))
            return;
    }
    c->icount += n;
    c->cur = e;
    c->mmio_log_len = 0;
}

/* Every case of the block hook (block_hook below is its common case). */
__attribute__((noinline)) static void block_hook_full(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    vmm_core *c = ud;
    uint32_t mode = code_mode(c);
    vmm_tbc_entry *e = &c->tbc[TBC_INDEX(addr)];
    uint32_t n;
    uint64_t next;

    if (__builtin_expect(c->cur != NULL && addr - c->cur->pc < c->cur->size, 0) && smc_restart(c, addr, size)) {
        /* Take the cut block back whole (the VMM adds the part before the store
           at the next exit, which comes before the next block: its count never
           reaches the budget check, and the part is less than the block, which
           fitted the budget), then count the store's own block, 1 instruction. */
        c->icount -= c->cur->icount;
        c->smc_pc = c->cur->pc;
        c->smc_cut = addr;
        c->smc_pending = 1;
        c->smc_restarts++;
        c->slow |= VMM_SLOW_SMC;
        c->smc_entry.pc = addr; c->smc_entry.size = size; c->smc_entry.mode = mode; c->smc_entry.icount = 1;
        c->smc_entry.xoff = 0;
        c->icount += 1;
        c->cur = &c->smc_entry;
        c->mmio_log_len = 0;
        return;
    }
    if (c->watch_inval)
        tbc_check_invalidations(c);
    if (c->inval_ctr != &c->inval_none)
        c->fast_seen = *c->inval_ctr;
    if (__builtin_expect(e->pc == addr && e->size == size && (e->mode & ~TBC_TRAP) == mode, 1))
        n = e->icount;
    else
        n = tbc_fill(c, uc, e, addr, size, mode);
    next = c->icount + n;
    /* the trap range (set while the HLE BIOS is in, so for whole boots) and a
       waiting interrupt (often for long stretches with IF=0) are tested in the
       hook itself, not left to a call that runs before every block */
    if (__builtin_expect((next > c->budget) | c->slow | (addr - c->trap_lo < c->trap_len) |
                         ((*(uint64_t *)(c->env + ENV_EFLAGS) & c->irq_pending) != 0), 0)) {
        if (c->slow & VMM_SLOW_FORCED) {
            forced_block(c, uc, addr, size);
            return;
        }
        if (block_slow(c, uc, addr, size, n))
            return;
    }
    c->icount = next;
    c->cur = e;
    c->mmio_log_len = 0;
}

/* The hook Unicorn calls before every translated block (~10^9 times in a Linux
   boot): the common case only, a leaf that changes nothing until it is sure.
   It needs a cached count for this block (its pc, size and code mode; an entry
   of a block in the trap range carries TBC_TRAP and never matches), no block
   invalidated since the last call of block_hook_full (so the block that ran
   before was not cut by its own store, and no translated code was rewritten
   under the nested MMU), nothing slow pending, the budget, and no waiting
   interrupt with IF set.  Anything else is block_hook_full's, which starts
   from scratch. */
static void block_hook(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
    vmm_core *c = ud;
    uint32_t idx = TBC_INDEX(addr);
    vmm_tbc_entry *e = &c->tbc[idx];
    uint64_t next = c->icount + e->icount;
    if (c->cur)
        c->cur->succ = idx;     /* the block that came after the last one, for its next run */
    /* one predicted branch per test (cheaper here than or-ing flags) */
    if (__builtin_expect(e->pc != addr, 0)) goto full;
    if (__builtin_expect(e->size != size, 0)) goto full;
    if (__builtin_expect(e->mode != code_mode(c), 0)) goto full;
    if (__builtin_expect(*c->inval_ctr != c->fast_seen, 0)) goto full;
    if (__builtin_expect(c->slow != 0, 0)) goto full;
    if (__builtin_expect(next > c->budget, 0)) goto full;
    if (__builtin_expect((*(uint64_t *)(c->env + ENV_EFLAGS) & c->irq_pending) != 0, 0)) goto full;
    c->icount = next;
    c->cur = e;
    c->mmio_log_len = 0;
    /* the entry of the block that followed this one last time: most blocks have one
       successor, and its entry is a cache miss more often than not */
    __builtin_prefetch(&c->tbc[e->succ & (TBC_SIZE - 1)]);
    return;
full:
    block_hook_full(uc, addr, size, ud);
}

/* The index in b of the opcode after the legacy and (in 64-bit code) REX prefixes,
   noting 0x66, 0x67 and REX.W; 15 if there is none within the 15 bytes. */
static int skip_prefixes(const uint8_t *b, uint32_t mode, int *p66, int *p67, int *rexw)
{
    int i;
    for (i = 0; i < 15; i++) {
        uint8_t x = b[i];
        if (x == 0x66) { *p66 = 1; continue; }
        if (x == 0x67) { *p67 = 1; continue; }
        if (x == 0xF0 || x == 0xF2 || x == 0xF3 || x == 0x2E ||
            x == 0x36 || x == 0x3E || x == 0x26 || x == 0x64 || x == 0x65)
            continue;
        if ((mode & HF_CS64) && (x & 0xF0) == 0x40) {
            *rexw = (x & 8) != 0;
            continue;
        }
        break;
    }
    return i;
}

/* Length of a non-string IN/OUT at the current EIP, or 0 for string forms
   (INS/OUTS update ESI/EDI/ECX after the port access, so they cannot be cut
   short: they stop at the end of the block instead). */
static int io_insn_len(vmm_core *c, uint64_t eip)
{
    uint8_t b[16];
    uint64_t cs_base = *(uint64_t *)(c->env + ENV_SEG_CS + 8);
    int i, p66 = 0, p67 = 0, rexw = 0;
    if (vmm_code_read(c, cs_base + eip, b, sizeof(b)) != UC_ERR_OK) {
        /* the instruction may end right before an unmapped page */
        for (i = 0; i < 15; i++) {
            if (vmm_code_read(c, cs_base + eip + i, b + i, 1) != UC_ERR_OK)
                break;
        }
        if (i == 0) return 0;
    }
    i = skip_prefixes(b, code_mode(c), &p66, &p67, &rexw);
    if (i >= 15) return 0;
    if (b[i] == 0xE4 || b[i] == 0xE5 || b[i] == 0xE6 || b[i] == 0xE7) return i + 2;
    if (b[i] == 0xEC || b[i] == 0xED || b[i] == 0xEE || b[i] == 0xEF) return i + 1;
    return 0;
}

static void exit_now(vmm_core *c)
{
    uc_emu_stop(c->uc);
    c->loop_exit(c->cpu);   /* longjmp into cpu_exec; does not return */
}

/* Stop with EIP at ``next``, the instruction that made the I/O access complete
   (VMM_STOP_IO).  An instruction in the shadow of STI or MOV SS ends the shadow
   by completing (SDM vol. 3 6.8.3), so an interrupt it raised is taken here. */
static void stop_after(vmm_core *c, uint64_t next)
{
    *(uint32_t *)(c->env + ENV_HFLAGS) &= ~HF_INHIBIT_IRQ_MASK;
    *(uint64_t *)(c->env + ENV_EIP) = next;
    c->stop_eip = next;
    c->stop_flags |= VMM_STOP_IO;
    exit_now(c);   /* a longjmp: Unicorn's exit-request check would put EIP back at the instruction */
}

static void io_stop(vmm_core *c, int is_in, int size, uint32_t value)
{
    uint64_t eip = *(uint64_t *)(c->env + ENV_EIP);
    int len = io_insn_len(c, eip);
    if (len == 0) {
        c->stop_flags |= VMM_STOP_IO_LATE;
        c->io_late_stops++;
        uc_emu_stop(c->uc);
        return;
    }
    if (is_in) {
        uint64_t *rax = (uint64_t *)(c->env + 0);
        if (size == 1) *rax = (*rax & ~0xFFull) | (value & 0xFF);
        else if (size == 2) *rax = (*rax & ~0xFFFFull) | (value & 0xFFFF);
        else *rax = value;  /* a 32-bit destination zero-extends */
    }
    stop_after(c, eip + len);
}

static void out_hook(uc_engine *uc, uint32_t port, int size, uint32_t value, void *ud)
{
    vmm_core *c = ud;
    uint32_t dummy = 0;
    c->io_count++;
    if (vmm_py_io(c->handle, 1, port, size, value, &dummy) & VMM_IO_STOP)
        io_stop(c, 0, size, value);
}

static uint32_t in_hook(uc_engine *uc, uint32_t port, int size, void *ud)
{
    vmm_core *c = ud;
    uint32_t v = 0xFFFFFFFFu;
    c->io_count++;
    if (vmm_py_io(c->handle, 0, port, size, 0, &v) & VMM_IO_STOP)
        io_stop(c, 1, size, v);
    return v;
}

static void intr_hook(uc_engine *uc, uint32_t intno, void *ud)
{
    vmm_core *c = ud;
    c->exc_vector = (int32_t)intno;
    c->exc_eip = *(uint64_t *)(c->env + ENV_EIP);
    c->exc_error = *(uint32_t *)(c->env + ENV_ERROR_CODE);
    c->exc_is_int = *(uint32_t *)(c->env + ENV_EXC_IS_INT);
    /* Unicorn never runs do_interrupt, so QEMU's double-fault bookkeeping
       would turn the next fault into #DF: the VMM applies the SDM rules. */
    *(int32_t *)(c->env + ENV_OLD_EXC) = -1;
    if (c->fast && fast_deliver(c, (int)intno, c->exc_is_int != 0, c->exc_error))
        return;   /* delivered: the guest goes on at its handler */
    c->stop_flags |= VMM_STOP_EXC;
    uc_emu_stop(uc);
}

static bool invalid_hook(uc_engine *uc, void *ud)
{
    vmm_core *c = ud;
    c->exc_vector = 6;
    c->exc_eip = *(uint64_t *)(c->env + ENV_EIP);
    c->exc_error = 0;
    c->exc_is_int = 0;
    if (c->fast && fast_deliver(c, 6, 0, 0))
        return true;   /* delivered: Unicorn goes on at the handler */
    c->stop_flags |= VMM_STOP_UD;
    uc_emu_stop(uc);
    return true;
}

/* RDTSC and RDTSCP read the machine's clock, which the VMM states as
   tsc_offset plus this vCPU's retired count (tsc_fast; Machine sets it up).
   The count at the instruction is the block's start count plus what the block
   retired before EIP, known here when fd_retired knows it without decoding:
   EIP at the block's start, or the offset Python decoded the first time it
   answered for this block (Engine._on_event, the reference, leaves it in the
   block's cache entry as the exit accounting does for exceptions).  A Linux
   boot runs ~230,000 of these, nearly all from a few blocks. */
/* 1: *now is the machine's tick at the instruction now executing (clock.now()) */
static int tick_now(vmm_core *c, uint64_t *now)
{
    int64_t retired;
    if (!c->tsc_fast || !c->cur || c->smc_pending || c->cur == &c->forced_tb)
        return 0;
    retired = fd_retired(c, *(uint64_t *)(c->env + ENV_SEG_CS + 8) + *(uint64_t *)(c->env + ENV_EIP));
    if (retired < 0)
        return -1;
    *now = c->tsc_offset + c->icount - c->cur->icount + (uint64_t)retired;
    return 1;
}

static int tsc_answer(vmm_core *c, int rdtscp)
{
    uint64_t *regs = (uint64_t *)c->env, tsc;
    int k = tick_now(c, &tsc);
    if (k <= 0) {
        c->tsc_misses += k < 0;
        return 0;
    }
    regs[0] = tsc & 0xFFFFFFFFu;      /* RAX */
    regs[2] = tsc >> 32;              /* RDX */
    if (rdtscp)
        regs[1] = *(uint64_t *)(c->env + ENV_TSC_AUX) & 0xFFFFFFFFu;   /* RCX: what WRMSR left */
    c->tsc_hits++;
    return 1;   /* skip the native instruction */
}

static int rdtsc_hook(uc_engine *uc, void *ud)
{
    vmm_core *c = ud;
    if (tsc_answer(c, 0))
        return 1;
    return vmm_py_event(c->handle, VMM_EV_RDTSC);
}

static int rdtscp_hook(uc_engine *uc, void *ud)
{
    vmm_core *c = ud;
    if (tsc_answer(c, 1))
        return 1;
    return vmm_py_event(c->handle, VMM_EV_RDTSCP);
}

static int cpuid_hook(uc_engine *uc, void *ud)
{
    return vmm_py_event(((vmm_core *)ud)->handle, VMM_EV_CPUID);
}

static void syscall_hook(uc_engine *uc, void *ud)
{
    vmm_core *c = ud;
    if (fast_sysinsn(c, VMM_INSN_SYSCALL))
        return;
    c->trap_kind = VMM_INSN_SYSCALL;
    c->stop_eip = *(uint64_t *)(c->env + ENV_EIP);
    c->stop_flags |= VMM_STOP_INSN;
    exit_now(c);
}

static void sysenter_hook(uc_engine *uc, void *ud)
{
    vmm_core *c = ud;
    if (fast_sysinsn(c, VMM_INSN_SYSENTER))
        return;
    c->trap_kind = VMM_INSN_SYSENTER;
    c->stop_eip = *(uint64_t *)(c->env + ENV_EIP);
    c->stop_flags |= VMM_STOP_INSN;
    exit_now(c);
}

/* ---------------------------------------------------------------- MMIO */
/* Guest accesses to guest-physical pages the MMIO bus claims reach these two
   callbacks (Unicorn mmio regions; in shadow mode the EPT maps those GPAs to
   the same Unicorn physical addresses).  The Python bus does the access.

   An exact stop.  When the access asks to stop (it raised an interrupt, or
   ended the run), the vCPU must stop right after the instruction, whatever
   the block shape, as port I/O does.  Unicorn checks for a stop request after
   every memory operation and then leaves with cpu_loop_exit_restore: EIP goes
   back to the start of the instruction, which has not retired.  So the
   accesses this instruction made are kept (`mmio_replay`), the vCPU stops at
   the instruction, and the VMM runs that one instruction again: its MMIO
   accesses are answered from `mmio_replay` (same values, no second side
   effect) until they are used up.  Which logged accesses belong to the
   instruction is found from where in translated code each was made
   (CPUState::mem_io_pc), mapped back to a guest EIP by cpu_restore_state. */
static void mmio_log(vmm_core *c, uint64_t gpa, uint32_t size, uint32_t is_write, uint64_t value)
{
    vmm_mmio_rec *r;
    if (c->mmio_log_len == VMM_MMIO_LOG) {
        memmove(c->mmio_log, c->mmio_log + 1, sizeof(vmm_mmio_rec) * (VMM_MMIO_LOG - 1));
        c->mmio_log_len--;
    }
    r = &c->mmio_log[c->mmio_log_len++];
    r->gpa = gpa;
    r->size = size;
    r->is_write = is_write;
    r->value = value;
    r->host_pc = c->mmio_pc_off ? *(uint64_t *)((uint8_t *)c->cpu + c->mmio_pc_off) : 0;
}

static uint64_t env_eip(vmm_core *c) { return *(uint64_t *)(c->env + ENV_EIP); }

static void mmio_abort(vmm_core *c)
{
    uint32_t last = c->mmio_log_len - 1, first = last, i;
    uint64_t eip;
    if (c->mmio_pc_off && c->restore_state && c->mmio_log[last].host_pc &&
        c->restore_state(c->cpu, c->mmio_log[last].host_pc, false)) {
        eip = env_eip(c);
        while (first > 0 && c->mmio_log[first - 1].host_pc &&
               c->restore_state(c->cpu, c->mmio_log[first - 1].host_pc, false) && env_eip(c) == eip)
            first--;
        c->restore_state(c->cpu, c->mmio_log[last].host_pc, false);
    }
    c->mmio_replay_len = last - first + 1;
    for (i = 0; i < c->mmio_replay_len; i++)
        c->mmio_replay[i] = c->mmio_log[first + i];
    c->mmio_replay_pos = 0;
    c->mmio_aborts++;
    c->stop_flags |= VMM_STOP_MMIO;
    uc_emu_stop(c->uc);
}

/* A MOV store to memory (88/89 /r, C6/C7 /0 with a memory operand) at eip: its
   length, and in *opsize the bytes it stores; 0 for anything else, and for 16-bit
   addressing (the common forms only).  After its one store such an instruction
   has nothing left to do. */
static int store_insn_len(vmm_core *c, uint64_t eip, uint32_t *opsize)
{
    uint8_t b[16];
    uint64_t cs_base = *(uint64_t *)(c->env + ENV_SEG_CS + 8);
    uint32_t mode = code_mode(c);
    int i, p66 = 0, p67 = 0, rexw = 0, n, op16, modrm, mod, rm;
    if (vmm_code_read(c, cs_base + eip, b, sizeof(b)) != UC_ERR_OK)
        return 0;
    i = skip_prefixes(b, mode, &p66, &p67, &rexw);
    if (i >= 13)
        return 0;
    /* 16-bit addressing: a 16-bit segment without 0x67, a 32-bit one with it */
    if (!(mode & HF_CS64) && (((mode & HF_CS32) != 0) == p67))
        return 0;
    op16 = (mode & HF_CS64) ? (p66 && !rexw) : (((mode & HF_CS32) == 0) != p66);
    switch (b[i]) {
    case 0x88: case 0xC6: *opsize = 1; break;
    case 0x89: case 0xC7: *opsize = rexw ? 8 : op16 ? 2 : 4; break;
    default: return 0;
    }
    modrm = b[i + 1];
    mod = modrm >> 6;
    rm = modrm & 7;
    if (mod == 3 || ((b[i] == 0xC6 || b[i] == 0xC7) && ((modrm >> 3) & 7) != 0))
        return 0;
    n = i + 2;
    if (rm == 4) {                         /* SIB */
        if (mod == 0 && (b[n] & 7) == 5)
            n += 4;
        n += 1;
    } else if (mod == 0 && rm == 5) {
        n += 4;                            /* disp32 (RIP-relative in 64-bit mode) */
    }
    if (mod == 1) n += 1;
    if (mod == 2) n += 4;
    if (b[i] == 0xC6) n += 1;
    if (b[i] == 0xC7) n += op16 ? 2 : 4;
    return n <= 15 ? n : 0;
}

/* An MMIO write that asked for a stop, made by a plain MOV store whose whole
   store it was: the instruction is complete, so the vCPU stops right after it
   (as after an OUT, io_stop), where mmio_abort would stop at it and have the
   VMM run it again with its accesses replayed.  Does not return if it stopped so. */
static int mmio_store_stop(vmm_core *c, uint32_t size)
{
    vmm_mmio_rec *r = &c->mmio_log[c->mmio_log_len - 1];
    uint32_t opsize = 0;
    uint64_t eip;
    int len;
    if (*(uint64_t *)(c->env + ENV_EFLAGS) & EFLAGS_TF)
        return 0;                          /* the #DB after the instruction is TCG's to raise */
    if (!c->mmio_pc_off || !c->restore_state || !r->host_pc || !c->restore_state(c->cpu, r->host_pc, false))
        return 0;
    eip = env_eip(c);
    len = store_insn_len(c, eip, &opsize);
    if (len == 0 || opsize != size)        /* not a MOV store, or a part of one (a split access) */
        return 0;
    c->mmio_store_stops++;
    stop_after(c, eip + len);
    return 1;
}

/* 1: the access was answered from the replay list (value in *v for reads) */
static int mmio_replayed(vmm_core *c, uint64_t gpa, uint32_t size, uint32_t is_write, uint64_t *v)
{
    vmm_mmio_rec *r;
    if (c->mmio_replay_pos >= c->mmio_replay_len)
        return 0;
    r = &c->mmio_replay[c->mmio_replay_pos];
    if (r->gpa != gpa || r->size != size || r->is_write != is_write) {
        c->mmio_replay_len = 0;   /* the instruction went another way: everything from here is live */
        return 0;
    }
    c->mmio_replay_pos++;
    *v = r->value;
    mmio_log(c, gpa, size, is_write, r->value);
    return 1;
}

/* 1: a read of the tick counter (ctr_*, above) answered in *v */
static int ctr_answer(vmm_core *c, uint64_t gpa, unsigned size, uint64_t *v)
{
    uint64_t now, val, off = gpa - c->ctr_gpa;
    int k;
    if (!c->ctr_gpa || !((off == 0 && (size == 4 || size == 8)) || (off == 4 && size == 4)))
        return 0;
    k = tick_now(c, &now);
    if (k <= 0) {
        c->ctr_misses += k < 0;
        return 0;
    }
    if (now >= c->ctr_limit)
        return 0;
    val = c->ctr_frozen || now <= c->ctr_sync ? c->ctr_base : c->ctr_base + (now - c->ctr_sync);
    val >>= off * 8;
    *v = size == 8 ? val : val & 0xFFFFFFFFu;
    c->ctr_hits++;
    return 1;
}

/* 1: a write to an inert timer's comparator (cmp_*, above) stored */
static int cmp_take(vmm_core *c, uint64_t gpa, unsigned size, uint64_t value)
{
    uint64_t now, off, mask, n, r;
    if (!c->ctr_gpa || !c->cmp_gpa || gpa < c->cmp_gpa)
        return 0;
    off = gpa - c->cmp_gpa;
    n = off / c->cmp_stride;
    r = off % c->cmp_stride;
    if (n >= c->cmp_n || !(c->cmp_inert >> n & 1) || !((r == 0 && (size == 4 || size == 8)) || (r == 4 && size == 4)))
        return 0;
    if (tick_now(c, &now) <= 0 || now >= c->ctr_limit)
        return 0;
    mask = (size == 8 ? ~(uint64_t)0 : 0xFFFFFFFFu) << (r * 8);
    if (c->cmp_mode32 >> n & 1)
        mask &= 0xFFFFFFFFu;   /* the high half is not there */
    c->cmp_val[n] = (c->cmp_val[n] & ~mask) | ((value << (r * 8)) & mask);
    c->cmp_hits++;
    return 1;
}

static uint64_t mmio_read_cb(uc_engine *uc, uint64_t offset, unsigned size, void *ud)
{
    vmm_mmio_region *reg = ud;
    vmm_core *c = reg->core;
    uint64_t gpa = reg->base + offset, v = 0;
    if (mmio_replayed(c, gpa, size, 0, &v))
        return v;
    c->mmio_count++;
    if (ctr_answer(c, gpa, size, &v)) {
        mmio_log(c, gpa, size, 0, v);
        return v;
    }
    if (vmm_py_mmio(c->handle, 0, gpa, (int)size, 0, &v)) {
        mmio_log(c, gpa, size, 0, v);
        mmio_abort(c);
        return v;
    }
    mmio_log(c, gpa, size, 0, v);
    return v;
}

static void mmio_write_cb(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value, void *ud)
{
    vmm_mmio_region *reg = ud;
    vmm_core *c = reg->core;
    uint64_t gpa = reg->base + offset, v = 0, dummy = 0;
    if (mmio_replayed(c, gpa, size, 1, &v))
        return;
    c->mmio_count++;
    if (cmp_take(c, gpa, size, value)) {
        mmio_log(c, gpa, size, 1, value);
        return;
    }
    if (vmm_py_mmio(c->handle, 1, gpa, (int)size, value, &dummy)) {
        mmio_log(c, gpa, size, 1, value);
        if (!c->mmio_store_stop_off && mmio_store_stop(c, size))
            return;
        mmio_abort(c);
        return;
    }
    mmio_log(c, gpa, size, 1, value);
}

static vmm_mmio_region *vmm_mmio_map(vmm_core *c, uint64_t base, uint64_t size)
{
    vmm_mmio_region *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->core = c;
    r->base = base;
    r->size = size;
    if (uc_mmio_map(c->uc, base, size, mmio_read_cb, r, mmio_write_cb, r) != UC_ERR_OK) {
        free(r);
        return NULL;
    }
    return r;
}

static int vmm_mmio_unmap(vmm_core *c, vmm_mmio_region *r)
{
    int e = (int)uc_mem_unmap(c->uc, r->base, r->size);
    if (e == UC_ERR_OK)
        free(r);
    return e;
}

static void vmm_mmio_replay_clear(vmm_core *c)
{
    c->mmio_replay_len = c->mmio_replay_pos = 0;
}

/* ---------------------------------------------------------------- code invalidation */
/* The VMM (delivery, the BIOS, DMA) wrote n bytes of guest RAM at host address
   `host`.  Unicorn never notices host writes (UNICORN.md 6), so translated
   code overlapping those bytes is invalidated here, and only that: QEMU's
   tb_invalidate_phys_range checks each block of the page against the byte
   range.  If any block went, the block-count cache may now hold counts of
   code that changed under an unchanged (address, size, mode) key: it is
   dropped too.  Returns the number of blocks invalidated. */
static uint64_t host_write(vmm_core *c, uint8_t *host, uint64_t n, int code_changed)
{
    uint64_t before, after, ram;
    if (!c->tb_invalidate_range || !c->ram_addr_from_host || !c->tb_invalidations || n == 0) {
        if (code_changed)
            memset(c->tbc, 0, sizeof(c->tbc));
        return 0;
    }
    ram = c->ram_addr_from_host(c->uc, host);
    if (ram == ~0ull)
        return 0;
    before = c->tcg_ctx ? c->tb_invalidations(c->tcg_ctx) : 0;
    c->tb_invalidate_range(c->uc, ram, ram + n);
    after = c->tcg_ctx ? c->tb_invalidations(c->tcg_ctx) : 1;
    if (after != before && code_changed) {
        /* the whole table cleared (4 MiB): dear when it is done often, hence code_changed */
        memset(c->tbc, 0, sizeof(c->tbc));
        c->code_invalidations++;
    }
    return after - before;
}

static uint64_t vmm_core_host_write(vmm_core *c, uint8_t *host, uint64_t n)
{
    return host_write(c, host, n, 1);
}

/* Locate CPUState and CPUX86State behind the public handle.  uc_struct holds
   `reg_read` and, 38 pointers later, `cpu` (include/uc_priv.h of 2.1.4); the
   X86CPU object holds env after CPUState.  Both are validated: env must hold
   the register values the caller just wrote through uc_reg_write. */
static int vmm_core_attach(vmm_core *c, void *uc, uint64_t reg_read_fn, uint64_t loop_exit_fn)
{
    uint64_t *w = (uint64_t *)uc;
    int i, off = -1;
    uint64_t probe[4];
    uint8_t *cpu;

    for (i = 0; i < 4; i++)
        probe[i] = 0x5a17c0de00000000ull | ((uint64_t)(i + 1) * 0x01010101ull);
    uc_reg_write(uc, UC_X86_REG_RAX, &probe[0]);
    uc_reg_write(uc, UC_X86_REG_RCX, &probe[1]);
    uc_reg_write(uc, UC_X86_REG_RDX, &probe[2]);
    uc_reg_write(uc, UC_X86_REG_RBX, &probe[3]);

    for (i = 0; i < 512; i++) {
        if (w[i] == reg_read_fn) { off = i; break; }
    }
    if (off < 0) return -1;
    cpu = (uint8_t *)w[off + 38];
    if (!cpu) return -2;
    for (i = 0; i < 0x40000; i += 8) {
        if (memcmp(cpu + i, probe, sizeof(probe)) == 0) {
            c->env = cpu + i;
            break;
        }
    }
    if (!c->env) return -3;
    c->uc = uc;
    c->cpu = cpu;
    /* CPUState::env_ptr points at env; mem_io_pc follows it after
       icount_decr_ptr, tb_jmp_cache[1 << 12], node, breakpoints, watchpoints,
       watchpoint_hit and opaque (include/hw/core/cpu.h of 2.1.4); the VMM
       checks the offset against a real MMIO access at start-up. */
    for (i = 0; i < 0x1000; i += 8) {
        if (*(uint64_t *)(cpu + i) == (uint64_t)(uintptr_t)c->env) {
            c->mmio_pc_off = (uint64_t)i + 8 + 8 + 8 * 4096 + 16 + 16 + 16 + 8 + 8;
            c->jmp_cache = (void **)(cpu + i + 8 + 8);
            /* before env_ptr: cflags_next_tb (u32), interrupt_request (u32),
               singlestep_enabled (int, padded), icount_budget, icount_extra,
               random_seed (8 each), jmp_env (sigjmp_buf, 200 bytes on x86-64
               glibc), cpu_ases, num_ases (padded), as, memory (8 each); a
               CPU reset leaves cflags_next_tb at -1, which is checked */
            if (i >= 272 && *(uint32_t *)(cpu + i - 272) == 0xFFFFFFFFu && sizeof(sigjmp_buf) == 200)
                c->cflags_off = (uint64_t)i - 272;
            break;
        }
    }
    c->loop_exit = (void (*)(void *))(uintptr_t)loop_exit_fn;
    return 0;
}

static int vmm_core_install_hooks(vmm_core *c)
{
    uc_engine *uc = c->uc;
    uc_err e = UC_ERR_OK;
    e |= uc_hook_add(uc, &c->hooks[0], UC_HOOK_BLOCK, (void *)block_hook, c, 1, 0);
    e |= uc_hook_add(uc, &c->hooks[1], UC_HOOK_INSN, (void *)in_hook, c, 1, 0, UC_X86_INS_IN);
    e |= uc_hook_add(uc, &c->hooks[2], UC_HOOK_INSN, (void *)out_hook, c, 1, 0, UC_X86_INS_OUT);
    e |= uc_hook_add(uc, &c->hooks[3], UC_HOOK_INTR, (void *)intr_hook, c, 1, 0);
    e |= uc_hook_add(uc, &c->hooks[4], UC_HOOK_INSN_INVALID, (void *)invalid_hook, c, 1, 0);
    e |= uc_hook_add(uc, &c->hooks[5], UC_HOOK_INSN, (void *)rdtsc_hook, c, 1, 0, UC_X86_INS_RDTSC);
    e |= uc_hook_add(uc, &c->hooks[6], UC_HOOK_INSN, (void *)rdtscp_hook, c, 1, 0, UC_X86_INS_RDTSCP);
    e |= uc_hook_add(uc, &c->hooks[7], UC_HOOK_INSN, (void *)cpuid_hook, c, 1, 0, UC_X86_INS_CPUID);
    e |= uc_hook_add(uc, &c->hooks[8], UC_HOOK_INSN, (void *)syscall_hook, c, 1, 0, UC_X86_INS_SYSCALL);
    e |= uc_hook_add(uc, &c->hooks[9], UC_HOOK_INSN, (void *)sysenter_hook, c, 1, 0, UC_X86_INS_SYSENTER);
    return (int)e;
}

static int vmm_vmem_read(vmm_core *c, uint64_t addr, uint8_t *buf, size_t size)
{
    return vmm_code_read(c, addr, buf, size);
}

/* One entry into guest code.  Resets the per-run stop state first. */
static int vmm_core_run(vmm_core *c, uint64_t begin, uint64_t until)
{
    int forced;
    c->stop_flags = 0;
    c->budget_pc = ~0ull;
    c->exc_vector = -1;
    c->trap_kind = 0;
    forced = c->forced != 0;   /* an exact stop's cut block: no second entry in this run */
    for (;;) {
        int e;
        vmm_core *prev;
        vmm_mmu_run_start(c);
        prev = vmm_cur_core;
        vmm_cur_core = c;
        e = (int)uc_emu_start(c->uc, begin, until, 0, 0);
        vmm_cur_core = prev;
        vmm_mmu_run_end(c);
        if (c->slow & VMM_SLOW_FORCED) {   /* a request no block took (the run stopped first) ends with it */
            *(uint32_t *)((uint8_t *)c->cpu + c->cflags_off) = 0xFFFFFFFFu;
            c->slow &= ~VMM_SLOW_FORCED;
            c->forced = 0;
        }
        c->forced_rf = 0;
        /* a guest #PF from the shadow MMU stops emu_start: deliver it here and go on */
        if (e == UC_ERR_EXCEPTION && c->fast && !c->stop_flags && !forced && c->shadow && fast_page_fault(c)) {
            begin = *(uint64_t *)(c->env + ENV_EIP);
            continue;
        }
        return e;
    }
}

/* The exact stop inside a block, k instructions into it (engine.py,
   Engine._finish_budget): the next run starts with a block TCG translates
   with at most k instructions (CPUState::cflags_next_tb, as QEMU's icount
   mode and precise self-modifying code use it), and the block hook stops
   before the one after it.  The whole block stays translated: the cut one
   is found only by a lookup that asks for k instructions.  Returns 0, or -1
   if this Unicorn build's CPUState was not recognised or k is out of range
   (the caller cuts the block with an exit instead). */
static int vmm_core_force_block(vmm_core *c, uint32_t k)
{
    if (!c->cflags_off || k == 0 || k > VMM_FORCED_MAX)
        return -1;
    *(uint32_t *)((uint8_t *)c->cpu + c->cflags_off) = k;
    c->forced = k;
    c->slow |= VMM_SLOW_FORCED;
    return 0;
}

/* Unicorn functions the core calls that its public API does not offer
   (exported QEMU symbols; the VMM passes their addresses). */
/* Is [p, p+n) readable memory of this process?  (mincore fails with ENOMEM
   on unmapped pages.) */
static int readable(const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)4095, end = (uintptr_t)p + n;
    unsigned char vec[64];
    if (!p || ((uintptr_t)p & 7) || n == 0 || end < (uintptr_t)p)
        return 0;
    while (a < end) {
        size_t len = end - a > 64 * 4096 ? 64 * 4096 : end - a;
        if (mincore((void *)a, len, vec) != 0)
            return 0;
        a += (len + 4095) & ~(size_t)4095;
    }
    return 1;
}

/* uc_struct::tcg_ctx, found by what it holds: a TCGContext has, in a row,
   the code prologue and epilogue (inside the code buffer), the code buffer
   (page aligned), its size (what the VMM asked for, less QEMU's guard and
   rounding), the high-water mark (an offset) and the code pointer (inside
   the buffer). */
static int looks_like_tcg_ctx(uint64_t *p, uint64_t tcg_buffer_size)
{
    size_t k;
    if (!readable(p, 0x100 * 8))
        return 0;
    for (k = 2; k + 3 < 0x100; k++) {
        uint64_t buf = p[k], size = p[k + 1];
        if ((buf & 0xFFF) || !buf || size > tcg_buffer_size || size + (2u << 20) < tcg_buffer_size)
            continue;
        if (p[k - 2] - buf < size && p[k - 1] - buf < size && p[k + 3] - buf <= size)
            return 1;
    }
    return 0;
}

/* Where Unicorn 2.1.4 keeps it: uc_struct word 96.  Looked at first because the
   pattern alone is not proof: freed heap memory can still hold an earlier engine's
   TCGContext, and another field of uc_struct can point into it (measured: 7 of 300
   fresh engines, at words 3, 10 and 82); its invalidation count never moves, so
   code rewritten under this engine would keep its stale block counts. */
#define UC_TCG_CTX_WORD 96

static void *find_tcg_ctx(vmm_core *c, uint64_t tcg_buffer_size)
{
    uint64_t *w = (uint64_t *)c->uc;
    size_t i;
    if (!tcg_buffer_size || !readable(w, 0x400 * 8))
        return NULL;
    if (looks_like_tcg_ctx((uint64_t *)(uintptr_t)w[UC_TCG_CTX_WORD], tcg_buffer_size))
        return (void *)(uintptr_t)w[UC_TCG_CTX_WORD];
    for (i = 0; i < 0x400; i++) {
        if (looks_like_tcg_ctx((uint64_t *)(uintptr_t)w[i], tcg_buffer_size))
            return (void *)(uintptr_t)w[i];
    }
    return NULL;
}

static void vmm_core_set_unicorn_fns(vmm_core *c, uint64_t restore_state, uint64_t tb_invalidate_range,
                                     uint64_t ram_addr_from_host, uint64_t tb_invalidations,
                                     uint64_t tcg_buffer_size)
{
    c->restore_state = (bool (*)(void *, uintptr_t, bool))(uintptr_t)restore_state;
    c->tb_invalidate_range = (void (*)(void *, uint64_t, uint64_t))(uintptr_t)tb_invalidate_range;
    c->ram_addr_from_host = (uint64_t (*)(void *, void *))(uintptr_t)ram_addr_from_host;
    c->tb_invalidations = (uint64_t (*)(void *))(uintptr_t)tb_invalidations;
    c->tcg_ctx = find_tcg_ctx(c, tcg_buffer_size);
    c->inval_ctr = &c->inval_none;
    c->fast_seen = 0;
    if (c->tcg_ctx && tb_invalidations) {
        /* tcg_tb_phys_invalidate_count is `mov rax, [rdi + disp]; ret` in
           Unicorn 2.1.4 (one TCG context): read the field it reads */
        const uint8_t *f = (const uint8_t *)(uintptr_t)tb_invalidations;
        int32_t disp = -1;
        if (f[0] == 0x48 && f[1] == 0x8b && f[2] == 0x87 && f[7] == 0xc3)
            memcpy(&disp, f + 3, 4);
        else if (f[0] == 0x48 && f[1] == 0x8b && f[2] == 0x47 && f[4] == 0xc3)
            disp = (int8_t)f[3];
        if (disp >= 0 && disp < 0x10000 && readable((uint8_t *)c->tcg_ctx + disp, 8) &&
            *(uint64_t *)((uint8_t *)c->tcg_ctx + disp) == c->tb_invalidations(c->tcg_ctx))
            c->inval_ctr = (const uint64_t *)((uint8_t *)c->tcg_ctx + disp);
    }
}

/* ---------------------------------------------------------------- CMPXCHG8B/16B */
/* Unicorn 2.1.4 (QEMU 5) translates CMPXCHG8B/CMPXCHG16B into a helper call
   without first storing the translator's current cc_op in env, and the helper
   computes the flags from env->cc_op: a stale one.  If that stale cc_op is
   CC_OP_EFLAGS, the "flags" are whatever CC_SRC held (a pointer, say), and the
   helper stores them back as the new flags image; when the run then stops
   before the next flag-setting instruction (a budget stop, a single step, a
   breakpoint), those bits become EFLAGS: TF, AC, reserved bits.  A Linux SMP
   boot hit this (#DB with TF set after `cmpxchg16b; sete al`).

   The SDM says the instruction changes ZF only.  These replacements take the
   cc_op of the instruction itself from the translation block's per-instruction
   data (cpu_restore_state, as QEMU does for a fault), so the flags they start
   from are the real ones, then do what the originals do.  They are installed
   by overwriting the originals' entry with a jump (the generated code calls
   the originals' addresses). */
#define ENV_CC_SRC_OFF 152
#define ENV_CC_OP_OFF  168
#define CC_Z_FLAG      0x40u
#define EXCP0D_GPF     13

static struct {
    bool (*restore_state)(void *cpu, uintptr_t host_pc, bool will_exit);
    uint32_t (*compute_all)(void *env, int op);
    uint64_t (*ldq)(void *env, uint64_t addr, uintptr_t ra);
    void (*stq)(void *env, uint64_t addr, uint64_t v, uintptr_t ra);
    void (*raise_ra)(void *env, int exception, uintptr_t ra);
    intptr_t cpu_to_env;     /* env - cpu inside an X86CPU */
    int installed;
} vmm_cx;

static uint32_t cx_flags(void *env, uintptr_t ra)
{
    /* put the instruction's own cc_op (and EIP) in env, as a fault would */
    if (vmm_cx.restore_state)
        vmm_cx.restore_state((uint8_t *)env - vmm_cx.cpu_to_env, ra, false);
    return vmm_cx.compute_all(env, *(int32_t *)((uint8_t *)env + ENV_CC_OP_OFF));
}

static void vmm_cmpxchg8b(void *env, uint64_t a0)
{
    uintptr_t ra = (uintptr_t)__builtin_return_address(0);
    uint64_t *regs = (uint64_t *)env;
    uint32_t eflags = cx_flags(env, ra);
    uint64_t cmpv = (uint32_t)regs[0] | (regs[2] << 32);
    uint64_t newv = (uint32_t)regs[3] | (regs[1] << 32);
    uint64_t oldv = vmm_cx.ldq(env, a0, ra);
    if (oldv != cmpv)
        newv = oldv;
    vmm_cx.stq(env, a0, newv, ra);    /* always the store, as the processor does */
    if (oldv == cmpv) {
        eflags |= CC_Z_FLAG;
    } else {
        regs[0] = (uint32_t)oldv;
        regs[2] = (uint32_t)(oldv >> 32);
        eflags &= ~CC_Z_FLAG;
    }
    *(uint64_t *)((uint8_t *)env + ENV_CC_SRC_OFF) = eflags;
}

static void vmm_cmpxchg16b(void *env, uint64_t a0)
{
    uintptr_t ra = (uintptr_t)__builtin_return_address(0);
    uint64_t *regs = (uint64_t *)env;
    uint32_t eflags;
    uint64_t o0, o1, n0 = regs[3], n1 = regs[1];
    int success;
    if (a0 & 0xF)
        vmm_cx.raise_ra(env, EXCP0D_GPF, ra);
    eflags = cx_flags(env, ra);
    o0 = vmm_cx.ldq(env, a0, ra);
    o1 = vmm_cx.ldq(env, a0 + 8, ra);
    success = o0 == regs[0] && o1 == regs[2];
    if (!success) {
        n0 = o0;
        n1 = o1;
    }
    vmm_cx.stq(env, a0, n0, ra);
    vmm_cx.stq(env, a0 + 8, n1, ra);
    if (success) {
        eflags |= CC_Z_FLAG;
    } else {
        regs[0] = o0;
        regs[2] = o1;
        eflags &= ~CC_Z_FLAG;
    }
    *(uint64_t *)((uint8_t *)env + ENV_CC_SRC_OFF) = eflags;
}

/* movabs rax, target; jmp rax */
static int patch_jump(uint64_t at, void *target)
{
    uint8_t code[12] = {0x48, 0xB8};
    uintptr_t page = at & ~(uintptr_t)4095;
    uint64_t t = (uint64_t)(uintptr_t)target;
    memcpy(code + 2, &t, 8);
    code[10] = 0xFF;
    code[11] = 0xE0;
    if (mprotect((void *)page, 8192, PROT_READ | PROT_WRITE | PROT_EXEC) != 0)
        return -1;
    memcpy((void *)(uintptr_t)at, code, sizeof(code));
    mprotect((void *)page, 8192, PROT_READ | PROT_EXEC);
    __builtin___clear_cache((char *)(uintptr_t)at, (char *)(uintptr_t)at + sizeof(code));
    return 0;
}

/* Install the replacements (once per process; every engine shares the library). */
static int vmm_fix_cmpxchg(vmm_core *c, uint64_t h8, uint64_t h16, uint64_t compute_all, uint64_t ldq,
                           uint64_t stq, uint64_t raise_ra)
{
    if (vmm_cx.installed)
        return 0;
    if (!h8 || !h16 || !compute_all || !ldq || !stq || !raise_ra || !c->restore_state)
        return -1;
    vmm_cx.restore_state = c->restore_state;
    vmm_cx.compute_all = (uint32_t (*)(void *, int))(uintptr_t)compute_all;
    vmm_cx.ldq = (uint64_t (*)(void *, uint64_t, uintptr_t))(uintptr_t)ldq;
    vmm_cx.stq = (void (*)(void *, uint64_t, uint64_t, uintptr_t))(uintptr_t)stq;
    vmm_cx.raise_ra = (void (*)(void *, int, uintptr_t))(uintptr_t)raise_ra;
    vmm_cx.cpu_to_env = (intptr_t)(c->env - (uint8_t *)c->cpu);
    if (patch_jump(h8, (void *)vmm_cmpxchg8b) || patch_jump(h16, (void *)vmm_cmpxchg16b))
        return -2;
    vmm_cx.installed = 1;
    return 0;
}
