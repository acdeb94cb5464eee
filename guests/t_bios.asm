; t_bios.asm -- BIOS services test guest: a 16-sector (8 KiB) hard-disk image.
;
; Build:  nasm -f bin -o t_bios.img t_bios.asm   (or: python3 guests/build.py)
;
; The BIOS loads sector 0 at 0000:7C00 with DL = the boot drive.  Sector 0
; loads sectors 1-7 (the rest of the code) after itself with INT 13h AH=02
; (CHS) and jumps there, or ends the run with status 4 if the end marker of
; the code is not where it should be.  The code then checks the BIOS services
; below; sectors 8-11 hold signatures ("LBA8 ...", ...) for the disk reads.
; Output goes to COM1 through its ports (not through the BIOS), one
; "t_bios ok: ..." line per check; the run ends through the debug-exit port
; 0x501 with 0, or with the number of the failing check:
;   1     DL = 0x80 (booted from the first hard disk)
;   2-4   INT 13h AH=02 (CHS 0/0/2, 7 sectors): CF clear, AL = 7, the code's
;         end marker is there (4 is checked by sector 0, before any output)
;   5-6   INT 13h AH=41h: EDD present (BX = AA55h), CX bit 0 (packet calls)
;   7-8   INT 13h AH=42h (LBA): one sector at LBA 8, then two at LBA 10-11
;   9     INT 13h AH=02 at CHS 0/0/10: sector LBA 9
;   10    INT 13h AH=02 with sector number 0 fails: CF set, AH = 01h
;   11-12 INT 13h AH=08: CF clear, 63 sectors per track, one hard disk
;   13    INT 13h AH=00 (reset): CF clear
;   14-17 INT 15h E820: every call CF clear with EAX = 'SMAP'; the walk ends with
;         EBX = 0 after 3-32 entries; usable RAM at 0 (>= 512 KiB) and at 1 MiB
;         (>= 15 MiB)
;   18    INT 12h: 639 KiB of base memory
;   19    INT 15h AX=E801h: AX = 15360 (KiB between 1 and 16 MiB)
;   20    INT 15h AX=2402h: A20 reported enabled
;   21-22 INT 1Ah AH=00h: the tick count advances (sti; hlt) by 1-3 ticks per wait
;   23-24 INT 1Ah AH=02h/04h: RTC time 00:00 and date 2026-01-01 (BCD)
;   25-27 INT 10h: AH=02h/03h set and read back the cursor (row 5, column 10);
;         a teletype character (AH=0Eh) moves it to column 11; AH=0Fh: 80 columns
;
; Hardware: BIOS INT 10h/12h/13h/15h/1Ah, COM1 0x3F8, debug exit 0x501.

bits 16
org 0x7C00

COM1            equ 0x3F8
DEBUG_EXIT_PORT equ 0x501
STAGE2          equ 0x7E00
BUF             equ 0x9000
E820_BUF        equ 0xA000

; CHECK cc, id, "text": passes when cc holds (as for jcc)
%macro CHECK 3
        j%1 %%pass
        mov si, %%msg
        mov al, %2
        jmp fail
%%msg:  db %3, 0
%%pass:
        push si
        mov si, %%msg
        call report_ok
        pop si
%endmacro

%macro PRINT 1+
        jmp %%after
%%str:  db %1, 0
%%after:
        push si
        mov si, %%str
        call puts
        pop si
%endmacro

; =============================================================================
; Sector 0 (LBA 0): loaded by the BIOS.
start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7C00
        jmp 0x0000:.flat
.flat:
        cld
        mov [boot_drive], dl
        call serial_init
        mov ax, 0x0207                  ; AH=02 read, AL=7 sectors
        mov cx, 0x0002                  ; cylinder 0, sector 2
        xor dh, dh                      ; head 0
        mov dl, [boot_drive]
        mov bx, STAGE2                  ; ES:BX = 0000:7E00
        int 0x13
        mov [saved_ax], ax
        pushf
        pop word [saved_flags]
        cmp dword [stage2_marker], 0x32474B53 ; "SKG2"
        je stage2
        mov al, 4                       ; the rest of the code is not there
        jmp exit_status

