; demo.asm -- the guest the VMM boots by default: a tiny Multiboot v1 kernel.
;
; Build:  nasm -f bin -o demo.elf demo.asm   (or: python3 guests/build.py)
;
; The output file is an ELF32 i386 executable written by hand (ELF header and
; one program header below), so nasm alone builds it byte-for-byte
; reproducibly: no linker, no timestamps, no paths.  The whole file is one
; PT_LOAD segment: file offset 0 is loaded at physical/virtual 0x00100000
; (1 MiB) and memsz > filesz provides a zeroed .bss (page tables, stacks).
; The Multiboot header follows the ELF headers (well inside the first 8 KiB)
; and does not set flag 16, so a loader must use the ELF program header.
;
; The kernel touches hardware only (no BIOS).  It prints one "[demo] ..." line
; on COM1 per step:
;   1. check the Multiboot magic, print memory size and command line;
;   2. load a GDT (ring 0/3 code+data, TSS) and an IDT (exceptions 0-31,
;      IRQ0, int 0x80 with DPL 3);
;   3. turn on paging (identity map of 0-8 MiB, user pages at 0x40000000,
;      CR0.WP) and check that WP makes a ring-0 write to a read-only page fault;
;   4. remap the 8259 PICs, run the PIT at 100 Hz and wait for 10 ticks;
;   5. read the CMOS RTC and print the date and time;
;   6. run two ring-3 tasks, preempted on every timer tick: task A makes its
;      system calls with int 0x80, task B with SYSENTER/SYSEXIT;
;   7. exit through the debug-exit port 0x501 with status 0.
;
; The serial output must be byte-identical on every run, whatever the speed of
; the (emulated) CPU relative to the timer: it is compared between QEMU and our
; VMM.  So nothing printed depends on how many ticks passed, and the two tasks'
; lines are ordered by a kernel-kept turn: a task's write/exit system call
; waits (switching to the other task) until it is that task's turn, then
; passes the turn on.  Preemption decides *when* things run, never the order
; of the output.  The only time printed is the RTC date, which the host makes
; equal by configuration (QEMU: -rtc base=...,clock=vm).
;
; Exit statuses (value written to port 0x501):
;   0  all done            2  bad multiboot magic
;   3  unexpected CPU exception (vector, error code and EIP are printed first)
;   4  a self-check failed (CR0.WP not honoured)
;
; Hardware used: UART 0x3F8-0x3FF (polled), PIC 0x20/0x21/0xA0/0xA1,
; PIT 0x40/0x43, CMOS 0x70/0x71 (registers 0x00-0x0B, 0x32), debug exit 0x501,
; MSRs 0x174/0x175/0x176, CR0/CR2/CR3, IRQ0 (vector 0x20).

bits 32
KERNEL_BASE      equ 0x00100000     ; where the loader puts file offset 0
org KERNEL_BASE

; ---- Multiboot v1 --------------------------------------------------------
MB_HEADER_MAGIC  equ 0x1BADB002
MB_HEADER_FLAGS  equ 0x00000003     ; bit 0: page-align modules, bit 1: want mem_* info
MB_BOOT_MAGIC    equ 0x2BADB002     ; what the loader leaves in EAX
MBI_FLAG_MEM     equ 1 << 0         ; mem_lower/mem_upper valid
MBI_FLAG_CMDLINE equ 1 << 2         ; cmdline valid

; ---- devices ---------------------------------------------------------------
COM1             equ 0x3F8
UART_DATA        equ COM1 + 0
UART_IER         equ COM1 + 1
UART_FCR         equ COM1 + 2
UART_LCR         equ COM1 + 3
UART_MCR         equ COM1 + 4
UART_LSR         equ COM1 + 5
LSR_THRE         equ 0x20
PIC1_CMD         equ 0x20
PIC1_DATA        equ 0x21
PIC2_CMD         equ 0xA0
PIC2_DATA        equ 0xA1
PIC_EOI          equ 0x20
IRQ_BASE_MASTER  equ 0x20           ; IRQ0-7  -> vectors 0x20-0x27
IRQ_BASE_SLAVE   equ 0x28           ; IRQ8-15 -> vectors 0x28-0x2F
PIT_CH0          equ 0x40
PIT_CMD          equ 0x43
PIT_DIVISOR      equ 11932          ; 1193182 Hz / 11932 = 100.0 Hz
CMOS_INDEX       equ 0x70
CMOS_DATA        equ 0x71
DEBUG_EXIT_PORT  equ 0x501

; ---- MSRs ------------------------------------------------------------------
MSR_SYSENTER_CS  equ 0x174
MSR_SYSENTER_ESP equ 0x175
MSR_SYSENTER_EIP equ 0x176

; ---- segments (GDT order is fixed by SYSENTER/SYSEXIT: they derive SS and the
; ring-3 selectors from SYSENTER_CS as CS+8, CS+16, CS+24) ------------------
KCODE            equ 0x08
KDATA            equ 0x10
UCODE            equ 0x18 | 3
UDATA            equ 0x20 | 3
TSS_SEL          equ 0x28

; ---- paging ----------------------------------------------------------------
PTE_P            equ 1 << 0
PTE_RW           equ 1 << 1
PTE_US           equ 1 << 2
CR0_WP           equ 1 << 16
CR0_PG           equ 1 << 31
USER_VA          equ 0x40000000     ; user code (read-only) ...
USTACK_A_VA      equ 0x40100000     ; ... task A's stack page ...
USTACK_B_VA      equ 0x40102000     ; ... task B's stack page (unmapped gaps between) ...
SHARED_VA        equ 0x40200000     ; ... and the kernel's tick counter, read-only

