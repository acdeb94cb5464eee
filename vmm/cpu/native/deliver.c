/*
 * Exception and software-interrupt delivery in C, inside Unicorn's hooks:
 * part of the vCPU's C module (vmm.cpu._native), compiled after core.c and
 * mmu.c (it uses the walk and the EPT view).
 *
 * Why.  Unicorn never vectors anything (UNICORN.md 2): every #UD, #GP, #DE,
 * INT n reaches a hook, and the VMM used to stop the vCPU there, return to
 * Python, deliver per the SDM (vmm/cpu/delivery.py) and enter the guest
 * again -- about 80 us per exception.  Here the common deliveries are done
 * in the hook itself and the guest goes on without leaving emu_start:
 *
 * * real mode through the IVT;
 * * protected mode through a present 32-bit interrupt or trap gate, at the
 *   same privilege or to an inner ring through the TSS stack (not from
 *   virtual-8086 mode);
 * * IA-32e mode through a present 64-bit gate, same privilege or inner ring,
 *   with IST stacks.
 *
 * Everything else -- task gates, 16-bit gates, any check that fails (the
 * #GP/#NP/#TS/#SS/#PF/#DF a delivery can raise), a stack in MMIO or in no
 * RAM, a page the EPT keeps read-only, a frame that wraps its stack segment
 * -- is left to the Python delivery, which stays the reference: the hook
 * then stops as before.  Nothing is written before every access of the
 * delivery has been translated and checked, so giving up leaves only what
 * the Python delivery does again (the A/D bits of the same walks).  The
 * statements follow delivery.py's order so the two stay comparable;
 * tests/test_delivery_fast.py runs guests both ways and compares the state.
 *
 * The clock.  The block hook counted the whole block; a fault retires
 * nothing of its instruction, a trap (INT n) retires it.  The retired count
 * up to the stopping EIP is known without decoding when EIP is the block's
 * first instruction or its end; otherwise from the block-count cache entry,
 * where the Python exit correction leaves the count it decoded (`xoff`,
 * `xn`) the first time.  Without it, the hook stops and Python delivers.
 */

#define FD_ON   0x1u   /* deliver in C when possible */
#define FD_LOG  0x2u   /* dirty logging is on: a write marks its page */

#define ENV_LDT_OFF  (184 + 24 * 6)
#define ENV_TR_OFF   (ENV_LDT_OFF + 24)
#define ENV_GDT_OFF  (ENV_TR_OFF + 24)
#define ENV_IDT_OFF  (ENV_GDT_OFF + 24)
#define ENV_RSP      (8 * 4)

#define FD_CS 1
#define FD_SS 2
#define FD_DS 3
#define FD_ES 0

#define HF_CPL   3u
#define HF_INHIBIT (1u << 3)
#define HF_SS32  (1u << 5)
#define HF_ADDSEG (1u << 6)
#define HF_LMA   (1u << 14)

#define EF_TF (1ull << 8)
#define EF_IF (1ull << 9)
#define EF_NT (1ull << 14)
#define EF_RF (1ull << 16)
#define EF_VM (1ull << 17)
#define EF_AC (1ull << 18)

#define D_S    (1u << 12)
#define D_CODE (1u << 11)
#define D_CONF (1u << 10)
#define D_WR   (1u << 9)
#define D_P    (1u << 15)
#define D_L    (1u << 21)
#define D_B    (1u << 22)
#define D_G    (1u << 23)

typedef struct {
    vmm_core *c;
    vmm_mmu *m;
    uint8_t *env;
    uint64_t cr0, cr3, cr4, efer;
    int32_t a20;
    int lma;
} fd_ctx;

#define FD_MAX_PIECES 4

typedef struct {
    uint8_t *host[FD_MAX_PIECES];
    uint32_t len[FD_MAX_PIECES];
    uint64_t gpn[FD_MAX_PIECES];
    uint64_t hfn[FD_MAX_PIECES];
    int n;
} fd_span;

static inline uint64_t fd_u64(uint8_t *env, int off) { uint64_t v; memcpy(&v, env + off, 8); return v; }
static inline uint32_t fd_u32(uint8_t *env, int off) { uint32_t v; memcpy(&v, env + off, 4); return v; }
static inline void fd_set64(uint8_t *env, int off, uint64_t v) { memcpy(env + off, &v, 8); }
static inline void fd_set32(uint8_t *env, int off, uint32_t v) { memcpy(env + off, &v, 4); }

