/*
 * The shadow MMU and the EPT walk: part of the vCPU's C module (vmm.cpu._native),
 * compiled in one unit after core.c (build.c includes both), so it sees vmm_core.
 *
 * Three parts:
 *
 * * `vmm_walk`: the guest page-table walk (GVA -> GPA), a line-by-line port
 *   of vmm/memory/paging.py's `translate` (the reference; tests/test_paging.py holds
 *   the two equal).  Paging-structure entries are read through the EPT from the
 *   host frames, bounds-checked: a GPA with nothing behind it reads as zeros, as
 *   QEMU's walk (and so Unicorn's, the nested MMU) reads unassigned space; so
 *   does a page routed to the MMIO bus (what the bus answers where nothing
 *   claims); A/D writes to either are dropped; a GPA the VMM made to
 *   trap, or a write to a page the EPT keeps read-only, is an EPT violation.
 * * the EPT itself is two numpy arrays owned by vmm/memory/ept.py: `ept[gpn]` =
 *   host frame << 12 | flags, and `dirty[gpn]`.  Host frames are Unicorn
 *   physical pages: frames [0, ram_frames) are guest RAM as mapped at boot, a
 *   second pool (for copy-on-write, lazy allocation, sharing) sits at
 *   `pool_first`.
 * * the shadow MMU: a UC_HOOK_TLB_FILL callback (Unicorn in UC_TLB_VIRTUAL
 *   mode) that walks the guest tables, then the EPT, and returns the combined
 *   entry.  Unicorn's hook is given neither the access's offset in the page
 *   (CR2 needs it) nor its mmu_idx (an implicit supervisor access made at
 *   CPL 3, such as a descriptor-table read during IRET, must not be checked as
 *   a user access), so `vmm_fill_wrapper` is put in front of Unicorn's own
 *   `unicorn_fill_tlb` in the CPU class (cc->tlb_fill): it gets what
 *   QEMU's softmmu passes -- full address, access type, mmu_idx, probe.
 *   mmu_idx is exactly QEMU's choice: MMU_USER_IDX for CPL-3 accesses, a
 *   kernel index for implicit supervisor ones (cpu_ldl_kernel and friends in
 *   seg_helper.c).  A fill that succeeds is entered with tlb_set_page right
 *   there (with the guest's page size, so INVLPG anywhere in a large page
 *   drops it), skipping unicorn_fill_tlb's cpu_restore_state (Unicorn issue
 *   #2342); a fill that fails goes on into unicorn_fill_tlb, whose
 *   UC_HOOK_TLB_FILL callback walks again, records the #PF (CR2, error code),
 *   the #GP of a non-canonical address or the EPT violation in vmm_shadow,
 *   and fails, so Unicorn restores EIP and stops with UC_ERR_EXCEPTION;
 *   vmm/cpu/vcpu.py turns that into the exit.
 *
 * W^X.  A fill grants X only to a fetch and W only to a write, so a TLB entry
 * is never both writable and executable: stores take Unicorn's fast path
 * (UNICORN.md 6), and every write to a frame that holds translated code, and
 * every (re)translation of code, goes through a fill.  Per host frame the
 * shadow MMU tracks which kind is granted and to which (page, mmu_idx)
 * entries; granting the other kind revokes them (a page flush, or a full TLB
 * flush when several pages alias the frame), so a frame is never writable and
 * executable through two different entries either.  Each grant of W bumps the
 * frame's write generation.  The instruction clock's block-count cache is
 * keyed by (linear address, size, mode); a fetch fill of page V -> frame F
 * that finds V last validated against another frame or an older write
 * generation of F invalidates the cache entries of V (and of blocks running
 * into V from the page before).  Code rewritten in place to a block of the
 * same address and size but another instruction count is therefore counted
 * right, and so is the same linear address mapped to other code after a CR3
 * switch.
 */
/* ---------------------------------------------------------------- EPT */
#define VMM_EPT_R      0x01ull
#define VMM_EPT_W      0x02ull
#define VMM_EPT_X      0x04ull
#define VMM_EPT_LOG    0x08ull   /* W withheld for dirty logging: the first write marks and restores it */
#define VMM_EPT_VALID  0x10ull   /* 0: nothing there (unclaimed bus); 1: the VMM owns this GPA page */
#define VMM_EPT_MMIO   0x20ull   /* the page belongs to the MMIO bus */
#define VMM_EPT_RWX    0x07ull

#define VMM_WALK_OK  0
#define VMM_WALK_PF  1
#define VMM_WALK_EPT 2

#define VMM_PEND_PF  1
#define VMM_PEND_EPT 2
#define VMM_PEND_GP  3   /* a non-canonical address in long mode: #GP(0), as QEMU's walk raises */
#define VMM_PEND_WATCH 4  /* a watched linear page maps to another frame than the one hooked (watch.c) */

#define PHYS_BITS 40
#define PHYS_MASK ((1ull << PHYS_BITS) - 1)
#define ADDR_4K (PHYS_MASK & ~0xFFFull)
#define PTE_NX (1ull << 63)

#define CR0_PE (1ull << 0)
#define CR0_WP (1ull << 16)
#define CR0_PG (1ull << 31)
#define CR4_PSE (1ull << 4)
#define CR4_PAE (1ull << 5)
#define EFER_LMA (1ull << 10)
#define EFER_NXE (1ull << 11)

#define PFEC_P 1u
#define PFEC_W 2u
#define PFEC_U 4u
#define PFEC_RSVD 8u
#define PFEC_I 16u

