"""What each machine type's virtio-net offers (vmm/platform/pc.py, vmm/platform/net.py): pc-4,
the default, TCP segmentation offload and transmit batching; pc-3 and pc-2 neither, so their
recordings replay with the device they were made with."""
from __future__ import annotations

import pytest

from devices.virtio import net as vn
from host.serial import NullBackend
from replay.session import build_machine, machine_config
from vmm.platform.net import TX_BATCH_TICKS, describe_nics
from vmm.platform.pc import DEFAULT_EPOCH

HLT = b"\xf4"


def virtio_net_of(platform: str | None):
    kw = {} if platform is None else {"platform": platform}
    cfg = machine_config(32 << 20, DEFAULT_EPOCH, "hlt.bin", HLT, "flat", "", 0x7C00, "none", **kw)
    cfg["nics"] = describe_nics([{"model": "virtio", "mac": None}])
    m = build_machine(cfg, HLT, NullBackend())
    try:
        return m.platform, next(getattr(d, "device") for d in m.devices
                                if isinstance(getattr(d, "device", None), vn.VirtioNet))
    finally:
        m.close()


def test_the_default_machine_type_segments_and_batches():
    platform, dev = virtio_net_of(None)
    assert platform == "pc-4"
    assert dev.features & vn.bit(vn.F_HOST_TSO4)
    assert dev.tx_batch == TX_BATCH_TICKS


@pytest.mark.parametrize("platform", ["pc-3", "pc-2"])
def test_older_machine_types_keep_the_device_of_their_recordings(platform):
    got, dev = virtio_net_of(platform)
    assert got == platform
    assert not dev.features & vn.bit(vn.F_HOST_TSO4)
    assert dev.tx_batch == 0
