; t_pit.asm -- 8254 PIT test guest (Multiboot v1 ELF32 kernel; frame in t_common.asm).
;
; Checks, in order (the exit status is the number of the failing check):
;   1-2   counter 0 in mode 2 at ~1 kHz: IRQ0 through the 8259 counted over a
;         50 ms interval timed by counter 2 (mode 0, gate via port 0x61, OUT
;         read through port 0x61 bit 5) -- independent of the RTC: 20-80 IRQs
;         (exactly 50 in vmm; QEMU coalesces periods missed while its host is busy)
;   3-5   read-back command (0xC2): status byte of counter 0 shows RW=3,
;         mode 2, binary; the latched count is within 1..1193
;   6-9   counter 0 in mode 0 (one-shot): OUT low after the count is written
;         (read-back status), exactly one IRQ0 when it expires, OUT high after,
;         no further IRQ0 during the next 2 ms
;   10-11 counter latch command: a second latch before the first is read is
;         ignored, so the value read is the old one; a fresh latch after ~2 ms
;         is 600-30000 counts lower
;   12-15 TSC calibration as Linux's pit_calibrate_tsc does it: counter 2 mode
;         0, gate high and speaker off via port 0x61, spin until OUT (bit 5)
;         rises; OUT read low first, the loop ran, the TSC advanced by an
;         amount that means a 10 MHz-100 GHz clock over 2 ms
;   16    read-back status of counter 2 programmed in BCD shows the BCD bit
;
; Hardware: PIT 0x40-0x43, port 0x61, PIC, COM1, debug exit 0x501.

%define T_NAME "t_pit"
%include "t_common.asm"

section .text
guest_main:
        ; ---- 1-2: IRQ0 at 1 kHz counted over a 50 ms counter-2 interval --------
        mov eax, 1193                   ; 1193182 / 1193 = 1000.15 Hz
        call pit0_rate
        xor ecx, ecx
        call irq_unmask
        mov edx, 1
        call wait_irqs                  ; in phase with the ticks
        in al, PORT_B
        and al, 0xFC                    ; counter 2 gate low, speaker off
        out PORT_B, al
        mov al, 0xB0                    ; counter 2, LSB then MSB, mode 0, binary
        out PIT_CMD, al
        mov ax, 59659                   ; 50 ms
        out PIT_CH2, al
        mov al, ah
        out PIT_CH2, al
        mov ebx, [irq_count]
        in al, PORT_B
        or al, 0x01                     ; gate high: counting starts
        out PORT_B, al
        mov ecx, 100000
.wait50:
        sti
        hlt                             ; woken by every IRQ0
        cli
        in al, PORT_B
        test al, 0x20                   ; counter 2 OUT
        jnz .done50
        dec ecx
        jnz .wait50
        FAIL 1, "counter 2 OUT never rose (50 ms one-shot)"
.done50:
        mov eax, [irq_count]
        sub eax, ebx
        cmp eax, 20
        CHECK ae, 1, "IRQ0 at 1 kHz: at least 20 interrupts in a 50 ms counter-2 interval"
        cmp eax, 80
        CHECK be, 2, "IRQ0 at 1 kHz: at most 80 interrupts in a 50 ms counter-2 interval"

        ; ---- 3-5: read-back command on counter 0 (mode 2) -------------------------
        mov al, 0xC2                    ; read-back: latch count and status of counter 0
        out PIT_CMD, al
        in al, PIT_CH0                  ; status first
        movzx ebx, al
        in al, PIT_CH0
        mov cl, al
        in al, PIT_CH0
        mov ch, al
        movzx ecx, cx
        mov eax, ebx
        and eax, 0x3F
        cmp eax, 0x34
        CHECK e, 3, "read-back status of counter 0: LSB/MSB, mode 2, binary"
        cmp ecx, 1
        CHECK ae, 4, "read-back count of counter 0 is at least 1"
        cmp ecx, 1193
        CHECK be, 5, "read-back count of counter 0 is at most the divisor 1193"

        ; ---- 6-9: counter 0 in mode 0 (interrupt on terminal count) ---------------
        mov edx, 1
        xor ecx, ecx
        call wait_irqs                  ; just after a tick: ~1 ms before the next edge
        mov al, 0x30                    ; counter 0, LSB then MSB, mode 0
        out PIT_CMD, al
        mov ax, 2386                    ; 2 ms
        out PIT_CH0, al
        mov al, ah
        out PIT_CH0, al
        mov al, 0x0C                    ; OCW3 poll: take any IRQ0 edge latched
        out PIC1_CMD, al                ; before the reprogramming, so that only
        in al, PIC1_CMD                 ; the one-shot's edge can interrupt
        test al, 0x80
        jz .no_stale
        mov al, EOI
        out PIC1_CMD, al