/* CPUX86State offsets beyond native_build's (checked by vcpu.py at attach) */
#define ENV_CR    424
#define ENV_A20   496
#define ENV_EFER  592
#define VMM_ENV_CR   ENV_CR
#define VMM_ENV_A20  ENV_A20
#define VMM_ENV_EFER ENV_EFER

typedef struct vmm_mmu {
    uint64_t *ept;          /* GPA page -> host frame << 12 | VMM_EPT_* */
    uint64_t ept_pages;
    uint8_t *dirty;         /* GPA page written since the dirty log was last collected */
    uint64_t dirty_marked;
    uint8_t *ram;           /* host frames [0, ram_frames) */
    uint64_t ram_frames;
    uint8_t *pool;          /* host frames [pool_first, pool_first + pool_frames) */
    uint64_t pool_first;
    uint64_t pool_frames;
    uint64_t viol_gpa;      /* the last EPT violation */
    uint64_t viol_lin;
    uint32_t viol_access;   /* 0 read, 1 write, 2 fetch */
    uint32_t viol_walk;     /* made by the page walk (a paging-structure access) */
    uint32_t viol_hole;     /* no RAM there at all (nested: Unicorn's *_UNMAPPED) */
    uint32_t viol_valid;
} vmm_mmu;

typedef struct {
    uint64_t gpa;
    uint64_t page_size;
    uint32_t prot;        /* the tables' combined rights: 1 U/S, 2 R/W, 4 executable (not NX) */
    uint32_t error_code;  /* the #PF error code when the walk returns VMM_WALK_PF */
} vmm_walk_result;

static inline uint8_t *frame_ptr(vmm_mmu *m, uint64_t hfn)
{
    if (hfn < m->ram_frames)
        return m->ram + (hfn << 12);
    if (hfn - m->pool_first < m->pool_frames)
        return m->pool + ((hfn - m->pool_first) << 12);
    return NULL;
}

/* index of a host frame in the per-frame tables, or -1 */
static inline int64_t frame_slot(vmm_mmu *m, uint64_t hfn)
{
    if (hfn < m->ram_frames)
        return (int64_t)hfn;
    if (hfn - m->pool_first < m->pool_frames)
        return (int64_t)(m->ram_frames + hfn - m->pool_first);
    return -1;
}

static void note_violation(vmm_mmu *m, uint64_t gpa, uint64_t lin, int access, int walk, int hole)
{
    m->viol_gpa = gpa;
    m->viol_lin = lin;
    m->viol_access = (uint32_t)access;
    m->viol_walk = (uint32_t)walk;
    m->viol_hole = (uint32_t)hole;
    m->viol_valid = 1;
}

/* A paging-structure read (aligned, width 4 or 8).  0, or -1 for an EPT violation. */
static int walk_load(vmm_mmu *m, uint64_t gpa, int width, uint64_t *val, uint64_t lin)
{
    uint64_t gpn = gpa >> 12, e;
    uint8_t *p;
    uint32_t v32;
    *val = 0;
    if (gpn >= m->ept_pages)
        return 0;                       /* nothing there: zeros, as QEMU's walk reads it */
    e = m->ept[gpn];
    if (!(e & VMM_EPT_VALID))
        return 0;
    if (e & VMM_EPT_MMIO)
        return 0;                       /* the bus's page: zeros, as the bus answers there */
    if (!(e & VMM_EPT_R)) {
        note_violation(m, gpa, lin, 0, 1, 0);
        return -1;
    }
    p = frame_ptr(m, e >> 12);
    if (!p)
        return 0;
    p += gpa & 0xFFF;
    if (width == 8) {
        memcpy(val, p, 8);
    } else {
        memcpy(&v32, p, 4);
        *val = v32;
    }
    return 0;
}

/* An A/D update.  0, or -1 for an EPT violation (a page the EPT keeps read-only). */
static int walk_store(vmm_mmu *m, uint64_t gpa, int width, uint64_t val, uint64_t lin)
{
    uint64_t gpn = gpa >> 12, e;
    uint8_t *p;
    uint32_t v32;
    if (gpn >= m->ept_pages)
        return 0;
    e = m->ept[gpn];
    if (!(e & VMM_EPT_VALID))
        return 0;                       /* unclaimed: dropped */
    if (!(e & VMM_EPT_W)) {
        if (!(e & VMM_EPT_LOG)) {
            note_violation(m, gpa, lin, 1, 1, 0);
            return -1;
        }
        m->dirty[gpn] = 1;
        m->dirty_marked++;
        e = (e | VMM_EPT_W) & ~VMM_EPT_LOG;
        m->ept[gpn] = e;
    }
    p = frame_ptr(m, e >> 12);
    if (!p)
        return 0;
    p += gpa & 0xFFF;
    if (width == 8) {
        memcpy(p, &val, 8);
    } else {
        v32 = (uint32_t)val;
        memcpy(p, &v32, 4);
    }
    return 0;
}

#define LOAD(addr, width, dst) do { if (walk_load(m, (addr), (width), &(dst), lin)) return VMM_WALK_EPT; } while (0)
#define STORE(addr, width, v) do { if (walk_store(m, (addr), (width), (v), lin)) return VMM_WALK_EPT; } while (0)
#define FAULT(ec) do { r->error_code = (ec); return VMM_WALK_PF; } while (0)

/* Port of vmm/memory/paging.py translate(): keep the two in step, statement by
   statement.  access: 0 read, 1 write, 2 fetch. */