; ---- tasks and system calls -------------------------------------------------
NTASKS           equ 2              ; task slots 1 and 2; slot 0 is the boot context
STEPS            equ 3              ; lines printed by each task
SYS_WRITE        equ 1              ; ebx = NUL-terminated string (user address)
SYS_EXIT         equ 2              ; ebx = status
SYS_YIELD        equ 3
EFAULT           equ 14
ENOSYS           equ 38

; Address of a .user label as the tasks see it (the .user pages are mapped at
; USER_VA; their identity mapping is kernel-only).
%define U(label) (USER_VA + ((label) - user_begin))

; PRINT "text", 10 -- send a string literal to COM1 (keeps every register).
%macro PRINT 1+
        push esi
        mov esi, %%str
        call puts
        pop esi
[section .rodata]
%%str:  db %1, 0
__SECT__
%endmacro

; Sections, in load order.  .user is page-aligned so that it can be mapped
; into user space by itself; .bss follows it (zeroed, not in the file).
section .text   progbits align=16
section .rodata progbits align=4    follows=.text
section .data   progbits align=16   follows=.rodata
section .user   progbits align=4096 follows=.data
section .bss    nobits   align=4096 follows=.user

; =============================================================================
section .text
; ---- ELF32 header ------------------------------------------------------------
elf_header:
        db 0x7F, "ELF"
        db 1                        ; ELFCLASS32
        db 1                        ; ELFDATA2LSB
        db 1                        ; EV_CURRENT
        db 0                        ; ELFOSABI_SYSV
        times 8 db 0
        dw 2                        ; e_type: ET_EXEC
        dw 3                        ; e_machine: EM_386
        dd 1                        ; e_version
        dd _start                   ; e_entry
        dd program_header - elf_header ; e_phoff
        dd 0                        ; e_shoff: no section headers
        dd 0                        ; e_flags
        dw elf_header_end - elf_header ; e_ehsize (52)
        dw program_header_end - program_header ; e_phentsize (32)
        dw 1                        ; e_phnum
        dw 40                       ; e_shentsize (unused: e_shnum = 0)
        dw 0                        ; e_shnum
        dw 0                        ; e_shstrndx
elf_header_end:

program_header:
        dd 1                        ; p_type: PT_LOAD
        dd 0                        ; p_offset: the whole file ...
        dd KERNEL_BASE              ; p_vaddr
        dd KERNEL_BASE              ; p_paddr: ... goes to 1 MiB
        dd file_end - KERNEL_BASE   ; p_filesz
        dd bss_end - KERNEL_BASE    ; p_memsz (the rest is zero-filled .bss)
        dd 7                        ; p_flags: R W X
        dd 0x1000                   ; p_align
program_header_end:

; ---- Multiboot header (must be 4-byte aligned in the first 8 KiB) -----------
        align 4, db 0
multiboot_header:
        dd MB_HEADER_MAGIC
        dd MB_HEADER_FLAGS
        dd -(MB_HEADER_MAGIC + MB_HEADER_FLAGS) ; the three add up to 0

; =============================================================================
; Entry: 32-bit protected mode, paging off, interrupts off, flat CS/DS/ES/SS,
; EAX = boot magic, EBX = physical address of the Multiboot info.  ESP and the
; GDTR are not guaranteed to be anything useful.
_start:
        cli
        cld
        mov esi, eax                ; keep the boot registers while ...
        mov ebp, ebx
        mov edi, bss_start          ; ... we zero .bss ourselves (a loader should,
        mov ecx, (bss_end - bss_start) / 4 ; but it costs nothing to be sure)
        xor eax, eax
        rep stosd
        mov esp, boot_stack_top
        mov [boot_magic], esi
        mov [boot_info], ebp

        call serial_init
        PRINT "[demo] multiboot kernel started (ELF32 loaded at 1 MiB)", 10

        ; ---- step 1: Multiboot magic, memory, command line ------------------
        mov eax, [boot_magic]
        cmp eax, MB_BOOT_MAGIC
        je .magic_ok
        PRINT "[demo] bad multiboot magic "
        call put_hex32
        PRINT " (expected 0x2BADB002): exiting with status 2", 10
        mov al, 2
        jmp debug_exit
.magic_ok:
        PRINT "[demo] multiboot magic OK (EAX = 0x2BADB002)", 10
        call print_boot_info        ; before paging: the info may live anywhere

        ; ---- step 2: descriptor tables ---------------------------------------
        call setup_gdt
        PRINT "[demo] GDT loaded: ring 0 code 0x08 / data 0x10, ring 3 code 0x1B / data 0x23, TSS 0x28", 10
        call setup_idt
        PRINT "[demo] IDT loaded: exceptions 0-31, IRQ0 at vector 0x20, int 0x80 gate with DPL 3", 10

        ; ---- step 3: paging --------------------------------------------------
        call setup_paging
        PRINT "[demo] paging on: 0-8 MiB identity mapped (page 0 left unmapped), user pages at 0x40000000, CR0.WP set", 10
        call check_write_protect

        ; ---- step 4: interrupt controller and timer --------------------------
        call setup_pic
        PRINT "[demo] PIC remapped: IRQ0-7 -> vectors 0x20-0x27, IRQ8-15 -> 0x28-0x2F; only IRQ0 unmasked", 10
        call setup_pit
        PRINT "[demo] PIT channel 0: mode 2, 100 Hz (divisor 11932); interrupts enabled", 10
        sti
