"""The candidate programs a calibration chooses from, and how one is
compiled (its features) and profiled (its wall time).

Candidates are the programs the compiler makes, built with explicit
shardings on 2-D meshes over *all* the devices being calibrated (as the ILP
plans them; a device left idle would change what the others get of a shared
host):

* ``dot``: one dot_general under each of its strategies: replicated, split
  on the batch (M), output (N) or contracted (K) dim over one axis (with an
  all-reduce or a reduce-scatter of the partial sums), split on two dims
  over both axes, or with a layout change after it;
* ``ew``: short chains of cheap elementwise ops (one fused kernel: its
  bytes), replicated or split;
* ``reduce``: sums over a split dim (all-reduce);
* ``collective``: resharding an array (all-gather, all-to-all) and explicit
  ``psum`` / ``psum_scatter`` over one axis, 8 KiB - 2 MiB per device;
* ``mlp`` / ``attn``: a layer's forward + backward (the step of a one-layer
  model) under data-parallel, Megatron-style, ZeRO-style and replicated
  plans;
* ``conv``: a 3x3 convolution layer's forward + backward (its input- and
  filter-gradient convolutions too) split on the batch, on the output
  channels, or replicated;
* ``step``: the whole training step (Adam update included) of a small
  transformer under data-parallel, ZeRO-style, Megatron-style and
  replicated plans (``calibration_steps``).

``measure_contention`` times the same per-device work on 1, 2, 4, ... of the
devices at once (``LinearCostModel.contention``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alpa_py.compiler.calibration_steps import step_candidates
from alpa_py.compiler.cost_features import program_features

AXES = ("x", "y")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One program to calibrate on.

  Attributes:
    id: a stable name (family, shapes, mesh, shardings): the key of its
      measurement in the cache.
    family: ``dot``, ``ew``, ``reduce``, ``collective``, ``mlp``, ``attn``.
    mesh_shape: the 2-D mesh it runs on.
    fn: the function.
    shapes: global shape of every argument (float32).
    in_specs: PartitionSpec of every argument.
    out_specs: PartitionSpec of the output(s) (a pytree like the output).
  """

  id: str
  family: str
  mesh_shape: tuple[int, int]
  fn: Callable
  shapes: tuple[tuple[int, ...], ...]
  in_specs: tuple
  out_specs: object


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A candidate compiled on the devices: its features and its executable."""

  candidate: Candidate
  features: np.ndarray
  executable: object
  in_shardings: tuple
  compile_seconds: float


def make_mesh(devices, shape: tuple[int, int]) -> Mesh:
  return Mesh(np.asarray(devices).reshape(shape), AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def compile_candidate(c: Candidate, devices) -> Compiled:
  """Compiles ``c`` on ``devices`` and reads its features from the HLO."""
  t0 = time.perf_counter()
  mesh = make_mesh(devices, c.mesh_shape)
  ins = tuple(NamedSharding(mesh, s) for s in c.in_specs)
  outs = jax.tree.map(lambda s: NamedSharding(mesh, s), c.out_specs,
                      is_leaf=lambda s: isinstance(s, P))
  args = [jax.ShapeDtypeStruct(sh, jnp.float32, sharding=s)
          for sh, s in zip(c.shapes, ins)]
  with jax.set_mesh(mesh):  # (shard_map bodies take the mesh from here)
    exe = jax.jit(c.fn, in_shardings=ins, out_shardings=outs).lower(
        *args).compile()
  feats = program_features(exe.as_text())
  return Compiled(c, feats, exe, ins, time.perf_counter() - t0)


def _inputs(compiled: Compiled, seed: int):
  rng = np.random.default_rng(seed)
  return [jax.device_put(rng.standard_normal(sh, np.float32), s)
          for sh, s in zip(compiled.candidate.shapes, compiled.in_shardings)]


def _median_call(compiled: Compiled, args, reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled.executable(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def profile(programs: list[Compiled], *, rounds: int = 3, reps: int = 3,
            on_round=None) -> tuple[np.ndarray, np.ndarray]:
  """Wall time of one blocked call of each program: the median of ``reps``
  calls (after a warm-up call) in each of ``rounds`` rounds, the least of
  those. Rounds go over all the programs in turn, so that a burst of load
  from another process slows one round of many programs, not every call of
  one, and the least disturbed round is kept (on a shared host the median
  over rounds drifted 2x between passes, the least 1.3x).

  Returns:
    (seconds per call, seconds spent profiling) for each program.
  """
  spent = np.zeros(len(programs))
  args = []
  for i, c in enumerate(programs):
    t0 = time.perf_counter()
    a = _inputs(c, i)
    jax.block_until_ready(c.executable(*a))
    args.append(a)
    spent[i] += time.perf_counter() - t0
  per_round = np.zeros((rounds, len(programs)))
  for r in range(rounds):
    for i, c in enumerate(programs):
      t0 = time.perf_counter()
      per_round[r, i] = _median_call(c, args[i], reps)
      spent[i] += time.perf_counter() - t0
    if on_round is not None:
      on_round(r + 1, rounds)
  return per_round.min(axis=0), spent


# -- the pool ---------------------------------------------------------------

def _meshes(n: int) -> list[tuple[int, int]]:
  return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


def _dot_candidates(n: int) -> list[Candidate]:
  out = []
  sizes = [(m, k, nn) for m in (128, 512, 1024) for k in (128, 512)
           for nn in (128, 512)] + [(2048, 256, 128), (256, 1024, 256),
                                    (64, 64, 64), (4096, 128, 64)]
  for shape in _meshes(n):
    axes = [a for a, s in zip(AXES, shape) if s > 1]
    specs = [("R", P(), P(), P())]
    for a in axes:
      specs += [(f"M:{a}", P(a, None), P(), P(a, None)),
                (f"N:{a}", P(), P(None, a), P(None, a)),
                (f"K:{a}+AR", P(None, a), P(a, None), P()),
                (f"K:{a}+RS", P(None, a), P(a, None), P(a, None)),
                (f"M:{a}+AG", P(a, None), P(), P())]
    if len(axes) == 2:
      specs += [("M:x,N:y", P("x", None), P(None, "y"), P("x", "y")),
                ("M:x,K:y+AR", P("x", "y"), P("y", None), P("x", None)),
                ("M:xy", P(("x", "y"), None), P(), P(("x", "y"), None)),
                ("N:y>M:y", P(), P(None, "y"), P("y", None))]
    for m, k, nn in sizes:
      for name, sa, sb, so in specs:
        out.append(Candidate(f"dot:{m}x{k}x{nn}:{shape}:{name}", "dot", shape,
                             lambda a, b: a @ b, ((m, k), (k, nn)), (sa, sb),
                             so))
  return out


def _ew_fn(depth: int):
  def f(x):
    for _ in range(depth):
      x = jnp.maximum(x * 1.01 + 0.5, 0.25 * x)
    return x
  return f


def _ew_candidates(n: int) -> list[Candidate]:
  out = []
  for shape in _meshes(n):
    specs = [("R", P())] + [(f"S:{a}", P(a, None)) for a, s in
                            zip(AXES, shape) if s > 1]
    for rows, cols in ((256, 256), (1024, 512), (2048, 1024), (4096, 512),
                       (512, 128), (8192, 1024)):
      for depth in (1, 3):
        for name, spec in specs:
          out.append(Candidate(f"ew:{rows}x{cols}:d{depth}:{shape}:{name}",
                               "ew", shape, _ew_fn(depth), ((rows, cols),),
                               (spec,), spec))
  return out


def _reduce_candidates(n: int) -> list[Candidate]:
  out = []
  for shape in _meshes(n):
    for a, s in zip(AXES, shape):
      if s == 1:
        continue
      for rows, cols in ((512, 256), (2048, 1024), (8192, 512)):
        out.append(Candidate(f"reduce:{rows}x{cols}:{shape}:{a}", "reduce",
                             shape, lambda x: jnp.sum(x * x, axis=0),
                             ((rows, cols),), (P(a, None),), P()))
  return out


def _psum(axis):
  return lambda x: lax.psum(x, axis)


def _psum_scatter(axis):
  return lambda x: lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True)


def _collective_candidates(n: int) -> list[Candidate]:
  out = []
  for shape in _meshes(n):
    for a, s in zip(AXES, shape):
      if s == 1:
        continue
      for rows in (16, 128, 1024, 4096):
        cols = 128
        out.append(Candidate(f"coll:allgather:{rows}x{cols}:{shape}:{a}",
                             "collective", shape, lambda x: x + 1.0,
                             ((rows * s, cols),), (P(a, None),), P()))
        out.append(Candidate(f"coll:alltoall:{rows}x{cols}:{shape}:{a}",
                             "collective", shape, lambda x: x + 1.0,
                             ((rows * s, cols * s),), (P(a, None),),
                             P(None, a)))
        for kind, body in (("psum", _psum(a)),
                           ("psum_scatter", _psum_scatter(a))):
          out_spec = P() if kind == "psum" else P(a, None)
          fn = jax.shard_map(body, in_specs=P(a, None), out_specs=out_spec)
          out.append(Candidate(f"coll:{kind}:{rows}x{cols}:{shape}:{a}",
                               "collective", shape, fn, ((rows * s, cols),),
                               (P(a, None),), out_spec))
  return out


def _mlp_step(x, w1, w2):
  def loss(w1, w2):
    h = jax.nn.relu(x @ w1)
    return jnp.mean((h @ w2) ** 2)
  g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)
  return w1 - 0.01 * g1, w2 - 0.01 * g2


def _attn_step(x, wq, wk, wv, wo):
  def loss(wq, wk, wv, wo):
    q, k, v = x @ wq, x @ wk, x @ wv
    s = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(q.shape[-1])
    o = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v) @ wo
    return jnp.mean(o ** 2)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(wq, wk, wv, wo)
  return tuple(w - 0.01 * g for w, g in zip((wq, wk, wv, wo), grads))


def _layer_candidates(n: int) -> list[Candidate]:
  out = []
  for shape in _meshes(n):
    if 1 in shape and shape != (1, n):
      continue
    both = ("x", "y") if shape[0] > 1 else "y"
    for batch, hidden in ((64, 128), (256, 128), (128, 256), (256, 256)):
      plans = {"data": (P(both, None), P(), P()),
               "zero": (P(both, None), P(both, None), P(both, None)),
               "replicated": (P(), P(), P())}
      if shape[0] > 1:
        plans["megatron"] = (P("x", None), P(None, "y"), P("y", None))
      for plan, (sx, s1, s2) in plans.items():
        out.append(Candidate(f"mlp:{batch}x{hidden}:{shape}:{plan}", "mlp",
                             shape, _mlp_step,
                             ((batch, hidden), (hidden, 4 * hidden),
                              (4 * hidden, hidden)), (sx, s1, s2), (s1, s2)))
    for batch, seq, d in ((8, 64, 64), (8, 128, 64), (16, 64, 128)):
      col = P(None, "y") if shape[0] > 1 else P()
      row = P("y", None) if shape[0] > 1 else P()
      plans = {"data": (P(both, None, None), (P(),) * 4),
               "replicated": (P(), (P(),) * 4)}
      if shape[0] > 1:
        plans["megatron"] = (P("x", None, None), (col, col, col, row))
      for plan, (sx, ws) in plans.items():
        out.append(Candidate(f"attn:{batch}x{seq}x{d}:{shape}:{plan}", "attn",
                             shape, _attn_step,
                             ((batch, seq, d),) + ((d, d),) * 4,
                             (sx,) + ws, ws))
  return out


def _conv_step(x, w):
  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y))
  return jax.grad(loss, argnums=(0, 1))(x, w)


def _conv_candidates(n: int) -> list[Candidate]:
  out = []
  for shape in _meshes(n):
    if 1 in shape and shape != (1, n):
      continue
    both = ("x", "y") if shape[0] > 1 else "y"
    for batch, hw, cin, cout in ((16, 16, 16, 32), (32, 16, 32, 32),
                                 (16, 32, 32, 64), (64, 8, 64, 64)):
      plans = {"data": (P(both), P()), "replicated": (P(), P())}
      if shape[0] > 1:
        plans["channels"] = (P("x"), P(None, None, None, "y"))
      for plan, (sx, sw) in plans.items():
        out.append(Candidate(f"conv:{batch}x{hw}x{cin}x{cout}:{shape}:{plan}",
                             "conv", shape, _conv_step,
                             ((batch, hw, hw, cin), (3, 3, cin, cout)),
                             (sx, sw), (sx, sw)))
  return out


def measure_contention(devices, size: int = 512,
                       reps: int = 5) -> tuple[tuple[int, float], ...]:
  """(d, t_d / t_n) for d = 1, 2, 4, ... n: the time of one [size, size]
  matmul per device when d of the ``n`` devices run it at once, over the
  time when all of them do (the least of ``reps`` blocked calls each: the
  least disturbed by other work on a shared host)."""
  n = len(devices)
  counts = sorted({1 << k for k in range(n.bit_length()) if 1 << k <= n}
                  | {n})
  times = {}
  for d in counts:
    mesh = Mesh(np.asarray(devices[:d]), ("d",))
    sh = NamedSharding(mesh, P("d"))
    a = jax.device_put(np.ones((d * size, size), np.float32), sh)
    b = jax.device_put(np.ones((d, size, size), np.float32), sh)
    f = jax.jit(lambda a, b, d=d: (a.reshape(d, size, size) @ b).reshape(
        d * size, size), out_shardings=sh)
    jax.block_until_ready(f(a, b))
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      ts.append(time.perf_counter() - t0)
    times[d] = float(np.min(ts))
  return tuple((d, times[d] / times[n]) for d in counts)


# share of each family in a pool: single ops dominate, as in a step; the
# collectives of each kind and link are the rarer rows
_QUOTA = {"dot": 0.28, "ew": 0.14, "reduce": 0.05, "collective": 0.2,
          "mlp": 0.09, "attn": 0.06, "conv": 0.07, "step": 0.11}


def all_candidates(num_devices: int) -> list[Candidate]:
  """Every candidate program for ``num_devices`` devices, in a fixed order."""
  return (_dot_candidates(num_devices) + _ew_candidates(num_devices)
          + _reduce_candidates(num_devices)
          + _collective_candidates(num_devices)
          + _layer_candidates(num_devices) + _conv_candidates(num_devices)
          + step_candidates(num_devices, _meshes(num_devices), Candidate))


def candidate_pool(num_devices: int, size: int = 240,
                   seed: int = 0) -> list[Candidate]:
  """A pool of ``size`` candidates drawn (by ``seed``) from
  ``all_candidates``, each family in its share.

  Raises:
    ValueError: ``size`` is larger than the candidates there are.
  """
  every = all_candidates(num_devices)
  if size > len(every):
    raise ValueError(f"a pool of {size} candidates asked for; there are "
                     f"{len(every)} for {num_devices} devices")
  rng = np.random.default_rng(seed)
  by_family: dict[str, list[Candidate]] = {}
  for c in every:
    by_family.setdefault(c.family, []).append(c)
  quota = {f: max(1, int(round(q * size))) for f, q in _QUOTA.items()
           if f in by_family}
  quota[max(quota, key=quota.get)] += size - sum(quota.values())
  pool = []
  for family, cands in by_family.items():
    k = min(quota.get(family, 0), len(cands))
    pool += [cands[i] for i in sorted(rng.choice(len(cands), k,
                                                 replace=False))]
  if len(pool) < size:  # a family too small for its share: top up
    chosen = {c.id for c in pool}
    rest = [c for c in every if c.id not in chosen]
    pool += [rest[i] for i in sorted(rng.choice(len(rest), size - len(pool),
                                                replace=False))]
  return pool
