"""Installed from a wheel, vmm takes one import name: `vmm`.  The source keeps its
top-level folders (devices/, replay/, tools/, guests/, host/); the wheel puts them
under vmm (vmm.devices, ...) with their imports rewritten, so a user's own `tools`
or `devices` package is never shadowed.  Built and installed offline into a fresh
virtual environment in a temporary folder, then used from another folder."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["vmm", "devices", "replay", "tools", "guests", "host", "setup.py", "pyproject.toml",
           "vmm_packaging.py", "README.md"]
DEPS = ["unicorn", "capstone", "keystone", "numpy", "cffi", "_cffi_backend", "pycparser"]


def _dep_paths() -> list[Path]:
    """Where this interpreter has each runtime dependency (linked into the fresh environment,
    since the install is offline and --no-deps)."""
    out = []
    for name in DEPS:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            pytest.skip(f"{name} is not installed here")
        origin = Path(spec.origin)
        out.append(origin.parent if origin.name == "__init__.py" else origin)
    if (extra := out[DEPS.index("numpy")].parent / "numpy.libs").exists():
        out.append(extra)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the wheel builds the vCPU's C fast path")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        else:
            shutil.copy(p, src / name)
    wheels = tmp / "dist"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("vmm-*.whl")
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    site = next((target / "lib").glob("python3*/site-packages"))
    deps = tmp / "deps"
    deps.mkdir()
    for p in _dep_paths():
        (deps / p.name).symlink_to(p)
    (site / "zz-deps.pth").write_text(str(deps) + "\n")
    before = set(os.listdir(site))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "-q",
                        "--no-deps", "--no-build-isolation", str(wheel)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return target, site, set(os.listdir(site)) - before, elsewhere


def test_the_wheel_installs_one_top_level_name(installed):
    _venv, _site, added, _cwd = installed
    assert {n for n in added if not n.endswith(".dist-info")} == {"vmm"}


def test_import_vmm_and_boot_from_the_installed_package(installed, tmp_path):
    target, _site, _added, cwd = installed
    # a user's own `tools` and `devices` packages sit beside their script: both must keep working
    for name in ("tools", "devices"):
        (cwd / name).mkdir(exist_ok=True)
        (cwd / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    script = """
import sys, tools, devices
import vmm
from vmm import Machine
m = Machine("hello")
r = m.run()
assert r.reason is vmm.StopReason.EXIT, r
assert tools.MINE == "tools" and devices.MINE == "devices"
import vmm.devices.bus, vmm.replay.session, vmm.tools.cli
print(m.console.decode().strip(), vmm.__file__)
"""
    r = subprocess.run([str(target / "bin" / "python"), "-c", script], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip()
    assert out.startswith("Hello from the boot sector!") and "site-packages/vmm/__init__.py" in out


def test_the_vmm_command_runs_from_the_installed_package(installed):
    target, _site, _added, cwd = installed
    r = subprocess.run([str(target / "bin" / "vmm"), "run", "demo", "--serial", "stdio"], capture_output=True,
                       text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.endswith("[demo] all tasks done, exiting with status 0\n")
    r = subprocess.run([str(target / "bin" / "python"), "-m", "vmm", "run", "/nonexistent/x.img"],
                       capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_the_import_rewriter_refuses_an_import_that_binds_a_folded_name():
    sys.path.insert(0, str(ROOT))
    try:
        from vmm_packaging import rewrite_imports
    finally:
        sys.path.remove(str(ROOT))
    assert rewrite_imports("from devices.bus import IoBus\n    from replay import events\n") == \
        "from vmm.devices.bus import IoBus\n    from vmm.replay import events\n"
    assert rewrite_imports("import tools.cli as cli\nfrom toolsx import y\n") == \
        "import vmm.tools.cli as cli\nfrom toolsx import y\n"
    with pytest.raises(ValueError, match="binds a top-level name"):
        rewrite_imports("import devices.bus\n")
