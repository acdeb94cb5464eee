; t_common.asm -- shared frame of the t_* Multiboot test guests (not a guest itself).
;
; A guest source defines T_NAME (a string, e.g. "t_pit") and optionally
; T_BASE (load address, default 1 MiB), then:
;
;       %include "t_common.asm"
;       section .text
;   guest_main:          ; entered with the frame below set up; return = pass
;       ...
;       ret
;       ... its own .rodata/.data/.bss ...
;       T_END            ; last line: closes the image
;
; What the frame does before guest_main: zero .bss, load a flat GDT (code
; 0x08, data 0x10), an IDT (exceptions 0-31 report and exit 99; vectors
; 0x20-0x2F are IRQ0-15 stubs that count into irq_count[n] and call
; irq_handler[n] if set, else send the EOIs), remap the 8259 pair to
; 0x20/0x28 with every input masked but the cascade, and set up COM1
; (115200 8N1, FIFOs on, polled).  When guest_main returns the guest prints
; "<name>: all checks passed" and writes 0 to the debug-exit port 0x501.
;
; Checks:  CHECK cc, id, "text"  passes when condition code cc holds (as for
; jcc) and prints "<name> ok: text"; otherwise it prints "<name> FAIL id:
; text (eax=... ebx=... ecx=... edx=...)" and exits with status id (1-98).
; Everything printed must be the same on every run and under QEMU, so no
; measured value is printed; only checks against ranges.
;
; The image is an ELF32 executable written by hand (like demo.asm): one
; PT_LOAD of the whole file at T_BASE, memsz covering .bss, a Multiboot v1
; header without flag 16.

bits 32
%ifndef T_BASE
%define T_BASE 0x00100000
%endif
org T_BASE

COM1             equ 0x3F8
UART_LSR         equ COM1 + 5
LSR_THRE         equ 0x20
PIC1_CMD         equ 0x20
PIC1_DATA        equ 0x21
PIC2_CMD         equ 0xA0
PIC2_DATA        equ 0xA1
EOI              equ 0x20
IRQ_BASE         equ 0x20       ; IRQ0-7 -> 0x20-0x27, IRQ8-15 -> 0x28-0x2F
PIT_CH0          equ 0x40
PIT_CH2          equ 0x42
PIT_CMD          equ 0x43
PORT_B           equ 0x61
CMOS_INDEX       equ 0x70
CMOS_DATA        equ 0x71
DEBUG_EXIT_PORT  equ 0x501
STATUS_EXCEPTION equ 99
STATUS_TIMEOUT   equ 98

KCODE            equ 0x08
KDATA            equ 0x10

; PRINT "text", 10 -- a string literal to COM1 (keeps every register).
%macro PRINT 1+
        push esi
        mov esi, %%str
        call puts
        pop esi
[section .rodata]
%%str:  db %1, 0
__SECT__
%endmacro

; CHECK cc, id, "text"
%macro CHECK 3
        mov [check_regs + 0], eax
        mov [check_regs + 4], ebx
        mov [check_regs + 8], ecx
        mov [check_regs + 12], edx
        j%1 %%pass
        mov esi, %%msg
        mov eax, %2
        jmp check_failed
%%pass:
        push esi
        mov esi, %%msg
        call report_ok
        pop esi
[section .rodata]
%%msg:  db %3, 0
__SECT__
%endmacro

; FAIL id, "text" -- unconditional failure
%macro FAIL 2
        mov [check_regs + 0], eax
        mov [check_regs + 4], ebx
        mov [check_regs + 8], ecx
        mov [check_regs + 12], edx
        mov esi, %%msg
        mov eax, %1
        jmp check_failed
[section .rodata]
%%msg:  db %2, 0
__SECT__
%endmacro

; IRQ_HANDLER n, label -- have IRQ n call label (it must send its own EOIs;
; it is called with interrupts off and may use every register but esp).
%macro IRQ_HANDLER 2
        mov dword [irq_handler + 4 * %1], %2
%endmacro

section .head   progbits align=16
section .text   progbits align=16   follows=.head
section .rodata progbits align=4    follows=.text
section .data   progbits align=16   follows=.rodata
section .bss    nobits   align=16   follows=.data

; =============================================================================
section .head
elf_header:
        db 0x7F, "ELF", 1, 1, 1, 0
        times 8 db 0
        dw 2                            ; ET_EXEC
        dw 3                            ; EM_386
        dd 1                            ; EV_CURRENT
        dd t_start                      ; e_entry
        dd program_header - elf_header  ; e_phoff
        dd 0                            ; e_shoff
        dd 0                            ; e_flags
        dw 52                           ; e_ehsize
        dw 32                           ; e_phentsize
        dw 1                            ; e_phnum
        dw 40, 0, 0                     ; e_shentsize, e_shnum, e_shstrndx
