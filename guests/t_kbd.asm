; t_kbd.asm -- 8042 keyboard controller and A20 test guest (Multiboot v1 ELF32 kernel,
; frame in t_common.asm).
;
; Loaded at 2 MiB (T_BASE), where address bit 20 is clear: the code, data and
; stack keep working while A20 is off.  A20 is checked by aliasing: with A20
; off, physical 0x10E000 is 0x00E000.  Port 0x92 is only ever driven in the
; same direction as the 8042's gate or with the 8042's gate off (chipsets OR
; the two gates; QEMU lets the last write win, and both agree on these steps).
; Checks (exit status):
;   1     controller self test (0xAA) answers 0x55
;   2     keyboard interface test (0xAB) answers 0x00
;   3     command byte written with 0x60 (0x24) reads back with 0x20
;   4     keyboard echo (0xEE) answers 0xEE
;   5-7   keyboard identify (0xF2), translation off: 0xFA, 0xAB, 0x83
;   8-9   0xAD / 0xAE set and clear the command byte's keyboard-disable bit
;   10    output port (0xD0): reset inactive (bit 0) and A20 on (bit 1)
;   11    input port (0xC0): bit 7, keyboard not inhibited
;   12    A20 on: 0x10E000 and 0x00E000 are different memory
;   13-14 0xD1 0xDD: output port reads A20 off; 0x10E000 aliases 0x00E000
;   15-16 port 0x92 bit 1 set: A20 on (no alias), and reads back bit 1
;   17    port 0x92 bit 1 clear again (8042 gate still off): aliased again
;   18-19 0xD1 0xDF: A20 on, no alias; output port reads A20 on
;
; Hardware: 8042 0x60/0x64, port 0x92, COM1, debug exit 0x501.

%define T_NAME "t_kbd"
%define T_BASE 0x00200000
%include "t_common.asm"

KBC_DATA   equ 0x60
KBC_STATUS equ 0x64
KBC_CMD    equ 0x64
PORT_A     equ 0x92
LOW_ADDR   equ 0x0000E000
HIGH_ADDR  equ 0x0010E000              ; LOW_ADDR + 1 MiB
MARK_LOW   equ 0x11111111
MARK_HIGH  equ 0x22222222

; KBC_COMMAND byte   /   KBC_WRITE byte   /   KBC_READ -> eax (0xFFFFFFFF: nothing came)
%macro KBC_COMMAND 1
        mov al, %1
        call kbc_command
%endmacro
%macro KBC_WRITE 1
        mov al, %1
        call kbc_write
%endmacro
%macro KBC_READ 0
        call kbc_read
%endmacro