.wait_ticks:                        ; sleep until the timer has ticked 10 times
        hlt
        cmp dword [ticks], 10
        jb .wait_ticks
        cli                         ; the kernel runs with interrupts off from now on
        PRINT "[demo] timer: 10 ticks seen", 10

        ; ---- step 5: real-time clock -----------------------------------------
        call print_rtc

        ; ---- step 6: two ring-3 tasks ----------------------------------------
        call setup_sysenter
        PRINT "[demo] SYSENTER MSRs set: CS 0x08, ESP = current task's kernel stack, EIP = kernel entry", 10
        mov ebx, 1
        mov eax, U(task_a)
        mov edx, USTACK_A_VA + 4096
        call make_task
        mov ebx, 2
        mov eax, U(task_b)
        mov edx, USTACK_B_VA + 4096
        call make_task
        PRINT "[demo] starting task A (ring 3, int 0x80) and task B (ring 3, sysenter), preempted on every tick", 10
        mov dword [turn], 1         ; task A prints first
        mov dword [multitasking], 1
        call schedule               ; returns once no task is left alive
        mov dword [multitasking], 0

        ; ---- step 7: done ----------------------------------------------------
        PRINT "[demo] all tasks done, exiting with status 0", 10
        mov al, 0
        ; fall through

; Write AL to the debug-exit port: QEMU's isa-debug-exit exits with (AL<<1)|1,
; our VMM ends the run with status AL.  If nobody listens, halt for good.
debug_exit:
        mov dx, DEBUG_EXIT_PORT
        out dx, al
.halt:
        cli
        hlt
        jmp .halt

; =============================================================================
; Multiboot information (physical address in [boot_info]).
print_boot_info:
        pushad
        mov ebx, [boot_info]
        test dword [ebx], MBI_FLAG_MEM
        jz .no_mem
        PRINT "[demo] memory: lower "
        mov eax, [ebx + 4]          ; mem_lower, KiB below 1 MiB
        call put_dec
        PRINT " KiB, upper "
        mov eax, [ebx + 8]          ; mem_upper, KiB from 1 MiB to the first hole
        call put_dec
        PRINT " KiB", 10
        jmp .cmdline
.no_mem:
        PRINT "[demo] memory: not reported by the boot loader", 10
.cmdline:
        test dword [ebx], MBI_FLAG_CMDLINE
        jz .no_cmdline
        mov esi, [ebx + 16]         ; NUL-terminated string
        xor ecx, ecx
.length:                            ; ecx = length, at most 200
        cmp byte [esi + ecx], 0
        je .trim
        inc ecx
        cmp ecx, 200
        jb .length
.trim:                              ; drop trailing blanks (QEMU appends one)
        test ecx, ecx
        jz .no_cmdline
        cmp byte [esi + ecx - 1], ' '
        jne .print_cmdline
        dec ecx
        jmp .trim
.print_cmdline:
        PRINT '[demo] command line: "'
.char:
        lodsb
        cmp al, 0x20                ; show control and non-ASCII bytes as '?'
        jb .odd
        cmp al, 0x7E
        jbe .plain
.odd:
        mov al, '?'
.plain:
        call putc
        loop .char
        PRINT '"', 10
        popad
        ret
.no_cmdline:
        PRINT "[demo] command line: (none)", 10
        popad
        ret

; =============================================================================
; GDT and TSS.  The TSS is only used for its ring-0 stack (SS0:ESP0), which the
; CPU loads when an interrupt or int 0x80 arrives from ring 3.
setup_gdt:
        ; TSS descriptor: base = tss, limit = 103, type 0x89 (present, DPL 0,
        ; 32-bit available TSS), byte granularity.  Built at run time because
        ; nasm cannot split a label's address into descriptor fields.
        mov eax, tss
        mov word [gdt_tss + 0], 103         ; limit 15:0
        mov [gdt_tss + 2], ax               ; base 15:0
        shr eax, 16
        mov [gdt_tss + 4], al               ; base 23:16
        mov byte [gdt_tss + 5], 0x89        ; access
        mov byte [gdt_tss + 6], 0x00        ; limit 19:16 = 0, G = 0
        mov [gdt_tss + 7], ah               ; base 31:24
        mov dword [tss + 4], boot_stack_top ; ESP0 (replaced per task)
        mov dword [tss + 8], KDATA          ; SS0
        mov word [tss + 102], 104           ; I/O map base past the limit: no bitmap

        lgdt [gdtr]
        jmp KCODE:.reload_cs                ; far jump loads the new CS
.reload_cs:
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        mov ax, TSS_SEL
        ltr ax
        ret

; =============================================================================
; IDT: all 256 gates not present except exceptions 0-31, IRQ0, spurious IRQ7
; and int 0x80.  Anything else raises #NP, reported like any bad exception.
GATE_INT_DPL0    equ 0x8E           ; present, DPL 0, 32-bit interrupt gate
GATE_INT_DPL3    equ 0xEE           ; present, DPL 3, 32-bit interrupt gate

setup_idt:
        pushad
        xor ebx, ebx
.exceptions:
        mov eax, ebx
        mov edx, [exception_stubs + ebx*4]
        mov cl, GATE_INT_DPL0
        call set_gate
        inc ebx
        cmp ebx, 32
        jb .exceptions
        mov eax, IRQ_BASE_MASTER + 0
        mov edx, irq0_entry
        mov cl, GATE_INT_DPL0
        call set_gate
        mov eax, IRQ_BASE_MASTER + 7        ; the 8259 reports spurious interrupts
        mov edx, spurious_irq_entry         ; as IRQ7: ignore them (no EOI)
        mov cl, GATE_INT_DPL0
        call set_gate
        ; int 0x80 from ring 3 needs gate DPL 3.  An interrupt gate (not a trap
        ; gate) so the kernel always runs with interrupts off: it is never
        ; preempted, which keeps it simple.
        mov eax, 0x80
        mov edx, int80_entry
        mov cl, GATE_INT_DPL3
        call set_gate
        lidt [idtr]
        popad
        ret