int vmm_walk(vmm_mmu *m, uint64_t lin, int access, int user, uint64_t cr0, uint64_t cr3,
             uint64_t cr4, uint64_t efer, int32_t a20, int set_ad, vmm_walk_result *r)
{
    uint64_t a20m = (uint64_t)(int64_t)a20;
    int write = access == 1, fetch = access == 2;
    int nxe = (efer & EFER_NXE) != 0, wp = (cr0 & CR0_WP) != 0;
    int mode;               /* 32, 3 = PAE, 4 = 4-level */
    uint32_t ecode;
    uint64_t flags_rw, flags_us, phys, size, leaf_addr, leaf_val;
    int leaf_width, nx = 0;

    r->error_code = 0;
    if (!(cr0 & CR0_PG) || !(cr0 & CR0_PE)) {
        r->gpa = lin & 0xFFFFFFFFull & a20m;
        r->page_size = 1ull << 32;
        r->prot = 7;
        return VMM_WALK_OK;
    }
    mode = (efer & EFER_LMA) ? 4 : (cr4 & CR4_PAE) ? 3 : 32;
    ecode = (write ? PFEC_W : 0) | (user ? PFEC_U : 0);
    if (fetch && nxe && mode != 32)
        ecode |= PFEC_I;

    if (mode == 32) {
        uint64_t pde_addr, pde, pte_addr, pte;
        lin &= 0xFFFFFFFFull;
        pde_addr = ((cr3 & 0xFFFFF000ull) | ((lin >> 20) & 0xFFC)) & a20m;
        LOAD(pde_addr, 4, pde);
        if (!(pde & 1))
            FAULT(ecode);
        if ((pde & 0x80) && (cr4 & CR4_PSE)) {
            uint64_t rsvd = (pde >> 13) & ~((1ull << (PHYS_BITS - 32)) - 1) & 0x1FF;
            if (rsvd)
                FAULT(ecode | PFEC_P | PFEC_RSVD);
            flags_rw = pde & 2;
            flags_us = pde & 4;
            phys = ((pde & 0xFFC00000ull) | (((pde >> 13) & 0xFF) << 32)) | (lin & 0x3FFFFF);
            size = 4ull << 20;
            leaf_addr = pde_addr; leaf_val = pde; leaf_width = 4;
        } else {
            if (set_ad && !(pde & 0x20))
                STORE(pde_addr, 4, pde | 0x20);
            pte_addr = ((pde & 0xFFFFF000ull) | ((lin >> 10) & 0xFFC)) & a20m;
            LOAD(pte_addr, 4, pte);
            if (!(pte & 1))
                FAULT(ecode);
            flags_rw = pde & pte & 2;
            flags_us = pde & pte & 4;
            phys = (pte & 0xFFFFF000ull) | (lin & 0xFFF);
            size = 4096;
            leaf_addr = pte_addr; leaf_val = pte; leaf_width = 4;
        }
    } else {
        uint64_t table, hi_rsvd;
        int level, first;   /* level 4 pml4, 3 pdpt, 2 pd, 1 pt */
        if (mode == 3) {
            uint64_t pdpte_addr, pdpte;
            lin &= 0xFFFFFFFFull;
            pdpte_addr = ((cr3 & 0xFFFFFFE0ull) | ((lin >> 27) & 0x18)) & a20m;
            LOAD(pdpte_addr, 8, pdpte);
            if (!(pdpte & 1))
                FAULT(ecode);
            if (pdpte & (0x1E6ull | (~PHYS_MASK & ~0xFFFull & ((1ull << 63) - 1)) | PTE_NX))
                FAULT(ecode | PFEC_P | PFEC_RSVD);
            table = pdpte & ADDR_4K;
            first = 2;
            hi_rsvd = ~PHYS_MASK & ((1ull << 63) - 1) & ~0xFFFull;
        } else {
            table = cr3 & ADDR_4K;
            first = 4;
            hi_rsvd = ~PHYS_MASK & ((1ull << 52) - 1) & ~0xFFFull;
        }
        flags_rw = 2;
        flags_us = 4;
        leaf_addr = leaf_val = 0; leaf_width = 8; phys = size = 0;
        for (level = first; level >= 1; level--) {
            int shift = 12 + 9 * (level - 1);
            uint64_t addr = (table | (((lin >> shift) & 0x1FF) << 3)) & a20m;
            uint64_t e, rsvd;
            int big;
            LOAD(addr, 8, e);
            if (!(e & 1))
                FAULT(ecode);
            rsvd = e & hi_rsvd;
            if (!nxe && (e & PTE_NX))
                rsvd |= 1;
            if (level == 4 && (e & 0x80))
                rsvd |= 1;
            big = (level == 3 || level == 2) && (e & 0x80);
            if (big)
                rsvd |= e & ((1ull << shift) - 1) & ~0x1FFFull;
            if (rsvd)
                FAULT(ecode | PFEC_P | PFEC_RSVD);
            flags_rw &= e & 2;
            flags_us &= e & 4;
            nx = nx || ((e & PTE_NX) && nxe);
            if (big || level == 1) {
                uint64_t page = 1ull << shift;
                phys = (e & PHYS_MASK & ~(page - 1)) | (lin & (page - 1));
                size = page;
                leaf_addr = addr; leaf_val = e; leaf_width = 8;
                break;
            }
            if (set_ad && !(e & 0x20))
                STORE(addr, 8, e | 0x20);
            table = e & ADDR_4K;
        }
    }

    /* access rights (SDM 4.6) */
    if (user && !flags_us)
        FAULT(ecode | PFEC_P);
    if (write && !flags_rw && (user || wp))
        FAULT(ecode | PFEC_P);
    if (fetch && nx)
        FAULT(ecode | PFEC_P);

    if (set_ad) {
        uint64_t nv = leaf_val | 0x20 | (write ? 0x40 : 0);
        if (nv != leaf_val)
            STORE(leaf_addr, leaf_width, nv);
    }
    r->gpa = phys & a20m;
    r->page_size = size;
    r->prot = (flags_us ? 1 : 0) | (flags_rw ? 2 : 0) | (nx ? 0 : 4);
    return VMM_WALK_OK;
}

