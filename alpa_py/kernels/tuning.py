"""Which kernel backend ``backend="auto"`` runs, from recorded measurements.

The kernel benchmarks time every backend of an operator as device time
and, with ``--record``, write per device kind the fastest backend at each
measured size: ``benchmarks/lora_kernels.py`` for the LoRA operators (op
``lora_bgmv``: sizes tokens, rank, h_in, h_out) and
``benchmarks/sparse_neurons.py`` for the sparse firing-neuron step (op
``sparse_step``: sizes neurons, points, features, capacity). ``auto`` then
picks the backend measured fastest at the nearest recorded size (distance
in log2 of the sizes, same op and dtype). Records are read from the file
shipped with the package (``kernel_choices.json``) and from the user's
cache (``$ALPA_PY_CACHE_DIR/kernel_choices.json``, default
``~/.cache/alpa_py``), which wins where both hold a device kind and op. A
device kind with no record of an op keeps that op's default.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib

import jax

SCHEMA = 1
PACKAGED = pathlib.Path(__file__).with_name("kernel_choices.json")


def user_path() -> pathlib.Path:
  root = os.environ.get("ALPA_PY_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "alpa_py")
  return pathlib.Path(root) / "kernel_choices.json"


def _read(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise ValueError(f"kernel backend records {path} are unreadable ({e}); "
                     "delete the file or record them again with the "
                     "kernel benchmarks' --record") from None
  if data.get("schema") != SCHEMA:
    raise ValueError(f"kernel backend records {path} have schema "
                     f"{data.get('schema')!r}, expected {SCHEMA}; record "
                     "them again with the kernel benchmarks' --record")
  return data.get("devices", {})


@functools.lru_cache(maxsize=None)
def records() -> dict:
  """Device kind -> list of records (the user's cache over the package's)."""
  out = dict(_read(PACKAGED))
  out.update(_read(user_path()))
  return out


def device_kind() -> str:
  return jax.devices()[0].device_kind


def _distance(rec: dict, sizes: dict) -> float:
  return sum(abs(math.log2(max(rec["sizes"][k], 1)) - math.log2(max(v, 1)))
             for k, v in sizes.items())


def choose(op: str, dtype, sizes: dict, default: str) -> str:
  """The backend measured fastest for ``op`` at the nearest recorded
  ``sizes``, or ``default`` when this device kind has no record of this op
  and dtype."""
  name = jax.numpy.dtype(dtype).name
  recs = [r for r in records().get(device_kind(), ())
          if r["op"] == op and r["dtype"] == name and
          set(r["sizes"]) == set(sizes)]
  if not recs:
    return default
  return min(recs, key=lambda r: _distance(r, sizes))["best"]


def _key(r: dict) -> tuple:
  return (r["op"], r["dtype"], tuple(sorted(r["sizes"].items())))


def write(kind: str, rows: list[dict], path: pathlib.Path | None = None) -> str:
  """Merges ``rows`` (dicts with op, dtype, sizes, best, and the measured
  ``us`` per backend) for device ``kind`` into the records file at
  ``path`` (default: the user's cache); returns the path."""
  path = pathlib.Path(path) if path is not None else user_path()
  data = {"schema": SCHEMA, "devices": _read(path)}
  keep = {_key(r): r for r in data["devices"].get(kind, [])}
  keep.update({_key(r): r for r in rows})
  data["devices"][kind] = sorted(keep.values(), key=_key)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1) + "\n")
  records.cache_clear()
  return str(path)
