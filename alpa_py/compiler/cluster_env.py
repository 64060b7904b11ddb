"""Logical device meshes and the alpha-beta cost model of their collectives.

A ``CostProfile`` describes one kind of cluster: per-device compute and memory
bandwidth, and the latency (alpha, seconds) and inverse bandwidth (beta,
seconds per byte) of links inside a node and between nodes. A ``LogicalMesh``
lays a profile over a mesh shape: mesh axis ``a`` uses the inter-node link when
the devices it spans (row-major order) do not fit in one node.

Profiles:
  * ``cpu``: measured on this machine with the simulated host devices, once,
    then read from ``~/.cache/alpa_py``.
  * ``v100_8x_nvlink_25gbps``, ``a100_8x_nvlink_100gbps``,
    ``h100_8x_nvlink_400gbps``: GPU-cluster presets (vendor figures, derated to
    what dense kernels and ring collectives reach in practice), so that plans
    for such clusters can be made and inspected without one.
  * ``cpu:calibrated`` (``gpu:``, ``tpu:``): a cost model fitted to profiles
    of actively chosen programs on these devices (``compiler/calibration``),
    calibrated on first use and cached; ``calibrate()`` makes one on request.
    Such a profile carries its ``LinearCostModel``, and ``LogicalMesh``
    prices compute and every collective (per kind and link) from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alpa_py import _progress
from alpa_py.compiler import calibration
from alpa_py.compiler.cost_features import ring_bytes, ring_steps
from alpa_py.compiler.cost_model import LinearCostModel

GiB = 1 << 30


def mesh_factorizations(n: int) -> list[tuple[int, int]]:
  """Every 2-D logical mesh (a, n // a) of ``n`` devices, a ascending."""
  return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


@dataclasses.dataclass(frozen=True)
class CostProfile:
  """Performance figures of one kind of device cluster.

  Attributes:
    name: profile name.
    flops_per_s: dense matmul throughput of one device.
    mem_bytes_per_s: memory bandwidth of one device (elementwise work).
    intra_alpha: latency of one collective step inside a node, seconds.
    intra_beta: seconds per byte on an intra-node link.
    inter_alpha: latency between nodes, seconds.
    inter_beta: seconds per byte between nodes.
    devices_per_node: devices that share the fast links.
    memory_per_device: device memory in bytes (None: unknown).
    half_flops_per_s: dense matmul throughput in fp16/bf16 (tensor cores),
      vendor peak x a stated efficiency (None: as ``flops_per_s``).
    conv_flops_per_s: fp16/bf16 convolution throughput (cuDNN implicit
      GEMM reaches less of the peak than a large GEMM; None: as
      ``half_flops_per_s``).
    single_flops_per_s, single_conv_flops_per_s: fp32 matmul and
      convolution throughput, for steps that compute in float32 (None: as
      ``flops_per_s`` and ``conv_flops_per_s``).
    model: a calibrated cost model; where set, ``LogicalMesh`` prices with
      it (the rates above are read from it, for code that reads them).
  """

  name: str
  flops_per_s: float
  mem_bytes_per_s: float
  intra_alpha: float
  intra_beta: float
  inter_alpha: float
  inter_beta: float
  devices_per_node: int
  memory_per_device: int | None = None
  half_flops_per_s: float | None = None
  conv_flops_per_s: float | None = None
  single_flops_per_s: float | None = None
  single_conv_flops_per_s: float | None = None
  model: LinearCostModel | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    for field in ("flops_per_s", "mem_bytes_per_s", "intra_beta", "inter_beta"):
      if not getattr(self, field) > 0:
        raise ValueError(f"CostProfile.{field} (={getattr(self, field)}) "
                         "must be positive")

  def __str__(self) -> str:
    return self.name

  @classmethod
  def from_model(cls, model: LinearCostModel,
                 name: str | None = None) -> "CostProfile":
    """A profile that prices with a calibrated ``model``."""
    def rate(feature):  # units per second; a zero coefficient: very fast
      return 1.0 / max(model.coef(feature), 1e-30)

    return cls(name or f"{model.key.platform}:calibrated",
               flops_per_s=rate("matmul_flops"),
               conv_flops_per_s=rate("conv_flops"),
               mem_bytes_per_s=rate("nonmatmul_bytes"),
               intra_alpha=model.coef("all-reduce:inner:count"),
               intra_beta=max(model.coef("all-reduce:inner:bytes"), 1e-30),
               inter_alpha=model.coef("all-reduce:outer:count"),
               inter_beta=max(model.coef("all-reduce:outer:bytes"), 1e-30),
               devices_per_node=1 << 30, model=model)


GPU_PRESETS = {
    # AWS p3.16xlarge, the Alpa paper's cluster: fp16 tensor cores, NVLink
    # (~130 GB/s achieved ring bandwidth), 25 Gb/s Ethernet between nodes.
    "v100_8x_nvlink_25gbps": CostProfile(
        "v100_8x_nvlink_25gbps", flops_per_s=90e12, mem_bytes_per_s=800e9,
        intra_alpha=8e-6, intra_beta=1 / 130e9, inter_alpha=30e-6,
        inter_beta=1 / 3.0e9, devices_per_node=8, memory_per_device=16 * GiB,
        # V100 SXM2 datasheet: 125 TFLOPS fp16 tensor-core peak x 0.72 (the
        # efficiency of flops_per_s above); convolutions: the same peak x
        # 0.4 (a stated derating for cuDNN fp16 convolutions, not fitted);
        # fp32: the 15.7 TFLOPS datasheet peak x the same two efficiencies.
        half_flops_per_s=125e12 * 0.72, conv_flops_per_s=125e12 * 0.4,
        single_flops_per_s=15.7e12 * 0.72,
        single_conv_flops_per_s=15.7e12 * 0.4),
    # 8x A100 80 GB per node over NVLink 3 (~230 GB/s achieved), 100 Gb/s
    # between nodes.
    "a100_8x_nvlink_100gbps": CostProfile(
        "a100_8x_nvlink_100gbps", flops_per_s=220e12, mem_bytes_per_s=1.8e12,
        intra_alpha=6e-6, intra_beta=1 / 230e9, inter_alpha=20e-6,
        inter_beta=1 / 11.5e9, devices_per_node=8, memory_per_device=80 * GiB,
        # A100 SXM datasheet: 312 TFLOPS fp16/bf16 dense peak x 0.72; convs
        # the same peak x 0.4 (stated derating).
        half_flops_per_s=312e12 * 0.72, conv_flops_per_s=312e12 * 0.4),
    # 8x H100 80 GB per node over NVLink 4 (~370 GB/s achieved), 400 Gb/s
    # InfiniBand between nodes.
    "h100_8x_nvlink_400gbps": CostProfile(
        "h100_8x_nvlink_400gbps", flops_per_s=650e12, mem_bytes_per_s=3.0e12,
        intra_alpha=5e-6, intra_beta=1 / 370e9, inter_alpha=15e-6,
        inter_beta=1 / 46e9, devices_per_node=8, memory_per_device=80 * GiB,
        # H100 SXM datasheet: 989 TFLOPS bf16 dense peak x 0.66; convs the
        # same peak x 0.4 (stated derating).
        half_flops_per_s=989e12 * 0.66, conv_flops_per_s=989e12 * 0.4),
}
CALIBRATED_NAMES = ("cpu:calibrated", "gpu:calibrated", "tpu:calibrated")
PROFILE_NAMES = ("cpu",) + tuple(GPU_PRESETS) + CALIBRATED_NAMES


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("ALPA_PY_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "alpa_py")
  return pathlib.Path(root)


def _timeit(fn, *args, reps: int = 5) -> float:
  fn(*args).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return best


def measure_cpu_profile(devices=None) -> CostProfile:
  """Measures compute, memory and collective speed of the local devices.

  All devices run at once, as they do in a sharded step, so that the figures
  include their contention for the host's cores.
  """
  devices = list(devices or jax.devices())
  n = len(devices)
  mesh = Mesh(np.array(devices), ("d",),
              axis_types=(jax.sharding.AxisType.Auto,))
  row = NamedSharding(mesh, P("d"))
  rep = NamedSharding(mesh, P())

  m = 256
  a = jax.device_put(jnp.ones((n * m, m), jnp.float32), row)
  b = jax.device_put(jnp.ones((m, m), jnp.float32), rep)
  mm = jax.jit(lambda x, y: x @ y, out_shardings=row)
  t_mm = _timeit(mm, a, b)
  flops = 2.0 * m * m * m / t_mm

  e = 1 << 20
  x = jax.device_put(jnp.ones((n * e,), jnp.float32), row)
  ew = jax.jit(lambda v: v * 2.0 + 1.0, out_shardings=row)
  t_ew = _timeit(ew, x)
  mem_bw = 2.0 * 4 * e / t_ew

  if n == 1:  # no collectives to measure
    return CostProfile("cpu", flops_per_s=flops, mem_bytes_per_s=mem_bw,
                       intra_alpha=1e-5, intra_beta=1 / mem_bw,
                       inter_alpha=1e-5, inter_beta=1 / mem_bw,
                       devices_per_node=1 << 30)
  # all-reduce and reduce-scatter of a [n, k] array sharded on dim 0,
  # summed over dim 0, from 4 KB to 16 MB per device (a training step's
  # gradients and activations): one alpha and beta fitted to both kinds
  # through their ring byte counts, by least squares on relative error.
  # Fitting small sizes alone under-prices large collectives (on a 2-core
  # host a 16 MB reduce-scatter took 5x what a 4 KB-1 MB fit predicted,
  # enough to make a tensor-parallel plan look cheaper than data parallel
  # for a narrow MLP on a large batch, which measured 5x slower).
  ar = jax.jit(lambda v: v.sum(0), out_shardings=rep)
  rs = jax.jit(lambda v: v.sum(0), out_shardings=row)
  rows, times = [], []
  for k in (1 << 10, 1 << 16, 1 << 20, 1 << 22):
    v = jax.device_put(jnp.ones((n, k), jnp.float32), row)
    for fn, factor in ((ar, 2.0 * (n - 1) / n), (rs, (n - 1) / n)):
      rows.append((1.0, 4.0 * k * factor))
      times.append(_timeit(fn, v, reps=3))
  a = np.array(rows) / np.array(times)[:, None]
  (alpha, beta), *_ = np.linalg.lstsq(a, np.ones(len(times)), rcond=None)
  alpha, beta = max(float(alpha), 1e-7), max(float(beta), 1e-13)
  return CostProfile("cpu", flops_per_s=flops, mem_bytes_per_s=mem_bw,
                     intra_alpha=alpha, intra_beta=beta, inter_alpha=alpha,
                     inter_beta=beta, devices_per_node=1 << 30)


def get_profile(name: "str | CostProfile") -> CostProfile:
  """Returns a profile: a ``CostProfile`` as given; a named one (``cpu`` is
  measured once and cached on disk; ``<platform>:calibrated`` is calibrated
  once on this process's devices and cached on disk).

  Raises:
    ValueError: for an unknown name, or a calibrated one of another platform.
  """
  if isinstance(name, CostProfile):
    return name
  if name in CALIBRATED_NAMES:
    return _calibrated_profile(name, str(calibration.cache_dir()))
  return _named_profile(name)


@functools.lru_cache(maxsize=None)
def _calibrated_profile(name: str, cache_dir: str) -> CostProfile:
  del cache_dir  # (part of the key: another cache dir is looked up again)
  platform = name.split(":")[0]
  devices = jax.devices()
  if devices[0].platform != platform:
    raise ValueError(f"cost_profile {name!r} calibrates the devices it runs "
                     f"on, but JAX's devices are {devices[0].platform}; use "
                     f"'{devices[0].platform}:calibrated'")
  return CostProfile.from_model(calibration.load_or_calibrate(devices), name)


def calibrate(devices=None, budget: int = calibration.DEFAULT_BUDGET, *,
              pool_size: int = calibration.DEFAULT_POOL_SIZE,
              selection: str = "leverage", loss: str = "l2", seed: int = 0,
              cache: bool = True) -> CostProfile:
  """Calibrates the cost model on ``devices`` by active regression.

  Compiles ``pool_size`` candidate programs (single ops under their
  strategies, collectives, layer steps under baseline plans), profiles the
  ``budget`` of them that ``selection`` picks, and fits the model to them.

  Args:
    devices: the devices (None: all of ``jax.devices()``).
    budget: programs to profile; at least one per coefficient
      (``calibration.minimum_budget()``).
    pool_size: candidate programs to choose from.
    selection: ``leverage`` (leverage-score sampling), ``bss`` (randomised
      BSS, linear in the coefficients), ``uniform`` or ``all``
      (``benchmarks/calibration.py`` compares them).
    loss: ``l2`` (weighted least squares) or ``l1`` (robust to outliers).
    seed: the pool draw and the selection.
    cache: also store it as ``<platform>:calibrated`` for these devices.

  Returns:
    A profile for ``AutoShardingOption(cost_profile=...)``.

  Raises:
    ValueError: a budget below the minimum (the message names it) or above
      the pool.

  Examples:
    >>> profile = alpa_py.calibrate(budget=64)
    >>> method = alpa_py.ShardParallel(auto_sharding_option=
    ...     alpa_py.AutoShardingOption(cost_profile=profile))
  """
  model = calibration.calibrate_model(devices, budget, pool_size=pool_size,
                                      selection=selection, loss=loss,
                                      seed=seed)
  if cache:
    calibration.save(model)
    _calibrated_profile.cache_clear()
  return CostProfile.from_model(model)


@functools.lru_cache(maxsize=None)
def _named_profile(name: str) -> CostProfile:
  if name in GPU_PRESETS:
    return GPU_PRESETS[name]
  if name != "cpu":
    raise ValueError(f"unknown cost_profile {name!r}; choose one of "
                     f"{PROFILE_NAMES}")
  n = jax.device_count()
  # v2: collectives fitted up to 16 MB (profiles measured before are
  # measured again)
  path = _cache_dir() / f"profile-cpu-v2-{jax.__version__}-{n}dev.json"
  if path.exists():
    try:
      return CostProfile(**json.loads(path.read_text()))
    except (ValueError, TypeError):
      pass  # a stale or partial file: measure again
  _progress.log(f"measuring the cpu cost profile on {n} devices (once; cached "
                f"in {path})")
  profile = measure_cpu_profile()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(profile), indent=1))
  except OSError:
    pass  # read-only home: keep the in-memory profile
  return profile