#undef LOAD
#undef STORE
#undef FAULT

/* The same walk over many inputs (benchmarks: no Python call per walk). */
int vmm_walk_bench(vmm_mmu *m, uint64_t *lins, int *accesses, int *users, size_t n, uint64_t cr0,
                   uint64_t cr3, uint64_t cr4, uint64_t efer, int32_t a20, int set_ad)
{
    vmm_walk_result r;
    int faults = 0;
    size_t i;
    for (i = 0; i < n; i++)
        faults += vmm_walk(m, lins[i], accesses[i], users[i], cr0, cr3, cr4, efer, a20, set_ad, &r) != 0;
    return faults;
}

/* ---------------------------------------------------------------- shadow MMU */
#define PGT_BITS 14
#define PGT_SIZE (1u << PGT_BITS)
#define FST_NONE 0
#define FST_W 1
#define FST_X 2
#define FOWN_MANY 0xFFFull
#define TBC_BAD_MODE 0xFFFFFFFFu

struct vmm_shadow;
static void *vmm_shadow_cpu(struct vmm_shadow *s);

typedef struct {
    uint64_t va;      /* page | 1 when valid */
    uint64_t hfn;
    uint32_t wgen;
    uint32_t pad;
} vmm_pgt_entry;

typedef struct vmm_shadow {
    vmm_mmu *mmu;
    uint32_t pending;       /* why the last fill failed: VMM_PEND_PF or VMM_PEND_EPT */
    uint32_t pend_access;   /* 0 read, 1 write, 2 fetch */
    uint64_t pf_addr;
    uint32_t pf_error;
    uint64_t fills;
    uint64_t fills_write;
    uint64_t fills_fetch;
    uint64_t faults;
    uint64_t violations;
    uint64_t probes;
    uint64_t revokes_page;
    uint64_t revokes_all;
    uint64_t tbc_invalidations;
    uint64_t wrapper_misses;
    vmm_core *core;
    uint64_t nframes;
    uint8_t *fstate;        /* per host frame: FST_NONE, FST_W or FST_X granted */
    uint64_t *fowner;       /* page | mask of mmu_idx holding that grant, or FOWN_MANY */
    uint32_t *wgen;         /* per host frame: bumped by each new grant of W */
    void (*tlb_flush)(void *cpu);
    void (*tlb_flush_page)(void *cpu, uint64_t addr, uint16_t idxmap);
    uc_hook hook;
    vmm_pgt_entry pgt[PGT_SIZE];
} vmm_shadow;

/* What QEMU's softmmu passed to cc->tlb_fill, for the hook that Unicorn's
   unicorn_fill_tlb calls next (same thread, no other fill in between). */
typedef struct {
    uint64_t addr;
    int access;
    int mmu_idx;
    int probe;
    int valid;
} vmm_fill_args;

static __thread vmm_fill_args vmm_fargs;
static __thread struct vmm_shadow *vmm_running;   /* the shadow MMU of the vCPU in emu_start */
static bool (*vmm_uc_fill)(void *cs, uint64_t addr, int size, int access, int mmu_idx, bool probe,
                           uintptr_t retaddr);
static void (*vmm_tlb_set_page)(void *cs, uint64_t vaddr, uint64_t paddr, int prot, int mmu_idx,
                                uint64_t size);
static bool shadow_resolve(struct vmm_shadow *s, uint64_t addr, int access, int idx, int quiet,
                           uint64_t *paddr, uint32_t *prot, uint64_t *size);

/* Does watched linear page `va` now map to another frame than the one hooked? */
static int watch_moved(vmm_core *c, uint64_t va, uint64_t phys)
{
    uint32_t i;
    for (i = 0; i < c->watch_n; i++) {
        if (c->watch_lin[i] == va && c->watch_phys[i] != phys) {
            c->watch_moves++;
            return 1;
        }
    }
    return 0;
}

/* In front of Unicorn's unicorn_fill_tlb.  A fill that succeeds is entered
   into the TLB here directly: unicorn_fill_tlb would first run
   cpu_restore_state (re-decoding the block up to the access, Unicorn issue
   #2342), which the walk does not need (it reads CR0/CR3/CR4/EFER/A20, never
   lazily synced).  A fill that fails goes on to unicorn_fill_tlb, whose
   UC_HOOK_TLB_FILL callback (shadow_fill) walks again, records the #PF or
   EPT violation and fails, so that Unicorn restores EIP and stops. */
static bool vmm_fill_wrapper(void *cs, uint64_t addr, int size, int access, int mmu_idx, bool probe,
                             uintptr_t retaddr)
{
    struct vmm_shadow *s = vmm_running;
    if (s && vmm_shadow_cpu(s) == cs && !probe && vmm_tlb_set_page) {
        uint64_t paddr, size;
        uint32_t prot;
        if (shadow_resolve(s, addr, access, mmu_idx, 1, &paddr, &prot, &size)) {
            /* the guest's page size, so that INVLPG anywhere in a large page drops it */
            vmm_tlb_set_page(cs, addr & ~0xFFFull, paddr, (int)prot, mmu_idx, size);
            return true;
        }
    }
    vmm_fargs.addr = addr;
    vmm_fargs.access = access;
    vmm_fargs.mmu_idx = mmu_idx;
    vmm_fargs.probe = probe;
    vmm_fargs.valid = 1;
    return vmm_uc_fill(cs, addr, size, access, mmu_idx, probe, retaddr);
}

