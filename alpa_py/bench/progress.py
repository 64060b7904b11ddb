"""A minimal progress bar on stderr (no dependency)."""

import sys
import time


class Bar:
  def __init__(self, total: int, title: str, enabled: bool = True):
    self.total, self.title, self.n = total, title, 0
    self.enabled = enabled
    self.t0 = time.perf_counter()

  def step(self, label: str):
    self.n += 1
    if not self.enabled:
      return
    width = 24
    done = int(width * self.n / max(self.total, 1))
    sys.stderr.write(f"\r{self.title} [{'#' * done}{'.' * (width - done)}] "
                     f"{self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s "
                     f"{label[:40]:<40}")
    sys.stderr.flush()
    if self.n == self.total:
      sys.stderr.write("\n")
