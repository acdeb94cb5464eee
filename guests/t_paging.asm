; t_paging.asm -- paging test guest (Multiboot v1 ELF32 kernel; frame in t_common.asm).
;
; Every page-fault kind of Intel SDM vol. 3A 4.7 and the accessed/dirty
; flags of 4.8, first with 32-bit paging (4 KiB pages and, with CR4.PSE,
; 4 MiB pages), then with PAE paging and EFER.NXE (2 MiB and 4 KiB pages).
; The #PF handler records CR2 and the error code and resumes at a label the
; check armed.  Test pages live at TVA (0x40000000) and are remapped, with
; INVLPG, before each check.  Checks (exit status):
;   1      not-present read: #PF, CR2 = the address, error code 0
;   2      not-present write: error code 2 (W)
;   3-4    a read sets A in the PDE and the PTE, not D
;   5      a write sets D in the PTE, not in the PDE
;   6      supervisor write to a read-only page with CR0.WP=0: allowed, D set
;   7-8    with CR0.WP=1 (MOV CR0 flushes the TLB): #PF error code 3 (P|W); D not set
;   9      a faulting write leaves D clear (the PTE is rewritten clean first)
;   10-11  ring 3: user read of a supervisor page -> error code 5 (P|U); the
;          GDT and the TSS are on supervisor pages and ring 3 still loads
;          segments, takes INT 0x30 and IRETs (implicit supervisor accesses)
;   12     ring 3: user write to a read-only user page -> error code 7 (P|W|U)
;   13     ring 3: user read of a user page works
;   14     ring 3: not-present user read -> error code 4 (U)
;   15-17  a 4 MiB page (CR4.PSE): reads through it, A then D set in the PDE
;   18     a 4 MiB PDE with reserved bit 21 set -> error code 9 (P|RSVD)
;   19     remapping a PTE and INVLPG: the new frame shows
;   20     MOV CR3 flushes: a remapped PTE shows after reloading CR3
;   21     PAE + EFER.NXE: a data read of an NX page works
;   22     fetch from an NX page -> #PF, CR2 = the target, error code 0x11 (P|I)
;   23     fetch from a not-present page -> error code 0x10 (I)
;   24     PTE with reserved bit 45 set: read -> error code 9 (P|RSVD)
;   25     ... and a fetch there -> error code 0x19 (P|RSVD|I)
;   26     a fetch from an executable page works (the code there runs)
;   27     2 MiB pages: the identity map is made of them, and a write through
;          one sets D in its PDE
;   28     PAE write to a read-only page with CR0.WP=1 -> error code 3
;
; Hardware: COM1, 0x501.  CPU: PAE, PSE, NX (QEMU: -cpu qemu32,+nx).

%define T_NAME "t_paging"
%include "t_common.asm"

TVA       equ 0x40000000                ; test pages: PDE 256 (32-bit) / PDPTE 1 (PAE)
BIGVA     equ 0x80000000                ; 4 MiB page at PDE 512 (32-bit)
CR0_WP    equ 1 << 16
CR0_PG    equ 1 << 31
CR4_PSE   equ 1 << 4
CR4_PAE   equ 1 << 5
MSR_EFER  equ 0xC0000080
EFER_NXE  equ 1 << 11
PTE_P     equ 1
PTE_W     equ 2
PTE_U     equ 4
PTE_A     equ 0x20
PTE_D     equ 0x40
PTE_PS    equ 0x80
UCODE     equ 0x18 | 3
UDATA     equ 0x20 | 3
TSS_SEL   equ 0x28

; ARM label -- the next #PF resumes at label; clear the record
%macro ARM 1
        mov dword [pf_resume], %1
        mov dword [pf_count], 0
        mov dword [pf_cr2], 0
        mov dword [pf_ec], 0xFFFFFFFF
%endmacro

; EXPECT_PF id, cr2, error code, "text" -- exactly one #PF with these
%macro EXPECT_PF 4
        mov eax, [pf_count]
        mov ebx, [pf_cr2]
        mov ecx, [pf_ec]
        xor edx, edx
        cmp eax, 1
        je %%a
        or edx, 1
%%a:    cmp ebx, %2
        je %%b
        or edx, 2
%%b:    cmp ecx, %3
        je %%c
        or edx, 4
%%c:    test edx, edx
        CHECK z, %1, %4
%endmacro