static void *vmm_shadow_cpu(struct vmm_shadow *s) { return s->core->cpu; }

/* Drop the block-count cache entries of blocks that start in the page of
   `va`, or start in the page before and run into it.  An entry is made to
   miss by its mode, keeping pc and count intact: it may be the block now
   running (core->cur), which the exit correction still reads. */
static void tbc_invalidate_page(vmm_core *c, uint64_t va)
{
    uint64_t page = va & ~0xFFFull, prev = page - 0x1000, a;
    uint32_t i;
    for (i = 0; i < 0x1000; i++) {
        vmm_tbc_entry *e;
        a = page + i;
        e = &c->tbc[TBC_INDEX(a)];
        if (e->pc == a)
            e->mode = TBC_BAD_MODE;
        a = prev + i;
        e = &c->tbc[TBC_INDEX(a)];
        if (e->pc == a && a + e->size > page)
            e->mode = TBC_BAD_MODE;
    }
}

static void frames_forget(vmm_shadow *s)
{
    memset(s->fstate, 0, s->nframes);
}

/* Grant kind `want` (FST_W or FST_X) on frame `slot` to the entry (va, idx):
   revoke the other kind wherever it is granted first. */
static void wx_grant(vmm_shadow *s, int64_t slot, uint64_t va, int idx, uint8_t want)
{
    uint8_t st = s->fstate[slot];
    uint64_t own = s->fowner[slot];
    uint64_t bit = 1ull << (idx & 7);
    if (st == want) {
        if (own != FOWN_MANY) {
            if ((own & ~0xFFFull) == va && bit < 0x1000)
                s->fowner[slot] = own | bit;
            else
                s->fowner[slot] = FOWN_MANY;
        }
        return;
    }
    if (st != FST_NONE) {
        if (own == FOWN_MANY || bit >= 0x1000) {
            s->tlb_flush(s->core->cpu);
            frames_forget(s);
            s->revokes_all++;
        } else {
            /* every entry that holds the grant goes, the one being refilled too:
               refilling overwrites it in the main TLB, but an older copy of it
               may sit in the victim TLB, where it would survive */
            uint16_t map = (uint16_t)(own & 0xFFF);
            if (map) {
                s->tlb_flush_page(s->core->cpu, own & ~0xFFFull, map);
                s->revokes_page++;
            }
        }
    }
    if (want == FST_W)
        s->wgen[slot]++;
    s->fstate[slot] = want;
    s->fowner[slot] = bit < 0x1000 ? (va | bit) : FOWN_MANY;
}

/* A write grant to frame hfn (page va) drops the frame's translated code.  QEMU
   checks only the first store through a new write entry against translated code
   (notdirty_write then clears TLB_NOTDIRTY, as the entry has no addr_code), so the
   stores after it through the same entry went unseen: GRUB's BIOS-call trampoline
   patches the ES, DS, FLAGS and EAX immediates of its real-mode code in a row, and
   the block holding the first three ran with the values of its first call.  Code on
   the frame runs again only after a fetch fill, which takes the write grant back, so
   every store in between is covered.  The block now running is kept when it sits on
   the page written: QEMU's check of the first store handles a block that rewrites
   itself (smc_restart in core.c). */
static void wx_drop_code(vmm_shadow *s, uint64_t va, uint64_t hfn)
{
    vmm_core *c = s->core;
    uint8_t *p = frame_ptr(s->mmu, hfn);
    uint64_t ram, lo = 0, hi = 0;
    if (!p || !c->tb_invalidate_range || !c->ram_addr_from_host)
        return;
    ram = c->ram_addr_from_host(c->uc, p);
    if (ram == ~0ull)
        return;
    if (c->cur != NULL && (c->cur->pc & ~0xFFFull) == va) {
        lo = c->cur->pc & 0xFFF;
        hi = lo + c->cur->size;
        if (hi > 0x1000)
            hi = 0x1000;
    }
    if (lo > 0)
        c->tb_invalidate_range(c->uc, ram, ram + lo);
    if (hi < 0x1000)
        c->tb_invalidate_range(c->uc, ram + hi, ram + 0x1000);
}

/* A fetch fill of page va -> frame hfn: is the block-count cache for va
   still about the same code? */
static void pgt_note_exec(vmm_shadow *s, uint64_t va, int64_t slot, uint64_t hfn)
{
    vmm_pgt_entry *p = &s->pgt[((va >> 12) ^ (va >> (12 + PGT_BITS)) ^ (va >> 40)) & (PGT_SIZE - 1)];
    uint32_t g = s->wgen[slot];
    if (p->va == (va | 1) && p->hfn == hfn && p->wgen == g)
        return;
    if ((p->va & 1) && p->va != (va | 1))
        tbc_invalidate_page(s->core, p->va & ~0xFFFull);   /* its page loses its record */
    tbc_invalidate_page(s->core, va);
    s->tbc_invalidations++;
    p->va = va | 1;
    p->hfn = hfn;
    p->wgen = g;
}

/* The combined translation for one TLB fill: guest walk (GVA -> GPA, A/D
   updates), then the EPT (GPA -> host frame; the first write to a logged
   page marks it dirty), then the W^X bookkeeping.  False: a guest #PF or an
   EPT violation, recorded as pending unless `quiet` (a probe, or the
   wrapper's first attempt, which retries through Unicorn to raise it). */
