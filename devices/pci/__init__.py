"""PCI: configuration mechanism #1, the bus, the function base class, and the
i440FX/PIIX3 chipset functions that QEMU's ``pc`` machine presents.

* ``config``: ``PciBus`` (bus 0, 32 slots x 8 functions) and
  ``ConfigMechanism1`` (ports 0xCF8-0xCFF).
* ``function``: ``PciFunction``, a type 0 header with BARs that map
  themselves on the machine's IoBus/MmioBus, capabilities and INTx; IDE,
  virtio and NIC functions subclass it.
* ``i440fx``: the host bridge function at 00:00.0.
* ``piix3``: the PCI-to-ISA bridge at 00:01.0, which routes INTx to ISA IRQs.

Wiring a PC (the machine does this)::

    pci = PciBus()
    # reset_control is the 0xCF9 register (devices.timers.acpi_pm.PiixResetControl); it is
    # reached through conf and must not be registered on the IoBus itself (config.py says why)
    conf = ConfigMechanism1(pci, narrow=reset_control)
    machine.add_device(conf)                             # claims 0xCF8-0xCFB and 0xCFC-0xCFF
    pci.attach(machine.add_device(I440fx()), 0)
    piix3 = machine.add_device(Piix3(isa_irq))           # isa_irq(n) -> IrqLine into ISA IRQ n
    pci.attach(piix3, 1)
    pci.set_intx_router(piix3)
    pci.attach(SomeDevice(io_bus=machine.io, mmio_bus=machine.mmio), 3)

Each piece's module docstring cites the specification sections it implements.
"""