; eax = vector, edx = handler, cl = type/attributes.  Clobbers edx.
set_gate:
        push edi
        lea edi, [idt + eax*8]
        mov [edi + 0], dx                   ; offset 15:0
        mov word [edi + 2], KCODE           ; selector
        mov byte [edi + 4], 0
        mov [edi + 5], cl
        shr edx, 16
        mov [edi + 6], dx                   ; offset 31:16
        pop edi
        ret

; =============================================================================
; Paging: one page directory, two page tables for the identity map of 0-8 MiB
; (kernel only), one page table for the user region at 0x40000000.
setup_paging:
        pushad
        mov edi, pt_identity
        mov eax, PTE_P | PTE_RW
        mov ecx, 2 * 1024
.identity:
        stosd
        add eax, 4096
        loop .identity
        mov dword [pt_identity], 0          ; page 0 absent: null pointers fault
        mov eax, wp_test_page               ; read-only even for ring 0 once CR0.WP=1
        shr eax, 12
        and dword [pt_identity + eax*4], ~PTE_RW

        ; user code and constants: read-only for ring 3
        mov edi, pt_user
        mov eax, user_begin + (PTE_P | PTE_US)
        mov ecx, USER_PAGES
.user_code:
        stosd
        add eax, 4096
        loop .user_code
        mov dword [pt_user + ((USTACK_A_VA - USER_VA) >> 12) * 4], ustack_a + (PTE_P | PTE_RW | PTE_US)
        mov dword [pt_user + ((USTACK_B_VA - USER_VA) >> 12) * 4], ustack_b + (PTE_P | PTE_RW | PTE_US)
        mov dword [pt_user + ((SHARED_VA - USER_VA) >> 12) * 4], shared_page + (PTE_P | PTE_US)

        ; The directory entries are permissive; the page table entries decide.
        mov dword [page_directory + 0 * 4], pt_identity + (PTE_P | PTE_RW)
        mov dword [page_directory + 1 * 4], pt_identity + 4096 + (PTE_P | PTE_RW)
        mov dword [page_directory + (USER_VA >> 22) * 4], pt_user + (PTE_P | PTE_RW | PTE_US)

        mov eax, page_directory
        mov cr3, eax
        mov eax, cr0
        or eax, CR0_PG | CR0_WP             ; WP: ring 0 honours read-only pages too
        mov cr0, eax
        popad
        ret

; With CR0.WP set a ring-0 write to a read-only page must raise #PF (error
; code 3: page present, write, supervisor).  The #PF handler resumes at
; [pf_resume] when [pf_expected] is set.
check_write_protect:
        mov dword [pf_resume], .faulted
        mov dword [pf_expected], 1
        mov dword [wp_test_page], 0x12345678
        ; still here: the write went through
        mov dword [pf_expected], 0
        PRINT "[demo] CR0.WP check FAILED: a ring-0 write to a read-only page did not fault; exiting with status 4", 10
        mov al, 4
        jmp debug_exit
.faulted:
        PRINT "[demo] CR0.WP check: ring-0 write to a read-only page raised #PF, error code "
        mov eax, [pf_error]
        call put_hex32
        PRINT ", CR2 "
        mov eax, [pf_address]
        call put_hex32
        PRINT 10
        ret

; =============================================================================
; 8259 PIC pair: ICW1-ICW4 for each chip, then mask everything but IRQ0.
setup_pic:
        mov al, 0x11                        ; ICW1: edge triggered, cascade, ICW4 follows
        out PIC1_CMD, al
        out PIC2_CMD, al
        mov al, IRQ_BASE_MASTER             ; ICW2: vector bases
        out PIC1_DATA, al
        mov al, IRQ_BASE_SLAVE
        out PIC2_DATA, al
        mov al, 0x04                        ; ICW3 master: a slave on IRQ2
        out PIC1_DATA, al
        mov al, 0x02                        ; ICW3 slave: cascade identity 2
        out PIC2_DATA, al
        mov al, 0x01                        ; ICW4: 8086 mode, normal EOI
        out PIC1_DATA, al
        out PIC2_DATA, al
        mov al, 0xFE                        ; OCW1: only IRQ0 (timer)
        out PIC1_DATA, al
        mov al, 0xFF
        out PIC2_DATA, al
        ret

; PIT channel 0, mode 2 (rate generator), binary, 100 Hz.
setup_pit:
        mov al, 0x34                        ; channel 0, lobyte/hibyte, mode 2, binary
        out PIT_CMD, al
        mov ax, PIT_DIVISOR
        out PIT_CH0, al
        mov al, ah
        out PIT_CH0, al
        ret

; =============================================================================
; Interrupt handlers.  Stack frame after the common prologue (pushad, ds, es):
;   +0 es  +4 ds  +8 edi  +12 esi  +16 ebp  +20 (esp)  +24 ebx  +28 edx
;   +32 ecx  +36 eax  then, for exceptions, +40 vector  +44 error code,
;   then the CPU's frame: eip, cs, eflags [, esp, ss when coming from ring 3].
FRAME_EAX        equ 36
FRAME_VECTOR     equ 40
FRAME_ERROR      equ 44
FRAME_EIP        equ 48
FRAME_CS         equ 52

%macro EXCEPTION_STUB 1
exception_ %+ %1:
%if !((%1 == 8) || (%1 >= 10 && %1 <= 14) || (%1 == 17) || (%1 == 21) || (%1 == 29) || (%1 == 30))
        push dword 0                        ; no CPU error code: push a dummy one
%endif
        push dword %1
        jmp exception_common
%endmacro

%assign vec 0
%rep 32
        EXCEPTION_STUB vec
%assign vec vec + 1
%endrep

