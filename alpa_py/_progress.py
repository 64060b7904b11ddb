"""Progress messages for long compiles and benchmarks.

Messages go to the ``alpa_py`` logger. Unless the application configured that
logger itself, they are printed to stderr, except when ``ALPA_PY_QUIET=1`` is
set (the test suite sets it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

logger = logging.getLogger("alpa_py")


def _enabled() -> bool:
  return os.environ.get("ALPA_PY_QUIET", "0") not in ("1", "true", "yes")


def log(msg: str) -> None:
  """Reports one progress line."""
  if logger.handlers or logging.getLogger().handlers:
    logger.info(msg)
  elif _enabled():
    print(f"[alpa_py] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(what: str):
  """Reports how long a step took: ``with step("XLA compile"): ...``."""
  t0 = time.perf_counter()
  yield
  log(f"{what}: {time.perf_counter() - t0:.2f} s")
