"""What the timer devices share: checked reading of saved states, and keeping one clock timer.

``StateFields``: every way a field can be wrong -- missing, of the wrong
type, out of range -- becomes a ``DeviceStateError``, so a loader validates
everything first and only then touches the live device (a refused load
leaves it as it was).

``rearm``: each device keeps at most one timer on the clock, moved only when
its deadline changes, so the clock's heap does not fill with cancelled
timers on every register access.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devices.base import DeviceStateError
from devices.clock import Timer, VirtualClock


def rearm(clock: VirtualClock, timer: Timer | None, deadline: int | None,
          callback: Callable[[int], None], name: str) -> Timer | None:
    """The device's timer for ``deadline`` (None: no timer): ``timer`` itself if it is already there."""
    if timer is not None and timer.active and timer.deadline == deadline:
        return timer
    if timer is not None:
        timer.cancel()
    return None if deadline is None else clock.schedule(deadline, callback, name)


class StateFields:
    """Checked access to the fields of one dict of a saved state."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise DeviceStateError(f"{where} must be a dict, not {type(data).__name__}")
        self._data = data
        self._where = where

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise DeviceStateError(f"{self._where}: field {key!r} is missing")
        return self._data[key]

    def int(self, key: str, lo: int, hi: int | None = None) -> int:
        """An int (never a bool) with lo <= value (<= hi)."""
        v = self._get(key)
        if type(v) is not int:
            raise DeviceStateError(f"{self._where}: {key} must be an int, not {type(v).__name__}")
        if v < lo or (hi is not None and v > hi):
            raise DeviceStateError(f"{self._where}: {key}={v} is out of range")
        return v

    def bits(self, key: str, allowed: int) -> int:
        """An int whose set bits all lie in the mask ``allowed``."""
        v = self.int(key, 0)
        if v & ~allowed:
            raise DeviceStateError(f"{self._where}: {key}={v:#x} sets bits outside {allowed:#x}")
        return v

    def bool(self, key: str) -> bool:
        v = self._get(key)
        if type(v) is not bool:
            raise DeviceStateError(f"{self._where}: {key} must be a bool, not {type(v).__name__}")
        return v

    def records(self, key: str, count: int) -> list[StateFields]:
        """A list of exactly ``count`` dicts, each checked the same way."""
        v = self._get(key)
        if not isinstance(v, list) or len(v) != count:
            raise DeviceStateError(f"{self._where}: {key} must be a list of {count}")
        return [StateFields(item, f"{self._where}.{key}[{i}]") for i, item in enumerate(v)]