; EXPECT_RSVD id, cr2, error code, "text" -- a reserved-bit fault.  The SDM
; (4.7) has P=1 in every RSVD error code; QEMU 7.2's TCG reports them with P
; clear, so the check accepts either P and sends the exact error code to the
; debug console port 0xE9 (ignored by QEMU without -debugcon), where
; tests/test_mmu_modes.py requires P=1 of the VMM.
%macro EXPECT_RSVD 4
        and dword [pf_ec], ~PTE_P
        EXPECT_PF %1, %2, (%3) & ~PTE_P, %4
        mov eax, [pf_ec]
        or eax, [pf_ec_p]
        out 0xE9, al
%endmacro

; EXPECT_NO_PF id, "text"
%macro EXPECT_NO_PF 2
        mov eax, [pf_count]
        test eax, eax
        CHECK z, %1, %2
%endmacro

; PTE32 index, value -- test page `index` (at TVA + index * 4 KiB), 32-bit paging
%macro PTE32 2
        mov dword [pt_test + 4 * %1], %2
        invlpg [TVA + 4096 * %1]
%endmacro

; PTE64 index, low, high -- the same with PAE
%macro PTE64 3
        mov dword [pt_test + 8 * %1], %2
        mov dword [pt_test + 8 * %1 + 4], %3
        invlpg [TVA + 4096 * %1]
%endmacro

; USER label -- run the ring-3 code at label (in the user page) until it does INT 0x30
%macro USER 1
        mov eax, %1
        call enter_user
%endmacro

section .text
guest_main:
        call setup_cpu
        call build_tables32
        mov eax, pd32
        mov cr3, eax
        mov eax, cr4
        or eax, CR4_PSE
        mov cr4, eax
        mov eax, cr0
        or eax, CR0_PG
        and eax, ~CR0_WP
        mov cr0, eax
        PRINT "t_paging: 32-bit paging on (4 KiB pages, PSE), CR0.WP clear", 10

        ; ---- 1-2: not present
        PTE32 0, 0
        ARM .r1
        mov eax, [TVA + 0x123]
.r1:    EXPECT_PF 1, TVA + 0x123, 0, "not-present read: #PF, CR2 and error code 0"
        ARM .r2
        mov dword [TVA + 0x456], 1
.r2:    EXPECT_PF 2, TVA + 0x456, 2, "not-present write: error code 2 (W)"

        ; ---- 3-5: A and D
        mov dword [pd32 + 4 * 256], pt_test + PTE_P + PTE_W + PTE_U   ; PDE: A and D clear
        mov dword [scratch0], 0x5EED
        PTE32 0, scratch0 + PTE_P + PTE_W
        mov eax, cr3                    ; the PDE changed: flush it too
        mov cr3, eax
        ARM fail_pf
        mov eax, [TVA]
        cmp eax, 0x5EED
        CHECK e, 3, "a read through a fresh mapping sees its frame"
        mov eax, [pt_test]
        mov ebx, [pd32 + 4 * 256]
        and eax, PTE_A | PTE_D
        and ebx, PTE_A | PTE_D
        cmp eax, PTE_A
        jne .ad_bad
        cmp ebx, PTE_A
.ad_bad:
        CHECK e, 4, "the read set A in the PDE and the PTE, D in neither"
        mov dword [TVA + 8], 2
        mov eax, [pt_test]
        mov ebx, [pd32 + 4 * 256]
        and eax, PTE_A | PTE_D
        and ebx, PTE_A | PTE_D
        cmp eax, PTE_A | PTE_D
        jne .d_bad
        cmp ebx, PTE_A
.d_bad:
        CHECK e, 5, "the write set D in the PTE, not in the PDE"

        ; ---- 6-9: read-only pages and CR0.WP
        PTE32 1, scratch1 + PTE_P
        ARM fail_pf
        mov dword [TVA + 0x1000], 0xAB
        mov eax, [pt_test + 4]
        and eax, PTE_D
        cmp eax, PTE_D
        CHECK e, 6, "CR0.WP=0: ring 0 writes a read-only page, D set"
        mov eax, cr0
        or eax, CR0_WP
        mov cr0, eax
        mov dword [pt_test + 4], scratch1 + PTE_P   ; clean again (the TLB was flushed by MOV CR0)
        invlpg [TVA + 0x1000]
        ARM .r7
        mov dword [TVA + 0x1010], 0xCD
