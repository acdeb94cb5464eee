; hello.asm -- the smallest guest: a 512-byte BIOS boot sector.
;
; Build:  nasm -f bin -o hello.img hello.asm   (or: python3 guests/build.py)
;
; The BIOS loads this sector at 0000:7C00 in real mode and jumps to it.
; It prints one line on the screen through the BIOS teletype service
; (int 10h, AH=0Eh; the VMM shows the BIOS screen on its console),
; then it ends the run by writing 0 to the debug-exit port 0x501 (QEMU's
; isa-debug-exit device; our VMM stops there with guest status 0).
; If nothing listens on 0x501 it parks the CPU with cli/hlt.
;
; Hardware used: BIOS int 10h, port 0x501.

bits 16
org 0x7C00









DEBUG_EXIT_PORT equ 0x501

start:
        cli
        xor ax, ax                  ; the BIOS may enter at 07C0:0000 or 0000:7C00:
        mov ds, ax                  ; use zero segments everywhere and ...
        mov es, ax
        mov ss, ax
        mov sp, 0x7C00              ; ... a stack just below the boot sector
        jmp 0x0000:.flat            ; ... and make CS:IP match our org
.flat:
        cld                         ; interrupts stay off: nothing here needs them
                                    ; (the teletype service works without), so a
                                    ; VMM need not deliver IRQs to run this guest

        mov si, message
.next:
        lodsb
        test al, al
        jz .done
        mov ah, 0x0E                ; BIOS teletype output: AL = character,
        mov bx, 0x0007              ; BH = page 0, BL = colour (graphics modes)
        int 0x10
        jmp .next

.done:
        mov dx, DEBUG_EXIT_PORT     ; end the run with status 0
        mov al, 0
        out dx, al
.halt:                              ; fallback when there is no debug-exit device
        cli
        hlt
        jmp .halt

message:
        db "Hello from the boot sector!", 13, 10, 0

        times 510 - ($ - $$) db 0   ; pad to 510 bytes (fails to assemble if too big)
        dw 0xAA55                   ; boot signature: bytes 55 AA at offsets 510/511
