"""Emulated devices.

Devices are deterministic functions of their state, the guest's accesses and
virtual time.  They never import Unicorn, the vCPU or the run loop: they are
reached through the buses (devices.bus) and they signal the CPU only through
IrqLine objects (devices.base).
"""
