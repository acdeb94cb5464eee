"""`--nic` on the command line (tools/cli_net.py): QEMU's manner of naming a card and its
backend, a one-line error and exit status 2 for anything unusable (a bad option, a port in
use, nobody listening, a TAP name the kernel refuses), and a recording whose config names
its cards so `vmm replay` builds them with no network."""
from __future__ import annotations

import socket

import pytest

from replay.logfile import LogReader
from tools import cli
from tools.cli_net import parse_nic


def main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def test_parse_nic_in_qemus_manner():
    assert parse_nic("model=virtio,net=switch:lan,mac=52:54:00:00:00:09,pcap=x.pcap") == {
        "model": "virtio", "net": "switch:lan", "mac": "52:54:00:00:00:09", "pcap": "x.pcap", "server": False, "hostfwd": []}
    assert parse_nic("stream:127.0.0.1:5555,server=on") == {
        "model": "e1000", "net": "stream:127.0.0.1:5555", "mac": None, "pcap": None, "server": True, "hostfwd": []}
    assert parse_nic("tap:tap0,model=virtio-net-pci")["model"] == "virtio"


@pytest.mark.parametrize("spec, words", [
    ("model=rtl8139,net=switch:a", "model must be e1000 or virtio"),
    ("model=e1000", "name a backend"),
    ("net=switch:", "net must be"),
    ("net=bogus:x", "net must be"),
    ("net=user,hostfwd=tcp::8080", "is not [tcp|udp]"),
    ("net=switch:a,hostfwd=tcp::8080-:80", "hostfwd= goes with net=user"),
    ("net=user,server=on", "server=on goes with"),
    ("net=switch:a,model=e1000,model=virtio", "given twice"),
    ("net=switch:a,server=on", "server=on goes with"),
    ("net=switch:a,mac=01:00:00:00:00:01", "group (multicast)"),
    ("net=switch:a,mac=nonsense", "bad MAC address"),
    ("net=stream:localhost:99999", "port 1-65535"),
    ("net=tap:" + "x" * 20, "interface name"),
])
def test_bad_nic_options_are_one_line_and_exit_2(spec, words, capsys):
    assert main(["run", "hello", "--serial", "none", "--nic", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and "Traceback" not in err, err


def test_two_cards_with_one_mac_are_refused(capsys):
    assert main(["run", "hello", "--serial", "none", "--nic", "net=switch:a,mac=52:54:00:00:00:01",
                 "-nic", "net=switch:b,mac=52:54:00:00:00:01"]) == 2
    assert "two network cards" in capsys.readouterr().err


def test_a_port_in_use_and_a_refused_connection_exit_2(capsys):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        assert main(["run", "hello", "--serial", "none", "--nic", f"net=stream:127.0.0.1:{port},server=on"]) == 2
        err = capsys.readouterr().err.strip()
        assert "in use" in err and "\n" not in err, err
    finally:
        held.close()
    assert main(["run", "hello", "--serial", "none", "-netdev", f"net=stream:127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and "\n" not in err, err


def test_a_recording_names_its_cards_and_replays_without_a_network(tmp_path, capsys):
    log = tmp_path / "run.vmlog"
    pcap = tmp_path / "cap.pcap"
    assert main(["record", "hello", "-o", str(log), "--serial", "none", "--max-instructions", "300000",
                 "--nic", f"model=virtio,net=switch:cli-test,pcap={pcap}",
                 "--nic", "model=e1000,net=switch:cli-test"]) == 0
    nics = LogReader(str(log)).header.config["nics"]
    assert [(n["id"], n["model"], n["slot"]) for n in nics] == [("net0", "virtio", 3), ("net1", "e1000", 12)]
    assert nics[0]["mac"] == "52:54:00:12:34:56" and nics[1]["mac"] == "52:54:00:12:34:57"
    assert pcap.read_bytes()[:4] == bytes.fromhex("4d3cb2a1")     # a nanosecond pcap, written by now
    capsys.readouterr()
    assert main(["replay", str(log), "--serial", "none"]) == 0
