"""What lies outside the determinism boundary: the terminal, files and sockets
behind the serial console (and later disk image formats and network taps).
Nothing here is reached by a guest except through the event log."""