static inline uint64_t seg_base(uint8_t *env, int i) { return fd_u64(env, 184 + 24 * i + 8); }
static inline uint32_t seg_sel(uint8_t *env, int i) { return fd_u32(env, 184 + 24 * i) & 0xFFFF; }
static inline uint32_t seg_flags(uint8_t *env, int i) { return fd_u32(env, 184 + 24 * i + 20); }

/* Translate [lin, lin+n) for a supervisor/user read or write: host pieces, or -1
   (a fault, an EPT violation, a hole, MMIO, a write to a page without W). */
static int fd_translate(fd_ctx *x, uint64_t lin, uint32_t n, int write, int user, fd_span *sp)
{
    vmm_mmu *m = x->m;
    sp->n = 0;
    while (n > 0) {
        vmm_walk_result w;
        uint64_t gpn, e;
        uint8_t *p;
        uint32_t chunk = 0x1000 - (uint32_t)(lin & 0xFFF);
        if (chunk > n)
            chunk = n;
        if (x->lma && (x->cr0 & CR0_PG)) {
            int64_t sext = (int64_t)lin >> 47;
            if (sext != 0 && sext != -1)
                return -1;
        }
        if (sp->n == FD_MAX_PIECES)
            return -1;
        if (vmm_walk(m, lin, write ? 1 : 0, user, x->cr0, x->cr3, x->cr4, x->efer, x->a20, 1, &w) != VMM_WALK_OK)
            return -1;
        gpn = w.gpa >> 12;
        e = gpn < m->ept_pages ? m->ept[gpn] : 0;
        if (!(e & VMM_EPT_VALID) || (e & VMM_EPT_MMIO))
            return -1;
        if (!(e & (write ? VMM_EPT_W : VMM_EPT_R)))
            return -1;
        p = frame_ptr(m, e >> 12);
        if (!p)
            return -1;
        sp->host[sp->n] = p + (w.gpa & 0xFFF);
        sp->len[sp->n] = chunk;
        sp->gpn[sp->n] = gpn;
        sp->hfn[sp->n] = e >> 12;
        sp->n++;
        lin += chunk;
        n -= chunk;
    }
    return 0;
}

static int fd_read(fd_ctx *x, uint64_t lin, void *buf, uint32_t n)
{
    fd_span sp;
    uint8_t *out = buf;
    int i;
    if (fd_translate(x, lin, n, 0, 0, &sp))
        return -1;
    for (i = 0; i < sp.n; i++) {
        memcpy(out, sp.host[i], sp.len[i]);
        out += sp.len[i];
    }
    return 0;
}

/* The guest sees the bytes; translated code on them is dropped, the dirty log
   marks the page (as GuestMemory.write does through Engine._host_wrote). */
static void fd_commit(fd_ctx *x, fd_span *sp, const uint8_t *data)
{
    int i;
    for (i = 0; i < sp->n; i++) {
        memcpy(sp->host[i], data, sp->len[i]);
        vmm_core_host_write(x->c, sp->host[i], sp->len[i]);
        if ((x->c->fast & FD_LOG) && sp->hfn[i] == sp->gpn[i])
            x->m->dirty[sp->gpn[i]] = 1;
        data += sp->len[i];
    }
}

static void fd_descriptor_fields(uint32_t lo, uint32_t hi, uint64_t *base, uint32_t *limit, uint32_t *flags)
{
    uint32_t lim = (lo & 0xFFFF) | (hi & 0xF0000);
    *base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000u);
    if (hi & D_G)
        lim = (lim << 12) | 0xFFF;
    *limit = lim;
    *flags = hi & 0x00F0FF00u;
}

static int fd_read_descriptor(fd_ctx *x, uint32_t selector, uint32_t *lo, uint32_t *hi)
{
    uint8_t *env = x->env;
    uint64_t base;
    uint32_t limit, index = selector & ~7u;
    uint32_t raw[2];
    if (selector & 4) {
        base = fd_u64(env, ENV_LDT_OFF + 8);
        limit = fd_u32(env, ENV_LDT_OFF + 16);
    } else {
        base = fd_u64(env, ENV_GDT_OFF + 8);
        limit = fd_u32(env, ENV_GDT_OFF + 16);
    }
    if (index + 7 > limit)
        return -1;
    if (fd_read(x, base + index, raw, 8))
        return -1;
    *lo = raw[0];
    *hi = raw[1];
    return 0;
}