; al = status: print nothing more, end the run
exit_status:
        mov dx, DEBUG_EXIT_PORT
        out dx, al
.park:
        cli
        hlt
        jmp .park

serial_init:
        mov dx, COM1 + 1
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x80
        out dx, al
        mov dx, COM1
        mov al, 1
        out dx, al
        mov dx, COM1 + 1
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x03
        out dx, al
        mov dx, COM1 + 2
        mov al, 0xC7
        out dx, al
        mov dx, COM1 + 4
        mov al, 0x03
        out dx, al
        ret

puts:                                   ; si = NUL-terminated string; keeps every register
        pusha
.next:
        lodsb
        test al, al
        jz .done
        mov ah, al
        mov dx, COM1 + 5
        mov cx, 0xFFFF
.wait:
        in al, dx
        test al, 0x20
        jnz .ready
        loop .wait
.ready:
        mov al, ah
        mov dx, COM1
        out dx, al
        jmp .next
.done:
        popa
        ret

boot_drive:     db 0
saved_ax:       dw 0
saved_flags:    dw 0

        times 510 - ($ - $$) db 0
        dw 0xAA55

; =============================================================================
; Sectors 1-7 (LBA 1-7): loaded at 0000:7E00 by sector 0.
stage2:
        PRINT "t_bios: started", 13, 10
        cmp byte [boot_drive], 0x80
        CHECK e, 1, "booted with DL = 0x80"
        test word [saved_flags], 1
        CHECK z, 2, "INT 13h AH=02 read 7 sectors (CHS 0/0/2): CF clear"
        cmp byte [saved_ax], 7
        CHECK e, 3, "INT 13h AH=02: AL = 7 sectors read"
        cmp ax, ax
        CHECK e, 4, "the loaded sectors end with the stage-2 marker"
        ; ---- 5-6: EDD installation check ----------------------------------------------
        mov ah, 0x41
        mov bx, 0x55AA
        mov dl, [boot_drive]
        int 0x13
        jc .edd_bad
        cmp bx, 0xAA55
.edd_bad:
        CHECK e, 5, "INT 13h AH=41h: EDD present (BX = AA55h, CF clear)"
        test cx, 1
        CHECK nz, 6, "INT 13h AH=41h: packet calls supported (CX bit 0)"

        ; ---- 7-8: LBA reads --------------------------------------------------------------
        mov dword [dap_lba], 8
        mov word [dap_count], 1
        call read_lba
        jc .lba8_bad
        cmp dword [BUF], 0x3841424C     ; "LBA8"
.lba8_bad:
        CHECK e, 7, "INT 13h AH=42h: LBA 8 read"
        mov dword [dap_lba], 10
        mov word [dap_count], 2
        call read_lba
        jc .lba1011_bad
        cmp dword [BUF + 2], 0x20303141 ; "A10 " of "LBA10 "
        jne .lba1011_bad
        cmp dword [BUF + 512 + 2], 0x20313141 ; "A11 " of "LBA11 "
.lba1011_bad:
        CHECK e, 8, "INT 13h AH=42h: two sectors from LBA 10 read"

        ; ---- 9-10: more CHS ----------------------------------------------------------------
        mov ax, 0x0201
        mov cx, 0x000A                  ; sector 10 = LBA 9
        xor dh, dh
        mov dl, [boot_drive]
        mov bx, BUF
        int 0x13
        jc .chs_bad
        cmp dword [BUF], 0x3941424C     ; "LBA9"
.chs_bad:
        CHECK e, 9, "INT 13h AH=02: CHS 0/0/10 is LBA 9"
        mov ax, 0x0201
        mov cx, 0x0000                  ; sector 0 does not exist
        xor dh, dh
        mov dl, [boot_drive]
        mov bx, BUF
        int 0x13
        jnc .bad_sector_ok
        cmp ah, 0x01
