"""A cost model fitted to measured programs: predicted seconds are linear in
a program's features (``cost_features.FEATURES``).

``LinearCostModel`` is the schema this project stores and passes around: the
coefficients (seconds per unit of each feature), the key of the devices it
was measured on, and how it was fitted. ``cluster_env.CostProfile`` carries
one (``CostProfile.from_model``), and ``LogicalMesh`` then prices compute and
collectives from its coefficients, so that the ILP uses it unchanged.

Schema 3 (JSON, ``to_json`` / ``from_json``; schema 2 models were fitted to
``nonmatmul_bytes`` that counted a sliced operand whole, and are measured
again)::

  {"schema": 3,
   "key": {"platform": "cpu", "device_kind": "cpu", "num_devices": 8,
           "jax": "0.10.2", "jaxlib": "0.10.2"},
   "features": [...FEATURES...], "coefficients": [...seconds per unit...],
   "contention": [[1, 0.13], [2, 0.26], [4, 0.5], [8, 1.0]],
   "collective_terms": [["all-to-all:inner", 4e-4, 1.2e-8], ...],
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

SCHEMA_VERSION = 3
# the features that are the device's own work (scaled by ``contention``)
COMPUTE_FEATURES = ("matmul_flops", "conv_flops", "nonmatmul_bytes",
                    "kernel_launches")


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
    contention: (d, factor) pairs: the time of the same per-device work
      when d of the devices run it at once, over its time when all
      ``key.num_devices`` do. 1 everywhere for devices with compute of
      their own (GPUs); about d / num_devices for simulated devices that
      share a host's cores, where one device alone gets all of them.
      Compute features are scaled by it for programs on fewer devices.
    collective_terms: (``<kind>:<link>``, seconds per collective, seconds
      per ring byte) fitted on programs that do one resharding alone: the
      collective *and* the copies and transposes XLA adds around it. A
      compiled program shows those copies as kernels of its own (priced by
      ``predict``); the ILP's graph does not, so ``collective_time`` prices
      a collective with these terms where they were measured.
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
  contention: tuple[tuple[int, float], ...] = ()
  collective_terms: tuple[tuple[str, float, float], ...] = ()

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

  def contention_factor(self, num_devices: int | None) -> float:
    """``contention`` at ``num_devices`` (the nearest measured count; 1
    for the calibrated count or where nothing was measured)."""
    if not self.contention or num_devices is None:
      return 1.0
    d, f = min(self.contention,
               key=lambda p: abs(math.log(p[0]) - math.log(num_devices)))
    return f

  def predict(self, features: np.ndarray,
              num_devices: int | None = None) -> np.ndarray | float:
    """Seconds of one feature row, or of each row of a matrix, for a
    program on ``num_devices`` devices (None: the calibrated count)."""
    coef = np.array(self.coefficients)
    scale = self.contention_factor(num_devices)
    for name in COMPUTE_FEATURES:
      coef[INDEX[name]] *= scale
    return np.asarray(features) @ coef

  # -- LogicalMesh pricing -------------------------------------------------

  def compute_time(self, flops: float, nbytes: float, is_matmul: bool,
                   is_conv: bool = False,
                   num_devices: int | None = None) -> float:
    """One op's compute on a mesh of ``num_devices``: its FLOPs (a matmul
    or convolution) or its bytes (the others)."""
    scale = self.contention_factor(num_devices)
    if is_conv:
      return scale * flops * self.coef("conv_flops")
    if is_matmul:
      return scale * flops * self.coef("matmul_flops")
    return scale * nbytes * self.coef("nonmatmul_bytes")

  def collective_time(self, kind: str, n: int, nbytes: float,
                      link: str) -> float:
    """One collective of ``n`` devices on ``nbytes`` (an all-gather's result,
    a reduce-scatter's operand, the array of the others)."""
    if n <= 1:
      return 0.0
    prefix = f"{kind}:{link}"
    for name, alpha, beta in self.collective_terms:
      if name == prefix:
        return alpha + beta * ring_bytes(kind, n, nbytes)
    return (self.coef(prefix + ":count")
            + self.coef(prefix + ":bytes") * ring_bytes(kind, n, nbytes))

  # -- schema ---------------------------------------------------------------

  def to_json(self) -> dict:
    return {"schema": SCHEMA_VERSION, "key": dataclasses.asdict(self.key),
            "features": list(self.features),
            "coefficients": list(self.coefficients), "budget": self.budget,
            "pool_size": self.pool_size, "selection": self.selection,
            "loss": self.loss, "train_rel_error": self.train_rel_error,
            "labels": dict(self.labels), "unmeasured": list(self.unmeasured),
            "contention": [list(p) for p in self.contention],
            "collective_terms": [list(t) for t in self.collective_terms]}

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
               unmeasured=tuple(str(f) for f in data["unmeasured"]),
               contention=tuple((int(d), float(f))
                                for d, f in data.get("contention", ())),
               collective_terms=tuple(
                   (str(k), float(a), float(b))
                   for k, a, b in data.get("collective_terms", ())))
