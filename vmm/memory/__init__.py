"""Guest memory: RAM (ram.py), the EPT (GPA -> host frame, ept.py), the guest
page walk (paging.py, with its C port in vmm/cpu/native/mmu.c), and DMA views."""