.bad_sector_ok:
        CHECK e, 10, "INT 13h AH=02 with sector 0: CF set, AH = 01h"

        ; ---- 11-13: parameters and reset ----------------------------------------------------
        mov ah, 0x08
        mov dl, [boot_drive]
        xor di, di
        int 0x13
        mov [saved_cx], cx
        mov [saved_dx], dx
        jc .params_bad
        mov al, cl
        and al, 0x3F
        cmp al, 63
.params_bad:
        CHECK e, 11, "INT 13h AH=08: CF clear, 63 sectors per track"
        cmp byte [saved_dx], 1
        CHECK e, 12, "INT 13h AH=08: one hard disk (DL = 1)"
        xor ax, ax
        mov dl, [boot_drive]
        int 0x13
        CHECK nc, 13, "INT 13h AH=00 (reset): CF clear"

        ; ---- 14-17: E820 ------------------------------------------------------------------------
        xor ebx, ebx
        mov word [e820_n], 0
        mov byte [e820_flags], 0
.e820_next:
        mov eax, 0xE820
        mov edx, 0x534D4150             ; 'SMAP'
        mov ecx, 20
        mov di, E820_BUF
        mov dword [E820_BUF + 16], 0
        int 0x15
        jc .e820_bad
        cmp eax, 0x534D4150
        jne .e820_bad
        inc word [e820_n]
        cmp dword [E820_BUF + 16], 1    ; usable RAM?
        jne .e820_skip
        cmp dword [E820_BUF + 4], 0     ; below 4 GiB
        jne .e820_skip
        cmp dword [E820_BUF + 12], 0
        jne .e820_big
        mov eax, [E820_BUF]
        test eax, eax
        jnz .e820_not0
        cmp dword [E820_BUF + 8], 0x80000
        jb .e820_skip
        or byte [e820_flags], 1
        jmp .e820_skip
.e820_not0:
        cmp eax, 0x100000
        jne .e820_skip
        cmp dword [E820_BUF + 8], 0xF00000
        jb .e820_skip
.e820_big:
        cmp dword [E820_BUF], 0x100000
        jne .e820_skip
        or byte [e820_flags], 2
.e820_skip:
        cmp word [e820_n], 64
        jae .e820_done
        test ebx, ebx
        jnz .e820_next
        jmp .e820_done
.e820_bad:
        xor ax, ax
        inc ax                          ; ZF = 0
        jmp .e820_check
.e820_done:
        cmp ax, ax                      ; ZF = 1
.e820_check:
        CHECK e, 14, "INT 15h E820: every call CF clear, EAX = 'SMAP', walk ends with EBX = 0"
        cmp word [e820_n], 3
        jb .e820_count
        cmp word [e820_n], 32
        ja .e820_count
        cmp ax, ax
.e820_count:
        CHECK e, 15, "INT 15h E820: 3 to 32 entries"
        test byte [e820_flags], 1
        CHECK nz, 16, "INT 15h E820: usable RAM at 0 (at least 512 KiB)"
        test byte [e820_flags], 2
        CHECK nz, 17, "INT 15h E820: usable RAM at 1 MiB (at least 15 MiB)"

        ; ---- 18-20: memory sizes, A20 ---------------------------------------------------------------
        int 0x12
        cmp ax, 639
        CHECK e, 18, "INT 12h: 639 KiB of base memory"
        mov ax, 0xE801
        int 0x15
        jc .e801_bad
        cmp ax, 15360
.e801_bad:
        CHECK e, 19, "INT 15h AX=E801h: 15360 KiB between 1 and 16 MiB"
        mov ax, 0x2402
        int 0x15
        jc .a20_bad
        cmp al, 1
.a20_bad:
        CHECK e, 20, "INT 15h AX=2402h: A20 enabled"

        ; ---- 21-22: the BIOS tick count -----------------------------------------------------------
        xor ah, ah
        int 0x1A
        mov [ticks0], dx
        mov [ticks0 + 2], cx
        mov si, 200                     ; wake-ups allowed