static bool shadow_resolve(vmm_shadow *s, uint64_t addr, int access, int idx, int quiet,
                           uint64_t *paddr, uint32_t *prot, uint64_t *size)
{
    vmm_core *c = s->core;
    vmm_mmu *m = s->mmu;
    uint8_t *env = c->env;
    uint64_t vaddr = addr & ~0xFFFull, gpn, e, need, hfn;
    int rc;
    int64_t slot;
    vmm_walk_result w;
    uint32_t perms;

    s->fills++;
    m->viol_valid = 0;
    if ((*(uint64_t *)(env + ENV_EFER) & EFER_LMA) && (*(uint64_t *)(env + ENV_CR) & CR0_PG)) {
        int64_t sext = (int64_t)addr >> 47;
        if (sext != 0 && sext != -1) {
            if (!quiet) {
                s->pending = VMM_PEND_GP;
                s->pend_access = (uint32_t)access;
                s->pf_addr = addr;
                s->pf_error = 0;
            }
            return false;
        }
    }
    rc = vmm_walk(m, addr, access, idx == 1,
                  *(uint64_t *)(env + ENV_CR), *(uint64_t *)(env + ENV_CR + 24),
                  *(uint64_t *)(env + ENV_CR + 32), *(uint64_t *)(env + ENV_EFER),
                  *(int32_t *)(env + ENV_A20), 1, &w);
    if (rc == VMM_WALK_PF) {
        if (!quiet) {
            s->pending = VMM_PEND_PF;
            s->pend_access = (uint32_t)access;
            s->pf_addr = addr;
            s->pf_error = w.error_code;
            s->faults++;
        }
        return false;
    }
    if (rc == VMM_WALK_EPT) {
        if (!quiet) {
            s->pending = VMM_PEND_EPT;
            s->pend_access = (uint32_t)access;
            s->violations++;
        }
        return false;
    }
    gpn = w.gpa >> 12;
    e = gpn < m->ept_pages ? m->ept[gpn] : 0;
    need = access == 1 ? VMM_EPT_W : access == 2 ? VMM_EPT_X : VMM_EPT_R;
    if (!(e & VMM_EPT_VALID) || !(e & need)) {
        if (access == 1 && (e & VMM_EPT_VALID) && (e & VMM_EPT_LOG)) {
            m->dirty[gpn] = 1;
            m->dirty_marked++;
            e = (e | VMM_EPT_W) & ~VMM_EPT_LOG;
            m->ept[gpn] = e;
        } else {
            if (!quiet) {
                note_violation(m, w.gpa, addr, access, 0, !(e & VMM_EPT_VALID));
                s->pending = VMM_PEND_EPT;
                s->pend_access = (uint32_t)access;
                s->violations++;
            }
            return false;
        }
    }
    hfn = e >> 12;
    if (c->watch_n && access != 2 && watch_moved(c, vaddr, hfn << 12)) {
        if (!quiet) {
            s->pending = VMM_PEND_WATCH;
            s->pend_access = (uint32_t)access;
            s->pf_addr = addr;
        }
        return false;
    }
    slot = frame_slot(m, hfn);
    perms = (uint32_t)(e & VMM_EPT_R);
    if (access == 1) {
        s->fills_write++;
        perms |= UC_PROT_WRITE;
        if (slot >= 0) {
            uint8_t was = s->fstate[slot];
            wx_grant(s, slot, vaddr, idx, FST_W);
            if (was != FST_W)
                wx_drop_code(s, vaddr, hfn);
        }
    } else if (access == 2) {
        s->fills_fetch++;
        perms |= UC_PROT_EXEC;
        if (slot >= 0) {
            wx_grant(s, slot, vaddr, idx, FST_X);
            pgt_note_exec(s, vaddr, slot, hfn);
        }
    }
    *paddr = hfn << 12;
    *prot = perms;
    *size = w.page_size > 0x40000000ull ? 4096 : w.page_size;   /* paging off: 4 KiB entries */
    return true;
}

/* The UC_HOOK_TLB_FILL callback (Unicorn's unicorn_fill_tlb calls it). */
static bool shadow_fill(uc_engine *uc, uint64_t vaddr, uc_mem_type type, uc_tlb_entry *res, void *ud)
{
    vmm_shadow *s = ud;
    int access = type == UC_MEM_WRITE ? 1 : type == UC_MEM_FETCH ? 2 : 0;
    uint64_t addr = vaddr, paddr, size;
    uint32_t prot;
    int idx, probe = 0;

    if (vmm_fargs.valid && (vmm_fargs.addr & ~0xFFFull) == vaddr && vmm_fargs.access == access) {
        addr = vmm_fargs.addr;
        idx = vmm_fargs.mmu_idx;
        probe = vmm_fargs.probe;
    } else {
        /* not through cc->tlb_fill (cannot happen once installed): the CPL decides */
        idx = (*(uint32_t *)(s->core->env + ENV_HFLAGS) & 3) == 3 ? 1 : 2;
        s->wrapper_misses++;
    }
    vmm_fargs.valid = 0;
    if (probe)
        s->probes++;
    if (!shadow_resolve(s, addr, access, idx, probe, &paddr, &prot, &size))
        return false;
    if (size > 4096 && vmm_tlb_set_page)
        /* Unicorn enters a 4 KiB page; tell QEMU it belongs to a large one first */
        vmm_tlb_set_page(s->core->cpu, vaddr, paddr, (int)prot, idx, size);
    res->paddr = paddr;
    res->perms = (uc_prot)prot;
    return true;
}

vmm_shadow *vmm_shadow_new(vmm_core *c, vmm_mmu *m)
{
    vmm_shadow *s = calloc(1, sizeof(vmm_shadow));
    if (!s)
        return NULL;
    s->core = c;
    s->mmu = m;
    s->nframes = m->ram_frames + m->pool_frames;
    s->fstate = calloc(s->nframes + 1, 1);
    s->fowner = calloc(s->nframes + 1, sizeof(uint64_t));
    s->wgen = calloc(s->nframes + 1, sizeof(uint32_t));
    if (!s->fstate || !s->fowner || !s->wgen) {
        free(s->fstate); free(s->fowner); free(s->wgen); free(s);
        return NULL;
    }
    return s;
}

