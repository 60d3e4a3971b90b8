"""Rate limits for log lines a client can trigger at will.

Pure: the caller passes "now" (monotonic seconds); nothing here logs or reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class LogLimiter:
    """Decides whether a warning about ``key`` is written now.

    Each key is logged at most once per ``window_s``, and at most ``per_window`` lines of
    any keys are logged per ``window_s``: a client repeating one odd request, or sending a
    new odd field name every time, cannot flood the log. What was held back is counted in
    ``suppressed`` so the next line can say how many were left out; the caller resets it.
    """

    def __init__(self, window_s: float = 60.0, per_window: int = 10, max_keys: int = 1024) -> None:
        self.window_s = window_s
        self.per_window = per_window
        self.max_keys = max_keys
        self.suppressed = 0
        self._last: dict[Hashable, float] = {}  # key -> when it was last logged
        self._recent: deque[float] = deque()  # when the lines of the current window were logged

    def allow(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self.suppressed += 1
            return False
        while self._recent and now - self._recent[0] >= self.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.per_window:
            self.suppressed += 1
            return False
        if len(self._last) >= self.max_keys:
            # Keys logged longer than a window ago no longer hold anything back.
            self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
        self._last[key] = now
        self._recent.append(now)
        return True
