"""Real guests from Debian packages, fetched at test time and never committed.

``package(name)`` downloads a Debian package with ``apt-get download`` and
unpacks it with ``dpkg-deb -x`` into a cache directory, one directory per
package version, so a second run finds it there at once.  The cache is
``$VMM_CACHE/debian`` (``VMM_CACHE`` defaults to ``~/.cache/vmm``).  The
package lists are refreshed (``apt-get update``) only when apt cannot find a
package for lack of them.  Where the packages cannot be had (no apt, no way to
the archive) a ``DebianUnavailable`` error says why in one line; tests turn it
into a skip.

On top of that: ``kernel()`` (the vmlinuz of the kernel package that
linux-image-amd64 depends on), ``modules_dir()``, ``busybox()`` (the static
busybox), ``seabios()``, and ``initramfs()``, which assembles a gzip'd newc
cpio archive (Documentation/driver-api/early-userspace/buffer-format.rst)
holding busybox and its applet links, a few device nodes, kernel modules with
their dependencies, extra files and an /init script.  The archive is a pure
function of its inputs (sorted entries, inode numbers by position, mtime 0,
uid and gid 0, a gzip header without a time stamp), so recordings that name
images by hash stay valid.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
SEABIOS_PACKAGE = "seabios"
APT_TIMEOUT = 600          # seconds for one apt-get call (the kernel package is ~70 MB)
COMPLETE = ".complete"     # written last into an unpacked package directory

# /init for the guests the tests boot: ``{body}`` runs after the mounts
INIT_HEADER = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"""
# insmod every module initramfs() added, dependencies first
LOAD_MODULES = ("while read m; do insmod /lib/modules/$m.ko || echo \"insmod $m failed\"; "
                "done < /lib/modules/load-order\n")


class DebianUnavailable(RuntimeError):
    """A Debian package (or the tools to fetch it) cannot be had on this machine."""


class InitramfsError(ValueError):
    """An initramfs cannot be built as asked (an unknown module, a bad path)."""


