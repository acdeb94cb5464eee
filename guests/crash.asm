; crash.asm -- a Multiboot kernel with a timing-dependent bug, for the
; time-travel debugging walkthrough (README "Debugging a crash backwards").
;
; Build: python3 guests/build.py   (nasm -f bin; the ELF header is written here)
;
; Two activities share a buffer pointer:
;   * the worker loop reads `shared`, then - a few instructions later - clears
;     the `next` field of "its" buffer;
;   * the timer interrupt retires the current buffer: it stores a pointer to
;     the statistics block in the buffer's `next` field, swaps `shared` to the
;     other buffer, and on the following tick reads through the retired
;     buffer's `next` pointer.
; If a tick lands between the worker's load of `shared` and its store, the
; worker clears `next` of a buffer that was just retired (a stale pointer),
; and the next tick dereferences NULL: a page fault (page 0 is not mapped).
; The worker starts after a delay taken from the RTC, so whether the race is
; lost depends on the wall-clock time at boot: it crashes on some boots only.
;
; Serial (COM1) output, then the debug-exit port 0x501:
;   status 0 -- "survived N ticks";  status 1 -- "CRASH: page fault ..."

bits 32
org 0x100000

MB_MAGIC    equ 0x1BADB002
MB_FLAGS    equ 0x00010003          ; page-align modules, memory info, address fields
COM1        equ 0x3F8
TICKS_GOAL  equ 40
BUF_A       equ 0x200000
BUF_B       equ 0x201000
PD          equ 0x300000
PT0         equ 0x301000

file_start:
mb_header:
        dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        dd mb_header                ; header_addr
        dd file_start               ; load_addr
        dd file_end                 ; load_end_addr
        dd bss_end                  ; bss_end_addr
        dd start                    ; entry_addr

start:
        cli
        mov esp, stack_top
        lgdt [gdt_desc]
        jmp 0x08:.cs
.cs:    mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        call serial_init
        mov esi, msg_hello
        call puts
        call setup_idt
        call setup_paging
        call setup_pic_pit
        ; the worker's start is delayed by the RTC: seconds * 97 + minutes spins
        mov al, 0x00
        out 0x70, al
        in al, 0x71
        movzx ecx, al
        imul ecx, 97
        mov al, 0x02
        out 0x70, al
        in al, 0x71
        movzx eax, al
        add ecx, eax
        inc ecx
.delay: loop .delay
        mov dword [shared], BUF_A
        mov dword [retired], BUF_B
        mov dword [BUF_B + 4], stats_block
        sti

; ---- the worker ---------------------------------------------------------
worker:
        mov ecx, 60                 ; unrelated work between two uses of the buffer
.work:  add edi, ecx
        xor edi, 0x55
        loop .work
        mov esi, [shared]           ; the window opens: esi may go stale
        add edi, esi
        mov dword [esi + 4], 0      ; clear "my" buffer's next pointer: the racy store
        inc dword [esi]             ; count work done in "my" buffer
        cmp dword [ticks], TICKS_GOAL
        jb worker
        cli
        mov esi, msg_survived
        call puts
        mov al, 0
        jmp exit

; ---- the timer interrupt --------------------------------------------------
timer_isr:
        pushad
        inc dword [ticks]
        mov ebx, [retired]
        mov ecx, [ebx + 4]          ; the retired buffer's next pointer ...
        mov edx, [ecx]              ; ... dereferenced: faults if it was cleared
        add [stats_block + 4], edx
        mov eax, [shared]           ; retire the current buffer
        mov dword [eax + 4], stats_block
        mov [retired], eax
        mov [shared], ebx           ; and hand the worker the other one
        mov al, 0x20
        out 0x20, al
        popad
        iretd

pf_isr:
        mov esi, msg_crash
        call puts
        mov eax, cr2
        call puthex
        mov esi, msg_eip
        call puts
        mov eax, [esp + 4]          ; the faulting EIP (above the error code)
        call puthex
        mov esi, msg_nl
        call puts
        mov al, 1
        jmp exit

other_isr:
        mov esi, msg_unexpected
        call puts
        mov al, 3
        jmp exit

spurious_isr:
        iretd

exit:
        mov dx, 0x501
        out dx, al
.halt:  cli
        hlt
        jmp .halt

; ---- set-up -----------------------------------------------------------------
setup_idt:
        mov edi, idt
        mov ecx, 48
        mov eax, other_isr