exception_common:
        pushad
        push ds
        push es
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        cmp dword [esp + FRAME_VECTOR], 14
        jne .fatal
        cmp dword [pf_expected], 0
        je .fatal
        ; an expected page fault (the CR0.WP self-check): note it, skip the write
        mov dword [pf_expected], 0
        mov eax, cr2
        mov [pf_address], eax
        mov eax, [esp + FRAME_ERROR]
        mov [pf_error], eax
        mov eax, [pf_resume]
        mov [esp + FRAME_EIP], eax
        pop es
        pop ds
        popad
        add esp, 8                          ; vector and error code
        iret
.fatal:
        mov ebp, esp
        PRINT "[demo] unexpected exception "
        mov ebx, [ebp + FRAME_VECTOR]
        mov eax, ebx
        call put_dec
        PRINT " ("
        mov esi, [exception_names + ebx*4]
        call puts
        PRINT "), error code "
        mov eax, [ebp + FRAME_ERROR]
        call put_hex32
        PRINT ", CS:EIP "
        mov eax, [ebp + FRAME_CS]
        call put_hex32
        PRINT ":"
        mov eax, [ebp + FRAME_EIP]
        call put_hex32
        cmp ebx, 14
        jne .no_cr2
        PRINT ", CR2 "
        mov eax, cr2
        call put_hex32
.no_cr2:
        PRINT 10, "[demo] exiting with status 3", 10
        mov al, 3
        jmp debug_exit

; IRQ0: count the tick (the counter is also readable by the tasks), send EOI,
; then give the CPU to the next task.  EOI comes first because the switch
; returns here only when this task runs again.
irq0_entry:
        pushad
        push ds
        push es
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        inc dword [ticks]
        mov al, PIC_EOI
        out PIC1_CMD, al
        cmp dword [multitasking], 0
        je .done
        call schedule                       ; preemption: round robin every tick
.done:
        pop es
        pop ds
        popad
        iret

; A spurious IRQ7 is not in service at the PIC: no EOI, nothing to do.
spurious_irq_entry:
        iret

; int 0x80: eax = number, ebx = argument; result in eax.
int80_entry:
        pushad
        push ds
        push es
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov eax, [esp + FRAME_EAX]
        call syscall_dispatch
        mov [esp + FRAME_EAX], eax          ; popad hands it back to the caller
        pop es
        pop ds
        popad
        iret

; SYSENTER: CS = 0x08, SS = 0x10, ESP = [SYSENTER_ESP] (the current task's
; kernel stack top), EIP here, interrupts off.  The CPU saves nothing: by our
; convention the caller put its return EIP in EDX and its ESP in ECX, which
; SYSEXIT takes back.  eax = number, ebx = argument; result in eax.
sysenter_entry:
        push ecx                            ; user ESP for SYSEXIT
        push edx                            ; user EIP for SYSEXIT
        push ds
        push es
        push ebx
        push esi
        push edi
        push ebp
        mov bp, KDATA
        mov ds, bp
        mov es, bp
        call syscall_dispatch
        pop ebp
        pop edi
        pop esi
        pop ebx
        pop es
        pop ds
        pop edx
        pop ecx
        sti                                 ; SYSEXIT leaves EFLAGS alone: re-enable
        sysexit                             ; interrupts (sti holds them off one more
                                            ; instruction, so this completes first)

; =============================================================================
; System calls.  Run with interrupts off on the calling task's kernel stack.
; In: eax = number, ebx = argument.  Out: eax.
syscall_dispatch:
        cmp eax, SYS_WRITE
        je sys_write
        cmp eax, SYS_EXIT
        je sys_exit
        cmp eax, SYS_YIELD
        je sys_yield
        mov eax, -ENOSYS
        ret

sys_yield:
        call schedule
        xor eax, eax
        ret

; write(ebx = string): the string (at most 255 bytes) must be readable by the
; task.  Output is serialised by the turn: see wait_turn.
sys_write:
        push esi
        mov esi, ebx
        xor ecx, ecx
.check:
        lea eax, [esi + ecx]
        call user_readable
        test eax, eax
        jz .fault
        cmp byte [esi + ecx], 0
        je .ok
        inc ecx
        cmp ecx, 256
        jb .check
.fault:
        pop esi
        mov eax, -EFAULT
        ret
.ok:
        call wait_turn
        call puts
        call pass_turn
        pop esi
        xor eax, eax
        ret

; exit(ebx = status): also takes its turn, so the exit lines come in a fixed
; order too.  Never returns.
sys_exit:
        call wait_turn
        PRINT "[demo] task "
        mov eax, [current]
        add al, 'A' - 1
        call putc
        PRINT " exited with status "
        mov eax, ebx
        call put_dec
        PRINT 10
        mov eax, [current]
        mov dword [task_alive + eax*4], 0
        call pass_turn
        call schedule                       ; a dead task is never picked again
.dead:
        jmp .dead

; eax = user address -> eax = 1 if ring 3 may read it (user page table entry
; present with U/S set), else 0.  Clobbers edx.
user_readable:
        mov edx, eax
        shr edx, 22
        cmp edx, USER_VA >> 22
        jne .no
        mov edx, eax
        shr edx, 12
        and edx, 0x3FF
        mov edx, [pt_user + edx*4]
        and edx, PTE_P | PTE_US
        cmp edx, PTE_P | PTE_US
        jne .no
        mov eax, 1
        ret
.no:
        xor eax, eax
        ret

; Block (letting the other tasks run) until it is the current task's turn.
; Clobbers eax, ecx, edx.
wait_turn:
        mov eax, [current]
        cmp eax, [turn]
        je .mine
        call schedule
        jmp wait_turn
.mine:
        ret

; Hand the turn to the next live task after the current one (round robin).
; Clobbers eax, ecx.
pass_turn:
        mov eax, [current]
        mov ecx, NTASKS
.next:
        inc eax
        cmp eax, NTASKS
        jbe .check
        mov eax, 1
.check:
        cmp dword [task_alive + eax*4], 0
        jne .found
        loop .next
        ret                                 ; nobody left: keep it