section .text
guest_main:
        call kbc_flush
        KBC_COMMAND 0xAA
        KBC_READ
        cmp eax, 0x55
        CHECK e, 1, "8042 self test (0xAA) answers 0x55"
        KBC_COMMAND 0xAB
        KBC_READ
        cmp eax, 0x00
        CHECK e, 2, "keyboard interface test (0xAB) answers 0x00"

        KBC_COMMAND 0x60                ; write the command byte: no interrupts,
        KBC_WRITE 0x24                  ; system flag, aux disabled, no translation
        KBC_COMMAND 0x20
        KBC_READ
        cmp eax, 0x24
        CHECK e, 3, "command byte 0x24 reads back"

        call kbc_flush
        KBC_WRITE 0xEE                  ; to the keyboard: echo
        KBC_READ
        cmp eax, 0xEE
        CHECK e, 4, "keyboard echo (0xEE) answers 0xEE"
        KBC_WRITE 0xF2                  ; identify
        KBC_READ
        cmp eax, 0xFA
        CHECK e, 5, "keyboard identify (0xF2) is acknowledged (0xFA)"
        KBC_READ
        cmp eax, 0xAB
        CHECK e, 6, "keyboard identify: first ID byte 0xAB"
        KBC_READ
        cmp eax, 0x83
        CHECK e, 7, "keyboard identify: second ID byte 0x83 (translation off)"

        KBC_COMMAND 0xAD                ; disable the keyboard interface
        KBC_COMMAND 0x20
        KBC_READ
        test eax, 0x10
        CHECK nz, 8, "0xAD sets the keyboard-disable bit of the command byte"
        KBC_COMMAND 0xAE
        KBC_COMMAND 0x20
        KBC_READ
        test eax, 0x10
        CHECK z, 9, "0xAE clears the keyboard-disable bit"

        KBC_COMMAND 0xD0                ; read the output port
        KBC_READ
        and eax, 0x03
        cmp eax, 0x03
        CHECK e, 10, "output port: reset inactive, A20 on"
        KBC_COMMAND 0xC0                ; read the input port
        KBC_READ
        test eax, 0x80
        CHECK nz, 11, "input port: bit 7 (keyboard not inhibited) set"

        ; ---- A20 ----------------------------------------------------------------------
        mov dword [LOW_ADDR], MARK_LOW
        mov dword [HIGH_ADDR], MARK_HIGH
        wbinvd
        mov eax, [LOW_ADDR]
        cmp eax, MARK_LOW
        CHECK e, 12, "A20 on: 1 MiB up is different memory"

        KBC_COMMAND 0xD1                ; write the output port: A20 off
        KBC_WRITE 0xDD
        KBC_COMMAND 0xD0
        KBC_READ
        test eax, 0x02
        CHECK z, 13, "after 0xD1 0xDD the output port reads A20 off"
        mov eax, [HIGH_ADDR]
        cmp eax, MARK_LOW
        CHECK e, 14, "A20 off through the 8042: 0x10E000 aliases 0x00E000"

        in al, PORT_A
        and al, 0xFE                    ; never the fast-reset bit
        or al, 0x02                     ; fast A20 on
        out PORT_A, al
        mov eax, [HIGH_ADDR]
        cmp eax, MARK_HIGH
        CHECK e, 15, "port 0x92 bit 1 set: A20 on, no alias"
        in al, PORT_A
        movzx eax, al
        test eax, 0x02
        CHECK nz, 16, "port 0x92 reads back bit 1"
        in al, PORT_A
        and al, 0xFC                    ; fast A20 off (the 8042's gate is off too)
        out PORT_A, al
        mov eax, [HIGH_ADDR]
        cmp eax, MARK_LOW
        CHECK e, 17, "port 0x92 bit 1 clear: aliased again"

        KBC_COMMAND 0xD1                ; A20 on again through the 8042
        KBC_WRITE 0xDF
        mov eax, [HIGH_ADDR]
        cmp eax, MARK_HIGH
        CHECK e, 18, "after 0xD1 0xDF: A20 on, no alias"
        KBC_COMMAND 0xD0
        KBC_READ
        test eax, 0x02
        CHECK nz, 19, "output port reads A20 on"
        ret

; Read and drop whatever is in the output buffer (bounded).
kbc_flush:
        push ecx
        mov ecx, 64
.loop:
        in al, KBC_STATUS
        test al, 0x01
        jz .done
        in al, KBC_DATA
        call kbc_pause
        dec ecx
        jnz .loop
.done:
        pop ecx
        ret

; Wait until the input buffer is empty (status bit 1), bounded.
kbc_wait_in:
        push ecx
        mov ecx, 100000
.loop:
        in al, KBC_STATUS
        test al, 0x02
        jz .done
        dec ecx
        jnz .loop
.done:
        pop ecx
        ret

kbc_command:                            ; al = controller command
        push eax
        call kbc_wait_in
        pop eax
        out KBC_CMD, al
        ret

kbc_write:                              ; al = byte for port 0x60
        push eax
        call kbc_wait_in
        pop eax
        out KBC_DATA, al
        ret

; -> eax = next byte from port 0x60, or 0xFFFFFFFF if none arrives (bounded wait)
kbc_read:
        push ecx
        mov ecx, 200000
.loop:
        in al, KBC_STATUS
        test al, 0x01
        jnz .ready
        call kbc_pause
        dec ecx
        jnz .loop
        pop ecx
        mov eax, 0xFFFFFFFF
        ret
.ready:
        in al, KBC_DATA
        movzx eax, al
        pop ecx
        ret

kbc_pause:
        push ecx
        mov ecx, 20
.spin:
        dec ecx
        jnz .spin
        pop ecx
        ret

T_END
