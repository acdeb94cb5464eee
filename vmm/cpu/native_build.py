"""cffi build of the vCPU's C fast path, ``vmm.cpu._native``.

The C lives in real files under vmm/cpu/native/: ``core.c`` (the exact
instruction clock, I/O, MMIO and event hooks), ``mmu.c`` (the EPT walk and the
shadow MMU), ``deliver.c`` (exceptions, interrupts, SYSCALL/SYSENTER),
``watch.c`` (watchpoints), ``msr.c`` (RDMSR of IA32_ARCH_CAPABILITIES) and
``api.cdef`` (what Python sees of them).  They are compiled as
one unit so the static helpers of core.c are visible to mmu.c.  setup.py runs
this at install time (cffi_modules); vmm/cpu/native.py runs it on first use in
a checkout that was not installed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

from cffi import FFI

NATIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
SOURCES = ("core.c", "mmu.c", "deliver.c", "watch.c", "msr.c")


def _unicorn_paths() -> tuple[str, str]:
    spec = importlib.util.find_spec("unicorn")
    if spec is None or spec.origin is None:
        raise RuntimeError("the unicorn package is not installed (pip install unicorn==2.1.4)")
    pkg = os.path.dirname(spec.origin)
    return os.path.join(pkg, "include"), os.path.join(pkg, "lib")


def _read(name: str) -> str:
    with open(os.path.join(NATIVE_DIR, name), encoding="utf-8") as f:
        return f.read()


def source_tag() -> bytes:
    """The bytes a build of the current sources carries, so a stale build is seen.

    A checkout that pulls new C keeps its old ``_native`` .so; loading it
    would bind Python to a different struct layout.  native.load() looks for
    this tag in the .so and rebuilds when it is missing.
    """
    h = hashlib.sha256()
    for name in (*SOURCES, "api.cdef"):
        h.update(name.encode() + b"\0" + _read(name).encode() + b"\0")
    return b"vmm-native-src-" + h.hexdigest()[:32].encode()


def make_builder() -> FFI:
    inc, lib = _unicorn_paths()
    ffibuilder = FFI()
    ffibuilder.cdef(_read("api.cdef") + "\nconst char *vmm_source_tag(void);\n")
    tag = source_tag().decode()
    ffibuilder.set_source(
        "vmm.cpu._native",
        "".join(f'#include "{s}"\n' for s in SOURCES)
        + f'static const char vmm_src_tag[] = "{tag}";\n'
        + "const char *vmm_source_tag(void) { return vmm_src_tag; }\n",
        include_dirs=[inc, NATIVE_DIR],
        library_dirs=[lib],
        depends=[os.path.join(NATIVE_DIR, s) for s in (*SOURCES, "api.cdef")],
        extra_link_args=[f"-Wl,-rpath,{lib}", "-l:libunicorn.so.2"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
    )
    return ffibuilder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
