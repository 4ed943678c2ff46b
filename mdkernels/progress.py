"""Progress for long jobs: a tqdm bar on a terminal, plain lines elsewhere (CI logs, ``| tee``, files).

tqdm redraws its bar with carriage returns, which a log file keeps as one endless line of frames. Off a terminal
this prints one plain line at each tenth of the work and at least every ``interval`` seconds instead, with the
same figures (count, percent, rate and the latest ``set_postfix`` values).
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, stream=None,
                 interval: float = 30.0, initial: int = 0) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.interval = enabled, interval
        self.postfix: dict = {}
        self._bar, self._t0, self._n0 = None, time.perf_counter(), self.n
        self._last = self._t0
        self._next_tenth = self.n * 10 // max(self.total, 1) + 1
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True,
                                 file=self.stream)  # fmt: skip
            except ImportError:
                pass

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled or not self.total:
            return
        now = time.perf_counter()
        tenth = self.n * 10 // self.total
        if tenth >= self._next_tenth or now - self._last >= self.interval or self.n == self.total:
            self._next_tenth = tenth + 1
            self._last = now
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, "
                  f"{self.rate:.1f} {self.unit}/s{extra})", file=self.stream, flush=True)  # fmt: skip

    @property
    def rate(self) -> float:
        return (self.n - self._n0) / max(time.perf_counter() - self._t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
