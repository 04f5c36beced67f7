"""What the secondary tells the bus about the files of one sync job, as it goes.

A job of up to PER_FILE_EVENTS files gets one `transfer` event a file; a bigger one gets
`progress` events instead, at most two a second (and one at the end).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PER_FILE_EVENTS = 100  # above this many files in one job, the bus gets progress instead


class FileEvents:
    def __init__(self, emit: Callable[..., None]):
        self._emit = emit
        self.begin(0)

    def begin(self, total: int) -> None:
        """A new job of `total` files to fetch (0 when not known: per-file events)."""
        self.files, self.bytes, self.total, self._at = 0, 0, total, 0.0

    def event(self, action: str, name: str, e: dict[str, Any]) -> None:
        if action == "fetched":
            self.files += 1
            self.bytes += e.get("size", 0)
        if self.total <= PER_FILE_EVENTS:
            self._emit("transfer", action=action, folder=name, path=e["path"],
                       size=e.get("size", 0))
        elif time.monotonic() - self._at > 0.5 or self.files == self.total:
            self._at = time.monotonic()
            self._emit("progress", files=self.files, total=self.total, bytes=self.bytes)