.found:
        mov [turn], eax
        ret

; =============================================================================
; Scheduling.  Each task has its own kernel stack; a switch saves the
; callee-saved registers and ESP on the old one and restores them from the new
; one, so every task resumes inside the kernel exactly where it left (timer
; handler, wait_turn, ...) and returns to ring 3 the way it entered (iret or
; sysexit).  Slot 0 is the boot context; it runs again once no task is alive.

; Switch to the next live task after the current one (round robin), or to the
; boot context if none is left.  Clobbers eax, edx.
schedule:
        push ebx
        push ecx
        mov ebx, [current]
        mov ecx, NTASKS
.next:
        inc ebx
        cmp ebx, NTASKS
        jbe .check
        mov ebx, 1
.check:
        cmp dword [task_alive + ebx*4], 0
        jne .found
        loop .next
        xor ebx, ebx                        ; nothing alive: the boot context
.found:
        cmp ebx, [current]
        je .same
        mov eax, ebx
        call switch_to
.same:
        pop ecx
        pop ebx
        ret

; eax = slot to run.  Returns when the calling context is switched back to.
; Clobbers eax, ecx, edx.
switch_to:
        push ebx
        push esi
        push edi
        push ebp
        mov ecx, [current]
        mov [task_esp + ecx*4], esp
        mov [current], eax
        mov esp, [task_esp + eax*4]
        mov edx, [task_stack_top + eax*4]
        mov [tss + 4], edx                  ; ESP0: interrupts/int 0x80 from ring 3
        mov eax, edx                        ; SYSENTER lands on the same stack
        xor edx, edx
        mov ecx, MSR_SYSENTER_ESP
        wrmsr
        pop ebp
        pop edi
        pop esi
        pop ebx
        ret

; ebx = slot, eax = user entry point, edx = user stack top.  Lays out the new
; task's kernel stack so that switch_to "returns" into task_start, which
; irets to ring 3.
make_task:
        pushad
        mov edi, [task_stack_top + ebx*4]
        sub edi, 4
        mov dword [edi], UDATA              ; iret frame: SS
        sub edi, 4
        mov [edi], edx                      ; ESP
        sub edi, 4
        mov dword [edi], 0x202              ; EFLAGS: IF=1, IOPL 0
        sub edi, 4
        mov dword [edi], UCODE              ; CS
        sub edi, 4
        mov [edi], eax                      ; EIP
        sub edi, 4
        mov dword [edi], task_start         ; switch_to's return address
        sub edi, 16                         ; ebp, edi, esi, ebx for switch_to
        mov dword [edi + 0], 0
        mov dword [edi + 4], 0
        mov dword [edi + 8], 0
        mov dword [edi + 12], 0
        mov [task_esp + ebx*4], edi
        mov dword [task_alive + ebx*4], 1
        popad
        ret

task_start:
        mov ax, UDATA
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        xor eax, eax
        xor ecx, ecx
        xor edx, edx
        iret                                ; to ring 3 at the task's entry point

setup_sysenter:
        xor edx, edx
        mov ecx, MSR_SYSENTER_CS
        mov eax, KCODE
        wrmsr
        mov ecx, MSR_SYSENTER_ESP
        mov eax, boot_stack_top             ; replaced on every task switch
        wrmsr
        mov ecx, MSR_SYSENTER_EIP
        mov eax, sysenter_entry
        wrmsr
        ret

; =============================================================================
; CMOS real-time clock.  Read while no update is in progress, twice, until two
; readings agree (an update may start between the UIP check and the reads).
RTC_SECONDS      equ 0x00
RTC_MINUTES      equ 0x02
RTC_HOURS        equ 0x04
RTC_DAY          equ 0x07
RTC_MONTH        equ 0x08
RTC_YEAR         equ 0x09
RTC_STATUS_A     equ 0x0A               ; bit 7: update in progress
RTC_STATUS_B     equ 0x0B               ; bit 2: binary (else BCD), bit 1: 24-hour
RTC_CENTURY      equ 0x32               ; not on every RTC: checked below

print_rtc:
        pushad
        mov edi, rtc_now
        call rtc_snapshot
.again:
        mov esi, rtc_now                    ; keep the last reading ...
        mov edi, rtc_prev
        mov ecx, 8
        rep movsb
        mov edi, rtc_now                    ; ... and take a new one
        call rtc_snapshot
        mov esi, rtc_now
        mov edi, rtc_prev
        mov ecx, 8
        repe cmpsb
        jne .again

        mov al, RTC_STATUS_B
        call cmos_read
        mov bl, al                          ; bl = format flags

        movzx eax, byte [rtc_now + 0]
        call rtc_to_binary
        mov [rtc_value + 0], al             ; seconds
        movzx eax, byte [rtc_now + 1]
        call rtc_to_binary
        mov [rtc_value + 1], al             ; minutes
        movzx eax, byte [rtc_now + 2]       ; hours: bit 7 is PM in 12-hour mode
        mov dh, al
        and eax, 0x7F
        call rtc_to_binary
        test bl, 0x02
        jnz .hours_done                     ; 24-hour mode
        cmp al, 12                          ; 12-hour mode: 12 AM is 0, 12 PM is 12
        jne .not_12
        xor al, al
.not_12:
        test dh, 0x80
        jz .hours_done
        add al, 12
.hours_done:
        mov [rtc_value + 2], al
        movzx eax, byte [rtc_now + 3]
        call rtc_to_binary
        mov [rtc_value + 3], al             ; day
        movzx eax, byte [rtc_now + 4]
        call rtc_to_binary
        mov [rtc_value + 4], al             ; month
        movzx eax, byte [rtc_now + 5]
        call rtc_to_binary
        mov [rtc_value + 5], al             ; year in century
        movzx eax, byte [rtc_now + 6]
        call rtc_to_binary
        cmp al, 19                          ; believe the century register only
        jb .guess_century                   ; if it looks sane
        cmp al, 21
        jbe .century_ok
