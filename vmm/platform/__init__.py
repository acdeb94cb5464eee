"""Boards: the machine wired as a PC (pc.py)."""