@dataclasses.dataclass(frozen=True)
class LogicalMesh:
  """A mesh shape with the cost of collectives along each axis."""

  shape: tuple[int, ...]
  profile: CostProfile
  # per mesh axis (alpha seconds, beta seconds/byte), overriding the
  # profile's node-based choice (``ShardParallel(mesh_link_costs=...)``)
  link_costs: tuple[tuple[float, float], ...] | None = None

  @property
  def num_devices(self) -> int:
    return int(math.prod(self.shape))

  @property
  def _model(self) -> LinearCostModel | None:
    """The calibrated model, unless per-axis link costs override it."""
    return self.profile.model if self.link_costs is None else None

  def link(self, axis: int) -> str:
    """``inner``: the axis spans consecutive devices (no later axis splits
    them); ``outer``: strided ones (``cost_features``' two links)."""
    return "inner" if math.prod(self.shape[axis + 1:]) == 1 else "outer"

  def _alpha_beta(self, axis: int) -> tuple[float, float]:
    if self.link_costs is not None:
      return self.link_costs[axis]
    span = math.prod(self.shape[axis:])
    if span > self.profile.devices_per_node:
      return self.profile.inter_alpha, self.profile.inter_beta
    return self.profile.intra_alpha, self.profile.intra_beta

  def _collective(self, kind: str, nbytes: float, axis: int) -> float:
    """One ring collective along ``axis`` (``cost_features.ring_steps`` /
    ``ring_bytes``), or the calibrated model's time for it."""
    n = self.shape[axis]
    if n == 1:
      return 0.0
    if self._model is not None:
      return self._model.collective_time(kind, n, nbytes, self.link(axis))
    a, b = self._alpha_beta(axis)
    return a * ring_steps(kind, n) + b * ring_bytes(kind, n, nbytes)

  def all_reduce(self, nbytes: float, axis: int) -> float:
    return self._collective("all-reduce", nbytes, axis)

  def all_gather(self, out_bytes: float, axis: int) -> float:
    return self._collective("all-gather", out_bytes, axis)

  def reduce_scatter(self, in_bytes: float, axis: int) -> float:
    return self._collective("reduce-scatter", in_bytes, axis)

  def all_to_all(self, nbytes: float, axis: int) -> float:
    return self._collective("all-to-all", nbytes, axis)

  def compute(self, flops: float, nbytes: float, is_matmul: bool,
              is_conv: bool = False) -> float:
    if self.profile.model is not None:
      return self.profile.model.compute_time(flops, nbytes, is_matmul,
                                             is_conv, self.num_devices)
    if is_conv:
      return flops / (self.profile.conv_flops_per_s or self.profile.flops_per_s)
    if is_matmul:
      return flops / self.profile.flops_per_s
    return nbytes / self.profile.mem_bytes_per_s