.guess_century:
        mov al, 20
.century_ok:
        mov [rtc_value + 6], al

        PRINT "[demo] RTC: "
        movzx eax, byte [rtc_value + 6]
        imul eax, eax, 100
        movzx ecx, byte [rtc_value + 5]
        add eax, ecx
        call put_dec
        mov al, '-'
        call putc
        movzx eax, byte [rtc_value + 4]
        call put_dec2
        mov al, '-'
        call putc
        movzx eax, byte [rtc_value + 3]
        call put_dec2
        mov al, ' '
        call putc
        movzx eax, byte [rtc_value + 2]
        call put_dec2
        mov al, ':'
        call putc
        movzx eax, byte [rtc_value + 1]
        call put_dec2
        mov al, ':'
        call putc
        movzx eax, byte [rtc_value + 0]
        call put_dec2
        PRINT 10
        popad
        ret

; Wait for "no update in progress", then read the raw registers into [edi]:
; seconds, minutes, hours, day, month, year, century.
rtc_snapshot:
.uip:
        mov al, RTC_STATUS_A
        call cmos_read
        test al, 0x80
        jnz .uip
        mov al, RTC_SECONDS
        call cmos_read
        mov [edi + 0], al
        mov al, RTC_MINUTES
        call cmos_read
        mov [edi + 1], al
        mov al, RTC_HOURS
        call cmos_read
        mov [edi + 2], al
        mov al, RTC_DAY
        call cmos_read
        mov [edi + 3], al
        mov al, RTC_MONTH
        call cmos_read
        mov [edi + 4], al
        mov al, RTC_YEAR
        call cmos_read
        mov [edi + 5], al
        mov al, RTC_CENTURY
        call cmos_read
        mov [edi + 6], al
        ret

; al = CMOS register (bit 7, NMI disable, left clear) -> al = value
cmos_read:
        out CMOS_INDEX, al
        in al, CMOS_DATA
        ret

; eax = raw RTC value, bl = status register B -> eax = binary value
rtc_to_binary:
        test bl, 0x04
        jnz .done                           ; already binary
        push edx
        mov edx, eax
        shr eax, 4
        imul eax, eax, 10
        and edx, 0x0F
        add eax, edx
        pop edx
.done:
        ret

; =============================================================================
; Serial console (COM1, polled).

; 115200 baud (divisor 1), 8N1, FIFOs on, no UART interrupts.
serial_init:
        mov dx, UART_IER
        mov al, 0x00
        out dx, al
        mov dx, UART_LCR
        mov al, 0x80                        ; DLAB=1: divisor latch
        out dx, al
        mov dx, UART_DATA
        mov al, 0x01                        ; divisor 1 = 115200 baud
        out dx, al
        mov dx, UART_IER
        mov al, 0x00
        out dx, al
        mov dx, UART_LCR
        mov al, 0x03                        ; DLAB=0, 8N1
        out dx, al
        mov dx, UART_FCR
        mov al, 0xC7                        ; enable and clear the FIFOs
        out dx, al
        mov dx, UART_MCR
        mov al, 0x03                        ; DTR + RTS
        out dx, al
        ret

; al = character; "\n" goes out as "\r\n".  Keeps every register.
putc:
        cmp al, 10
        jne putc_raw
        push eax
        mov al, 13
        call putc_raw
        pop eax
putc_raw:
        push edx
        push eax
        mov dx, UART_LSR
.wait:
        in al, dx
        test al, LSR_THRE
        jz .wait
        pop eax
        mov dx, UART_DATA
        out dx, al
        pop edx
        ret

; esi = NUL-terminated string.  Keeps every register.
puts:
        push esi
        push eax
.next:
        lodsb
        test al, al
        jz .done
        call putc
        jmp .next
.done:
        pop eax
        pop esi
        ret

; eax as "0x" and 8 hex digits.  Keeps every register.
put_hex32:
        pushad
        mov ebx, eax
        mov al, '0'
        call putc
        mov al, 'x'
        call putc
        mov ecx, 8
.digit:
        rol ebx, 4
        mov eax, ebx
        and eax, 0x0F
        mov al, [hex_digits + eax]
        call putc
        loop .digit
        popad
        ret

; eax in decimal.  Keeps every register.
put_dec:
        pushad
        mov ecx, 10
        xor ebx, ebx
.divide:
        xor edx, edx
        div ecx
        push edx
        inc ebx
        test eax, eax
        jnz .divide
.emit:
        pop eax
        add al, '0'
        call putc
        dec ebx
        jnz .emit
        popad
        ret

; eax (0-99) in decimal with two digits.  Keeps every register.
put_dec2:
        cmp eax, 10
        jae put_dec
        push eax
        mov al, '0'
        call putc
        pop eax
        jmp put_dec

; =============================================================================
section .rodata
hex_digits:
        db "0123456789ABCDEF"

exception_names:
%assign vec 0
%rep 32
        dd exception_name_ %+ vec
%assign vec vec + 1
%endrep
exception_name_0:  db "#DE divide error", 0
exception_name_1:  db "#DB debug", 0
exception_name_2:  db "NMI", 0
exception_name_3:  db "#BP breakpoint", 0
exception_name_4:  db "#OF overflow", 0
exception_name_5:  db "#BR bound range", 0
exception_name_6:  db "#UD invalid opcode", 0
exception_name_7:  db "#NM device not available", 0
exception_name_8:  db "#DF double fault", 0
exception_name_9:  db "coprocessor segment overrun", 0
exception_name_10: db "#TS invalid TSS", 0
exception_name_11: db "#NP segment not present", 0
exception_name_12: db "#SS stack fault", 0
exception_name_13: db "#GP general protection", 0
exception_name_14: db "#PF page fault", 0
exception_name_15: db "reserved", 0
exception_name_16: db "#MF x87 error", 0
exception_name_17: db "#AC alignment check", 0
exception_name_18: db "#MC machine check", 0
exception_name_19: db "#XM SIMD error", 0
exception_name_20: db "#VE virtualization", 0
exception_name_21: db "#CP control protection", 0
%assign vec 22
%rep 10
exception_name_ %+ vec: db "reserved", 0
%assign vec vec + 1
%endrep

