; t_uart.asm -- 16550A UART (COM1) test guest (Multiboot v1 ELF32 kernel; frame in t_common.asm).
;
; While the divisor latch or loopback is selected nothing can be printed (it
; would go to the latch or loop back), so each phase records what it reads
; and the checks run once COM1 is back to 115200 8N1.  Checks (exit status):
;   1-2   scratch register keeps 0xA5 and 0x5A
;   3-5   divisor latch: DLAB=1 makes ports 0/1 DLL/DLM (0x0C/0x00 read back),
;         LCR reads back 0x83, then 0x03
;   6-7   Linux's 8250 loopback probe: MCR=LOOP gives MSR[7:4]=0, MCR=LOOP|OUT2|RTS
;         gives 0x90
;   8-9   loopback, FIFOs off: a byte written to THR is received (LSR.DR, RBR)
;   10-14 FIFOs on: IIR[7:6]=11; 16 bytes in loopback come back in order, LSR.DR
;         clears after the last; a 17th byte sets LSR.OE and is dropped; reading
;         LSR clears OE
;   15-17 interrupt identification (IRQ4 masked at the PIC): with RX level at the
;         trigger (4) and IER=RDA|THRE the IIR says RDA (0xC4); once drained, THRE
;         (0xC2); reading that IIR acknowledges it (0xC1)
;   18-19 LSR reads THRE|TEMT when idle; MSR shows CTS, DSR, DCD outside loopback
;   20-22 THRE interrupts on IRQ4: a line sent one byte per interrupt by the IRQ4
;         handler; every IRQ4 read IIR=THRE; the whole line went out
;
; Hardware: COM1 0x3F8-0x3FF, PIC (IRQ4), debug exit 0x501.

%define T_NAME "t_uart"
%include "t_common.asm"

RBR equ COM1 + 0
THR equ COM1 + 0
IER equ COM1 + 1
IIR equ COM1 + 2
FCR equ COM1 + 2
LCR equ COM1 + 3
MCR equ COM1 + 4
LSR equ COM1 + 5
MSR equ COM1 + 6
SCR equ COM1 + 7

; OUTB port, value   /   INB port -> al
%macro OUTB 2
        mov dx, %1
        mov al, %2
        out dx, al
%endmacro
%macro INB 1
        mov dx, %1
        in al, dx
%endmacro

