"""vmm/firmware"""