exception_stubs:
%assign vec 0
%rep 32
        dd exception_ %+ vec
%assign vec vec + 1
%endrep

; =============================================================================
section .data
        align 8
gdt:
        dq 0                                ; 0x00 null
        dq 0x00CF9B000000FFFF               ; 0x08 ring 0 code: base 0, 4 GiB, 32-bit
        dq 0x00CF93000000FFFF               ; 0x10 ring 0 data
        dq 0x00CFFB000000FFFF               ; 0x18 ring 3 code
        dq 0x00CFF3000000FFFF               ; 0x20 ring 3 data
gdt_tss:
        dq 0                                ; 0x28 TSS (filled in by setup_gdt)
gdt_end:

        align 4
        dw 0                                ; so that the base below is aligned
gdtr:
        dw gdt_end - gdt - 1
        dd gdt
        align 4
        dw 0
idtr:
        dw 256 * 8 - 1
        dd idt

        align 4
task_stack_top:                             ; kernel stack of each slot
        dd boot_stack_top
        dd kstack_a + 4096
        dd kstack_b + 4096

; =============================================================================
; The tasks: ring 3 code, mapped read-only at USER_VA.  They can touch only
; their own stack page and the read-only tick counter at SHARED_VA; absolute
; addresses of labels here must go through U().
; gdb symbols: section .user runs at USER_VA
section .user
user_begin:

; Task A: three lines through int 0x80, then exit.
task_a:
        mov edi, 1                          ; step number
.step:
        sub esp, 64                         ; build the line on the user stack
        mov esi, U(task_a_line)
        mov ebx, esp
        call u_format
        mov eax, SYS_WRITE                  ; ebx = the line
        int 0x80
        add esp, 64
        mov ecx, 1                          ; busy in ring 3 until the next tick:
        call u_wait_ticks                   ; that tick's interrupt preempts us here
        inc edi
        cmp edi, STEPS
        jbe .step
        mov eax, SYS_EXIT
        xor ebx, ebx
        int 0x80
.dead:
        jmp .dead                           ; exit does not return

; Task B: the same through SYSENTER.
task_b:
        mov edi, 1
.step:
        sub esp, 64
        mov esi, U(task_b_line)
        mov ebx, esp
        call u_format
        mov eax, SYS_WRITE
        call u_sysenter
        add esp, 64
        mov ecx, 1
        call u_wait_ticks
        inc edi
        cmp edi, STEPS
        jbe .step
        mov eax, SYS_EXIT
        xor ebx, ebx
        call u_sysenter
.dead:
        jmp .dead

; System call through SYSENTER: eax = number, ebx = argument -> eax.
; SYSEXIT returns to EDX with ESP = ECX, so pass both.
u_sysenter:
        push ecx
        push edx
        mov ecx, esp
        mov edx, U(.back)
        sysenter
.back:
        pop edx
        pop ecx
        ret

; Copy the template at esi to ebx, replacing '#' by the digit edi.
u_format:
        push eax
        push ebx
        push esi
.copy:
        lodsb
        cmp al, '#'
        jne .store
        mov eax, edi
        add al, '0'
.store:
        mov [ebx], al
        inc ebx
        test al, al
        jnz .copy
        pop esi
        pop ebx
        pop eax
        ret

; Spin until the kernel's tick counter has advanced by ecx.
u_wait_ticks:
        push eax
        push edx
        mov edx, [SHARED_VA]
.spin:
        pause
        mov eax, [SHARED_VA]
        sub eax, edx
        cmp eax, ecx
        jb .spin
        pop edx
        pop eax
        ret

task_a_line:    db "task A: step #/3 (ring 3, int 0x80)", 10, 0
task_b_line:    db "task B: step #/3 (ring 3, sysenter)", 10, 0

user_end:
file_end:

USER_PAGES       equ (user_end - user_begin + 4095) / 4096

; =============================================================================
section .bss
bss_start:
page_directory: resb 4096
pt_identity:    resb 2 * 4096           ; 0-8 MiB
pt_user:        resb 4096               ; 0x40000000-0x403FFFFF
shared_page:    resb 4096               ; mapped read-only at SHARED_VA
ticks           equ shared_page         ; timer ticks since the PIT started
wp_test_page:   resb 4096               ; read-only page for the CR0.WP check
ustack_a:       resb 4096
ustack_b:       resb 4096
kstack_a:       resb 4096
kstack_b:       resb 4096
boot_stack:     resb 8192
boot_stack_top:
idt:            resb 256 * 8
tss:            resb 104
                alignb 4
boot_magic:     resd 1
boot_info:      resd 1
current:        resd 1                  ; running slot: 0 boot, 1 task A, 2 task B
turn:           resd 1                  ; slot whose output comes next
multitasking:   resd 1                  ; timer switches tasks when set
task_alive:     resd NTASKS + 1
task_esp:       resd NTASKS + 1         ; saved kernel ESP of each switched-out slot
pf_expected:    resd 1
pf_resume:      resd 1
pf_address:     resd 1
pf_error:       resd 1
rtc_now:        resb 8
rtc_prev:       resb 8
rtc_value:      resb 8
                alignb 4
bss_end:
