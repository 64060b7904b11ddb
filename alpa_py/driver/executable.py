"""What ``get_executable`` returns: a compiled step, its printable plan, and
the backend runner that executes it."""

from __future__ import annotations

import os
from typing import Any

import jax

from alpa_py.compiler.pipeline_program import PipelineProgram
from alpa_py.compiler.program import Task
from alpa_py.driver.plans import PipeshardPlan, ShardingPlan, SolveStats
from alpa_py.driver.signature import Signature, make_signature
from alpa_py.runtime.backend import Backend, Runner
from alpa_py.runtime.distributed_array import ClusterGoneError


def _difference(old: Signature, new: Signature) -> str:
  if old.nargs != new.nargs:
    return f"{new.nargs} arguments, compiled for {old.nargs}"
  old_held, new_held = dict(old.static_leaves), dict(new.static_leaves)
  for path in old_held.keys() & new_held.keys():
    if old_held[path] != new_held[path]:
      return (f"the static value at {path} is {new_held[path].value!r:.60}, "
              f"compiled for {old_held[path].value!r:.60}")
  if old.treedefs != new.treedefs:
    return "the arguments' tree structure differs"
  for path, a, b in zip(old.paths, old.avals, new.avals):
    if a != b:
      return (f"{path} is {b.dtype}{list(b.shape)}, compiled for "
              f"{a.dtype}{list(a.shape)}")
  if old.static != new.static:
    return "a static argument differs"
  return "the devices differ"


class _Loaded:
  """A step loaded on a backend: refuses to run once the backend is shut
  down; callable like the step it was compiled from."""

  def __init__(self, backend: Backend, runner: Runner, out_tree,
               sig: Signature):
    self._backend = backend
    self._runner = runner
    self._out_tree = out_tree
    self.signature = sig

  def __call__(self, *args) -> Any:
    """Runs the step on arguments like those it was compiled for.

    Raises:
      TypeError: the arguments' structure, shapes or dtypes differ from the
        compiled signature (the parallelized function would recompile; an
        executable cannot).
    """
    sig = self.signature
    new, leaves = make_signature(
        args, static=tuple(n for n, _ in sig.static), donate=sig.donate,
        batch=sig.batch, devices=sig.devices)
    if new != sig:
      raise TypeError("this executable was compiled for other arguments: "
                      + _difference(sig, new) + "; call the parallelized "
                      "function instead, which compiles for new arguments")
    return self.call_flat(leaves)

  def dump(self, directory: str) -> list[str]:
    """Writes the plan and the optimized HLO into ``directory``; returns the
    paths written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    files = [("plan.txt", str(self.plan))]
    hlo = self.hlo_text()
    if isinstance(hlo, str):
      files.append(("step.hlo.txt", hlo))
    else:
      files.extend((f"stage{k}.hlo.txt", h) for k, h in enumerate(hlo))
    for name, text in files:
      path = os.path.join(directory, name)
      with open(path, "w") as f:
        f.write(text)
      written.append(path)
    return written

  def call_flat(self, leaves) -> Any:
    """Runs on flat inputs; returns the output pytree."""
    if not self._backend.alive:
      raise ClusterGoneError(
          f"this step was compiled for a {self._backend.kind} backend that "
          "alpa_py.shutdown() released; call the parallelized function again "
          "(it compiles for the current backend) or get a new executable")
    outs = self._runner.call_flat(leaves)
    return jax.tree_util.tree_unflatten(self._out_tree, outs)


class Executable(_Loaded):
  """A compiled, sharded step.

  Attributes:
    plan: the ``ShardingPlan``.
    mesh: the ``jax.sharding.Mesh`` it was planned on.
    solve_stats: the ILP's ``SolveStats``.
    task: the compiled program (``compiler.program.Task``).
  """

  def __init__(self, task: Task, plan: ShardingPlan, mesh,
               solve_stats: SolveStats, out_tree, backend: Backend,
               sig: Signature):
    super().__init__(backend, backend.step_runner(task), out_tree, sig)
    self.task = task
    self.plan = plan
    self.mesh = mesh
    self.solve_stats = solve_stats
    self.in_shardings = task.in_shardings

  def hlo_text(self) -> str:
    """The optimized (partitioned) HLO."""
    return self.task.hlo_text()

  def memory_analysis(self):
    return self.task.compiled.memory_analysis()

  def memory_per_device(self) -> int:
    """Peak bytes per device from XLA: arguments + outputs + temps - aliased."""
    return self.task.memory()

  def __repr__(self) -> str:
    return (f"<alpa_py.Executable mesh={self.plan.mesh_shape} "
            f"{self.plan.method} on {self._backend.kind}>")


class PipeshardExecutable(_Loaded):
  """A compiled pipelined step.

  Attributes:
    plan: the ``PipeshardPlan`` (stages, schedule, per-stage shardings).
    program: the ``PipelineProgram`` the backend interprets.
    instructions: the program's instruction list.
    compile_seconds: wall time of the compile.
  """

  def __init__(self, program: PipelineProgram, plan: PipeshardPlan, out_tree,
               compile_seconds: float, backend: Backend, sig: Signature):
    super().__init__(backend, backend.pipeline_runner(program), out_tree, sig)
    self.program = program
    self.plan = plan
    self.instructions = program.instructions
    self.compile_seconds = compile_seconds

  @property
  def last_run_stats(self):
    """``RunStats`` of the last call (local backend: peak live activation
    bytes, transfers, tasks run)."""
    return self._runner.last_run_stats

  def memory_per_device(self) -> tuple[int, ...]:
    """Per stage, XLA's peak bytes per device (the larger of fwd / bwd)."""
    return tuple(max(st.forward.memory(), st.backward.memory())
                 for st in self.program.stages)

  def hlo_text(self) -> tuple[str, ...]:
    """Per stage, the optimized HLO of its forward and backward programs
    (and of its gradient reduce program, where it has one)."""
    return tuple("\n".join(t.hlo_text() for t in (st.forward, st.backward,
                                                   st.reduce) if t)
                 for st in self.program.stages)

  @property
  def schedule(self):
    return self.plan.schedule

  def __repr__(self):
    return (f"<alpa_py.PipeshardExecutable {len(self.program.stages)} stages, "
            f"{self.program.num_micro_batches} micro-batches, "
            f"{self.plan.schedule_name} on {self._backend.kind}>")