.no_stale:
        mov ebx, [irq_count]
        mov al, 0xE2                    ; read-back: status only, counter 0
        out PIT_CMD, al
        in al, PIT_CH0
        test al, 0x80
        CHECK z, 6, "mode 0: OUT is low while the count runs"
        mov edx, 1
        xor ecx, ecx
        call wait_irqs                  ; the one-shot's interrupt
        mov eax, [irq_count]
        sub eax, ebx
        cmp eax, 1
        CHECK e, 7, "mode 0: the terminal count raised IRQ0"
        mov al, 0xE2
        out PIT_CMD, al
        in al, PIT_CH0
        test al, 0x80
        CHECK nz, 8, "mode 0: OUT is high after the terminal count"
        mov eax, 2386                   ; 2 ms on counter 2, polled with interrupts on
        call ch2_oneshot_poll
        mov eax, [irq_count]
        sub eax, ebx
        cmp eax, 1
        CHECK e, 9, "mode 0: no further IRQ0 in the next 2 ms"

        ; ---- 10-11: counter latch command on counter 2 -----------------------------
        mov eax, 1193
        call pit0_rate                  ; ticks again, for waiting
        in al, PORT_B
        or al, 0x01                     ; gate high
        and al, 0xFD                    ; speaker off
        out PORT_B, al
        mov al, 0xB4                    ; counter 2, LSB then MSB, mode 2
        out PIT_CMD, al
        xor al, al                      ; count 0 = 65536 (55 ms)
        out PIT_CH2, al
        out PIT_CH2, al
        mov edx, 1
        xor ecx, ecx
        call wait_irqs
        mov al, 0x80                    ; latch counter 2 ...
        out PIT_CMD, al
        mov edx, 2
        xor ecx, ecx
        call wait_irqs                  ; ... ~2 ms pass ...
        mov al, 0x80                    ; ... a second latch is ignored
        out PIT_CMD, al
        call read_ch2
        mov esi, eax                    ; the first latched value
        mov al, 0x80
        out PIT_CMD, al
        call read_ch2
        mov edi, eax                    ; a fresh one
        mov eax, esi
        sub eax, edi
        and eax, 0xFFFF                 ; counts elapsed (mod 65536)
        cmp eax, 600
        CHECK ae, 10, "latch: a second latch before reading is ignored (old value kept)"
        cmp eax, 30000
        CHECK be, 11, "latch: ~2 ms between the latches is 600-30000 counts"

        ; ---- 12-15: TSC calibration loop on counter 2 ------------------------------
        in al, PORT_B
        and al, 0xFD                    ; speaker off
        or al, 0x01                     ; gate high
        out PORT_B, al
        mov al, 0xB0                    ; counter 2, LSB then MSB, mode 0, binary
        out PIT_CMD, al
        mov ax, 2386                    ; 2 ms
        out PIT_CH2, al
        mov al, ah
        out PIT_CH2, al
        in al, PORT_B
        mov [first_61], al
        rdtsc
        mov [tsc0], eax
        mov [tsc0 + 4], edx
        xor ecx, ecx
.spin:
        inc ecx
        cmp ecx, 50000000
        ja .spun
        in al, PORT_B
        test al, 0x20
        jz .spin
.spun:
        rdtsc
        sub eax, [tsc0]
        sbb edx, [tsc0 + 4]
        mov ebx, eax
        mov al, [first_61]
        test al, 0x20
        CHECK z, 12, "calibration: counter 2 OUT reads low right after the count is written"
        cmp ecx, 50000000
        CHECK b, 13, "calibration: counter 2 OUT rose (port 0x61 bit 5)"
        cmp ecx, 2
        CHECK ae, 14, "calibration: the spin loop ran before OUT rose"
        mov eax, ebx
        test edx, edx
        jnz .tsc_bad
        cmp eax, 20000                  ; 10 MHz * 2 ms
        jb .tsc_bad
        cmp eax, 200000000              ; 100 GHz * 2 ms
        ja .tsc_bad
        cmp eax, eax
        jmp .tsc_check
.tsc_bad:
        test esp, esp                   ; ZF = 0
.tsc_check:
        CHECK e, 15, "calibration: the TSC advanced by 20000-200000000 in 2 ms"

        ; ---- 16: BCD bit in the read-back status ----------------------------------
        mov al, 0xB1                    ; counter 2, LSB then MSB, mode 0, BCD
        out PIT_CMD, al
        xor al, al
        out PIT_CH2, al
        mov al, 0x10                    ; 1000 (BCD)
        out PIT_CH2, al
        mov al, 0xE8                    ; read-back: status only, counter 2
        out PIT_CMD, al
        in al, PIT_CH2
        and al, 0x3F
        cmp al, 0x31
        CHECK e, 16, "read-back status of counter 2: LSB/MSB, mode 0, BCD"

        in al, PORT_B
        and al, 0xFC                    ; gate and speaker off
        out PORT_B, al
        xor ecx, ecx
        call irq_mask
        ret

; eax = count: run counter 2 once in mode 0 and poll port 0x61 until its OUT
; rises (interrupts on while polling).
ch2_oneshot_poll:
        push eax
        in al, PORT_B
        and al, 0xFD
        or al, 0x01
        out PORT_B, al
        mov al, 0xB0
        out PIT_CMD, al
        pop eax
        out PIT_CH2, al
        mov al, ah
        out PIT_CH2, al
        mov ecx, 2000000
        sti
.poll:
        in al, PORT_B
        test al, 0x20
        jnz .done
        push ecx
        mov ecx, 40                     ; a short pause between polls (fewer port reads)
.pause:
        dec ecx
        jnz .pause
        pop ecx
        dec ecx
        jnz .poll
        cli
        FAIL 97, "counter 2 OUT never rose"
.done:
        cli
        ret

; -> eax = counter 2 read as LSB then MSB
read_ch2:
        in al, PIT_CH2
        mov ah, al
        in al, PIT_CH2
        xchg al, ah
        movzx eax, ax
        ret

section .bss
tsc0:           resd 2
first_61:       resb 4

T_END
