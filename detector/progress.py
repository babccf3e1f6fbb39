"""Progress lines for long CLI commands (stderr; rewritten in place on a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress("replay", total=N)`` then ``update(done)``; ``close()`` prints the final line.

    On a terminal the line is rewritten in place; otherwise a line is written at most every
    ``every_s`` seconds, so CI logs stay short.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "events", every_s: float = 2.0) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.tty = sys.stderr.isatty()
        self.every_s = every_s if not self.tty else 0.2
        self.start = self._last = time.monotonic()
        self.done = 0

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        pct = f" {min(self.done / self.total, 1.0):5.1%}" if self.total else ""
        return f"{self.label}:{pct} {self.done:,} {self.unit} ({rate:,.0f}/s, {elapsed:.0f}s)"

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            sys.stderr.write(("\r" + self._line() + "\033[K") if self.tty else self._line() + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write(("\r" + self._line() + "\033[K\n") if self.tty else self._line() + "\n")
        sys.stderr.flush()
