"""Progress for long loads and saves: nothing for the first few seconds, then a bar
(tqdm when installed) or a line on stderr every few seconds."""
from __future__ import annotations

import sys
import time
from typing import Optional

#: seconds before progress appears when not asked for explicitly
DELAY_S = 3.0
_LINE_EVERY_S = 5.0


class Progress:
    def __init__(self, total: int, desc: str, show: Optional[bool] = None, unit: str = "tensor") -> None:
        """``show``: True always, False never, None after :data:`DELAY_S` seconds."""
        self.total, self.desc, self.n, self.unit = total, desc, 0, unit
        self.start = time.monotonic()
        self.delay = 0.0 if show else DELAY_S
        self.enabled = show is not False
        self.last = None
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, delay=self.delay, file=sys.stderr, unit=unit, leave=bool(show))

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        if self.last is None or now - self.last >= _LINE_EVERY_S or self.n == self.total:
            self.last = now
            print(f"qlinear_pass: {self.desc}: {self.n}/{self.total} {self.unit}s, {now - self.start:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