/* delivery.py _handler_code_segment */
static int fd_handler_cs(fd_ctx *x, uint32_t selector, uint32_t cpl, uint32_t *lo, uint32_t *hi)
{
    if ((selector & 0xFFFC) == 0)
        return -1;
    if (fd_read_descriptor(x, selector, lo, hi))
        return -1;
    if (!(*hi & D_S) || !(*hi & D_CODE))
        return -1;
    if (((*hi >> 13) & 3) > cpl)
        return -1;
    if (!(*hi & D_P))
        return -1;
    return 0;
}

/* vcpu.py load_seg (QEMU's cpu_x86_load_seg_cache) */
static void fd_load_seg(fd_ctx *x, int i, uint32_t selector, uint64_t base, uint32_t limit, uint32_t flags)
{
    uint8_t *env = x->env;
    uint32_t hf;
    int off = 184 + 24 * i;
    fd_set32(env, off, selector & 0xFFFF);
    fd_set32(env, off + 4, 0);
    fd_set64(env, off + 8, base);
    fd_set32(env, off + 16, limit);
    fd_set32(env, off + 20, flags);
    hf = fd_u32(env, ENV_HFLAGS);
    if (i == FD_CS) {
        if ((hf & HF_LMA) && (flags & D_L)) {
            hf |= HF_CS32 | HF_SS32 | HF_CS64;
            hf &= ~HF_ADDSEG;
        } else {
            hf = (hf & ~(HF_CS32 | HF_CS64)) | ((flags & D_B) >> (22 - 4));
        }
    }
    if (i == FD_SS)
        hf = (hf & ~HF_CPL) | ((flags >> 13) & 3);
    hf = (hf & ~HF_SS32) | ((seg_flags(env, FD_SS) & D_B) >> (22 - 5));
    if (hf & HF_CS64) {
        /* nothing */
    } else if (!(fd_u64(env, ENV_CR) & 1) || (fd_u64(env, ENV_EFLAGS) & EF_VM) || !(hf & HF_CS32)) {
        hf |= HF_ADDSEG;
    } else {
        uint64_t nz = seg_base(env, FD_DS) | seg_base(env, FD_ES) | seg_base(env, FD_SS);
        hf = (hf & ~HF_ADDSEG) | (nz ? HF_ADDSEG : 0);
    }
    fd_set32(env, ENV_HFLAGS, hf);
}

static void fd_set_cpl(fd_ctx *x, uint32_t cpl)
{
    fd_set32(x->env, ENV_HFLAGS, (fd_u32(x->env, ENV_HFLAGS) & ~HF_CPL) | (cpl & 3));
}

static uint64_t fd_rflags(fd_ctx *x)
{
    uint64_t v = 0;
    uc_reg_read(x->c->uc, UC_X86_REG_RFLAGS, &v);
    return v;
}

static void fd_set_rflags(fd_ctx *x, uint64_t v)
{
    uc_reg_write(x->c->uc, UC_X86_REG_RFLAGS, &v);
}

/* delivery.py _real */
static int fd_real(fd_ctx *x, int vector, uint64_t flags)
{
    uint8_t *env = x->env;
    uint64_t idt_base = fd_u64(env, ENV_IDT_OFF + 8), rsp = fd_u64(env, ENV_RSP), rip = fd_u64(env, ENV_EIP);
    uint32_t idt_limit = fd_u32(env, ENV_IDT_OFF + 16), entry, sp;
    uint16_t frame[3];
    fd_span span;
    if ((uint32_t)vector * 4 + 3 > idt_limit)
        return -1;
    if (fd_read(x, idt_base + vector * 4, &entry, 4))
        return -1;
    sp = (uint32_t)(rsp & 0xFFFF);
    if (sp < 6)
        return -1;   /* the frame wraps the 64 KiB stack: Python's item by item */
    sp -= 6;
    frame[0] = (uint16_t)rip;
    frame[1] = (uint16_t)seg_sel(env, FD_CS);
    frame[2] = (uint16_t)flags;
    if (fd_translate(x, seg_base(env, FD_SS) + sp, 6, 1, 0, &span))
        return -1;
    fd_commit(x, &span, (const uint8_t *)frame);
    fd_set64(env, ENV_RSP, (rsp & ~0xFFFFull) | sp);
    fd_load_seg(x, FD_CS, entry >> 16, (uint64_t)(entry >> 16) << 4, 0xFFFF, seg_flags(env, FD_CS));
    fd_set64(env, ENV_EIP, entry & 0xFFFF);
    fd_set_rflags(x, flags & ~(EF_IF | EF_TF | EF_AC | EF_RF));
    return 0;
}