section .text
guest_main:
        ; ---- 1-2: scratch -------------------------------------------------------------
        OUTB SCR, 0xA5
        INB SCR
        movzx eax, al
        cmp eax, 0xA5
        CHECK e, 1, "scratch register keeps 0xA5"
        OUTB SCR, 0x5A
        INB SCR
        movzx eax, al
        cmp eax, 0x5A
        CHECK e, 2, "scratch register keeps 0x5A"

        ; ---- 3-5: divisor latch (recorded, checked after) ---------------------------------
        call drain_tx
        OUTB LCR, 0x83
        OUTB THR, 0x0C                  ; DLL
        OUTB IER, 0x00                  ; DLM
        INB RBR
        mov [r_dll], al
        INB IER
        mov [r_dlm], al
        INB LCR
        mov [r_lcr], al
        OUTB THR, 0x01                  ; back to 115200
        OUTB IER, 0x00
        OUTB LCR, 0x03
        movzx eax, byte [r_dll]
        movzx ebx, byte [r_dlm]
        shl ebx, 8
        or eax, ebx
        cmp eax, 0x000C
        CHECK e, 3, "divisor latch reads back DLL=0x0C, DLM=0x00 with DLAB set"
        movzx eax, byte [r_lcr]
        cmp eax, 0x83
        CHECK e, 4, "LCR reads back 0x83 (DLAB, 8N1)"
        INB LCR
        movzx eax, al
        cmp eax, 0x03
        CHECK e, 5, "LCR reads back 0x03 after DLAB is cleared"

        ; ---- 6-14: loopback phase ---------------------------------------------------------------
        call drain_tx
        OUTB FCR, 0x00                  ; FIFOs off (16450 mode)
        OUTB MCR, 0x10                  ; loopback
        INB MSR
        mov [r_msr_loop0], al
        OUTB MCR, 0x1A                  ; loopback | OUT2 | RTS (Linux's probe)
        INB MSR
        mov [r_msr_loop1], al
        OUTB MCR, 0x10
        INB RBR                         ; nothing stale
        OUTB THR, 0x55
        call wait_dr
        mov [r_lsr_dr], al
        INB RBR
        mov [r_rbr], al
        ; FIFOs on, 16 bytes then a 17th
        OUTB FCR, 0x07                  ; enable, clear both FIFOs, trigger 1
        INB IIR
        mov [r_iir_fifo], al
        xor ecx, ecx
.send16:
        mov al, cl
        add al, 'a'
        mov dx, THR
        out dx, al
        inc ecx
        cmp ecx, 16
        jb .send16
        call wait_dr
        mov al, 'Z'                     ; the 17th: no room
        mov dx, THR
        out dx, al
        INB LSR
        mov [r_lsr_oe], al
        INB LSR
        mov [r_lsr_oe2], al
        xor ecx, ecx
.recv16:
        INB RBR
        mov [r_fifo + ecx], al
        inc ecx
        cmp ecx, 16
        jb .recv16
        INB LSR
        mov [r_lsr_empty], al
        ; interrupt identification: trigger level 4, IER = RDA | THRE
        OUTB FCR, 0x47                  ; enable, clear RX, trigger level 4
        mov ecx, 4
.send4:
        OUTB THR, 'x'
        dec ecx
        jnz .send4
        call wait_dr
        OUTB IER, 0x03
        INB IIR
        mov [r_iir_rda], al
        mov ecx, 4
.recv4:
        INB RBR
        dec ecx
        jnz .recv4
        INB IIR
        mov [r_iir_thre], al
        INB IIR
        mov [r_iir_none], al
        OUTB IER, 0x00
        ; back to normal
        OUTB MCR, 0x03
        OUTB FCR, 0xC7
        INB RBR

        movzx eax, byte [r_msr_loop0]
        and eax, 0xF0
        cmp eax, 0x00
        CHECK e, 6, "loopback probe: MCR=0x10 gives MSR[7:4] = 0"
        movzx eax, byte [r_msr_loop1]
        and eax, 0xF0
        cmp eax, 0x90
        CHECK e, 7, "loopback probe: MCR=0x1A gives MSR[7:4] = 0x9 (CTS, DCD)"
        movzx eax, byte [r_lsr_dr]
        test eax, 0x01
        CHECK nz, 8, "loopback: the byte written is received (LSR.DR)"
        movzx eax, byte [r_rbr]
        cmp eax, 0x55
        CHECK e, 9, "loopback: RBR holds the byte written (0x55)"
        movzx eax, byte [r_iir_fifo]
        and eax, 0xC0
        cmp eax, 0xC0
        CHECK e, 10, "FIFOs enabled: IIR bits 7-6 read 11"
        xor ecx, ecx
        xor eax, eax
.cmp16:
        movzx ebx, byte [r_fifo + ecx]
        lea edx, [ecx + 'a']
        cmp ebx, edx
        jne .cmp_done
        inc ecx
        cmp ecx, 16
        jb .cmp16
.cmp_done:
        cmp ecx, 16
        CHECK e, 11, "FIFO: 16 bytes looped back in order (the 17th dropped)"
        movzx eax, byte [r_lsr_oe]
        and eax, 0x03
        cmp eax, 0x03
        CHECK e, 12, "FIFO full: a 17th byte sets LSR.OE (DR still set)"
        movzx eax, byte [r_lsr_oe2]
        test eax, 0x02
        CHECK z, 13, "reading LSR cleared OE"
        movzx eax, byte [r_lsr_empty]
        test eax, 0x01
        CHECK z, 14, "LSR.DR is clear once the FIFO is drained"
        movzx eax, byte [r_iir_rda]
        cmp eax, 0xC4
        CHECK e, 15, "IIR = 0xC4 (received data) with RX at the trigger level, THRE also pending"
        movzx eax, byte [r_iir_thre]
        cmp eax, 0xC2
        CHECK e, 16, "IIR = 0xC2 (THR empty) once RX is drained"
        movzx eax, byte [r_iir_none]
        cmp eax, 0xC1
        CHECK e, 17, "reading IIR = THRE acknowledged it (0xC1)"

        ; ---- 18-19: idle LSR, modem status ------------------------------------------------
        call drain_tx
        INB LSR
        movzx eax, al
        and eax, 0x61
        cmp eax, 0x60
        CHECK e, 18, "idle: LSR shows THRE and TEMT, no data"
        INB MSR
        movzx eax, al
        and eax, 0xB0
        cmp eax, 0xB0
        CHECK e, 19, "MSR shows CTS, DSR and DCD outside loopback"

        ; ---- 20-22: THRE interrupts on IRQ4 -------------------------------------------------
        call drain_tx
        IRQ_HANDLER 4, uart_irq
        OUTB MCR, 0x0B                  ; DTR, RTS, OUT2 (the IRQ enable on a PC)
        mov ecx, 4
        call irq_unmask
        mov dword [tx_next], irq_line
        OUTB IER, 0x02                  ; THRE: interrupts at once (THR is empty)
        mov ecx, 100000
.wait_tx:
        cmp dword [tx_done], 0
        jne .tx_finished
        sti
        hlt
        cli
        dec ecx
        jnz .wait_tx
.tx_finished:
        mov ecx, 4
        call irq_mask
        OUTB IER, 0x00
        OUTB MCR, 0x03
        mov eax, [tx_done]
        cmp eax, 1
        CHECK e, 20, "THRE interrupts: the IRQ4 handler sent the whole line"
        mov eax, [bad_iir]
        cmp eax, 0
        CHECK e, 21, "THRE interrupts: every IRQ4 read IIR = THR empty"
        mov eax, [irq_count + 4 * 4]
        cmp eax, irq_line_len
        CHECK ae, 22, "THRE interrupts: at least one IRQ4 per byte sent"
        ret

; IRQ4: identify, send the next byte of irq_line, or stop at its end.
uart_irq:
        INB IIR
        and al, 0x0F
        cmp al, 0x02
        je .thre
        inc dword [bad_iir]
        jmp .eoi
.thre:
        mov esi, [tx_next]
        mov al, [esi]
        test al, al
        jz .end
        inc dword [tx_next]
        mov dx, THR
        out dx, al
        jmp .eoi
.end:
        OUTB IER, 0x00
        mov dword [tx_done], 1
.eoi:
        mov al, EOI
        out PIC1_CMD, al
        ret

; Wait until the transmitter is idle (LSR.TEMT), bounded.
drain_tx:
        push ecx
        mov ecx, 1000000
.loop:
        INB LSR
        test al, 0x40
        jnz .done
        dec ecx
        jnz .loop
.done:
        pop ecx
        ret

; Wait for LSR.DR (bounded) -> al = LSR
wait_dr:
        push ecx
        mov ecx, 100000
.loop:
        INB LSR
        test al, 0x01
        jnz .done
        dec ecx
        jnz .loop
.done:
        pop ecx
        ret

section .rodata
irq_line:       db T_NAME, ": this line was sent by the IRQ4 handler, one byte per THRE interrupt", 13, 10, 0
irq_line_len    equ $ - irq_line - 1

section .bss
r_dll:          resb 1
r_dlm:          resb 1
r_lcr:          resb 1
r_msr_loop0:    resb 1
r_msr_loop1:    resb 1
r_lsr_dr:       resb 1
r_rbr:          resb 1
r_iir_fifo:     resb 1
r_lsr_oe:       resb 1
r_lsr_oe2:      resb 1
r_lsr_empty:    resb 1
r_iir_rda:      resb 1
r_iir_thre:     resb 1
r_iir_none:     resb 1
                alignb 4
r_fifo:         resb 16
tx_next:        resd 1
tx_done:        resd 1
bad_iir:        resd 1

T_END
