"""Load the C fast path, building it on first use if the install did not.

``pip install`` compiles ``vmm.cpu._native`` through setup.py (cffi_modules)
from the C files in vmm/cpu/native/.
A source checkout that was not installed builds it here, once, next to this
file.  With no C compiler the error says so plainly.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys


class NativeBuildError(RuntimeError):
    """The C fast path is missing and cannot be built."""


def _current(so_path: str | None) -> bool:
    """Whether the built module was compiled from the C sources beside it."""
    if so_path is None or not os.path.exists(so_path):
        return False
    try:
        from vmm.cpu.native_build import source_tag

        tag = source_tag()
    except OSError:  # an install that ships no C sources: trust its build
        return True
    with open(so_path, "rb") as f:
        return tag in f.read()


def load():
    spec = importlib.util.find_spec("vmm.cpu._native")
    if spec is not None and _current(spec.origin):
        return importlib.import_module("vmm.cpu._native")
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("gcc") is None:
        raise NativeBuildError(
            "the vCPU's C fast path (vmm.cpu._native) is not built and no C compiler was found: "
            "install gcc (apt-get install gcc) and reinstall with `pip install -e .`"
        )
    from vmm.cpu.native_build import make_builder

    here = os.path.dirname(os.path.abspath(__file__))
    # one build directory per process: test workers may rebuild at once
    tmp = os.path.join(os.path.dirname(os.path.dirname(here)), "build", f"cffi-{os.getpid()}")
    builder = make_builder()
    try:
        so = builder.compile(tmpdir=tmp, verbose=False)
    except Exception as e:  # the compiler's own message is the useful part
        raise NativeBuildError(f"building the vCPU's C fast path failed: {e}") from e
    name = os.path.basename(so) if spec is None or spec.origin is None else os.path.basename(spec.origin)
    dest = os.path.join(here, name)
    shutil.copy(so, dest + f".{os.getpid()}.tmp")
    os.replace(dest + f".{os.getpid()}.tmp", dest)  # a loader never sees half a file
    shutil.rmtree(tmp, ignore_errors=True)
    importlib.invalidate_caches()
    sys.modules.pop("vmm.cpu._native", None)
    return importlib.import_module("vmm.cpu._native")