/* The IDT gate of `vector` (entries of `size` bytes), checked as far as C takes it:
   a present 32/64-bit interrupt or trap gate whose DPL admits INT n.  0 and the
   words, or -1 (the Python delivery raises the #GP/#NP, or takes a task gate). */
static int fd_gate(fd_ctx *x, int vector, uint32_t size, int sw, uint32_t *raw, uint32_t *gtype)
{
    uint8_t *env = x->env;
    uint64_t idt_base = fd_u64(env, ENV_IDT_OFF + 8);
    uint32_t idt_limit = fd_u32(env, ENV_IDT_OFF + 16), hi, cpl;
    if ((uint32_t)vector * size + size - 1 > idt_limit)
        return -1;
    if (fd_read(x, idt_base + vector * size, raw, size))
        return -1;
    hi = raw[1];
    *gtype = (hi >> 8) & 0x1F;
    if (*gtype != 0xE && *gtype != 0xF)
        return -1;   /* task gates, 16-bit gates, and the #GP of a bad type */
    cpl = fd_u32(env, ENV_HFLAGS) & HF_CPL;
    if (sw && ((hi >> 13) & 3) < cpl)
        return -1;
    if (!(hi & D_P))
        return -1;
    return 0;
}

/* delivery.py _protected, 32-bit interrupt and trap gates only */
static int fd_protected(fd_ctx *x, int vector, int has_ec, uint32_t ec, int sw, uint64_t flags)
{
    uint8_t *env = x->env;
    uint64_t rsp = fd_u64(env, ENV_RSP), rip = fd_u64(env, ENV_EIP);
    uint32_t raw[2], lo, hi, gtype, cpl, selector, offset, e1, e2, cs_dpl, new_cpl;
    uint32_t ss_sel, ss_limit, ss_flags, mask, sp, words[7], total, n = 0, i;
    uint64_t esp, ss_base, cs_base;
    uint32_t cs_limit, cs_flags;
    int new_stack;
    uint8_t buf[28];
    fd_span span;

    if (fd_gate(x, vector, 8, sw, raw, &gtype))
        return -1;
    lo = raw[0];
    hi = raw[1];
    cpl = fd_u32(env, ENV_HFLAGS) & HF_CPL;
    selector = lo >> 16;
    offset = (hi & 0xFFFF0000u) | (lo & 0xFFFF);
    if (fd_handler_cs(x, selector, cpl, &e1, &e2))
        return -1;
    cs_dpl = (e2 >> 13) & 3;
    if (flags & EF_VM)
        return -1;
    if (!(e2 & D_CONF) && cs_dpl < cpl) {
        uint64_t tr_base = fd_u64(env, ENV_TR_OFF + 8);
        uint32_t tr_limit = fd_u32(env, ENV_TR_OFF + 16), tr_flags = fd_u32(env, ENV_TR_OFF + 20);
        uint32_t shift, index, s1, s2;
        uint16_t v16;
        new_cpl = cs_dpl;
        if (!(tr_flags & D_P))
            return -1;
        shift = ((tr_flags >> 8) & 0xF) >> 3;
        index = (new_cpl * 4 + 2) << shift;
        if (index + (4u << shift) - 1 > tr_limit)
            return -1;
        if (shift == 0) {
            if (fd_read(x, tr_base + index + 2, &v16, 2))
                return -1;
            ss_sel = v16;
            if (fd_read(x, tr_base + index, &v16, 2))
                return -1;
            esp = v16;
        } else {
            uint32_t v32;
            if (fd_read(x, tr_base + index + 4, &v16, 2))
                return -1;
            ss_sel = v16;
            if (fd_read(x, tr_base + index, &v32, 4))
                return -1;
            esp = v32;
        }
        if ((ss_sel & 0xFFFC) == 0 || (ss_sel & 3) != new_cpl)
            return -1;
        if (fd_read_descriptor(x, ss_sel, &s1, &s2))
            return -1;
        if (((s2 >> 13) & 3) != new_cpl || !(s2 & D_S) || (s2 & D_CODE) || !(s2 & D_WR))
            return -1;
        if (!(s2 & D_P))
            return -1;
        fd_descriptor_fields(s1, s2, &ss_base, &ss_limit, &ss_flags);
        new_stack = 1;
    } else {
        new_cpl = cpl;
        ss_sel = seg_sel(env, FD_SS);
        ss_base = seg_base(env, FD_SS);
        ss_limit = fd_u32(env, 184 + 24 * FD_SS + 16);
        ss_flags = seg_flags(env, FD_SS);
        esp = rsp;
        new_stack = 0;
    }
    mask = (ss_flags & D_B) ? 0xFFFFFFFFu : 0xFFFFu;
    if (new_stack) {
        words[n++] = seg_sel(env, FD_SS);
        words[n++] = (uint32_t)rsp;
    }
    words[n++] = (uint32_t)flags;
    words[n++] = seg_sel(env, FD_CS);
    words[n++] = (uint32_t)rip;
    if (has_ec)
        words[n++] = ec;
    total = 4 * n;
    sp = (uint32_t)(esp & mask);
    if (sp < total)
        return -1;   /* wraps the stack segment: Python's item by item */
    sp -= total;
    for (i = 0; i < n; i++)   /* the last pushed at the lowest address */
        memcpy(buf + 4 * i, &words[n - 1 - i], 4);
    if (fd_translate(x, ss_base + sp, total, 1, new_cpl == 3, &span))
        return -1;
    /* commit: nothing below can fail */
    fd_commit(x, &span, buf);
    if (new_stack)
        fd_load_seg(x, FD_SS, (ss_sel & 0xFFFC) | new_cpl, ss_base, ss_limit, ss_flags);
    fd_set64(env, ENV_RSP, mask != 0xFFFFFFFFu ? ((esp & ~(uint64_t)mask) | sp) : sp);
    fd_descriptor_fields(e1, e2, &cs_base, &cs_limit, &cs_flags);
    if (new_stack)
        fd_set_cpl(x, new_cpl);
    fd_load_seg(x, FD_CS, (selector & 0xFFFC) | new_cpl, cs_base, cs_limit, cs_flags);
    fd_set_cpl(x, new_cpl);
    fd_set64(env, ENV_EIP, offset);
    flags &= ~(EF_TF | EF_VM | EF_RF | EF_NT);
    if (!(gtype & 1))
        flags &= ~EF_IF;
    fd_set_rflags(x, flags);
    return 0;
}

