"""Display adapters: the VGA's register set and its text mode (devices/display/vga.py).

The frame buffer is guest RAM the guest writes as memory; a display device
only reads it when asked to render, so nothing here traps memory accesses.
Drawing on the host (the terminal renderer) lives in host/display.py, outside
the determinism boundary.
"""