void vmm_shadow_free(vmm_shadow *s)
{
    if (!s)
        return;
    if (vmm_running == s)
        vmm_running = NULL;
    free(s->fstate); free(s->fowner); free(s->wgen); free(s);
}

/* The frame pool changed: new per-frame tables (after a full TLB flush). */
int vmm_shadow_set_frames(vmm_shadow *s)
{
    uint64_t n = s->mmu->ram_frames + s->mmu->pool_frames;
    uint8_t *st = calloc(n + 1, 1);
    uint64_t *ow = calloc(n + 1, sizeof(uint64_t));
    uint32_t *wg = calloc(n + 1, sizeof(uint32_t));
    if (!st || !ow || !wg) {
        free(st); free(ow); free(wg);
        return -1;
    }
    free(s->fstate); free(s->fowner); free(s->wgen);
    s->fstate = st; s->fowner = ow; s->wgen = wg;
    s->nframes = n;
    memset(s->pgt, 0, sizeof(s->pgt));
    return 0;
}

/* After a full TLB flush nothing is granted any more. */
void vmm_shadow_reset_frames(vmm_shadow *s)
{
    frames_forget(s);
}

/* UC_TLB_VIRTUAL, the fill hook, and vmm_fill_wrapper in front of Unicorn's
   fill in this CPU's class.  The class (X86CPU::cc) is found from
   CPUState::cc: a pointer, stored in the CPUState before env, to memory
   after env inside the same X86CPU object, where tlb_fill and, next to it,
   tlb_fill_cpu hold unicorn_fill_tlb and x86_cpu_tlb_fill (in 2.1.4 the
   class is 0x1cc0 bytes past env, the pointer 0x8a0 bytes before it). */
int vmm_shadow_install(vmm_shadow *s, uint64_t uc_fill_fn, uint64_t cpu_fill_fn, uint64_t tlb_flush_fn,
                       uint64_t tlb_flush_page_fn, uint64_t tlb_set_page_fn)
{
    vmm_core *c = s->core;
    uint8_t *cpu = c->cpu, *env = c->env;
    uint64_t *slot = NULL;
    uc_err e;
    size_t i, k;

    if (!uc_fill_fn || !cpu_fill_fn || !tlb_flush_fn || !tlb_flush_page_fn)
        return -1;
    e = uc_ctl(c->uc, UC_CTL_WRITE(UC_CTL_TLB_TYPE, 1), UC_TLB_VIRTUAL);
    if (e != UC_ERR_OK)
        return -2;
    for (i = 0; cpu + i < env && !slot; i += 8) {
        uint64_t v = *(uint64_t *)(cpu + i);
        uint8_t *p = (uint8_t *)(uintptr_t)v;
        if ((v & 7) || p <= env || p >= env + 0x8000)   /* 2.1.4: env + 0x1cc0 */
            continue;
        for (k = 0; k < 64; k++) {
            uint64_t *q = (uint64_t *)p + k;
            if (q[0] == uc_fill_fn && q[1] == cpu_fill_fn) {
                slot = q;
                break;
            }
        }
    }
    if (!slot)
        return -3;
    vmm_uc_fill = (bool (*)(void *, uint64_t, int, int, int, bool, uintptr_t))(uintptr_t)uc_fill_fn;
    vmm_tlb_set_page = (void (*)(void *, uint64_t, uint64_t, int, int, uint64_t))(uintptr_t)tlb_set_page_fn;
    s->tlb_flush = (void (*)(void *))(uintptr_t)tlb_flush_fn;
    s->tlb_flush_page = (void (*)(void *, uint64_t, uint16_t))(uintptr_t)tlb_flush_page_fn;
    e = uc_hook_add(c->uc, &s->hook, UC_HOOK_TLB_FILL, (void *)shadow_fill, s, 1, 0);
    if (e != UC_ERR_OK)
        return -4;
    *slot = (uint64_t)(uintptr_t)vmm_fill_wrapper;
    c->shadow = s;
    c->mmu = s->mmu;
    return 0;
}

/* ---------------------------------------------------------------- nested MMU */
/* Unicorn's own walk; the EPT is its memory map.  An access to a GPA with
   nothing mapped (or mapped without the right) stops the run with
   UC_ERR_*_UNMAPPED / *_PROT; this hook notes the physical address. */
static bool nested_invalid(uc_engine *uc, uc_mem_type type, uint64_t address, int size, int64_t value,
                           void *ud)
{
    vmm_core *c = ud;
    vmm_mmu *m = c->mmu;
    int access = (type == UC_MEM_WRITE_UNMAPPED || type == UC_MEM_WRITE_PROT) ? 1
               : (type == UC_MEM_FETCH_UNMAPPED || type == UC_MEM_FETCH_PROT) ? 2 : 0;
    int hole = type == UC_MEM_READ_UNMAPPED || type == UC_MEM_WRITE_UNMAPPED || type == UC_MEM_FETCH_UNMAPPED;
    uint64_t gpn = address >> 12;
    if (hole && gpn < m->ept_pages && (m->ept[gpn] & VMM_EPT_VALID))
        hole = 0;   /* the VMM unmapped it to trap */
    note_violation(m, address, 0, access, 0, hole);
    return false;
}

