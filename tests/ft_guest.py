"""The guest the fault-tolerance tests and benchmark run: a flat 32-bit binary
that prints a numbered line at a steady pace and, every ASK lines, prints a
"?" line and waits (polling the UART, never halting) for one console byte,
which it echoes as "got X".  Its transcript is a function of the bytes typed,
not of when they arrive, so a run with failovers can be held against a run
without.  With SMP=1 the BSP starts the application processor through the
LAPIC (INIT, then a start-up IPI to a real-mode loop that counts in memory)
and prints that counter on every line: a transcript that shows the vCPU
interleaving exactly.

Built with nasm (skip where it is missing), cached per source and options.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
bits 32
org 0x100000
COM1 equ 0x3f8
start:
    mov esp, 0x90000
%if NET
    call nic_init
%endif
%if SMP
    mov esi, ap_tramp
    mov edi, 0x8000
    mov ecx, ap_tramp_end - ap_tramp
    rep movsb
    mov dword [0xFEE00310], 0
    mov dword [0xFEE00300], 0x000C4500
    mov dword [0xFEE00300], 0x000C4608
%endif
    xor ebx, ebx
line:
    inc ebx
    mov eax, ebx
    call print_dec
%if SMP
    mov al, ' '
    call putc
    mov eax, [0x7000]
    call print_hex
%endif
    mov al, 10
    call putc
%if NET
    mov eax, ebx
    call nic_send
%endif
%if DISK
    mov eax, ebx
    call disk_write
%endif
%if ASK
    mov eax, ebx
    xor edx, edx
    mov ecx, ASK
    div ecx
    test edx, edx
    jnz no_ask
    mov al, '?'
    call putc
    mov al, 10
    call putc
wait_rx:
    mov ecx, 20000
    loop $
    mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz wait_rx
    mov dx, COM1
    in al, dx
    mov cl, al
    mov al, 'g'
    call putc
    mov al, 'o'
    call putc
    mov al, 't'
    call putc
    mov al, ' '
    call putc
    mov al, cl
    call putc
    mov al, 10
    call putc
no_ask:
%endif
    mov ecx, DELAY
    loop $
    cmp ebx, LINES
    jb line
%if DISK
    call disk_hash
%endif
    mov dx, 0x501
    mov ax, 0
    out dx, ax
    cli
    hlt

putc:                       ; al
    push edx
    mov dx, COM1
    out dx, al
    pop edx
    ret

print_dec:                  ; eax, six digits
    push ebx
    push ecx
    push edx
    mov ecx, 6
    mov ebx, 10
    sub esp, 8
.d: xor edx, edx
    div ebx
    add dl, '0'
    mov [esp + ecx - 1], dl
    loop .d
    mov ecx, 0
.p: mov al, [esp + ecx]
    call putc
    inc ecx
    cmp ecx, 6
    jb .p
    add esp, 8
    pop edx
    pop ecx
    pop ebx
    ret

print_hex:                  ; eax, eight digits
    push ecx
    push edx
    mov edx, eax
    mov ecx, 8
.h: rol edx, 4
    mov al, dl
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe .o
    add al, 7
.o: call putc
    loop .h
    pop edx
    pop ecx
    ret

%if NET
NET_MMIO equ 0xFEB00000
NET_RING equ 0x300000
NET_BUF equ 0x301000
PCI_NIC equ 0x80000000 | (3 << 11)   ; bus 0, device 3 (the first NIC), function 0

nic_init:                   ; BAR 0, memory space and bus master on; an 8-descriptor transmit ring
    mov dx, 0xCF8
    mov eax, PCI_NIC | 0x10
    out dx, eax
    mov dx, 0xCFC
    mov eax, NET_MMIO
    out dx, eax
    mov dx, 0xCF8
    mov eax, PCI_NIC | 0x04
    out dx, eax
    mov dx, 0xCFC
    mov ax, 6
    out dx, ax
    mov dword [NET_MMIO + 0x3800], NET_RING
    mov dword [NET_MMIO + 0x3804], 0
    mov dword [NET_MMIO + 0x3808], 128
    mov dword [NET_MMIO + 0x3810], 0
    mov dword [NET_MMIO + 0x3818], 0
    mov dword [NET_MMIO + 0x0400], 0x0A     ; TCTL: EN, PSP
    ret

nic_send:                   ; eax: one broadcast frame of ethertype 0x88B5 carrying eax
    push eax
    push ecx
    push esi
    push edi
    mov ecx, eax
    dec ecx
    and ecx, 7
    mov edi, ecx
    shl edi, 7
    add edi, NET_BUF
    mov dword [edi], 0xFFFFFFFF
    mov word [edi + 4], 0xFFFF
    mov dword [edi + 6], 0x12005452          ; 52:54:00:12:34:56
    mov word [edi + 10], 0x5634
    mov word [edi + 12], 0xB588
    mov [edi + 14], eax
    mov esi, ecx
    shl esi, 4
    add esi, NET_RING
    mov [esi], edi
    mov dword [esi + 4], 0
    mov dword [esi + 8], 0x0B000000 | 60     ; 60 bytes; EOP, IFCS, RS
    mov dword [esi + 12], 0
    inc ecx
    and ecx, 7
    mov [NET_MMIO + 0x3818], ecx             ; TDT: the frame goes out now
    pop edi
    pop esi
    pop ecx
    pop eax
    ret
%endif

%if DISK
ATA equ 0x1F0

disk_write:                 ; eax: the line number n; sector n % DISK gets the words n, n+1, ...
    pushad
    mov ebx, eax
    xor edx, edx
    mov ecx, DISK
    div ecx
    mov eax, edx
    mov cl, 0x30            ; WRITE SECTORS
    call ata_command
    mov dx, ATA
    xor ecx, ecx
.w: lea eax, [ebx + ecx]
    out dx, ax
    inc ecx
    cmp ecx, 256
    jb .w
    call ata_idle
    popad
    ret

disk_hash:                  ; reads sectors 0 .. DISK-1 back; prints "disk " and h = rol(h, 5) ^ word
    xor esi, esi
    xor edi, edi
.s: mov eax, esi
    mov cl, 0x20            ; READ SECTORS
    call ata_command
    mov dx, ATA
    mov ecx, 256
.r: in ax, dx
    movzx eax, ax
    rol edi, 5
    xor edi, eax
    loop .r
    inc esi
    cmp esi, DISK
    jb .s
    mov al, 'd'
    call putc
    mov al, 'i'
    call putc
    mov al, 's'
    call putc
    mov al, 'k'
    call putc
    mov al, ' '
    call putc
    mov eax, edi
    call print_hex
    mov al, 10
    call putc
    ret

ata_command:                ; eax: LBA (< 256), cl: the command; returns once the drive wants data
    push eax
    call ata_idle
    mov dx, ATA + 6
    mov al, 0xE0            ; LBA, the master
    out dx, al
    mov dx, ATA + 2
    mov al, 1
    out dx, al
    pop eax
    mov dx, ATA + 3
    out dx, al
    xor al, al
    mov dx, ATA + 4
    out dx, al
    mov dx, ATA + 5
    out dx, al
    mov dx, ATA + 7
    mov al, cl
    out dx, al
.q: in al, dx
    test al, 0x80
    jnz .q
    test al, 8
    jz .q
    ret

ata_idle:
    mov dx, ATA + 7
.b: in al, dx
    test al, 0x80
    jnz .b
    ret
%endif

%if SMP
bits 16
ap_tramp:
    xor ax, ax
    mov ds, ax
.l: inc dword [0x7000]
    jmp .l
ap_tramp_end:
%endif
"""

