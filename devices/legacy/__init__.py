"""The PC/AT's legacy devices: 8259 PIC pair, 8254 PIT, MC146818 RTC, 16550
UART, 8042 keyboard controller, and the debug ports QEMU users rely on."""
