"""Collective traffic read from optimized HLO text."""

from __future__ import annotations

import math
import re

import numpy as np

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_LINE = re.compile(r"=\s*(\(.*?\)|[a-z]+[0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                   r"([a-z\-]+)\(")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
          "c64": 8, "c128": 16}


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _BYTES.get(dtype, np.dtype(dtype).itemsize if dtype in
                            np.sctypeDict else 4)
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Per collective kind, the bytes of its results on one device per step.

  Async pairs count once (the ``-start``); ``-done`` ops are skipped.
  """
  out = {k: 0 for k in _COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    op = m.group(2)
    base = op[:-6] if op.endswith("-start") else op
    if base in out and not op.endswith("-done"):
      out[base] += _shape_bytes(m.group(1))
  return out
