"""Plans the suite compares: alpa_py's methods and hand-written baselines.

Each plan is compiled and measured on the local devices, and evaluated under
a cost profile by the same intra-op cost model (its input layouts fixed, the
rest chosen by the ILP), so that predictions compare like with like.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import alpa_py
from alpa_py.compiler.hlo_stats import collective_bytes
from alpa_py.compiler.program import AXIS_NAMES, make_mesh, peak_bytes
from alpa_py.driver import candidate_timing
from alpa_py.driver.analysis import StepAnalysis

METHODS = {"data": alpa_py.DataParallel, "zero2": alpa_py.Zero2Parallel,
           "zero3": alpa_py.Zero3Parallel, "auto": alpa_py.ShardParallel}


@dataclasses.dataclass
class Runner:
  """One compiled plan, ready to be timed: ``step()`` runs one blocked
  training step on the runner's own state (so that plans can be timed in
  turn, interleaved, on one machine)."""

  fn: Callable
  state: object
  batch: object
  memory_per_device: int
  collective_bytes: dict
  compile_seconds: float
  ilp: dict
  hlo_text: str = ""

  def step(self) -> float:
    t0 = time.perf_counter()
    self.state, loss = self.fn(self.state, self.batch)
    jax.block_until_ready(loss)
    return time.perf_counter() - t0


def measure_interleaved(runners: dict, rounds: int) -> dict:
  """Median step seconds per runner over ``rounds`` interleaved rounds (one
  step of every plan per round, in a seeded shuffled order, after one
  warm-up step each): a slow spell on a shared machine hits every plan,
  and no plan always follows the same one."""
  return candidate_timing.interleaved_medians(
      {name: r.step for name, r in runners.items()}, rounds)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path)


def megatron_spec(path: str, shape, mp: str = "y") -> P:
  """Megatron-LM tensor parallelism: column-parallel qkv/fc1, row-parallel
  proj/fc2, vocab-parallel embedding; everything else replicated."""
  col = any(f"'{n}'" in path for n in ("qkv", "fc1"))
  row = any(f"'{n}'" in path for n in ("proj", "fc2"))
  if col and path.endswith("['kernel']") and len(shape) == 2:
    return P(None, mp)
  if col and path.endswith("['bias']"):
    return P(mp)
  if row and path.endswith("['kernel']") and len(shape) == 2:
    return P(mp, None)
  if "'wte'" in path and len(shape) == 2:
    return P(mp, None)
  return P()


def expert_spec(path: str, shape, ep: str = "x") -> P:
  """Expert parallelism: the expert dim of the batched expert weights."""
  if any(f"'{n}'" in path for n in ("w1", "w2")) and len(shape) == 3:
    return P(ep)
  return P()


def _fits(spec: P, shape, mesh) -> P:
  for dim, axes in zip(shape, tuple(spec)):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if dim % int(np.prod([mesh.shape[a] for a in names])):
      return P()
  return spec


@dataclasses.dataclass
class ManualPlan:
  """A plan written as PartitionSpecs (a baseline)."""

  name: str
  mesh_shape: tuple
  param_spec: Callable  # (path str, shape) -> PartitionSpec
  batch_axes: tuple  # mesh axes splitting the batch's dim 0

  def shardings(self, state, batch, mesh):
    def leaf(path, x):
      shape = np.shape(x)
      return NamedSharding(mesh, _fits(self.param_spec(_path_str(path), shape),
                                       shape, mesh))
    st = jax.tree_util.tree_map_with_path(leaf, state)
    axes = self.batch_axes[0] if len(self.batch_axes) == 1 else self.batch_axes
    bt = jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, _fits(P(axes), np.shape(x), mesh)), batch)
    return st, bt


def manual_plans(suite: str, n: int):
  plans = []
  if suite == "gpt" and n % 4 == 0:
    plans.append(ManualPlan("megatron", (n // 4, 4), megatron_spec, ("x",)))
  if suite == "moe":
    plans.append(ManualPlan("ep+dp", (n,), expert_spec, ("x",)))
  return plans


def prepare_method(step, state, batch, method) -> Runner:
  t0 = time.perf_counter()
  par = alpa_py.parallelize(step, method=method)
  ex = par.get_executable(state, batch)
  compile_s = time.perf_counter() - t0
  s = ex.solve_stats
  hlo = ex.hlo_text()
  # the batch placed in the plan's layout once, as the hand-written plans'
  # is: every plan is timed on its step alone, not on a host transfer
  n_state = len(jax.tree_util.tree_leaves(state))
  batch = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(batch),
      [jax.device_put(x, sh) for x, sh in zip(
          jax.tree_util.tree_leaves(batch), ex.in_shardings[n_state:])])
  return Runner(par, state, batch, ex.memory_per_device(),
                collective_bytes(hlo), compile_s,
                dict(status=s.status, variables=s.num_variables,
                     constraints=s.num_constraints,
                     solve_seconds=s.solve_seconds,
                     mesh=list(ex.plan.mesh_shape),
                     # the compiled-cost selection's figures, if it ran
                     candidates_priced=[list(a) for a in
                                        getattr(ex.plan, "alternatives", ())],
                     candidates_measured=[list(m) for m in
                                          getattr(ex.plan, "measured", ())]),
                hlo)


def prepare_manual(step, state, batch, plan: ManualPlan, devices) -> Runner:
  mesh = make_mesh(devices, plan.mesh_shape)
  st, bt = plan.shardings(state, batch, mesh)
  t0 = time.perf_counter()
  jitted = jax.jit(step, in_shardings=(st, bt),
                   out_shardings=(st, NamedSharding(mesh, P())))
  compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  return Runner(compiled, jax.device_put(state, st), jax.device_put(batch, bt),
                peak_bytes(compiled), collective_bytes(hlo), compile_s, {},
                hlo)


def prepare_single(step, state, batch) -> Runner:
  dev = jax.devices()[0]
  state, batch = jax.device_put((state, batch), dev)
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  return Runner(compiled, state, batch, peak_bytes(compiled),
                collective_bytes(hlo), compile_s, {}, hlo)


class Predictor:
  """The cost model's step time for any plan of one traced step."""

  def __init__(self, step, state, batch, n_devices: int):
    self.analysis = StepAnalysis(step, (state, batch), num_devices=n_devices)
    self.n = n_devices
    self.matmul_flops = self.analysis.matmul_flops()

  def method(self, name: str, profile: str):
    if name == "jit":
      return self.analysis.solve((1,), profile)
    return self.analysis.solve_method(METHODS[name](), profile)

  def manual(self, plan: ManualPlan, profile: str):
    names = AXIS_NAMES[:len(plan.mesh_shape)]
    mesh_like = dict(zip(names, plan.mesh_shape))
    sig = self.analysis.sig
    specs = {}
    for i, (aval, owner, path) in enumerate(zip(sig.avals, sig.owners,
                                                sig.paths)):
      if owner in sig.batch:
        pspec = P(plan.batch_axes[0] if len(plan.batch_axes) == 1
                  else plan.batch_axes)
      else:
        pspec = plan.param_spec(path[len("arg0"):], aval.shape)
      pspec = _fits(pspec, aval.shape, type("M", (), {"shape": mesh_like})())
      entries = tuple(pspec) + (None,) * (len(aval.shape) - len(tuple(pspec)))
      spec = tuple(() if e is None else tuple(names.index(a) for a in
                                             (e if isinstance(e, tuple) else (e,)))
                   for e in entries)
      specs[i] = [spec]
    return self.analysis.solve(plan.mesh_shape, profile, input_specs=specs)
