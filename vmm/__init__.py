"""vmm: an instruction-level x86 hypervisor emulator with an exact clock and
deterministic record/replay.

The Python API (docs/api.md), loaded on first use so that ``import vmm.cpu``
and the command line stay light::

    import vmm
    m = vmm.boot("demo")            # or vmm.Machine("demo", mem="64M")
    m.run()
    vmm.record("demo", "run.vmlog")
    r = vmm.replay("run.vmlog")

Entry points: ``Machine``, ``boot``, ``record``, ``replay``, ``Replay``,
``Recording``, ``RunResult``, ``StopReason``, ``Divergence``, ``Introspector``
(vmm/introspect.py) and ``regress`` (replay/regress.py).
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = ("Machine", "Replay", "Recording", "Registers", "Breakpoints", "boot", "record", "replay", "bundled",
        "RunResult", "StopReason", "Divergence", "ReplayError", "BootError", "PageFault")
__all__ = [*_API, "Introspector", "regress", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from vmm import api

        return getattr(api, name)
    if name == "Introspector":
        from vmm.introspect import Introspector

        return Introspector
    if name == "regress":
        from replay.regress import regress

        return regress
    raise AttributeError(f"module 'vmm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
