"""The features of a compiled program that the calibrated cost model is
linear in.

One row per program, per device, read from its optimized HLO:

* ``fixed``: 1 (what a step costs whatever it does);
* ``matmul_flops``, ``conv_flops``, ``nonmatmul_bytes``,
  ``kernel_launches`` (``hlo_kernels.kernel_stats``: after fusion, as XLA
  compiled it; convolutions apart from dots, as devices run them at rates
  of their own);
* per collective kind and link, ``<kind>:<link>:bytes`` and
  ``<kind>:<link>:count`` (``hlo_stats.collectives``). The link is
  ``inner`` where a collective's group holds consecutive device ids (a 1-D
  mesh, or the last axis of a 2-D one: the devices of one node) and
  ``outer`` where they are strided (the first axis of a 2-D mesh). Bytes are
  those a ring algorithm moves per device, as ``LogicalMesh`` prices them:
  ``2 (n-1)/n B`` for an all-reduce of B bytes, ``(n-1)/n B`` for an
  all-gather (B its result) or a reduce-scatter (B its operand),
  ``(n-1)/(2n) B`` for an all-to-all, B for a collective-permute.

A collective over both axes of a 2-D mesh has one group of consecutive ids
and counts as ``inner``.
"""

from __future__ import annotations

import math
import re

import numpy as np

from alpa_py.compiler.hlo_kernels import kernel_stats
from alpa_py.compiler.hlo_stats import collectives

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
LINKS = ("inner", "outer")
FEATURES: tuple[str, ...] = (
    ("fixed", "matmul_flops", "conv_flops", "nonmatmul_bytes",
     "kernel_launches")
    + tuple(f"{k}:{link}:{what}" for k in COLLECTIVE_KINDS for link in LINKS
            for what in ("bytes", "count"))
    + ("collective-permute:bytes", "collective-permute:count"))
INDEX = {name: i for i, name in enumerate(FEATURES)}

_NUM_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_IOTA = re.compile(r"\[([0-9,]*)\]<=\[([0-9,]*)\](?:T\(([0-9,]*)\))?")
_MESH = re.compile(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?"
                   r"\s*\{([^}]*)\}")


def ring_bytes(kind: str, n: int, nbytes: float) -> float:
  """Bytes one device moves in a ring collective of ``n`` devices."""
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * (n - 1) / n * nbytes
  if kind == "all-to-all":
    return (n - 1) / (2.0 * n) * nbytes
  if kind == "collective-permute":
    return float(nbytes)
  return (n - 1) / n * nbytes


def ring_steps(kind: str, n: int) -> int:
  """Latency terms (alphas) of a ring collective of ``n`` devices: an
  all-reduce takes 2(n-1) steps, the others n-1 (a collective-permute one),
  and each collective pays one more alpha to start, so that one all-reduce
  is cheaper than the reduce-scatter + all-gather it equals."""
  if n <= 1:
    return 0
  if kind == "all-reduce":
    return 2 * n - 1
  if kind == "collective-permute":
    return 1
  return n


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(dims)).reshape(dims)
  return ids.transpose(perm) if perm else ids


def group_members(text: str, num_devices: int) -> list[list[int]]:
  """The device ids of every group of a ``replica_groups`` text.

  Args:
    text: as in the HLO (``{{0,1},{2,3}}``, ``[2,4]<=[8]``,
      ``[4,2]<=[2,4]T(1,0)``, ``mesh['a'=2,'b'=4] {'a'}``); empty or ``{}``
      means one group of every device.
    num_devices: the module's partition count.
  """
  text = text.strip()
  if text in ("", "{}"):
    return [list(range(num_devices))]
  if text.startswith("{{"):
    return [_ints(g) for g in re.findall(r"\{([0-9,\s]*)\}", text[1:-1])]
  m = _IOTA.fullmatch(text)
  if m:
    shape = _ints(m.group(1))
    ids = _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
    return ids.reshape(shape[0], -1).tolist()
  m = _MESH.fullmatch(text)
  if m:
    axes = re.findall(r"'([^']*)'=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes))
    if m.group(2):
      dev = re.fullmatch(r"\[([0-9,]*)\](?:T\(([0-9,]*)\))?", m.group(2).strip())
      ids = (_iota(_ints(dev.group(1)),
                   _ints(dev.group(2)) if dev.group(2) else None).ravel()
             if dev else np.array(_ints(m.group(2))))
    ids = ids.reshape(sizes)
    chosen = [names.index(a) for a in re.findall(r"'([^']*)'", m.group(3))]
    rest = [i for i in range(len(sizes)) if i not in chosen]
    size = math.prod(sizes[i] for i in chosen)
    return ids.transpose(rest + chosen).reshape(-1, size).tolist()
  return [list(range(num_devices))]


def link_of(group: list[int]) -> str:
  """``inner`` for consecutive device ids, ``outer`` for strided ones."""
  return "inner" if max(group) - min(group) + 1 == len(group) else "outer"


def num_partitions(hlo_text: str) -> int:
  """The device count of a compiled SPMD program (1 if unpartitioned)."""
  m = _NUM_PARTITIONS.search(hlo_text)
  return int(m.group(1)) if m else 1


def program_features(hlo_text: str) -> np.ndarray:
  """The feature row (``FEATURES``) of one compiled SPMD program.

  Args:
    hlo_text: the optimized HLO (``jax.jit(f).lower(...).compile().as_text()``).
  """
  row = np.zeros(len(FEATURES))
  row[INDEX["fixed"]] = 1.0
  ks = kernel_stats(hlo_text)
  row[INDEX["matmul_flops"]] = ks.matmul_flops
  row[INDEX["conv_flops"]] = ks.conv_flops
  row[INDEX["nonmatmul_bytes"]] = ks.nonmatmul_bytes
  row[INDEX["kernel_launches"]] = ks.launches
  num_devices = num_partitions(hlo_text)
  for c in collectives(hlo_text):
    group = group_members(c.replica_groups, num_devices)[0]
    n = len(group)
    for kind, nbytes in c.kind_bytes:
      if kind == "collective-permute":
        row[INDEX["collective-permute:bytes"]] += nbytes
        row[INDEX["collective-permute:count"]] += 1
        continue
      prefix = f"{kind}:{link_of(group)}"
      row[INDEX[prefix + ":bytes"]] += ring_bytes(kind, n, nbytes)
      row[INDEX[prefix + ":count"]] += 1
  return row
