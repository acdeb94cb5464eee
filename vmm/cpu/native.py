"""Load the C fast path, building it on first use if the install did not.

``pip install`` compiles ``vmm.cpu._native`` through setup.py (cffi_modules)
from the C files in vmm/cpu/native/.
A source checkout that was not installed builds it here, once, next to this
file.  With no C compiler the error says so plainly.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys


class NativeBuildError(RuntimeError):
    """The C fast path is missing and cannot be built."""


def load():
    try:
        return importlib.import_module("vmm.cpu._native")
    except ImportError:
        pass
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("gcc") is None:
        raise NativeBuildError(
            "the vCPU's C fast path (vmm.cpu._native) is not built and no C compiler was found: "
            "install gcc (apt-get install gcc) and reinstall with `pip install -e .`"
        )
    from vmm.cpu.native_build import make_builder

    here = os.path.dirname(os.path.abspath(__file__))
    tmp = os.path.join(os.path.dirname(os.path.dirname(here)), "build", "cffi")
    builder = make_builder()
    try:
        so = builder.compile(tmpdir=tmp, verbose=False)
    except Exception as e:  # the compiler's own message is the useful part
        raise NativeBuildError(f"building the vCPU's C fast path failed: {e}") from e
    shutil.copy(so, os.path.join(here, os.path.basename(so)))
    importlib.invalidate_caches()
    sys.modules.pop("vmm.cpu._native", None)
    return importlib.import_module("vmm.cpu._native")