static int fd_tss64_rsp(fd_ctx *x, uint32_t level, uint64_t *rsp)
{
    uint64_t tr_base = fd_u64(x->env, ENV_TR_OFF + 8);
    uint32_t tr_limit = fd_u32(x->env, ENV_TR_OFF + 16), index = 8 * level + 4;
    if (index + 7 > tr_limit)
        return -1;
    return fd_read(x, tr_base + index, rsp, 8);
}

/* delivery.py _long */
static int fd_long(fd_ctx *x, int vector, int has_ec, uint32_t ec, int sw, uint64_t flags)
{
    uint8_t *env = x->env;
    uint64_t rsp = fd_u64(env, ENV_RSP), rip = fd_u64(env, ENV_EIP);
    uint32_t raw[4], e1, e2, e3, gtype, cpl, selector, ist, d1, d2, cs_dpl, new_cpl, n = 0, i;
    uint64_t offset, new_rsp, words[6], cs_base;
    uint32_t cs_limit, cs_flags;
    int priv_change;
    uint8_t buf[48];
    fd_span span;

    if (fd_gate(x, vector, 16, sw, raw, &gtype))
        return -1;
    e1 = raw[0];
    e2 = raw[1];
    e3 = raw[2];
    cpl = fd_u32(env, ENV_HFLAGS) & HF_CPL;
    selector = e1 >> 16;
    offset = (e2 & 0xFFFF0000u) | (e1 & 0xFFFF) | ((uint64_t)e3 << 32);
    ist = e2 & 7;
    if (fd_handler_cs(x, selector, cpl, &d1, &d2))
        return -1;
    cs_dpl = (d2 >> 13) & 3;
    if (!(d2 & D_L) || (d2 & D_B))
        return -1;
    if (!(d2 & D_CONF) && cs_dpl < cpl) {
        new_cpl = cs_dpl;
        priv_change = 1;
    } else {
        new_cpl = cpl;
        priv_change = 0;
    }
    if (ist) {
        if (fd_tss64_rsp(x, ist + 3, &new_rsp))
            return -1;
    } else if (priv_change) {
        if (fd_tss64_rsp(x, new_cpl, &new_rsp))
            return -1;
    } else {
        new_rsp = rsp;
    }
    new_rsp &= ~0xFull;
    words[n++] = seg_sel(env, FD_SS);
    words[n++] = rsp;
    words[n++] = flags;
    words[n++] = seg_sel(env, FD_CS);
    words[n++] = rip;
    if (has_ec)
        words[n++] = ec;
    new_rsp -= 8 * n;
    for (i = 0; i < n; i++)
        memcpy(buf + 8 * i, &words[n - 1 - i], 8);
    if (fd_translate(x, new_rsp, 8 * n, 1, new_cpl == 3, &span))
        return -1;
    fd_commit(x, &span, buf);
    if (priv_change) {
        fd_set_cpl(x, new_cpl);
        fd_load_seg(x, FD_SS, new_cpl, 0, 0, new_cpl << 13);
    }
    fd_set64(env, ENV_RSP, new_rsp);
    fd_descriptor_fields(d1, d2, &cs_base, &cs_limit, &cs_flags);
    fd_load_seg(x, FD_CS, (selector & 0xFFFC) | new_cpl, cs_base, cs_limit, cs_flags);
    fd_set_cpl(x, new_cpl);
    fd_set64(env, ENV_EIP, offset);
    flags &= ~(EF_TF | EF_VM | EF_RF | EF_NT);
    if (!(gtype & 1))
        flags &= ~EF_IF;
    fd_set_rflags(x, flags);
    return 0;
}

