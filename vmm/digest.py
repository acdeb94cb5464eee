"""Digests of machine state, for proving that a replay is bit-exact.

* ``page_hashes``: one 32-bit hash per 4 KiB page of guest RAM, vectorised
  with numpy (a multiply-accumulate of each page's 64-bit words with fixed
  odd constants, as one matrix-vector product; ~8 ms for 32 MiB), so a divergence report can name the
  pages that differ.
* ``regs_digest``: a hash of the architectural registers the VMM compares.
* ``OutputStream``: a running SHA-256 and byte count of an output stream
  (serial, debug console) without keeping the stream itself.
"""
from __future__ import annotations

import hashlib

import numpy as np

PAGE = 4096
_WORDS = PAGE // 8


def _constants() -> np.ndarray:
    # fixed odd multipliers from a 64-bit LCG: the same on every host and run
    out = np.empty(_WORDS, dtype=np.uint64)
    x = 0x9E37_79B9_7F4A_7C15
    for i in range(_WORDS):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFF_FFFF_FFFF_FFFF
        out[i] = x | 1
    return out


_K = _constants()


def page_hashes(ram: np.ndarray) -> np.ndarray:
    """uint32 hash of every 4 KiB page of ``ram`` (a uint8 array, page multiple)."""
    words = ram.view(np.uint64).reshape(-1, _WORDS)
    with np.errstate(over="ignore"):
        acc = words.dot(_K)  # wraps mod 2**64 like the multiply-accumulate it is; no temporary
    return ((acc >> np.uint64(32)) ^ acc).astype(np.uint32)


def ram_digest(ram: np.ndarray) -> str:
    return hashlib.sha256(page_hashes(ram).tobytes()).hexdigest()


REG_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
             "r13", "r14", "r15", "rip", "rflags", "es", "cs", "ss", "ds", "fs", "gs",
             "cr0", "cr2", "cr3", "cr4", "cpl")


def regs_digest(regs: dict[str, int]) -> str:
    h = hashlib.sha256()
    for n in REG_NAMES:
        h.update(int(regs.get(n, 0)).to_bytes(8, "little", signed=False))
    return h.hexdigest()


class OutputStream:
    """A guest output stream: its bytes, their count and running SHA-256.

    The bytes are kept so that the stream's state is plain data (a hash
    object's midstate is not): saving stores them, loading hashes them again.
    """

    def __init__(self, name: str):
        self.name = name
        self.count = 0
        self._h = hashlib.sha256()
        self.data = bytearray()

    def append(self, data: bytes) -> None:
        self.count += len(data)
        self._h.update(data)
        self.data += data

    def digest(self) -> str:
        return self._h.hexdigest()

    def save_state(self) -> dict:
        return {"kind": "output-stream", "version": 1, "name": self.name, "data": bytes(self.data)}

    def load_state(self, st: dict) -> None:
        data = st["data"]
        if not isinstance(data, bytes):
            raise ValueError("output stream data must be bytes")
        self.data = bytearray(data)
        self.count = len(data)
        self._h = hashlib.sha256(data)
