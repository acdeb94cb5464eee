; t_pic.asm -- 8259A pair test guest (Multiboot v1 ELF32 kernel; frame in t_common.asm).
;
; IRQ0 comes from the PIT at 1 kHz, IRQ8 from the RTC's periodic interrupt at
; 1024 Hz (through the slave and the master's IR2).  Checks (exit status):
;   1-3   masking, with the UART's THR-empty interrupt on IRQ4 as a source the
;         guest controls (no timer can add edges): a masked request is latched
;         in IRR (OCW3 read IRR) but not delivered; unmasking delivers it
;         exactly once (the handler clears the source by reading the IIR)
;   4-5   non-specific EOI: ISR bit 0 set in the handler (OCW3 read ISR), clear after
;   6-7   specific EOI 0x60 clears it; a specific EOI for another level (0x61) does not
;   8-9   fully nested: while IRQ0 is in service a new IRQ0 waits in IRR; EOI
;         from the main program lets it in (at least once: under QEMU a host
;         stall can replay PIT periods as a burst of edges)
;   10-12 poll command (OCW3 0x0C): returns 0x80 | 0 for a pending IRQ0 and
;         sets its ISR bit; with nothing unmasked pending, bit 7 is 0
;   13-16 priority and cascade: IRQ0 and IRQ8 both pending -> IRQ0 first; in the
;         IRQ8 handler the master's ISR shows IR2 and the slave's ISR shows IR0;
;         both ISRs are clear after the handlers' EOIs
;   17    specific rotation (OCW2 set priority 0xC1: IR2 highest) -> IRQ8 first
;   18-19 masking IR2 on the master holds IRQ8 back; unmasking lets it in
;   20    special mask mode: with IRQ0 in service and masked, IRQ8 is delivered
;         (the master's IMR is rewritten after the OCW3: QEMU 7.2 re-evaluates
;         its INTR output on IMR writes but not when OCW3 changes the mode)
;   21-22 automatic EOI (ICW4 AEOI): ISR stays clear in the handler, IRQ0 keeps coming
;   23-24 spurious IRQ7 protocol: the IRQ7 handler reads ISR, finds bit 7 clear,
;         counts a spurious interrupt and sends no EOI, so the IRQ0 that really
;         is in service stays in service (a spurious IRQ7 is raised here by
;         INT 0x27: no emulator can make the request vanish between INTR and INTA)
;   25    ELCR 0x4D0: IRQ0-2 bits are reserved (0xFF reads back as 0xF8)
;
;
; Hardware: PIC 0x20/0x21/0xA0/0xA1/0x4D0, PIT 0x40/0x43, CMOS 0x70/0x71, COM1
; (also IRQ4), debug exit 0x501.

%define T_NAME "t_pic"
%include "t_common.asm"

OCW3_IRR  equ 0x0A
OCW3_ISR  equ 0x0B
OCW3_POLL equ 0x0C

MODE_NS_EOI  equ 0                      ; IRQ0 handler: non-specific EOI
MODE_SP_EOI  equ 1                      ; specific EOI 0x60
MODE_NO_EOI  equ 2                      ; leave it in service
MODE_BAD_EOI equ 3                      ; specific EOI for level 1 (wrong one)

; MASTER_REG ocw3 -> al / SLAVE_REG ocw3 -> al
%macro MASTER_REG 1
        mov al, %1
        out PIC1_CMD, al
        in al, PIC1_CMD
%endmacro
%macro SLAVE_REG 1
        mov al, %1
        out PIC2_CMD, al
        in al, PIC2_CMD
%endmacro

; Let pending interrupts in for a few instructions.
%macro WINDOW 0
        sti
        nop
        nop
        nop
        nop
        cli
%endmacro

section .text
guest_main:
        IRQ_HANDLER 0, irq0_handler
        IRQ_HANDLER 8, irq8_handler
        IRQ_HANDLER 7, irq7_handler
        IRQ_HANDLER 4, irq4_handler

        ; ---- 1-3: masking (IRQ4 from the UART; nothing printed until it is quiet) -------
        call drain_tx
        mov dx, COM1 + 4
        mov al, 0x0B                    ; DTR, RTS, OUT2 (IRQ enable on a PC)
        out dx, al
        mov dx, COM1 + 1
        mov al, 0x02                    ; IER: THR empty -> IRQ4 now (IRQ4 masked)
        out dx, al
        mov al, 0x10
        call wait_master_irr            ; latched although masked
        MASTER_REG OCW3_IRR
        mov [irr_masked], al
        mov ebx, [irq_count + 4 * 4]
        WINDOW
        mov eax, [irq_count + 4 * 4]
        sub eax, ebx
        mov [n_masked], eax
        mov ecx, 4
        call irq_unmask
        WINDOW
        mov ecx, 4
        call irq_mask
        mov eax, [irq_count + 4 * 4]
        sub eax, ebx
        mov [n_unmasked], eax
        mov dx, COM1 + 1
        xor al, al                      ; IER: off
        out dx, al
        mov dx, COM1 + 4
        mov al, 0x03
        out dx, al
        movzx eax, byte [irr_masked]
        test eax, 0x10
        CHECK nz, 1, "masked IRQ4 is latched in IRR"
        mov eax, [n_masked]
        cmp eax, 0
        CHECK e, 2, "masked IRQ4 is not delivered"
        mov eax, [n_unmasked]
        cmp eax, 1
        CHECK e, 3, "unmasking delivers the latched IRQ4 exactly once"

        mov eax, 1193
        call pit0_rate                  ; IRQ0 at 1 kHz from here on
        mov dword [irq0_mode], MODE_NS_EOI
        mov al, 1
        call wait_master_irr
        xor ecx, ecx
        call irq_unmask
        WINDOW                          ; the first IRQ0, for checks 4-5

        ; ---- 4-5: non-specific EOI ------------------------------------------------------------
        movzx eax, byte [isr_in]
        test eax, 1
        CHECK nz, 4, "ISR bit 0 is set in the IRQ0 handler"
        movzx eax, byte [isr_out]
        test eax, 1
        CHECK z, 5, "non-specific EOI (0x20) clears ISR bit 0"

        ; ---- 6-7: specific EOI ------------------------------------------------------------------
        mov dword [irq0_mode], MODE_SP_EOI
        mov edx, 1
        xor ecx, ecx
        call wait_irqs
        movzx eax, byte [isr_in]
        movzx ebx, byte [isr_out]
        and eax, 1
        and ebx, 1
        cmp eax, 1
        jne .sp_bad
        cmp ebx, 0
.sp_bad:
        CHECK e, 6, "specific EOI 0x60 clears ISR bit 0"
        mov dword [irq0_mode], MODE_BAD_EOI
        mov edx, 1
        xor ecx, ecx
        call wait_irqs
        movzx eax, byte [isr_out]
        test eax, 1
        CHECK nz, 7, "specific EOI for level 1 (0x61) leaves ISR bit 0 set"

        ; ---- 8-9: fully nested: IRQ0 in service blocks the next IRQ0 ------------------------------
        mov ebx, [irq_count]            ; IRQ0 is still in service from check 7
        mov al, 1
        call wait_master_irr            ; the next edge arrives ...
        WINDOW
        mov eax, [irq_count]
        sub eax, ebx
        CHECK z, 8, "a new IRQ0 is held while IRQ0 is in service"
        mov dword [irq0_mode], MODE_NS_EOI
        mov al, 0x60                    ; EOI from the main program
        out PIC1_CMD, al
        WINDOW
        mov eax, [irq_count]
        sub eax, ebx
        cmp eax, 1
        CHECK ae, 9, "after the EOI the held IRQ0 is delivered"

        ; ---- 10-12: poll command ------------------------------------------------------------------
        mov al, 1
        call wait_master_irr
        mov al, OCW3_POLL
        out PIC1_CMD, al
        in al, PIC1_CMD
        movzx eax, al
        and eax, 0x87
        cmp eax, 0x80
        CHECK e, 10, "poll returns 0x80 | level 0 for a pending IRQ0"
        MASTER_REG OCW3_ISR
        movzx eax, al
        test eax, 1
        CHECK nz, 11, "poll acknowledged IRQ0 (ISR bit 0 set)"
        mov al, 0x60
        out PIC1_CMD, al
        xor ecx, ecx
        call irq_mask
        mov al, 1
        call wait_master_irr            ; IRQ0 requested but masked
        mov al, OCW3_POLL
        out PIC1_CMD, al
        in al, PIC1_CMD
        movzx eax, al
        test eax, 0x80
        CHECK z, 12, "poll with only masked requests: bit 7 clear"
        xor ecx, ecx
        call irq_unmask
        WINDOW                          ; let the latched one in

        ; ---- 13-16: priority and the cascade ---------------------------------------------------------
        mov al, 0x0A
        out CMOS_INDEX, al
        mov al, 0x26                    ; RTC periodic 1024 Hz
        out CMOS_DATA, al
        mov al, 0x0C
        out CMOS_INDEX, al
        in al, CMOS_DATA
        mov al, 0x0B
        out CMOS_INDEX, al
        mov al, 0x42                    ; PIE, 24-hour BCD
        out CMOS_DATA, al
        mov ecx, 8
        call irq_unmask
        call both_pending_order
        movzx eax, byte [order + 0]
        movzx ebx, byte [order + 1]
        cmp eax, 0
        jne .prio_bad
        cmp ebx, 8
.prio_bad:
        CHECK e, 13, "IRQ0 and IRQ8 pending: IRQ0 (higher priority) first, then IRQ8"
        movzx eax, byte [m_isr_in8]
        test eax, 0x04
        CHECK nz, 14, "in the IRQ8 handler the master's ISR shows IR2 (cascade)"
        movzx eax, byte [s_isr_in8]
        test eax, 0x01
        CHECK nz, 15, "in the IRQ8 handler the slave's ISR shows IR0"
        MASTER_REG OCW3_ISR
        movzx ebx, al
        SLAVE_REG OCW3_ISR
        movzx eax, al
        or eax, ebx
        CHECK z, 16, "both ISRs are clear after the handlers' EOIs"

        ; ---- 17: specific rotation -------------------------------------------------------------------
        mov al, 0xC1                    ; set priority: IR1 lowest, so IR2 highest
        out PIC1_CMD, al
        call both_pending_order
        mov al, 0xC7                    ; back to IR7 lowest
        out PIC1_CMD, al
        movzx eax, byte [order + 0]
        movzx ebx, byte [order + 1]
        cmp eax, 8
        jne .rot_bad
        cmp ebx, 0
.rot_bad:
        CHECK e, 17, "after OCW2 set priority 0xC1, IRQ8 (on IR2) comes before IRQ0"

        ; ---- 18-19: masking the cascade input ---------------------------------------------------------
        xor ecx, ecx
        call irq_mask
        mov ecx, 2
        call irq_mask
        mov ebx, [irq_count + 4 * 8]
        mov al, 1
        call wait_slave_irr
        WINDOW
        mov eax, [irq_count + 4 * 8]
        sub eax, ebx
        CHECK z, 18, "IR2 masked on the master: IRQ8 is held"
        mov ecx, 2
        call irq_unmask
        WINDOW
        mov eax, [irq_count + 4 * 8]
        sub eax, ebx
        cmp eax, 1
        CHECK ae, 19, "IR2 unmasked: IRQ8 is delivered"

        ; ---- 20: special mask mode ---------------------------------------------------------------------
        xor ecx, ecx
        call irq_unmask
        mov dword [irq0_mode], MODE_NO_EOI
        mov ecx, 8
        call irq_mask
        mov edx, 1
        xor ecx, ecx
        call wait_irqs                  ; IRQ0 now in service, no EOI
        xor ecx, ecx
        call irq_mask
        mov ecx, 8
        call irq_unmask
        mov ebx, [irq_count + 4 * 8]
        mov al, 1
        call wait_slave_irr             ; IRQ8 requested, held by IRQ0 in service
        mov al, 0x68                    ; OCW3: set special mask mode
        out PIC1_CMD, al
        in al, PIC1_DATA                ; rewrite the IMR unchanged (see above)
        out PIC1_DATA, al
        WINDOW
        mov al, 0x48                    ; OCW3: reset special mask mode
        out PIC1_CMD, al
        mov al, 0x60                    ; EOI for IRQ0
        out PIC1_CMD, al
        mov eax, [irq_count + 4 * 8]
        sub eax, ebx
        cmp eax, 1
        CHECK ae, 20, "special mask mode: IRQ8 delivered while the masked IRQ0 is in service"
        mov ecx, 8
        call irq_mask
        mov al, 0x0B
        out CMOS_INDEX, al
        mov al, 0x02                    ; RTC periodic interrupt off
        out CMOS_DATA, al
        mov al, 0x0C
        out CMOS_INDEX, al
        in al, CMOS_DATA

        ; ---- 21-22: automatic EOI ----------------------------------------------------------------------
        mov al, 0x11                    ; ICW1: edge, cascade, ICW4 needed
        out PIC1_CMD, al
        mov al, IRQ_BASE                ; ICW2
        out PIC1_DATA, al
        mov al, 0x04                    ; ICW3: slave on IR2
        out PIC1_DATA, al
        mov al, 0x03                    ; ICW4: 8086, AEOI
        out PIC1_DATA, al
        mov al, 0xFA                    ; OCW1: only IR0 and IR2 open
        out PIC1_DATA, al
        mov dword [irq0_mode], MODE_NO_EOI
        mov byte [isr_in], 0xFF
        mov ebx, [irq_count]
        mov edx, 2
        xor ecx, ecx
        call wait_irqs
        movzx eax, byte [isr_in]
        test eax, 1
        CHECK z, 21, "AEOI: ISR bit 0 is already clear in the IRQ0 handler"
        mov eax, [irq_count]
        sub eax, ebx
        cmp eax, 2
        CHECK ae, 22, "AEOI: IRQ0 keeps coming without any EOI"
        call pic_init                   ; back to normal EOI mode, all masked
        xor ecx, ecx
        call irq_unmask

        ; ---- 23-24: spurious IRQ7 protocol ---------------------------------------------------------------
        mov al, 1
        call wait_master_irr
        mov al, OCW3_POLL               ; IRQ0 in service through the poll command
        out PIC1_CMD, al
        in al, PIC1_CMD
        int IRQ_BASE + 7                ; a spurious IRQ7 arrives
        mov eax, [spurious]
        cmp eax, 1
        CHECK e, 23, "IRQ7 with ISR bit 7 clear is counted as spurious"
        MASTER_REG OCW3_ISR
        movzx eax, al
        and eax, 0x81
        cmp eax, 0x01
        CHECK e, 24, "the spurious IRQ7 handler sent no EOI: IRQ0 is still in service"
        mov al, 0x60
        out PIC1_CMD, al
        xor ecx, ecx
        call irq_mask
        WINDOW

        ; ---- 25: ELCR -----------------------------------------------------------------------------------
        mov dx, 0x4D0
        in al, dx
        mov bl, al
        mov al, 0xFF
        out dx, al
        in al, dx
        movzx eax, al
        xchg al, bl
        out dx, al                      ; restore
        mov eax, ebx
        and eax, 0xFF
        cmp eax, 0xF8
        CHECK e, 25, "ELCR 0x4D0: IRQ0-2 are edge only (0xFF reads back 0xF8)"
        ret

; Wait (polling, interrupts off) until every bit of al is set in the master's IRR.
wait_master_irr:
        push ecx
        push ebx
        mov bl, al
        mov ecx, 200000
.loop:
        MASTER_REG OCW3_IRR
        and al, bl
        cmp al, bl
        je .done
        call short_pause
        dec ecx
        jnz .loop
        FAIL 96, "timed out waiting for a request in the master's IRR"
.done:
        pop ebx
        pop ecx
        ret

wait_slave_irr:
        push ecx
        push ebx
        mov bl, al
        mov ecx, 200000
.loop:
        SLAVE_REG OCW3_IRR
        and al, bl
        cmp al, bl
        je .done
        call short_pause
        dec ecx
        jnz .loop
        FAIL 95, "timed out waiting for a request in the slave's IRR"
.done:
        pop ebx
        pop ecx
        ret

short_pause:
        push ecx
        mov ecx, 40
.spin:
        dec ecx
        jnz .spin
        pop ecx
        ret

; With IRQ0 and IRQ8 unmasked: wait until both are pending, open a window and
; record the order of the first two handlers in order[0..1].
both_pending_order:
        mov dword [irq0_mode], MODE_NS_EOI
        mov byte [order_len], 0
        mov dword [order], 0xFFFFFFFF
        mov al, 0x01
        call wait_master_irr
        mov al, 0x01
        call wait_slave_irr
        mov al, 0x05                    ; IR0 and the cascade IR2
        call wait_master_irr
        mov byte [order_len], 0
        WINDOW
        ret

; handlers (called from irq_common, interrupts off, ebx = IRQ number)
irq0_handler:
        mov al, 0
        call log_order
        MASTER_REG OCW3_ISR
        mov [isr_in], al
        mov eax, [irq0_mode]
        cmp eax, MODE_NO_EOI
        je .out
        mov al, 0x20
        cmp dword [irq0_mode], MODE_SP_EOI
        jne .not_sp
        mov al, 0x60
.not_sp:
        cmp dword [irq0_mode], MODE_BAD_EOI
        jne .send
        mov al, 0x61
.send:
        out PIC1_CMD, al
.out:
        MASTER_REG OCW3_ISR
        mov [isr_out], al
        ret

irq8_handler:
        mov al, 8
        call log_order
        MASTER_REG OCW3_ISR
        mov [m_isr_in8], al
        SLAVE_REG OCW3_ISR
        mov [s_isr_in8], al
        mov al, 0x0C                    ; RTC register C: release the line
        out CMOS_INDEX, al
        in al, CMOS_DATA
        mov al, 0x60                    ; specific EOIs (right in special mask
        out PIC2_CMD, al                ; mode too): slave IR0, then master IR2
        mov al, 0x62
        out PIC1_CMD, al
        ret

; IRQ4: the UART's THR-empty interrupt; reading the IIR clears it.
irq4_handler:
        mov dx, COM1 + 2
        in al, dx
        mov al, EOI
        out PIC1_CMD, al
        ret

; Wait until the UART has sent everything (LSR.TEMT), bounded.
drain_tx:
        push ecx
        mov ecx, 1000000
.loop:
        mov dx, COM1 + 5
        in al, dx
        test al, 0x40
        jnz .done
        dec ecx
        jnz .loop
.done:
        pop ecx
        ret

irq7_handler:
        MASTER_REG OCW3_ISR
        test al, 0x80
        jnz .real
        inc dword [spurious]            ; spurious: no EOI
        ret
.real:
        mov al, EOI
        out PIC1_CMD, al
        ret

; al = IRQ number: append to order[] (first 4 only)
log_order:
        movzx ecx, byte [order_len]
        cmp ecx, 4
        jae .full
        mov [order + ecx], al
        inc byte [order_len]
.full:
        ret

section .bss
irr_masked:     resd 1
n_masked:       resd 1
n_unmasked:     resd 1
irq0_mode:      resd 1
spurious:       resd 1
order:          resb 4
order_len:      resb 4
isr_in:         resb 1
isr_out:        resb 1
m_isr_in8:      resb 1
s_isr_in8:      resb 1

T_END
