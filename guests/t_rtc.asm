; t_rtc.asm -- MC146818 RTC/CMOS test guest (Multiboot v1 ELF32 kernel; frame in t_common.asm).
;
; The run must start at 2026-01-01 00:00:00 (vmm's default; QEMU:
; -rtc base=2026-01-01T00:00:00,clock=vm).  Checks (exit status = number):
;   1-9   time in BCD: register B says 24-hour BCD; year 26, month 01, day 01,
;         century 20, 00:00, seconds below 5, day of week 5 (Thursday, Sunday = 1)
;   10-14 binary mode (B.DM = 1): year 26, month 1, day 1, hours 0, seconds < 60
;   15-16 12-hour mode: midnight reads 12 (binary 0x0C, BCD 0x12), PM bit clear
;   17    register D reads 0x80 (valid RAM and time)
;   18-19 CMOS RAM byte 0x40 keeps what is written
;   20    setting the time with B.SET: a year written while SET = 1 is what the
;         clock shows once SET is cleared
;   21-23 periodic interrupt at 1024 Hz (A = 0x26, B.PIE) on IRQ8 through the
;         cascade, counted against 100 PIT ticks at 1 kHz: 80-125 interrupts;
;         the handler's register C reads showed IRQF and PF
;   24    register A reads back the rate and divider written
;   25-26 register C clearing: with IRQ8 masked at the PIC and a 16 Hz rate,
;         C shows IRQF|PF after 80 ms, and a second read shows them cleared
;   27    rate 0 with PIE set gives no interrupt over 10 PIT ticks
;
; Hardware: CMOS 0x70/0x71, PIT 0x40/0x43, PIC (IRQ0, IRQ2 cascade, IRQ8), COM1, 0x501.

%define T_NAME "t_rtc"
%include "t_common.asm"

REG_A equ 0x0A
REG_B equ 0x0B
REG_C equ 0x0C
REG_D equ 0x0D

; CMOS_READ reg -> al
%macro CMOS_READ 1
        mov al, %1
        out CMOS_INDEX, al
        in al, CMOS_DATA
%endmacro

; CMOS_WRITE reg, value (uses al, ah)
%macro CMOS_WRITE 2
        mov ah, %2
        mov al, %1
        out CMOS_INDEX, al
        mov al, ah
        out CMOS_DATA, al
%endmacro

