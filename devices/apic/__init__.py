"""The APIC family: the xAPIC local APIC of each vCPU (lapic.py), the 82093AA
I/O APIC (ioapic.py) and the APIC bus that carries interrupt messages between
them (apicbus.py).

Wiring, in the order a machine does it::

    bus = ApicBus()
    lapics = [LocalApic(clock, bus, pins[i], apic_id=i, bsp=(i == 0)) for i in range(n)]
    bank = LocalApicBank(lapics)          # one MMIO device, per-vCPU registers
    bank.attach_pic(pic)                  # the 8259 pair's INTR on every LINT0
    mmio.register(bank, 0xFEE0_0000, 0x1000)
    ioapic = IoApic(bus)                  # joins the bus, receives EOI broadcasts
    mmio.register(ioapic, 0xFEC0_0000, 0x1000)
"""