# -- the cache and apt --------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$VMM_CACHE/debian``, by default ``~/.cache/vmm/debian``."""
    root = os.environ.get("VMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vmm")
    return Path(root) / "debian"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = APT_TIMEOUT) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise DebianUnavailable(f"{cmd[0]} is not installed, so Debian packages cannot be fetched")
    try:
        return subprocess.run(cmd, cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise DebianUnavailable(f"{' '.join(cmd[:3])} took more than {timeout} s "
                                f"(no way to the archive?)") from None


def _missing_lists(text: str) -> bool:
    return any(s in text for s in ("Unable to locate package", "No packages found",
                                   "has no installation candidate", "Can't select candidate version",
                                   "Couldn't find any package"))


_updated = False


def _apt_update() -> None:
    global _updated
    if _updated:
        return
    _updated = True
    r = _run(["apt-get", "update", "-qq"])
    if r.returncode != 0:
        raise DebianUnavailable(f"apt-get update failed: {_one_line(r.stderr or r.stdout)}")


def _apt(cmd: list[str], cwd: Path | None = None) -> str:
    """Run an apt command; refresh the package lists once if it failed for lack of them."""
    r = _run(cmd, cwd)
    if r.returncode != 0 or _missing_lists(r.stdout + r.stderr):
        if not _missing_lists(r.stdout + r.stderr):
            raise DebianUnavailable(f"{' '.join(cmd[:2])} failed: {_one_line(r.stderr or r.stdout)}")
        _apt_update()
        r = _run(cmd, cwd)
        if r.returncode != 0 or _missing_lists(r.stdout + r.stderr):
            raise DebianUnavailable(f"{' '.join(cmd[:2])} failed: {_one_line(r.stderr or r.stdout)}")
    return r.stdout


def _fields(control: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in control.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            out.setdefault(key.strip(), value.strip())
    return out


@functools.cache
def candidate(name: str) -> tuple[str, str, str]:
    """(package, version, Depends) of the version apt would install."""
    f = _fields(_apt(["apt-cache", "show", "--no-all-versions", name]))
    if "Version" not in f:
        raise DebianUnavailable(f"apt-cache knows no version of {name}")
    return f.get("Package", name), f["Version"], f.get("Depends", "")


def kernel_package() -> str:
    """The real kernel package behind the linux-image-amd64 metapackage (its first Depends)."""
    deps = candidate(KERNEL_METAPACKAGE)[2]
    for dep in deps.split(","):
        name = dep.split("|")[0].split("(")[0].strip()
        if name.startswith("linux-image-"):
            return name
    raise DebianUnavailable(f"{KERNEL_METAPACKAGE} depends on no linux-image package "
                            f"({deps or 'no Depends'})")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(name: str) -> Path | None:
    """The most recently unpacked version of ``name`` (when apt cannot be asked)."""
    root = cache_dir()
    found = [p for p in root.glob(f"{name}_*") if (p / COMPLETE).exists()] if root.is_dir() else []
    return max(found, key=lambda p: (p / COMPLETE).stat().st_mtime) if found else None


@functools.cache
def package(name: str) -> Path:
    """The root of the unpacked package ``name`` (the candidate version), fetched on first use."""
    try:
        pkg, version, _ = candidate(name)
    except DebianUnavailable:
        cached = _cached(name)
        if cached is not None:
            return cached
        raise
    root = cache_dir()
    dest = root / f"{pkg}_{re.sub(r'[^A-Za-z0-9.+~-]', '_', version)}"
    if (dest / COMPLETE).exists():
        return dest
    with _locked(root):
        if (dest / COMPLETE).exists():
            return dest
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            work = Path(tmp)
            _apt(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"], cwd=work)
            debs = sorted(work.glob("*.deb"))
            if not debs:
                raise DebianUnavailable(f"apt-get download {pkg}={version} left no .deb file")
            unpacked = work / "root"
            r = _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
            if r.returncode != 0:
                raise DebianUnavailable(f"dpkg-deb -x {debs[0].name} failed: {_one_line(r.stderr)}")
            (unpacked / COMPLETE).write_text(f"{pkg} {version}\n")
            if dest.exists():
                shutil.rmtree(dest)
            unpacked.rename(dest)
    return dest


# -- what the tests use -------------------------------------------------------------------------
def kernel() -> Path:
    """The vmlinuz (a bzImage) of Debian's current amd64 kernel."""
    found = sorted((package(kernel_package()) / "boot").glob("vmlinuz-*"))
    if not found:
        raise DebianUnavailable(f"{kernel_package()} holds no /boot/vmlinuz-*")
    return found[0]


def modules_dir() -> Path:
    """/lib/modules/<release> of that kernel."""
    found = sorted(p for p in (package(kernel_package()) / "lib" / "modules").glob("*") if p.is_dir())
    if not found:
        raise DebianUnavailable(f"{kernel_package()} holds no /lib/modules/<release>")
    return found[0]


def busybox() -> Path:
    """The statically linked busybox binary."""
    path = package(BUSYBOX_PACKAGE) / "bin" / "busybox"
    if not path.exists():
        raise DebianUnavailable(f"{BUSYBOX_PACKAGE} holds no /bin/busybox")
    return path


def seabios(image: str = "bios.bin") -> Path:
    """SeaBIOS's ROM image (bios.bin is 128 KiB, bios-256k.bin the one QEMU maps by default)."""
    path = package(SEABIOS_PACKAGE) / "usr" / "share" / "seabios" / image
    if not path.exists():
        raise DebianUnavailable(f"{SEABIOS_PACKAGE} holds no /usr/share/seabios/{image}")
    return path


# -- kernel modules -----------------------------------------------------------------------------
def _module_name(filename: str) -> str:
    base = filename.split(".ko", 1)[0]
    return base.replace("-", "_")


@functools.cache
def _module_index(moddir: Path) -> tuple[dict[str, Path], frozenset[str]]:
    """Module name -> file, and the names built into the kernel (modules.builtin)."""
    files: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(moddir / "kernel"):
        for n in names:
            if re.search(r"\.ko(\.xz|\.gz|\.zst)?$", n):
                files.setdefault(_module_name(n), Path(dirpath) / n)
    builtin_file = moddir / "modules.builtin"
    builtin = frozenset(_module_name(Path(line).name) for line in builtin_file.read_text().split()) \
        if builtin_file.exists() else frozenset()
    return files, builtin


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            raise InitramfsError(f"{path.name} is zstd-compressed and no zstd decoder is installed") from None
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section (the first value of each key)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise InitramfsError("not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    out: dict[str, str] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[str_off + name:str_off + name + 9] == b".modinfo\0":
            for item in ko[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode("utf-8", "replace").split("=", 1)
                    out.setdefault(k, v)
    return out


def _modules_dep(moddir: Path) -> dict[str, list[str]] | None:
    """modules.dep as name -> dependency names, if the package carries one (depmod output)."""
    dep = moddir / "modules.dep"
    if not dep.exists():
        return None
    out: dict[str, list[str]] = {}
    for line in dep.read_text().splitlines():
        if ":" in line:
            mod, deps = line.split(":", 1)
            out[_module_name(Path(mod).name)] = [_module_name(Path(d).name) for d in deps.split()]
    return out


def resolve_modules(names: Iterable[str], moddir: Path | None = None) -> list[tuple[str, bytes]]:
    """The named modules and everything they depend on, dependencies first, as (name, .ko bytes).

    Dependencies come from modules.dep when the package has one; Debian's
    kernel packages leave depmod to the install step, so otherwise from the
    ``depends=`` entry of each module's .modinfo section.  Modules built into
    the kernel are left out; compressed modules are decompressed."""
    moddir = moddir or modules_dir()
    files, builtin = _module_index(moddir)
    depfile = _modules_dep(moddir)
    order: list[tuple[str, bytes]] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _module_name(name)
        if state.get(name) == "done" or (name in builtin and name not in files):
            return
        if state.get(name) == "visiting":
            raise InitramfsError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in files:
            raise InitramfsError(f"no kernel module named {name} in {moddir}")
        state[name] = "visiting"
        data = _module_bytes(files[name])
        if depfile is not None:
            deps = depfile.get(name, [])
        else:
            deps = [d for d in modinfo(data).get("depends", "").split(",") if d]
        for d in deps:
            visit(d, chain + (name,))
        state[name] = "done"
        order.append((name, data))

    for n in names:
        visit(n, ())
    return order


# -- the newc cpio writer -----------------------------------------------------------------------
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


@dataclass(frozen=True)
class CpioEntry:
    path: str               # relative, no leading slash
    mode: int               # st_mode: type and permissions
    data: bytes = b""       # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") archive of ``entries`` in the order given, then the TRAILER!!! entry.

    Inode numbers count from 1 in order; nlink is 2 for directories and 1
    otherwise (so the kernel never takes two files for hard links); mtime,
    uid and gid are 0."""
    out = bytearray()

    def put(ino: int, path: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        name = path.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == S_IFDIR else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name + _pad4(110 + len(name)))
        out.extend(data + _pad4(len(data)))

    for ino, e in enumerate(entries, start=1):
        put(ino, e.path, e.mode, e.data, e.rdev)
    put(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def _clean_path(path: str) -> str:
    p = path.strip("/")
    parts = p.split("/")
    if not p or any(part in ("", ".", "..") for part in parts):
        raise InitramfsError(f"bad initramfs path {path!r}")
    return p


@functools.cache
def _applets(busybox_path: Path) -> tuple[str, ...]:
    r = subprocess.run([str(busybox_path), "--list-full"], check=False, capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise DebianUnavailable(f"busybox --list-full failed: {_one_line(r.stderr or r.stdout)}")
    return tuple(sorted(line.strip() for line in r.stdout.split() if line.strip()))


BASE_DIRS = ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "root", "run", "sbin", "sys", "tmp",
             "usr", "usr/bin", "usr/sbin", "var")
DEVICE_NODES = {"dev/console": (0o600, 5, 1), "dev/null": (0o666, 1, 3), "dev/tty": (0o666, 5, 0),
                "dev/ttyS0": (0o660, 4, 64), "dev/zero": (0o666, 1, 5)}


def initramfs_bytes(init_script: str, modules: Iterable[str] = (),
                    extra_files: Mapping[str, bytes | str | Path] | None = None,
                    busybox_path: Path | None = None, moddir: Path | None = None) -> bytes:
    """The uncompressed cpio archive that ``initramfs`` compresses (see there)."""
    extra = {_clean_path(path): content for path, content in (extra_files or {}).items()}
    bb = busybox_path or busybox()
    files: dict[str, CpioEntry] = {}

    def add(entry: CpioEntry) -> None:
        parts = entry.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in files:
                files[d] = CpioEntry(d, S_IFDIR | 0o755)
        files[entry.path] = entry

    for d in BASE_DIRS:
        add(CpioEntry(d, S_IFDIR | (0o1777 if d == "tmp" else 0o755)))
    for path, (perm, major, minor) in DEVICE_NODES.items():
        add(CpioEntry(path, S_IFCHR | perm, rdev=(major, minor)))
    add(CpioEntry("bin/busybox", S_IFREG | 0o755, bb.read_bytes()))
    for applet in _applets(bb):
        p = _clean_path(applet)
        if p not in ("bin/busybox", "init", "linuxrc"):
            add(CpioEntry(p, S_IFLNK | 0o777, b"/bin/busybox"))
    mods = resolve_modules(modules, moddir) if modules else []
    for name, data in mods:
        add(CpioEntry(f"lib/modules/{name}.ko", S_IFREG | 0o644, data))
    add(CpioEntry("lib/modules/load-order", S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in mods).encode()))
    for p, content in sorted(extra.items()):
        if isinstance(content, Path):
            data = content.read_bytes()
            perm = 0o755 if os.access(content, os.X_OK) else 0o644
        else:
            data = content.encode() if isinstance(content, str) else bytes(content)
            perm = 0o755 if data.startswith(b"#!") else 0o644
        add(CpioEntry(p, S_IFREG | perm, data))
    script = init_script if init_script.startswith("#!") else "#!/bin/sh\n" + init_script
    add(CpioEntry("init", S_IFREG | 0o755, script.encode()))
    return cpio_newc(files[p] for p in sorted(files))


def initramfs(init_script: str, modules: Iterable[str] = (),
              extra_files: Mapping[str, bytes | str | Path] | None = None) -> Path:
    """A gzip'd newc initramfs: busybox at /bin/busybox with a link per applet (``busybox
    --list-full``), /dev/console, null, tty, ttyS0 and zero, the named kernel modules and their
    dependencies at /lib/modules/NAME.ko with /lib/modules/load-order (``LOAD_MODULES`` loads
    them), ``extra_files`` (path -> contents; executable if it starts with #!, or a Path whose
    file is), and ``init_script`` as /init (given "#!/bin/sh" if it has no #! line).

    The same inputs give the same bytes; the file is named by their hash in the cache."""
    data = gzip.compress(initramfs_bytes(init_script, modules, extra_files), compresslevel=9, mtime=0)
    out_dir = cache_dir() / "initramfs"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{hashlib.sha256(data).hexdigest()[:24]}.cpio.gz"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path