_CACHE = Path(tempfile.gettempdir()) / "vmm-ft-guests"


def have_nasm() -> bool:
    return shutil.which("nasm") is not None


def build(lines: int = 300, ask: int = 0, smp: bool = False, delay: int = 20000, net: bool = False,
          disk: int = 0) -> Path:
    """The guest image (a flat binary for `--boot flat`), built once per option set.  With
    ``net`` it also sends, after each line, a broadcast frame of ethertype 0x88B5 carrying
    the line's number (u32 little-endian) on the first NIC (an e1000 at PCI device 3).
    With ``disk`` (a sector count) it writes, after each line n, sector n % disk of the IDE
    primary master (ATA PIO: the words n, n+1, ... n+255), and before it exits reads those
    sectors back and prints "disk XXXXXXXX", a hash of their content (``disk_line``)."""
    defs = {"LINES": lines, "ASK": ask, "SMP": int(smp), "DELAY": delay, "NET": int(net), "DISK": disk}
    key = hashlib.sha256((SOURCE + repr(sorted(defs.items()))).encode()).hexdigest()[:16]
    out = _CACHE / f"ft-{key}.bin"
    if out.exists():
        return out
    _CACHE.mkdir(parents=True, exist_ok=True)
    src = _CACHE / f"ft-{key}.asm"
    src.write_text(SOURCE)
    tmp = out.with_suffix(".tmp")
    subprocess.run(["nasm", "-f", "bin", *(f"-D{k}={v}" for k, v in defs.items()), "-o", str(tmp), str(src)],
                   check=True, capture_output=True)
    tmp.replace(out)
    return out


def expected(lines: int, ask: int, typed: bytes, disk: bytes | None = None, sectors: int = 0) -> bytes:
    """The transcript of a uniprocessor run: numbered lines, a "?" and the echo every ``ask`` lines
    (and with ``disk``, the image the guest started with, its last line: ``disk_line``)."""
    out = bytearray()
    it = iter(typed)
    for n in range(1, lines + 1):
        out += b"%06d\n" % n
        if ask and n % ask == 0:
            out += b"?\ngot %c\n" % next(it)
    if disk is not None:
        out += disk_line(disk_after(disk, lines, sectors), sectors)
    return bytes(out)


def disk_after(image: bytes, lines: int, sectors: int) -> bytes:
    """The disk's content after the guest's writes (line n writes sector n % sectors)."""
    img = bytearray(image)
    for n in range(1, lines + 1):
        s = n % sectors
        img[s * 512:(s + 1) * 512] = b"".join(((n + i) & 0xFFFF).to_bytes(2, "little") for i in range(256))
    return bytes(img)


def disk_line(image: bytes, sectors: int) -> bytes:
    """The line the guest prints last: a hash of its first ``sectors`` sectors as it reads them."""
    h = 0
    for i in range(0, sectors * 512, 2):
        h = (((h << 5) | (h >> 27)) & 0xFFFFFFFF) ^ int.from_bytes(image[i:i + 2], "little")
    return b"disk %08X\n" % h
