"""How the source tree is installed: one import name, ``vmm`` (used by setup.py).

The source keeps its top-level folders (vmm/, devices/, replay/, tools/,
guests/, host/) and imports them by those names.  Installed from a wheel,
generic names such as ``tools`` or ``devices`` would shadow (or be shadowed
by) a user's own packages, so a regular build puts them under ``vmm``:
devices/ becomes ``vmm.devices``, replay/ ``vmm.replay`` and so on, and
``build_py`` rewrites each absolute import of those names in the copied
files (``from devices.bus import IoBus`` -> ``from vmm.devices.bus import
IoBus``).  An editable install (``pip install -e .``, the developer's
checkout) maps the folders as they are.
"""
from __future__ import annotations

import re
from pathlib import Path

from setuptools import find_namespace_packages
from setuptools.command.build_py import build_py as _build_py

TOP = ("devices", "replay", "tools", "guests", "host")
# data files, by package (folders of data only count as packages, as setuptools wants)
DATA = {"guests": ["*.asm", "*.inc", "*.ld", "*.c"], "guests.build": ["*"], "guests.recordings": ["*.vmlog"],
        "guests.expected": ["*"], "tools": ["*.gdb"], "vmm.cpu.native": ["*.c", "*.cdef"]}
_NAMES = "|".join(TOP)
_FROM = re.compile(rf"^(\s*)from\s+({_NAMES})(?=[.\s])", re.M)
_IMPORT = re.compile(rf"^(\s*)import\s+({_NAMES})\b", re.M)


def layout(editable: bool) -> dict:
    """setup() arguments: the packages, where their folders are, their data files."""
    found = find_namespace_packages(include=["vmm", "vmm.*", *TOP, *[f"{t}.*" for t in TOP]],
                                    exclude=["*.__pycache__"])
    if editable:
        return {"packages": found, "package_data": DATA}

    def inside(name: str) -> str:
        return name if name.split(".")[0] == "vmm" else f"vmm.{name}"
    return {"packages": [inside(p) for p in found], "package_dir": {f"vmm.{t}": t for t in TOP},
            "package_data": {inside(k): v for k, v in DATA.items()}}


def rewrite_imports(text: str, where: str = "") -> str:
    """``from devices...`` -> ``from vmm.devices...`` (and the other top-level names)."""
    for m in _IMPORT.finditer(text):
        line = text[m.start():text.find("\n", m.start())]
        if not re.match(rf"\s*import\s+({_NAMES})(\.\w+)*\s+as\s+\w+\s*(#.*)?$", line):
            raise ValueError(f"{where}: `{line.strip()}` binds a top-level name the wheel does not have; "
                             "write `from ... import ...` instead")
    text = _IMPORT.sub(r"\1import vmm.\2", text)
    return _FROM.sub(r"\1from vmm.\2", text)


class build_py(_build_py):
    """Copies the modules, rewriting imports of the folded-in top-level names (regular builds)."""

    def build_module(self, module, module_file, package):
        out = super().build_module(module, module_file, package)
        if getattr(self, "editable_mode", False):
            return out
        path = Path(out[0] if isinstance(out, tuple) else self.get_module_outfile(self.build_lib,
                                                                                     package.split("."), module))
        if path.suffix == ".py" and path.is_file():
            text = path.read_text(encoding="utf-8")
            new = rewrite_imports(text, str(module_file))
            if new != text:
                path.unlink()      # never write through a hard link back into the source tree
                path.write_text(new, encoding="utf-8")
        return out