int vmm_mmu_install_nested(vmm_core *c, vmm_mmu *m)
{
    c->mmu = m;
    c->watch_inval = 1;
    c->seen_inval = c->tcg_ctx ? c->tb_invalidations(c->tcg_ctx) : 0;
    return (int)uc_hook_add(c->uc, &c->mem_hook, UC_HOOK_MEM_UNMAPPED | UC_HOOK_MEM_PROT,
                            (void *)nested_invalid, c, 1, 0);
}

static void vmm_mmu_run_start(vmm_core *c)
{
    vmm_running = c->shadow;
    if (c->shadow)
        ((vmm_shadow *)c->shadow)->pending = 0;
    if (c->mmu)
        ((vmm_mmu *)c->mmu)->viol_valid = 0;
}

static void vmm_mmu_run_end(vmm_core *c)
{
    vmm_running = NULL;
}

/* Full TLB flush from the VMM (EPT changes, dirty-log re-arm, reset). */
int vmm_core_flush_tlb(vmm_core *c)
{
    int e = (int)uc_ctl(c->uc, UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0));
    if (c->shadow)
        frames_forget((vmm_shadow *)c->shadow);
    return e;
}

/* Guest code bytes for the VMM (instruction counting, I/O lengths).  In
   shadow mode through the walk, without A/D side effects and without
   touching Unicorn's TLB; in nested mode through Unicorn. */
static int vmm_code_read(vmm_core *c, uint64_t addr, uint8_t *buf, size_t n)
{
    vmm_shadow *s = c->shadow;
    uint8_t *env = c->env;
    if (!s)
        return (int)uc_vmem_read(c->uc, addr, UC_PROT_EXEC, buf, n);
    while (n > 0) {
        vmm_walk_result w;
        vmm_mmu *m = s->mmu;
        uint64_t gpn, e;
        uint8_t *p;
        size_t chunk = 0x1000 - (addr & 0xFFF);
        if (chunk > n)
            chunk = n;
        if (vmm_walk(m, addr, 0, 0, *(uint64_t *)(env + ENV_CR), *(uint64_t *)(env + ENV_CR + 24),
                     *(uint64_t *)(env + ENV_CR + 32), *(uint64_t *)(env + ENV_EFER),
                     *(int32_t *)(env + ENV_A20), 0, &w) != VMM_WALK_OK)
            return UC_ERR_READ_PROT;
        gpn = w.gpa >> 12;
        e = gpn < m->ept_pages ? m->ept[gpn] : 0;
        if (!(e & VMM_EPT_VALID) || !(e & (VMM_EPT_R | VMM_EPT_X)) || !(p = frame_ptr(m, e >> 12)))
            return UC_ERR_READ_PROT;
        memcpy(buf, p + (w.gpa & 0xFFF), chunk);
        buf += chunk;
        addr += chunk;
        n -= chunk;
    }
    return UC_ERR_OK;
}

/* Invalidate translated code overlapping [lin, lin+len) of the current
   address space, without touching Unicorn's TLB: the linear address goes
   through the guest's tables (no A/D updates) and the EPT, here; Unicorn's
   own ctl_remove_cache would fill the TLB for it outside a run, which the
   shadow MMU's W^X bookkeeping does not expect.  Shadow mode only (returns
   -1 in nested mode, where Unicorn's walk is the right one). */
static int invalidate_linear(vmm_core *c, uint64_t lin, uint64_t len, int code_changed)
{
    vmm_shadow *s = c->shadow;
    uint8_t *env = c->env;
    vmm_walk_result w;
    vmm_mmu *m;
    uint64_t gpn, e;
    uint8_t *p;
    if (!s)
        return -1;
    m = s->mmu;
    while (len > 0) {
        uint64_t chunk = 0x1000 - (lin & 0xFFF);
        if (chunk > len)
            chunk = len;
        if (vmm_walk(m, lin, 0, 0, *(uint64_t *)(env + ENV_CR), *(uint64_t *)(env + ENV_CR + 24),
                     *(uint64_t *)(env + ENV_CR + 32), *(uint64_t *)(env + ENV_EFER),
                     *(int32_t *)(env + ENV_A20), 0, &w) == VMM_WALK_OK) {
            gpn = w.gpa >> 12;
            e = gpn < m->ept_pages ? m->ept[gpn] : 0;
            if ((e & VMM_EPT_VALID) && !(e & VMM_EPT_MMIO) && (p = frame_ptr(m, e >> 12)) != NULL)
                host_write(c, p + (w.gpa & 0xFFF), chunk, code_changed);
        }
        lin += chunk;
        len -= chunk;
    }
    return 0;
}

int vmm_core_invalidate_linear(vmm_core *c, uint64_t lin, uint64_t len)
{
    return invalidate_linear(c, lin, len, 1);
}

/* The exact stop inside a block (engine.py, Engine._finish_budget).  arm=1:
   drop the translation of the block through target-1 and make target
   Unicorn's one exit, so that block is translated again ending at target.
   arm=0: no exit, and drop that cut block again, or it stays in the cache,
   is found before the whole block, and splits every later pass through that
   code in two (a loop then runs as two blocks, each with its block hook).
   The code itself did not change, so the block-count cache stays.  Returns
   0, or -1 when there is no shadow MMU to find the code (the caller drops
   it through Unicorn). */
int vmm_core_exact_stop(vmm_core *c, uint64_t target, int arm)
{
    uint64_t exits[1] = {target};
    int rc;
    if (!arm)
        uc_ctl(c->uc, UC_CTL_WRITE(UC_CTL_UC_EXITS, 2), exits, (size_t)0);
    rc = invalidate_linear(c, target - 1, 1, 0);
    if (arm)
        uc_ctl(c->uc, UC_CTL_WRITE(UC_CTL_UC_EXITS, 2), exits, (size_t)1);
    return rc;
}
