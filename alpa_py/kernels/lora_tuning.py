"""Which LoRA backend ``backend="auto"`` runs, from recorded measurements.

``benchmarks/lora_kernels.py --record`` times every backend as device time
(a jitted loop of many calls) over batch sizes, ranks and hidden sizes,
and writes, per device kind, the fastest backend at each measured size.
``auto`` then picks the backend measured fastest at the nearest recorded
size (distance in log2 of tokens, rank and hidden sizes, same layout and
dtype). Records are read from the file shipped with the package
(``lora_choices.json``) and from the user's cache
(``$ALPA_PY_CACHE_DIR/lora_choices.json``, default ``~/.cache/alpa_py``),
which wins where both hold a device kind. A device kind with no records
keeps the default: the Pallas kernels on GPU, gather + batched matmul
elsewhere.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib

import jax

SCHEMA = 1
PACKAGED = pathlib.Path(__file__).with_name("lora_choices.json")


def user_path() -> pathlib.Path:
  root = os.environ.get("ALPA_PY_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "alpa_py")
  return pathlib.Path(root) / "lora_choices.json"


def _read(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise ValueError(f"LoRA backend records {path} are unreadable ({e}); "
                     "delete the file or record them again with "
                     "benchmarks/lora_kernels.py --record") from None
  if data.get("schema") != SCHEMA:
    raise ValueError(f"LoRA backend records {path} have schema "
                     f"{data.get('schema')!r}, expected {SCHEMA}; record "
                     "them again with benchmarks/lora_kernels.py --record")
  return data.get("devices", {})


@functools.lru_cache(maxsize=None)
def records() -> dict:
  """Device kind -> list of records (the user's cache over the package's)."""
  out = dict(_read(PACKAGED))
  out.update(_read(user_path()))
  return out


def device_kind() -> str:
  return jax.devices()[0].device_kind


def _distance(rec: dict, key: dict) -> float:
  return sum(abs(math.log2(max(rec[k], 1)) - math.log2(max(key[k], 1)))
             for k in ("tokens", "rank", "h_in", "h_out"))


def choose(layout: str, dtype, tokens: int, rank: int, h_in: int,
           h_out: int, default: str) -> str:
  """The backend measured fastest at the nearest recorded size, or
  ``default`` when this device kind has no record of this layout and
  dtype."""
  recs = [r for r in records().get(device_kind(), ())
          if r["layout"] == layout and r["dtype"] == jax.numpy.dtype(dtype).name]
  if not recs:
    return default
  key = dict(tokens=tokens, rank=rank, h_in=h_in, h_out=h_out)
  return min(recs, key=lambda r: _distance(r, key))["best"]


def write(kind: str, rows: list[dict], path: pathlib.Path | None = None) -> str:
  """Merges ``rows`` (dicts with layout, dtype, tokens, rank, h_in, h_out,
  best, and the measured ``us`` per backend) for device ``kind`` into the
  records file at ``path`` (default: the user's cache); returns the path."""
  path = pathlib.Path(path) if path is not None else user_path()
  data = {"schema": SCHEMA, "devices": _read(path)}
  keep = {(r["layout"], r["dtype"], r["tokens"], r["rank"], r["h_in"],
           r["h_out"]): r for r in data["devices"].get(kind, [])}
  for r in rows:
    keep[(r["layout"], r["dtype"], r["tokens"], r["rank"], r["h_in"],
          r["h_out"])] = r
  data["devices"][kind] = sorted(
      keep.values(), key=lambda r: (r["layout"], r["dtype"], r["rank"],
                                    r["h_in"], r["tokens"]))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1) + "\n")
  records.cache_clear()
  return str(path)