.r7:    EXPECT_PF 7, TVA + 0x1010, 3, "CR0.WP=1: the same write faults, error code 3 (P|W)"
        cmp dword [scratch1 + 0x10], 0
        CHECK e, 8, "the faulting write did not reach memory"
        mov eax, [pt_test + 4]
        and eax, PTE_D
        CHECK z, 9, "the faulting write left D clear"

        ; ---- 10-14: ring 3 (GDT, IDT, TSS on supervisor pages)
        mov dword [scratch2], 0x600D
        PTE32 2, scratch2 + PTE_P + PTE_U           ; user, read-only
        PTE32 3, scratch3 + PTE_P + PTE_W           ; supervisor
        PTE32 4, 0                                  ; not present
        ARM user_sup_read.back
        USER user_sup_read
        EXPECT_PF 10, TVA + 0x3004, 5, "ring 3 reads a supervisor page: error code 5 (P|U)"
        cmp dword [user_done], 1
        CHECK e, 11, "ring 3 loaded DS, took INT 0x30 and the #PF with the GDT/IDT/TSS supervisor-only"
        ARM user_ro_write.back
        USER user_ro_write
        EXPECT_PF 12, TVA + 0x2008, 7, "ring 3 writes a read-only user page: error code 7 (P|W|U)"
        ARM user_read.back
        USER user_read
        EXPECT_NO_PF 13, "ring 3 reads a user page"
        mov eax, [user_value]
        cmp eax, 0x600D
        CHECK e, 13, "ring 3 read the value"
        ARM user_np_read.back
        USER user_np_read
        EXPECT_PF 14, TVA + 0x4000, 4, "ring 3 not-present read: error code 4 (U)"

        ; ---- 15-18: 4 MiB pages
        mov dword [pd32 + 4 * 512], 0 + PTE_P + PTE_W + PTE_PS   ; BIGVA -> 0-4 MiB
        invlpg [BIGVA + magic]
        ARM fail_pf
        mov eax, [BIGVA + magic]
        cmp eax, [magic]
        CHECK e, 15, "a 4 MiB page maps BIGVA to physical 0"
        mov eax, [pd32 + 4 * 512]
        and eax, PTE_A | PTE_D
        cmp eax, PTE_A
        CHECK e, 16, "the read set A in the 4 MiB PDE, not D"
        mov dword [BIGVA + scratch0 + 16], 7
        mov eax, [pd32 + 4 * 512]
        and eax, PTE_A | PTE_D
        cmp eax, PTE_A | PTE_D
        CHECK e, 17, "a write set D in the 4 MiB PDE"
        mov dword [pd32 + 4 * 513], 0x00200000 + PTE_P + PTE_W + PTE_PS   ; bit 21: reserved
        invlpg [BIGVA + 0x400000]
        ARM .r18
        mov eax, [BIGVA + 0x400000 + 0x44]
.r18:   EXPECT_RSVD 18, BIGVA + 0x400044, 9, "4 MiB PDE with reserved bit 21: error code 9 (P|RSVD)"

        ; ---- 19-20: remapping and flushes
        mov dword [scratch3], 0x3333
        PTE32 5, scratch0 + PTE_P + PTE_W
        ARM fail_pf
        mov eax, [TVA + 0x5000]
        PTE32 5, scratch3 + PTE_P + PTE_W
        mov eax, [TVA + 0x5000]
        cmp eax, 0x3333
        CHECK e, 19, "INVLPG: a remapped page shows its new frame"
        mov dword [pt_test + 4 * 5], scratch0 + PTE_P + PTE_W
        mov eax, cr3
        mov cr3, eax
        mov eax, [TVA + 0x5000]
        cmp eax, 0x5EED
        CHECK e, 20, "MOV CR3: the remapped page shows its new frame"

        ; ---- 21-28: PAE with NX
        call to_pae
        PRINT "t_paging: PAE paging on, EFER.NXE set, 2 MiB identity map", 10
        mov dword [scratch1], 0x0000C3F4             ; hlt; ret (ret at +1 is the entry)
        PTE64 0, scratch1 + PTE_P, 0x80000000       ; NX
        ARM fail_pf
        mov eax, [TVA]
        cmp eax, 0x0000C3F4
        CHECK e, 21, "a data read of an NX page works"
        ARM .r22
        call TVA + 1
.r22:   add esp, 4                                  ; the return address the call pushed
        EXPECT_PF 22, TVA + 1, 0x11, "fetch from an NX page: #PF, CR2 = target, error code 0x11 (P|I)"
        PTE64 1, 0, 0
        ARM .r23
        call TVA + 0x1000
