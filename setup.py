"""Builds the vCPU's C fast path (vmm.cpu._native, from the C files in vmm/cpu/native/) at install time through cffi."""
import shutil
import sys

from setuptools import setup

if shutil.which("cc") is None and shutil.which("gcc") is None:
    sys.exit("vmm: no C compiler found; the vCPU's fast path is C built at install time: apt-get install gcc")

setup(cffi_modules=["vmm/cpu/native_build.py:ffibuilder"])
