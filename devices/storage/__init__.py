"""Storage: disk images as the guest's devices see them."""
