"""The decoder model's live captions by correlation id, with a TTL, and a timer thread.

Triton's sequence batcher forgets a sequence that stays silent past
max_sequence_idle_microseconds without telling the model, so the model expires
entries idle longer than its TTL itself. Pure Python: no Triton, no torch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

T = TypeVar("T")


class SequenceTable(Generic[T]):
    """Values by key with a last-used time; least recently used first, so expiry stops early."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: OrderedDict[Hashable, tuple[T, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        return [value for value, _ in self._entries.values()]

    def add(self, key: Hashable, value: T, now: float):
        self._entries[key] = (value, now)
        self._entries.move_to_end(key)

    def touch(self, key: Hashable, now: float) -> Optional[T]:
        """The value, marked used now; None if unknown."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self.add(key, entry[0], now)
        return entry[0]

    def pop(self, key: Hashable) -> Optional[T]:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[0]

    def pop_idle(self, now: float) -> list[tuple[Hashable, T]]:
        """Remove and return the entries unused for longer than the TTL."""
        idle = []
        for key, (value, last_used) in self._entries.items():
            if now - last_used <= self.ttl_s:
                break  # the rest were used more recently
            idle.append((key, value))
        for key, _ in idle:
            del self._entries[key]
        return idle


class RepeatingTimer:
    """Calls `action()` every `interval_s` seconds on a daemon thread until `stop()`."""

    def __init__(self, interval_s: float, action: Callable[[], None], name: str):
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._action = action
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self._interval_s):
            self._action()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