.r23:   add esp, 4
        EXPECT_PF 23, TVA + 0x1000, 0x10, "fetch from a not-present page: error code 0x10 (I)"
        PTE64 2, scratch1 + PTE_P, 0x00002000       ; bit 45: above MAXPHYADDR, reserved
        ARM .r24
        mov eax, [TVA + 0x2010]
.r24:   EXPECT_RSVD 24, TVA + 0x2010, 9, "PTE with reserved bit 45: error code 9 (P|RSVD)"
        ARM .r25
        call TVA + 0x2001
.r25:   add esp, 4
        EXPECT_RSVD 25, TVA + 0x2001, 0x19, "fetch there: error code 0x19 (P|RSVD|I)"
        PTE64 3, scratch1 + PTE_P, 0
        ARM fail_pf
        call TVA + 0x3001                           ; runs the ret
        EXPECT_NO_PF 26, "a fetch from an executable page runs its code"
        mov eax, [pae_pd]
        and eax, PTE_PS
        cmp eax, PTE_PS
        CHECK e, 27, "the identity map uses 2 MiB pages"
        mov eax, scratch0                           ; a write through the 2 MiB page holding scratch0
        shr eax, 21
        and dword [pae_pd + 8 * eax], ~PTE_D
        invlpg [scratch0]
        mov dword [scratch0 + 32], 1
        mov ebx, [pae_pd + 8 * eax]
        and ebx, PTE_D
        cmp ebx, PTE_D
        CHECK e, 27, "a write through a 2 MiB page sets D in its PDE"
        PTE64 4, scratch1 + PTE_P, 0
        ARM .r28
        mov dword [TVA + 0x4020], 5
.r28:   EXPECT_PF 28, TVA + 0x4020, 3, "PAE: write to a read-only page with CR0.WP=1: error code 3"
        ret

; An unexpected #PF in a check that expects none: report it.
fail_pf:
        mov eax, [pf_cr2]
        mov ebx, [pf_ec]
        FAIL 97, "unexpected page fault (eax = CR2, ebx = error code)"

; ---- set-up -------------------------------------------------------------------------
setup_cpu:
        lgdt [gdtr]
        jmp KCODE:.cs
.cs:    mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov eax, tss
        mov [tss_desc + 2], ax
        shr eax, 16
        mov [tss_desc + 4], al
        mov [tss_desc + 7], ah
        mov dword [tss + 4], kstack_top             ; ESP0
        mov dword [tss + 8], KDATA                  ; SS0
        mov word [tss + 102], 104                   ; no I/O bitmap
        mov ax, TSS_SEL
        ltr ax
        ; #PF and INT 0x30 (DPL 3) gates
        mov eax, pf_handler
        mov ecx, 14
        mov edx, 0x8E00
        call set_gate
        mov eax, int30_handler
        mov ecx, 0x30
        mov edx, 0xEE00
        call set_gate
        ret

; eax = handler, ecx = vector, edx = type/DPL word
set_gate:
        mov [t_idt + 8 * ecx], ax
        mov word [t_idt + 8 * ecx + 2], KCODE
        mov [t_idt + 8 * ecx + 4], dx
        shr eax, 16
        mov [t_idt + 8 * ecx + 6], ax
        ret

; 32-bit paging: 0-8 MiB identity mapped with 4 KiB pages, supervisor
; read/write, except the user page (code and data of ring 3) and the user stack.
build_tables32:
        mov edi, pt_id
        mov eax, PTE_P + PTE_W
        mov ecx, 2048
.pte:   stosd
        add eax, 4096
        loop .pte
        mov dword [pd32 + 0], pt_id + PTE_P + PTE_W + PTE_U
        mov dword [pd32 + 4], pt_id + 4096 + PTE_P + PTE_W + PTE_U
        mov dword [pd32 + 4 * 256], pt_test + PTE_P + PTE_W + PTE_U
        mov eax, user_page
        shr eax, 12
        or dword [pt_id + 4 * eax], PTE_U
        mov eax, user_stack
        shr eax, 12
        or dword [pt_id + 4 * eax], PTE_U
        ret

