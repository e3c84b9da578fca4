"""Collecting what a guest prints (printf, puts, hl_log) into host logging."""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("hlpool.guest")

LogHandler = Callable[[str], None]


class GuestLog:
    """Splits the guest's log bytes into lines and hands them on.

    Lines go to ``handler`` if given, else to the ``hlpool.guest`` logger at
    INFO. At most ``max_bytes`` per call are passed on; the rest is counted
    and reported once, so a guest cannot flood the host's logs.
    """

    def __init__(self, name: str, handler: LogHandler | None, max_bytes: int) -> None:
        self.name = name
        self.handler = handler
        self.max_bytes = max_bytes
        self._partial = b""
        self._taken = 0
        self._dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.max_bytes - self._taken
        if len(data) > room:
            self._dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self._taken += len(data)
        if not data:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line)

    def end_call(self) -> None:
        """Flush a trailing partial line and report dropped bytes; reset for the next call."""
        if self._partial:
            self._emit(self._partial)
            self._partial = b""
        if self._dropped:
            log.warning("%s: guest log exceeded %d bytes in one call; %d bytes dropped",
                        self.name, self.max_bytes, self._dropped)
        self._taken = self._dropped = 0

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self.handler is not None:
            self.handler(text)
        else:
            log.info("[%s] %s", self.name, text)
