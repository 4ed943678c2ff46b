"""Progress for long jobs: a tqdm bar on a terminal, plain lines elsewhere (CI logs, ``| tee``, files).

tqdm writes carriage returns, which a log file keeps as one unreadable line; off a terminal this prints a line
per tenth of the work (and at most one every ``min_interval`` seconds) instead.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, stream=None,
                 min_interval: float = 10.0) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.min_interval = enabled, min_interval
        self._bar, self._t0, self._last, self._next_tenth = None, time.perf_counter(), 0.0, 1
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled or not self.total:
            return
        now = time.perf_counter()
        tenth = self.n * 10 // self.total
        if (tenth >= self._next_tenth and now - self._last >= self.min_interval) or self.n >= self.total:
            self._next_tenth = tenth + 1
            self._last = now
            rate = self.n / max(now - self._t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, "
                  f"{rate:.1f} {self.unit}/s)", file=self.stream, flush=True)  # fmt: skip

    @property
    def rate(self) -> float:
        return self.n / max(time.perf_counter() - self._t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
