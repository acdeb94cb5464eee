"""The C fast path is rebuilt when its sources change (a pulled checkout must not load an old build)."""
import importlib.util

from vmm.cpu import native
from vmm.cpu.native_build import source_tag


def test_loaded_build_carries_the_tag_of_the_sources_beside_it():
    origin = importlib.util.find_spec("vmm.cpu._native").origin
    assert native._current(origin)
    mod = native.load()
    assert mod.ffi.string(mod.lib.vmm_source_tag()) == source_tag()


def test_a_build_of_other_sources_is_stale(tmp_path):
    origin = importlib.util.find_spec("vmm.cpu._native").origin
    stale = tmp_path / "_native.so"
    data = open(origin, "rb").read().replace(source_tag(), b"vmm-native-src-" + b"0" * 32)
    stale.write_bytes(data)
    assert not native._current(str(stale))
    assert not native._current(str(tmp_path / "missing.so"))
