"""The timers a kernel calibrates against, and ACPI fixed-hardware power management.

* ``hpet``: the IA-PC High Precision Event Timer block at 0xFED00000 (IA-PC
  HPET Specification 1.0a), as QEMU's hw/timer/hpet.c presents it.
* ``acpi_pm``: the ACPI fixed-hardware registers of a PIIX4-style chipset --
  PM1a event and control blocks, the PM timer, GPE0, the SMI command port --
  and the PIIX3/PIIX4 reset control register at port 0xCF9, at the port
  addresses QEMU's i440FX machine uses.  The FADT/DSDT builders take the
  addresses and the \\_S5 sleep type from the constants exported there.

Both count exactly from the machine's 100 MHz ``VirtualClock``: the HPET main
counter advances one per tick, the PM timer is ``floor(ticks * 3579545 /
100_000_000)``, so every timer event falls on an exact, reproducible tick.
"""