section .text
guest_main:
        ; ---- 1-9: the time in BCD -------------------------------------------------
        call wait_not_uip
        CMOS_READ 0x00
        mov [t_sec], al
        CMOS_READ 0x02
        mov [t_min], al
        CMOS_READ 0x04
        mov [t_hour], al
        CMOS_READ 0x06
        mov [t_dow], al
        CMOS_READ 0x07
        mov [t_day], al
        CMOS_READ 0x08
        mov [t_month], al
        CMOS_READ 0x09
        mov [t_year], al
        CMOS_READ 0x32
        mov [t_century], al
        CMOS_READ REG_B
        movzx eax, al
        and eax, 0x06
        cmp eax, 0x02
        CHECK e, 1, "register B: 24-hour mode, BCD"
        movzx eax, byte [t_year]
        cmp eax, 0x26
        CHECK e, 2, "BCD year is 26"
        movzx eax, byte [t_month]
        cmp eax, 0x01
        CHECK e, 3, "BCD month is 01"
        movzx eax, byte [t_day]
        cmp eax, 0x01
        CHECK e, 4, "BCD day is 01"
        movzx eax, byte [t_century]
        cmp eax, 0x20
        CHECK e, 5, "BCD century (CMOS 0x32) is 20"
        movzx eax, byte [t_hour]
        cmp eax, 0x00
        CHECK e, 6, "BCD hours are 00"
        movzx eax, byte [t_min]
        cmp eax, 0x00
        CHECK e, 7, "BCD minutes are 00"
        movzx eax, byte [t_sec]
        cmp eax, 0x05
        CHECK b, 8, "BCD seconds are below 05"
        movzx eax, byte [t_dow]
        cmp eax, 5
        CHECK e, 9, "day of week is 5 (2026-01-01 is a Thursday)"

        ; ---- 10-14: binary mode ------------------------------------------------------
        CMOS_WRITE REG_B, 0x06          ; 24-hour, binary
        call wait_not_uip
        CMOS_READ 0x09
        movzx eax, al
        cmp eax, 26
        CHECK e, 10, "binary year is 26"
        CMOS_READ 0x08
        movzx eax, al
        cmp eax, 1
        CHECK e, 11, "binary month is 1"
        CMOS_READ 0x07
        movzx eax, al
        cmp eax, 1
        CHECK e, 12, "binary day is 1"
        CMOS_READ 0x04
        movzx eax, al
        cmp eax, 0
        CHECK e, 13, "binary hours are 0"
        CMOS_READ 0x00
        movzx eax, al
        cmp eax, 60
        CHECK b, 14, "binary seconds are below 60"

        ; ---- 15-16: 12-hour mode ------------------------------------------------------
        CMOS_WRITE REG_B, 0x04          ; 12-hour, binary
        call wait_not_uip
        CMOS_READ 0x04
        movzx eax, al
        cmp eax, 0x0C
        CHECK e, 15, "12-hour binary: midnight reads 12, PM clear"
        CMOS_WRITE REG_B, 0x00          ; 12-hour, BCD
        call wait_not_uip
        CMOS_READ 0x04
        movzx eax, al
        cmp eax, 0x12
        CHECK e, 16, "12-hour BCD: midnight reads 0x12, PM clear"
        CMOS_WRITE REG_B, 0x02          ; back to 24-hour BCD

        ; ---- 17: register D --------------------------------------------------------------
        CMOS_READ REG_D
        movzx eax, al
        cmp eax, 0x80
        CHECK e, 17, "register D reads 0x80 (VRT)"

        ; ---- 18-19: CMOS RAM ---------------------------------------------------------------
        CMOS_WRITE 0x40, 0xA5
        CMOS_READ 0x40
        movzx eax, al
        cmp eax, 0xA5
        CHECK e, 18, "CMOS RAM byte 0x40 keeps 0xA5"
        CMOS_WRITE 0x40, 0x5A
        CMOS_READ 0x40
        movzx eax, al
        cmp eax, 0x5A
        CHECK e, 19, "CMOS RAM byte 0x40 keeps 0x5A"

        ; ---- 20: setting the time with SET ----------------------------------------------------
        call wait_not_uip
        CMOS_WRITE REG_B, 0x82          ; SET, 24-hour BCD
        CMOS_WRITE 0x09, 0x27
        CMOS_WRITE REG_B, 0x02          ; run again
        CMOS_READ 0x09
        movzx eax, al
        cmp eax, 0x27
        CHECK e, 20, "a year set while B.SET = 1 shows once SET is cleared"
        call wait_not_uip
        CMOS_WRITE REG_B, 0x82
        CMOS_WRITE 0x09, 0x26
        CMOS_WRITE REG_B, 0x02

        ; ---- 21-23: periodic interrupt against the PIT ----------------------------------------
        mov eax, 1193                   ; IRQ0 at 1 kHz
        call pit0_rate
        IRQ_HANDLER 8, rtc_irq
        xor ecx, ecx
        call irq_unmask                 ; IRQ0
        mov ecx, 8
        call irq_unmask                 ; IRQ8 (IRQ2, the cascade, is open)
        CMOS_WRITE REG_A, 0x26          ; 32.768 kHz time base, rate 6: 1024 Hz
        CMOS_READ REG_C                 ; nothing stale
        mov edx, 1
        xor ecx, ecx
        call wait_irqs
        mov ebx, [irq_count + 4 * 8]
        CMOS_WRITE REG_B, 0x42          ; PIE, 24-hour BCD
        mov edx, 100
        xor ecx, ecx
        call wait_irqs                  ; 100 ms by the PIT
        CMOS_WRITE REG_B, 0x02          ; PIE off
        CMOS_READ REG_C
        mov eax, [irq_count + 4 * 8]
        sub eax, ebx
        cmp eax, 80
        CHECK ae, 21, "periodic 1024 Hz: at least 80 IRQ8 in 100 PIT ticks"
        cmp eax, 125
        CHECK be, 22, "periodic 1024 Hz: at most 125 IRQ8 in 100 PIT ticks"
        movzx eax, byte [c_seen]
        and eax, 0xC0
        cmp eax, 0xC0
        CHECK e, 23, "register C read in the IRQ8 handler showed IRQF and PF"

        ; ---- 24: register A read-back -------------------------------------------------------
        CMOS_READ REG_A
        movzx eax, al
        and eax, 0x7F
        cmp eax, 0x26
        CHECK e, 24, "register A reads back divider 010 and rate 6"

        ; ---- 25-26: register C clearing -------------------------------------------------------
        mov ecx, 8
        call irq_mask                   ; IRQ8 masked at the PIC
        CMOS_WRITE REG_A, 0x2C          ; 16 Hz
        CMOS_READ REG_C
        CMOS_WRITE REG_B, 0x42          ; PIE
        mov edx, 80
        xor ecx, ecx
        call wait_irqs                  ; 80 ms: at least one 62.5 ms period
        CMOS_READ REG_C
        movzx esi, al
        CMOS_READ REG_C
        movzx ebx, al
        mov eax, esi
        and eax, 0xC0
        cmp eax, 0xC0
        CHECK e, 25, "register C shows IRQF and PF after a period (IRQ8 masked)"
        and ebx, 0xC0
        cmp ebx, 0
        CHECK e, 26, "reading register C cleared IRQF and PF"
        CMOS_WRITE REG_B, 0x02

        ; ---- 27: rate 0 gives no periodic interrupt -------------------------------------------
        CMOS_WRITE REG_A, 0x20          ; time base on, rate 0: no periodic interrupt
        CMOS_READ REG_C
        mov ecx, 8
        call irq_unmask                 ; the edge latched in IRR while IRQ8 was
        sti                             ; masked (checks 25-26) is delivered now
        nop
        cli
        mov ebx, [irq_count + 4 * 8]
        CMOS_WRITE REG_B, 0x42
        mov edx, 10
        xor ecx, ecx
        call wait_irqs
        CMOS_WRITE REG_B, 0x02
        CMOS_READ REG_C
        mov eax, [irq_count + 4 * 8]
        sub eax, ebx
        cmp eax, 0
        CHECK e, 27, "rate 0 with PIE set: no IRQ8 in 10 PIT ticks"

        CMOS_WRITE REG_A, 0x26
        mov ecx, 8
        call irq_mask
        xor ecx, ecx
        call irq_mask
        ret

; IRQ8: read register C (which releases the line), note its flags, EOI slave then master.
rtc_irq:
        CMOS_READ REG_C
        or [c_seen], al
        mov al, EOI
        out PIC2_CMD, al
        out PIC1_CMD, al
        ret

; Wait until register A's UIP bit is clear (bounded).
wait_not_uip:
        push ecx
        mov ecx, 1000000
.loop:
        CMOS_READ REG_A
        test al, 0x80
        jz .done
        dec ecx
        jnz .loop
.done:
        pop ecx
        ret

section .bss
t_sec:          resb 1
t_min:          resb 1
t_hour:         resb 1
t_dow:          resb 1
t_day:          resb 1
t_month:        resb 1
t_year:         resb 1
t_century:      resb 1
c_seen:         resb 4

T_END