/* Deliver one event now: 1 if delivered, 0 if left to Python (nothing changed
   but A/D bits Python sets again).  `retired` is what the current block
   (core->cur) really retired up to the event, or -1 for no correction.
   `ext`: an external interrupt (no error code, no RF, whatever the vector). */
static int fd_deliver_ev(vmm_core *c, int vector, int sw, int ext, uint32_t error, int64_t retired)
{
    uint8_t *env = c->env;
    uint64_t cr0, flags;
    int has_ec, fault, rc;
    fd_ctx x;
    vmm_mmu *m = c->mmu;
    uint32_t viol_valid;

    x.c = c;
    x.m = m;
    x.env = env;
    x.cr0 = cr0 = fd_u64(env, ENV_CR);
    x.cr3 = fd_u64(env, ENV_CR + 24);
    x.cr4 = fd_u64(env, ENV_CR + 32);
    x.efer = fd_u64(env, ENV_EFER);
    x.a20 = *(int32_t *)(env + ENV_A20);
    x.lma = (fd_u32(env, ENV_HFLAGS) & HF_LMA) != 0;
    has_ec = !sw && !ext && (vector == 8 || (vector >= 10 && vector <= 14) || vector == 17);
    fault = !sw && !ext && (vector == 0 || vector == 5 || vector == 6 || vector == 7 || (vector >= 10 && vector <= 14) ||
                    vector == 16 || vector == 17 || (vector >= 19 && vector <= 21));
    flags = fd_rflags(&x);
    if (fault)
        flags |= EF_RF;
    viol_valid = m->viol_valid;
    if (!(cr0 & 1))
        rc = fd_real(&x, vector, flags);
    else if (x.lma)
        rc = fd_long(&x, vector, has_ec, error, sw, flags);
    else
        rc = fd_protected(&x, vector, has_ec, error, sw, flags);
    if (rc != 0) {
        m->viol_valid = viol_valid;   /* a walk that gave up noted nothing the run reports */
        return 0;
    }
    fd_set32(env, ENV_HFLAGS, fd_u32(env, ENV_HFLAGS) & ~HF_INHIBIT);
    if (c->cur && retired >= 0)
        c->icount += (uint64_t)retired - c->cur->icount;
    c->cur = NULL;
    return 1;
}

static int fd_deliver(vmm_core *c, int vector, int sw, uint32_t error, int64_t retired)
{
    if (!fd_deliver_ev(c, vector, sw, 0, error, retired)) {
        c->fast_misses++;
        return 0;
    }
    c->fast_delivered++;
    return 1;
}