.fill:  call set_gate
        add edi, 8
        loop .fill
        mov eax, pf_isr
        mov edi, idt + 14 * 8
        call set_gate
        mov eax, timer_isr
        mov edi, idt + 0x20 * 8
        call set_gate
        mov eax, spurious_isr
        mov edi, idt + 0x27 * 8
        call set_gate
        lidt [idt_desc]
        ret

set_gate:                           ; eax = handler, edi = gate: 32-bit interrupt gate, DPL 0
        mov [edi], ax
        mov word [edi + 2], 0x08
        mov word [edi + 4], 0x8E00
        push eax
        shr eax, 16
        mov [edi + 6], ax
        pop eax
        ret

setup_paging:                       ; identity map 0-4 MiB except page 0 (so NULL faults)
        mov edi, PT0
        mov eax, 0x003              ; present, writable
        mov ecx, 1024
.pt:    mov [edi], eax
        add eax, 0x1000
        add edi, 4
        loop .pt
        mov dword [PT0], 0          ; page 0: not present
        mov edi, PD
        mov ecx, 1024
        xor eax, eax
        rep stosd
        mov dword [PD], PT0 | 3
        mov eax, PD
        mov cr3, eax
        mov eax, cr0
        or eax, 0x80010000          ; PG | WP
        mov cr0, eax
        ret

setup_pic_pit:
        mov al, 0x11
        out 0x20, al
        out 0xA0, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x28
        out 0xA1, al
        mov al, 4
        out 0x21, al
        mov al, 2
        out 0xA1, al
        mov al, 1
        out 0x21, al
        out 0xA1, al
        mov al, 0xFE                ; only IRQ0
        out 0x21, al
        mov al, 0xFF
        out 0xA1, al
        mov al, 0x34                ; channel 0, mode 2, lobyte/hibyte
        out 0x43, al
        mov ax, 2983                ; ~400 Hz
        out 0x40, al
        mov al, ah
        out 0x40, al
        ret

serial_init:
        mov dx, COM1 + 1
        xor al, al
        out dx, al                  ; no UART interrupts
        mov dx, COM1 + 3
        mov al, 0x80
        out dx, al                  ; DLAB
        mov dx, COM1
        mov al, 1
        out dx, al                  ; 115200 baud
        mov dx, COM1 + 1
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x03
        out dx, al                  ; 8N1
        ret

putc:                               ; al = character
        push edx
        push eax
        mov dx, COM1 + 5
.wait:  in al, dx
        test al, 0x20
        jz .wait
        pop eax
        mov dx, COM1
        out dx, al
        pop edx
        ret

puts:                               ; esi = NUL-terminated string
        push eax
.next:  lodsb
        test al, al
        jz .done
        call putc
        jmp .next
.done:  pop eax
        ret

puthex:                             ; eax = value, printed as 0xXXXXXXXX
        push ecx
        push eax
        mov al, '0'
        call putc
        mov al, 'x'
        call putc
        pop eax
        mov ecx, 8
.digit: rol eax, 4
        push eax
        and al, 0x0F
        add al, '0'
        cmp al, '9'
        jbe .out
        add al, 'a' - '0' - 10
.out:   call putc
        pop eax
        loop .digit
        pop ecx
        ret

; ---- data -------------------------------------------------------------------
align 8
gdt:    dq 0
        dq 0x00CF9A000000FFFF       ; 0x08 ring-0 code
        dq 0x00CF92000000FFFF       ; 0x10 ring-0 data
gdt_desc:
        dw gdt_desc - gdt - 1
        dd gdt
idt_desc:
        dw 48 * 8 - 1
        dd idt

msg_hello:      db "[crash] worker and timer share a buffer pointer; running ", "40 ticks", 13, 10, 0
msg_survived:   db "[crash] survived 40 ticks", 13, 10, 0
msg_crash:      db "[crash] CRASH: page fault at CR2=", 0
msg_eip:        db " EIP=", 0
msg_unexpected: db "[crash] unexpected exception", 13, 10, 0
msg_nl:         db 13, 10, 0

align 4
file_end:

; ---- bss (not in the file: the loader zero-fills up to bss_end) ---------------
absolute file_end
shared:         resd 1
retired:        resd 1
ticks:          resd 1
stats_block:    resd 4
                resd 1              ; pad: idt starts 8-byte aligned (file_end is 4-aligned, 7 dwords above)
idt:            resb 48 * 8
                resb 4096
stack_top:
bss_end:
