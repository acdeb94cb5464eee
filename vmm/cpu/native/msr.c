/*
 * RDMSR of IA32_ARCH_CAPABILITIES (MSR 0x10A).
 *
 * Unicorn offers no hook for RDMSR, and its helper answers 0 for every MSR it
 * does not know (UNICORN.md), 0x10A among them.  A CPU that reports the MSR
 * (CPUID.(EAX=7,ECX=0):EDX[29]) must answer it: that is how a kernel learns the
 * CPU is not exposed to Meltdown (RDCL_NO) and the other speculative-execution
 * flaws, which an emulated CPU that executes nothing speculatively is not.
 * Without it Linux isolates its page tables (two CR3 writes per system call,
 * each a full TLB flush in Unicorn).
 *
 * So Unicorn's helper_rdmsr starts with a jump here (as core.c replaces the
 * CMPXCHG8B/16B helpers).  This answers 0x10A for a core that offers the MSR
 * (vmm_core_set_arch_cap), the vCPU running on this thread (vmm_cur_core, set
 * around uc_emu_start); everything else goes to the original helper through a
 * trampoline: its first instructions, copied (Python checks with capstone that
 * they are whole and position-independent), then a jump to the rest.
 */
#include <sys/mman.h>

#define MSR_IA32_ARCH_CAPABILITIES 0x10Au

static struct {
    void (*orig)(void *env);   /* the trampoline */
    int installed;
} vmm_msr;

static void vmm_rdmsr(void *env)
{
    uint64_t *regs = (uint64_t *)env;          /* EAX, ECX, EDX, ... */
    vmm_core *c = vmm_cur_core;
    if ((uint32_t)regs[1] == MSR_IA32_ARCH_CAPABILITIES && c && c->env == (uint8_t *)env && c->arch_cap_on) {
        regs[0] = (uint32_t)c->arch_cap;
        regs[2] = (uint32_t)(c->arch_cap >> 32);
        return;
    }
    vmm_msr.orig(env);
}

/* Install once per process: ``rdmsr`` is helper_rdmsr's address, ``copy`` the
   length of its first whole instructions (at least the 12 bytes patch_jump
   writes).  Returns 0, or -1 for bad arguments, -2 if no memory. */
static int vmm_msr_install(uint64_t rdmsr, uint32_t copy)
{
    uint8_t *t;
    uint64_t back = rdmsr + copy;
    if (vmm_msr.installed)
        return 0;
    if (!rdmsr || copy < 12 || copy > 64)
        return -1;
    t = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED)
        return -2;
    memcpy(t, (void *)(uintptr_t)rdmsr, copy);
    t[copy] = 0x49;                     /* movabs r11, back (r11: scratch, no argument) */
    t[copy + 1] = 0xBB;
    memcpy(t + copy + 2, &back, 8);
    t[copy + 10] = 0x41;                /* jmp r11 */
    t[copy + 11] = 0xFF;
    t[copy + 12] = 0xE3;
    if (mprotect(t, 4096, PROT_READ | PROT_EXEC) != 0)
        return -2;
    __builtin___clear_cache((char *)t, (char *)t + copy + 13);
    vmm_msr.orig = (void (*)(void *))(void *)t;
    if (patch_jump(rdmsr, (void *)vmm_rdmsr))
        return -2;
    vmm_msr.installed = 1;
    return 0;
}

/* What RDMSR 0x10A reads on this core's vCPUs; on = 0: Unicorn's answer (0). */
static int vmm_core_set_arch_cap(vmm_core *c, int on, uint64_t value)
{
    if (on && !vmm_msr.installed)
        return -1;
    c->arch_cap = value;
    c->arch_cap_on = on != 0;
    return 0;
}