/* An external interrupt the VMM takes between two runs (Machine._turn_of: the
   vCPU is interruptible, the interrupt controller gave `vector`): 1 if
   delivered here, 0 if Python must deliver it (delivery.py, the reference,
   whose deliver(vector, external=True) this follows; anything C does not
   take, as for exceptions, is left to it).  `fast` is what Engine sets for a
   run (FD_ON, FD_LOG with dirty logging on).  A Linux boot takes ~4,000 of
   these, each ~100 us in Python. */
static int vmm_core_deliver_irq(vmm_core *c, int vector, uint32_t fast)
{
    if (!c->mmu || c->cur || c->smc_pending || !(fast & FD_ON) || vector < 0 || vector > 255)
        return 0;
    c->fast = fast;
    if (!fd_deliver_ev(c, vector, 0, 1, 0, -1)) {
        c->irq_misses++;
        return 0;
    }
    *(int32_t *)(c->env + ENV_OLD_EXC) = -1;   /* Vcpu.clear_exception_state */
    c->irq_delivered++;
    return 1;
}

/* What the current block retired up to the instruction at linear `lin`, known
   without decoding, or -1. */
static int64_t fd_retired(vmm_core *c, uint64_t lin)
{
    vmm_tbc_entry *cur = c->cur;
    uint64_t off = lin - cur->pc;
    if (off == 0)
        return 0;
    if (off == cur->size)
        return cur->icount;
    if (off < cur->size && cur->xoff == off + 1)
        return cur->xn;
    return -1;
}

/* Deliver one exception or INT n from a hook: 1 if delivered (the guest goes
   on at its handler), 0 if the hook must stop and leave it to Python. */
static int fast_deliver(vmm_core *c, int vector, int sw, uint32_t error)
{
    int64_t retired;
    if (!c->cur || !c->mmu || c->smc_pending || c->cur == &c->forced_tb)
        return 0;   /* (a block cut by its own store, or an exact stop's cut block: the exit accounts first) */
    if (!sw && (vector == 1 || vector == 2 || vector == 8 || vector == 14 || vector == 18 || vector > 31))
        return 0;   /* #DB, NMI, #DF, #MC: Python; #PF here is nested mode's, whose fetch faults see a stale block */
    retired = fd_retired(c, seg_base(c->env, FD_CS) + fd_u64(c->env, ENV_EIP));
    if (retired < 0)
        return 0;
    return fd_deliver(c, vector, sw, error, retired);
}

/* The shadow MMU's fill failed with a guest #PF and Unicorn stopped at the
   faulting instruction (EIP restored): deliver it, so vmm_core_run can enter
   the guest again without returning to Python.  As Engine._enter_once_inner:
   CR2 is set whatever happens next; a fetch fault retired the whole block
   that ran before it. */
static int fast_page_fault(vmm_core *c)
{
    vmm_shadow *s = c->shadow;
    int64_t retired = -1;
    if (s->pending != VMM_PEND_PF || !c->mmu || c->smc_pending || c->cur == &c->forced_tb)
        return 0;
    fd_set64(c->env, ENV_CR + 16, s->pf_addr);
    if (s->pend_access != 2) {
        if (!c->cur)
            return 0;
        retired = fd_retired(c, seg_base(c->env, FD_CS) + fd_u64(c->env, ENV_EIP));
        if (retired < 0)
            return 0;
    }
    if (!fd_deliver(c, 14, 0, s->pf_error, retired))
        return 0;
    s->pending = 0;
    return 1;
}

/* ---------------------------------------------------------------- SYSCALL / SYSENTER */
/* Unicorn runs neither (UNICORN.md 4): its helper calls the UC_HOOK_INSN hooks,
   then adds the instruction's length to EIP.  A Linux guest makes every system
   call through one of them, so each used to be an exit to Python
   (delivery.py syscall/sysenter, the reference, which this follows statement
   by statement).  Here the hook does the transfer and returns: the helper's
   `+ length` lands on the target, and the block, which the instruction ends,
   leaves to the next one at the new CS:RIP with the new hflags.
   Left to Python (the hook stops as before): the #UD and #GP cases, C delivery
   off (a tracer, introspection, the reference clock, an exact stop), an
   interrupt shadow, a block cut by a store or by an exact stop, an instruction
   that is not the 2 bytes ending its block (prefixes; a stale EIP), and a
   result with TF set (QEMU would raise #DB at the target at once, the Python
   path at the instruction after it).
   The clock: the block hook counted the block whole, and the instruction is its
   last, so the count is exact as it stands. */
