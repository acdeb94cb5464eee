"""Builds the vCPU's C fast path (vmm.cpu._native, from the C files in vmm/cpu/native/) at install time through cffi."""
import os
import shutil
import sys
import warnings

from setuptools import setup

try:  # pip shows a backend's warnings: this one only says an editable install is editable
    from setuptools.warnings import InformationOnly

    warnings.filterwarnings("ignore", category=InformationOnly)
except ImportError:  # setuptools < 67 has no such warning either
    pass

if shutil.which("cc") is None and shutil.which("gcc") is None:
    sys.exit("vmm: no C compiler found; the vCPU's fast path is C built at install time: apt-get install gcc")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmm_packaging import build_py, layout  # noqa: E402  (one namespace installed: see vmm_packaging.py)

setup(cffi_modules=["vmm/cpu/native_build.py:ffibuilder"], cmdclass={"build_py": build_py},
      **layout(editable="editable_wheel" in sys.argv))