program_header:
        dd 1                            ; PT_LOAD
        dd 0                            ; the whole file ...
        dd T_BASE, T_BASE               ; ... at T_BASE
        dd t_file_end - T_BASE          ; p_filesz
        dd t_bss_end - T_BASE           ; p_memsz
        dd 7                            ; RWX
        dd 0x1000
        align 4, db 0
multiboot_header:
        dd 0x1BADB002
        dd 0x00000003
        dd -(0x1BADB002 + 0x00000003)

; =============================================================================
section .text
t_start:
        cli
        cld
        mov edi, t_bss_start            ; zero .bss
        mov ecx, (t_bss_end - t_bss_start) / 4
        xor eax, eax
        rep stosd
        mov esp, t_stack_top
        lgdt [t_gdtr]
        jmp KCODE:.flush
.flush:
        mov ax, KDATA
        mov ds, ax
        mov es, ax
        mov fs, ax
        mov gs, ax
        mov ss, ax
        call serial_init
        call idt_init
        call pic_init
        PRINT T_NAME, ": started", 10
        call guest_main
        cli
        PRINT T_NAME, ": all checks passed", 10
        xor eax, eax
        jmp exit_status

; al = status: end the run through the debug-exit port (never returns).
exit_status:
        mov dx, DEBUG_EXIT_PORT
        out dx, al
.park:
        cli
        hlt
        jmp .park

; ---- checks ---------------------------------------------------------------------
report_ok:                              ; esi = text
        push esi
        mov esi, t_name_str
        call puts
        mov esi, t_ok_str
        call puts
        pop esi
        call puts
        push eax
        mov al, 10
        call putc
        pop eax
        ret

check_failed:                           ; eax = status, esi = text
        cli
        mov ebx, eax
        push esi
        mov esi, t_name_str
        call puts
        mov esi, t_fail_str
        call puts
        mov eax, ebx
        call put_dec
        mov al, ':'
        call putc
        mov al, ' '
        call putc
        pop esi
        call puts
        PRINT " (eax="
        mov eax, [check_regs + 0]
        call put_hex32
        PRINT " ebx="
        mov eax, [check_regs + 4]
        call put_hex32
        PRINT " ecx="
        mov eax, [check_regs + 8]
        call put_hex32
        PRINT " edx="
        mov eax, [check_regs + 12]
        call put_hex32
        PRINT ")", 10
        mov eax, ebx
        jmp exit_status

; ---- IDT --------------------------------------------------------------------------
idt_init:
        xor ecx, ecx
.fill:
        mov eax, unexpected_vector
        cmp ecx, 48
        jae .set
        mov eax, [vector_stubs + 4 * ecx]
.set:
        mov [t_idt + 8 * ecx], ax
        mov word [t_idt + 8 * ecx + 2], KCODE
        mov word [t_idt + 8 * ecx + 4], 0x8E00   ; present, DPL 0, 32-bit interrupt gate
        shr eax, 16
        mov [t_idt + 8 * ecx + 6], ax
        inc ecx
        cmp ecx, 256
        jb .fill
        lidt [t_idtr]
        ret

%assign v 0
%rep 48
vector_stub_ %+ v:
        push dword v
        jmp vector_common
%assign v v + 1
%endrep

vector_common:
        cmp dword [esp], 32
        jae irq_common
        ; exceptions 0-31: report and stop
        cli
        PRINT T_NAME, ": unexpected exception, vector "
        mov eax, [esp]
        call put_dec
        PRINT 10
        mov al, STATUS_EXCEPTION
        jmp exit_status

irq_common:                             ; [esp] = vector 0x20-0x2F
        pushad
        mov ebx, [esp + 32]
        sub ebx, IRQ_BASE               ; ebx = IRQ number
        inc dword [irq_count + 4 * ebx]
        mov eax, [irq_handler + 4 * ebx]
        test eax, eax
        jz .default
        call eax
        jmp .out
.default:
        mov al, EOI
        cmp ebx, 8
        jb .master
        out PIC2_CMD, al
.master:
        out PIC1_CMD, al
.out:
        popad
        add esp, 4
        iretd

unexpected_vector:
        cli
        PRINT T_NAME, ": unexpected interrupt vector above 0x2F", 10
        mov al, STATUS_EXCEPTION
        jmp exit_status

; ---- 8259 pair -----------------------------------------------------------------------
; ICW1-4 on both chips: edge triggered, cascade on IR2, 8086 mode, normal EOI;
; every input masked except the cascade input IR2.
pic_init:
        mov al, 0x11
        out PIC1_CMD, al
        out PIC2_CMD, al
        mov al, IRQ_BASE
        out PIC1_DATA, al
        mov al, IRQ_BASE + 8
        out PIC2_DATA, al
        mov al, 0x04
        out PIC1_DATA, al
        mov al, 0x02
        out PIC2_DATA, al
        mov al, 0x01
        out PIC1_DATA, al
        out PIC2_DATA, al
        mov al, 0xFB
        out PIC1_DATA, al
        mov al, 0xFF
        out PIC2_DATA, al
        ret