; Switch to PAE paging with EFER.NXE: 0-8 MiB identity mapped with 2 MiB
; pages, the test pages at TVA through PDPTE 1.
to_pae:
        mov eax, cr0
        and eax, ~CR0_PG
        mov cr0, eax
        mov edi, pt_test                            ; the test PT now holds 8-byte entries
        mov ecx, 1024
        xor eax, eax
        rep stosd
        mov dword [pae_pdpt + 0], pae_pd + PTE_P
        mov dword [pae_pdpt + 8], pae_pd_test + PTE_P
        mov dword [pae_pd_test], pt_test + PTE_P + PTE_W
        xor ecx, ecx
.pd:    mov eax, ecx
        shl eax, 21
        or eax, PTE_P + PTE_W + PTE_PS
        mov [pae_pd + 8 * ecx], eax
        inc ecx
        cmp ecx, 4
        jb .pd
        mov eax, pae_pdpt
        mov cr3, eax
        mov eax, cr4
        or eax, CR4_PAE
        mov cr4, eax
        mov ecx, MSR_EFER
        rdmsr
        or eax, EFER_NXE
        wrmsr
        mov eax, cr0
        or eax, CR0_PG
        mov cr0, eax
        ret

; ---- ring 3 -----------------------------------------------------------------------------
; eax = ring-3 entry point; returns when the ring-3 code does INT 0x30.
enter_user:
        mov [saved_esp], esp
        mov dword [user_done], 0
        push dword UDATA
        push dword user_stack_top
        push dword 0x2                              ; EFLAGS: IF clear
        push dword UCODE
        push eax
        iretd

int30_handler:                                      ; from ring 3: back to enter_user's caller
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov dword [user_done], 1
        mov esp, [saved_esp]
        ret

; The #PF handler: record, then resume at pf_resume (in the mode that faulted).
pf_handler:
        push eax
        mov ax, KDATA
        mov ds, ax
        mov eax, cr2
        mov [pf_cr2], eax
        mov eax, [esp + 4]
        mov [pf_ec], eax
        and eax, PTE_P
        mov [pf_ec_p], eax
        inc dword [pf_count]
        mov eax, [pf_resume]
        mov [esp + 8], eax
        test dword [esp + 12], 3                    ; back to ring 3: its data segment again
        jz .out
        mov ax, UDATA
        mov ds, ax
.out:   pop eax
        add esp, 4
        iretd

; Ring-3 code and data: one page, user accessible, read-only to ring 3 by
; nothing but its own PTE (supervisor writable).
        align 4096
user_page:
user_sup_read:
        mov ax, UDATA                               ; a descriptor load (GDT: supervisor page)
        mov ds, ax
        mov es, ax
        mov eax, [TVA + 0x3004]
.back:  int 0x30
user_ro_write:
        mov ax, UDATA
        mov ds, ax
        mov dword [TVA + 0x2008], 1
.back:  int 0x30
user_read:
        mov ax, UDATA
        mov ds, ax
        mov eax, [TVA + 0x2000]
        mov [user_value], eax
.back:  int 0x30
user_np_read:
        mov ax, UDATA
        mov ds, ax
        mov eax, [TVA + 0x4000]
.back:  int 0x30
        align 4, db 0
user_value:     dd 0
        align 4096, db 0

section .rodata
magic:          dd 0x7A6E3C1B

section .data
                align 8
gdt:            dq 0
                dq 0x00CF9A000000FFFF               ; 0x08 ring-0 code
                dq 0x00CF92000000FFFF               ; 0x10 ring-0 data
                dq 0x00CFFA000000FFFF               ; 0x18 ring-3 code
                dq 0x00CFF2000000FFFF               ; 0x20 ring-3 data
tss_desc:       dw 103                              ; 0x28 32-bit TSS (base set by setup_cpu)
                dw 0
                db 0, 0x89, 0x00, 0
gdt_end:
                align 4
                dw 0
gdtr:           dw gdt_end - gdt - 1
                dd gdt

section .bss
                alignb 4096
pd32:           resb 4096
pt_id:          resb 8192
pt_test:        resb 4096
pae_pd:         resb 4096
pae_pd_test:    resb 4096
scratch0:       resb 4096
scratch1:       resb 4096
scratch2:       resb 4096
scratch3:       resb 4096
user_stack:     resb 4096
user_stack_top:
kstack:         resb 4096
kstack_top:
                alignb 32
pae_pdpt:       resb 32
tss:            resb 104
                alignb 4
pf_resume:      resd 1
pf_count:       resd 1
pf_cr2:         resd 1
pf_ec:          resd 1
pf_ec_p:        resd 1
saved_esp:      resd 1
user_done:      resd 1

        T_END
