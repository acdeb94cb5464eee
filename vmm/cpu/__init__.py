"""The virtual CPU: the Unicorn engine behind the vCPU class (the only module
that imports Unicorn is vcpu.py), interrupt and exception delivery as the SDM
defines it, CPUID, and the C fast path in native/."""