; ecx = IRQ number: clear its mask bit (keeps every register)
irq_unmask:
        push eax
        push ecx
        push edx
        mov dx, PIC1_DATA
        cmp ecx, 8
        jb .chip
        mov dx, PIC2_DATA
        sub ecx, 8
.chip:
        in al, dx
        btr eax, ecx
        out dx, al
        pop edx
        pop ecx
        pop eax
        ret

; ecx = IRQ number: set its mask bit (keeps every register)
irq_mask:
        push eax
        push ecx
        push edx
        mov dx, PIC1_DATA
        cmp ecx, 8
        jb .chip
        mov dx, PIC2_DATA
        sub ecx, 8
.chip:
        in al, dx
        bts eax, ecx
        out dx, al
        pop edx
        pop ecx
        pop eax
        ret

; ---- waiting ----------------------------------------------------------------------------
; Sleep (sti; hlt) until IRQ ecx has been counted edx more times; interrupts
; are off again on return.  Gives up with STATUS_TIMEOUT after 1,000,000 wake-ups.
wait_irqs:
        push eax
        push ebx
        push esi
        mov esi, [irq_count + 4 * ecx]
        add esi, edx
        mov ebx, 1000000
.loop:
        mov eax, [irq_count + 4 * ecx]
        sub eax, esi
        jns .done                       ; count - target >= 0 (wrap-safe)
        sti
        hlt
        cli
        dec ebx
        jnz .loop
        PRINT T_NAME, ": timed out waiting for an interrupt", 10
        mov al, STATUS_TIMEOUT
        jmp exit_status
.done:
        pop esi
        pop ebx
        pop eax
        ret

; Program PIT counter 0 in mode 2 with divisor eax (keeps every register).
pit0_rate:
        push eax
        mov al, 0x34                    ; counter 0, LSB then MSB, mode 2, binary
        out PIT_CMD, al
        pop eax
        out PIT_CH0, al
        xchg al, ah
        out PIT_CH0, al
        xchg al, ah
        ret

; ---- serial console (COM1, polled) ---------------------------------------------------------
serial_init:
        mov dx, COM1 + 1
        xor al, al
        out dx, al                      ; IER: no interrupts
        mov dx, COM1 + 3
        mov al, 0x80
        out dx, al                      ; DLAB
        mov dx, COM1 + 0
        mov al, 0x01
        out dx, al                      ; divisor 1: 115200 baud
        mov dx, COM1 + 1
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x03
        out dx, al                      ; 8N1
        mov dx, COM1 + 2
        mov al, 0xC7
        out dx, al                      ; FIFOs on and cleared
        mov dx, COM1 + 4
        mov al, 0x03
        out dx, al                      ; DTR, RTS
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
        push ecx
        mov ecx, 1000000
        mov dx, UART_LSR
.wait:
        in al, dx
        test al, LSR_THRE
        jnz .ready
        dec ecx
        jnz .wait
.ready:
        pop ecx
        pop eax
        mov dx, COM1
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

; eax as 0x and 8 hex digits.  Keeps every register.
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
        mov al, [t_hex_digits + eax]
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

; =============================================================================
section .rodata
t_hex_digits:   db "0123456789ABCDEF"
t_name_str:     db T_NAME, 0
t_ok_str:       db " ok: ", 0
t_fail_str:     db " FAIL ", 0
                align 4
vector_stubs:
%assign v 0
%rep 48
                dd vector_stub_ %+ v
%assign v v + 1
%endrep

section .data
                align 8
t_gdt:
                dq 0
                dq 0x00CF9A000000FFFF   ; 0x08 code, flat 4 GiB, 32-bit
                dq 0x00CF92000000FFFF   ; 0x10 data
t_gdt_end:
                align 4
                dw 0
t_gdtr:         dw t_gdt_end - t_gdt - 1
                dd t_gdt
                align 4
                dw 0
t_idtr:         dw 256 * 8 - 1
                dd t_idt

section .bss
                alignb 16
t_bss_start:
t_idt:          resb 256 * 8
t_stack:        resb 16384
t_stack_top:
irq_count:      resd 16
irq_handler:    resd 16
check_regs:     resd 4

; T_END -- the last line of a guest: marks the end of the file and of .bss.
%macro T_END 0
section .data
                align 4
t_file_end:
section .bss
                alignb 4
t_bss_end:
%endmacro

section .text