.tick_wait:
        sti
        hlt
        cli
        xor ah, ah
        int 0x1A
        cmp dx, [ticks0]
        jne .ticked
        cmp cx, [ticks0 + 2]
        jne .ticked
        dec si
        jnz .tick_wait
.ticked:
        sub dx, [ticks0]
        sbb cx, [ticks0 + 2]
        mov [saved_dx], dx
        test si, si
        CHECK nz, 21, "INT 1Ah AH=00h: the tick count advances while waiting with hlt"
        cmp cx, 0
        jne .tick_bad
        cmp word [saved_dx], 1
        jb .tick_bad
        cmp word [saved_dx], 3
        ja .tick_bad
        cmp ax, ax
.tick_bad:
        CHECK e, 22, "INT 1Ah AH=00h: it advanced by 1 to 3 ticks"

        ; ---- 23-24: RTC services --------------------------------------------------------------------
        mov ah, 0x02
        int 0x1A
        jc .time_bad
        cmp cx, 0x0000
.time_bad:
        CHECK e, 23, "INT 1Ah AH=02h: RTC time 00:00 (BCD)"
        mov ah, 0x04
        int 0x1A
        jc .date_bad
        cmp cx, 0x2026
        jne .date_bad
        cmp dx, 0x0101
.date_bad:
        CHECK e, 24, "INT 1Ah AH=04h: RTC date 2026-01-01 (BCD)"

        ; ---- 25-27: video cursor --------------------------------------------------------------------
        mov ah, 0x02
        xor bh, bh
        mov dx, 0x050A                  ; row 5, column 10
        int 0x10
        mov ah, 0x03
        xor bh, bh
        int 0x10
        cmp dx, 0x050A
        CHECK e, 25, "INT 10h AH=02h/03h: the cursor reads back at row 5, column 10"
        mov ax, 0x0E00 | 'x'
        mov bx, 0x0007
        int 0x10
        mov ah, 0x03
        xor bh, bh
        int 0x10
        cmp dx, 0x050B
        CHECK e, 26, "INT 10h AH=0Eh: a teletype character moves the cursor to column 11"
        mov ah, 0x0F
        int 0x10
        cmp ah, 80
        CHECK e, 27, "INT 10h AH=0Fh: 80 text columns"

        PRINT "t_bios: all checks passed", 13, 10
        xor al, al
        jmp exit_status

; al = check number, si = text
fail:
        mov bl, al
        push si
        mov si, name_str
        call puts
        mov si, fail_str
        call puts
        pop si
        call puts
        mov si, crlf_str
        call puts
        mov al, bl
        jmp exit_status

report_ok:                              ; si = text; keeps every register
        pusha
        push si
        mov si, name_str
        call puts
        mov si, ok_str
        call puts
        pop si
        call puts
        mov si, crlf_str
        call puts
        popa
        ret

name_str:       db "t_bios", 0
ok_str:         db " ok: ", 0
fail_str:       db " FAIL: ", 0
crlf_str:       db 13, 10, 0

; INT 13h AH=42h with the packet below -> CF
read_lba:
        mov ah, 0x42
        mov dl, [boot_drive]
        mov si, dap
        int 0x13
        ret

        align 4
dap:            db 16, 0
dap_count:      dw 1
                dw BUF, 0               ; buffer offset, segment
dap_lba:        dq 0
saved_cx:       dw 0
saved_dx:       dw 0
ticks0:         dd 0
e820_n:         dw 0
e820_flags:     db 0

        times 8 * 512 - 4 - ($ - $$) db 0
stage2_marker:  db "SKG2"

; =============================================================================
; Sectors 8-11: signatures for the reads ("LBA8 ", "LBA9 ", "LBA10 ", "LBA11 ");
; sectors 12-15 are zeros.
        db "LBA8 of t_bios.img", 0
        times 9 * 512 - ($ - $$) db 0
        db "LBA9 of t_bios.img", 0
        times 10 * 512 - ($ - $$) db 0
        db "LBA10 of t_bios.img", 0
        times 11 * 512 - ($ - $$) db 0
        db "LBA11 of t_bios.img", 0
        times 16 * 512 - ($ - $$) db 0
