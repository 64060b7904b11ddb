"""A cost model fitted to measured programs: predicted seconds are linear in
a program's features (``cost_features.FEATURES``).

``LinearCostModel`` is the schema this project stores and passes around: the
coefficients (seconds per unit of each feature), the key of the devices it
was measured on, and how it was fitted. ``cluster_env.CostProfile`` carries
one (``CostProfile.from_model``), and ``LogicalMesh`` then prices compute and
collectives from its coefficients, so that the ILP uses it unchanged.

Schema (JSON, ``to_json`` / ``from_json``)::

  {"schema": 1,
   "key": {"platform": "cpu", "device_kind": "cpu", "num_devices": 8,
           "jax": "0.10.2", "jaxlib": "0.10.2"},
   "features": [...FEATURES...], "coefficients": [...seconds per unit...],
   "budget": 64, "pool_size": 240, "selection": "leverage", "loss": "l2",
   "train_rel_error": 0.12, "labels": {"<candidate id>": seconds, ...},
   "unmeasured": [...features no profiled program exercised...]}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jaxlib
import numpy as np

from alpa_py.compiler.cost_features import FEATURES, INDEX, ring_bytes

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DeviceKey:
  """What a calibration is valid for: another key means measure again."""

  platform: str
  device_kind: str
  num_devices: int
  jax: str
  jaxlib: str

  @classmethod
  def of(cls, devices: Sequence[Any]) -> "DeviceKey":
    d = devices[0]
    return cls(d.platform, str(d.device_kind), len(devices), jax.__version__,
               jaxlib.__version__)

  def __str__(self) -> str:
    return (f"{self.num_devices} x {self.device_kind} ({self.platform}), "
            f"jax {self.jax}, jaxlib {self.jaxlib}")


@dataclasses.dataclass(frozen=True)
class LinearCostModel:
  """Seconds = coefficients . features, per compiled program.

  Attributes:
    key: the devices (kind, count) and JAX version it was measured with.
    coefficients: seconds per unit of each of ``features``.
    features: ``cost_features.FEATURES`` when it was fitted.
    budget: programs profiled to fit it.
    pool_size: candidate programs it was chosen from.
    selection: how they were chosen (``leverage``, ``bss``, ``uniform``,
      ``all``).
    loss: ``l2`` (weighted least squares) or ``l1`` (least absolute
      deviations).
    train_rel_error: mean |predicted - measured| / measured on the profiled
      programs.
    labels: (candidate id, measured seconds) of every profiled program.
    unmeasured: features no profiled program exercised (their coefficients
      are filled in, not fitted).
  """

  key: DeviceKey
  coefficients: tuple[float, ...]
  features: tuple[str, ...] = FEATURES
  budget: int = 0
  pool_size: int = 0
  selection: str = "leverage"
  loss: str = "l2"
  train_rel_error: float | None = None
  labels: tuple[tuple[str, float], ...] = ()
  unmeasured: tuple[str, ...] = ()

  def __post_init__(self):
    if tuple(self.features) != FEATURES:
      raise ValueError(f"a cost model over features {self.features} does "
                       f"not match this version's {FEATURES}; calibrate again")
    if len(self.coefficients) != len(FEATURES):
      raise ValueError(f"{len(self.coefficients)} coefficients for "
                       f"{len(FEATURES)} features")
    bad = [(n, c) for n, c in zip(FEATURES, self.coefficients)
           if not (math.isfinite(c) and c >= 0)]
    if bad:
      raise ValueError(f"cost-model coefficients must be finite and "
                       f"non-negative: {bad}")

  def coef(self, name: str) -> float:
    return self.coefficients[INDEX[name]]

  def predict(self, features: np.ndarray) -> np.ndarray | float:
    """Seconds of one feature row, or of each row of a matrix."""
    return np.asarray(features) @ np.asarray(self.coefficients)

  # -- LogicalMesh pricing -------------------------------------------------

  def compute_time(self, flops: float, nbytes: float, is_matmul: bool) -> float:
    """One op's compute: its FLOPs (matmul) or its bytes (the others)."""
    if is_matmul:
      return flops * self.coef("matmul_flops")
    return nbytes * self.coef("nonmatmul_bytes")

  def collective_time(self, kind: str, n: int, nbytes: float,
                      link: str) -> float:
    """One collective of ``n`` devices on ``nbytes`` (an all-gather's result,
    a reduce-scatter's operand, the array of the others)."""
    if n <= 1:
      return 0.0
    prefix = f"{kind}:{link}"
    return (self.coef(prefix + ":count")
            + self.coef(prefix + ":bytes") * ring_bytes(kind, n, nbytes))

  # -- schema ---------------------------------------------------------------

  def to_json(self) -> dict:
    return {"schema": SCHEMA_VERSION, "key": dataclasses.asdict(self.key),
            "features": list(self.features),
            "coefficients": list(self.coefficients), "budget": self.budget,
            "pool_size": self.pool_size, "selection": self.selection,
            "loss": self.loss, "train_rel_error": self.train_rel_error,
            "labels": dict(self.labels), "unmeasured": list(self.unmeasured)}

  @classmethod
  def from_json(cls, data: dict) -> "LinearCostModel":
    """Raises ValueError / KeyError / TypeError on a malformed record."""
    if data.get("schema") != SCHEMA_VERSION:
      raise ValueError(f"schema {data.get('schema')!r}, expected "
                       f"{SCHEMA_VERSION}")
    return cls(key=DeviceKey(**data["key"]),
               coefficients=tuple(float(c) for c in data["coefficients"]),
               features=tuple(data["features"]), budget=int(data["budget"]),
               pool_size=int(data["pool_size"]),
               selection=str(data["selection"]), loss=str(data["loss"]),
               train_rel_error=(None if data["train_rel_error"] is None
                                else float(data["train_rel_error"])),
               labels=tuple((str(k), float(v))
                            for k, v in data["labels"].items()),
               unmeasured=tuple(str(f) for f in data["unmeasured"]))