#define ENV_SYSENTER_CS  4800
#define ENV_SYSENTER_ESP 4808
#define ENV_SYSENTER_EIP 4816
#define ENV_STAR         4824
#define ENV_LSTAR        4840
#define ENV_FMASK        4856
#define VMM_ENV_SYSENTER_CS ENV_SYSENTER_CS
#define VMM_ENV_STAR        ENV_STAR
#define VMM_ENV_LSTAR       ENV_LSTAR
#define VMM_ENV_FMASK       ENV_FMASK
#define D_ACC (1u << 8)

static int fast_sysinsn(vmm_core *c, int kind)
{
    uint8_t *env = c->env;
    vmm_tbc_entry *cur = c->cur;
    uint32_t hf = fd_u32(env, ENV_HFLAGS);
    uint64_t eip = fd_u64(env, ENV_EIP), flags, target;
    fd_ctx x;
    if (!(c->fast & FD_ON) || !cur || c->smc_pending || cur == &c->forced_tb || (hf & HF_INHIBIT))
        return 0;
    if (seg_base(env, FD_CS) + eip + 2 != cur->pc + cur->size)
        return 0;
    x.c = c;
    x.m = c->mmu;
    x.env = env;
    flags = fd_rflags(&x);
    if (kind == VMM_INSN_SYSCALL) {
        uint64_t star = fd_u64(env, ENV_STAR), nf;
        uint32_t cs_sel;
        if (!(fd_u64(env, ENV_EFER) & 1) || !(hf & HF_LMA) || !(hf & HF_CS64))
            return 0;   /* #UD */
        nf = flags & ~fd_u64(env, ENV_FMASK) & ~EF_RF;
        if (nf & EF_TF)
            return 0;
        fd_set64(env, 8 * 1, eip + 2);            /* RCX */
        fd_set64(env, 8 * 11, flags & ~EF_RF);    /* R11 */
        cs_sel = (uint32_t)(star >> 32) & 0xFFFF;
        fd_set_cpl(&x, 0);
        fd_load_seg(&x, FD_CS, cs_sel & 0xFFFC, 0, 0xFFFFFFFFu, D_G | D_P | D_S | D_CODE | D_WR | D_ACC | D_L);
        fd_load_seg(&x, FD_SS, (cs_sel + 8) & 0xFFFC, 0, 0xFFFFFFFFu, D_G | D_B | D_P | D_S | D_WR | D_ACC);
        fd_set_cpl(&x, 0);
        fd_set_rflags(&x, nf);
        target = fd_u64(env, ENV_LSTAR);
        c->fast_syscalls++;
    } else {
        uint32_t cs_sel = (uint32_t)fd_u64(env, ENV_SYSENTER_CS) & 0xFFFF, cs_flags;
        int lma = (hf & HF_LMA) != 0;
        uint64_t esp;
        if (!(fd_u64(env, ENV_CR) & 1) || (cs_sel & 0xFFFC) == 0)
            return 0;   /* #GP */
        if ((flags & ~(EF_VM | EF_IF | EF_RF)) & EF_TF)
            return 0;
        fd_set_rflags(&x, flags & ~(EF_VM | EF_IF | EF_RF));
        fd_set_cpl(&x, 0);
        cs_flags = D_G | D_P | D_S | D_CODE | D_WR | D_ACC | (lma ? D_L : D_B);
        fd_load_seg(&x, FD_CS, cs_sel & 0xFFFC, 0, 0xFFFFFFFFu, cs_flags);
        fd_load_seg(&x, FD_SS, (cs_sel + 8) & 0xFFFC, 0, 0xFFFFFFFFu, D_G | D_P | D_S | D_WR | D_ACC | D_B);
        fd_set_cpl(&x, 0);
        esp = fd_u64(env, ENV_SYSENTER_ESP);
        target = fd_u64(env, ENV_SYSENTER_EIP);
        if (!lma) {
            esp &= 0xFFFFFFFFu;
            target &= 0xFFFFFFFFu;
        }
        fd_set64(env, ENV_RSP, esp);
        c->fast_sysenters++;
    }
    fd_set64(env, ENV_EIP, target - 2);   /* the helper adds the length next */
    c->cur = NULL;
    return 1;
}
