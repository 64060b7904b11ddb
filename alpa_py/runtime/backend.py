"""The backend protocol, and the local backend.

A backend owns the devices a step runs on and turns compiled programs into
runners: ``step_runner`` for one SPMD program (ShardParallel and its
variants), ``pipeline_runner`` for a ``PipelineProgram``. ``api.py`` asks the
current backend (``cluster.current_cluster()``) and never branches on its
kind. The Ray backend is ``ray_cluster.RayCluster``.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Protocol, Sequence

import jax

from alpa_py.compiler.pipeline_program import PipelineProgram
from alpa_py.compiler.program import Task
from alpa_py.runtime.pipeshard import LocalPipelineRunner

_serials = itertools.count(1)


def next_serial() -> int:
  """A number no other backend of this process has (for cache keys: an
  ``id()`` may be reused after a backend is freed)."""
  return next(_serials)


class Runner(Protocol):
  """A loaded step: flat inputs in, flat outputs out."""

  def call_flat(self, leaves: Sequence[Any]) -> list: ...


class Backend(Protocol):
  """Where steps run.

  Attributes:
    kind: "local" or "ray".
    devices: the devices plans are made for (on Ray, the driver's stand-ins).
    serial: unique per backend in this process; part of executable keys.
    alive: False once shut down.
  """

  kind: str
  devices: tuple[Any, ...]
  serial: int
  alive: bool

  def step_runner(self, task: Task) -> Runner: ...

  def check_stage_placement(self, stage_device_ids) -> None:
    """Raises ``ValueError`` if this backend cannot run pipeline stages on
    these devices (checked before any stage is compiled)."""

  def pipeline_runner(self, program: PipelineProgram) -> Runner: ...

  def shutdown(self) -> None: ...


def blocks(devices) -> bool:
  """Whether to wait for each step: XLA's CPU collectives stall when many
  sharded steps are in flight."""
  return all(d.platform == "cpu" for d in devices)


_IS_DELETED = operator.methodcaller("is_deleted")


def check_live(leaves, shardings) -> None:
  """Raises JAX's own error (``RuntimeError: Array has been deleted``) for an
  input whose buffer was deleted or donated to an earlier call.

  Needed before the C++ dispatch: on XLA:CPU, a donated buffer passed again
  to a sharded executable whose signature JAX's C++ path has cached crashes
  the process instead of raising (JAX 0.10).
  """
  try:
    dead = any(map(_IS_DELETED, leaves))
  except AttributeError:  # not all arrays: placement reports those
    dead = False
  if dead:
    for x, s in zip(leaves, shardings):
      if isinstance(x, jax.Array) and x.is_deleted():
        jax.device_put(x, s)  # raises JAX's RuntimeError for a deleted array
    raise RuntimeError("an input array has been deleted or donated")


class LocalStepRunner:
  """Runs one compiled SPMD program on this process's devices.

  Inputs go straight to the ``Compiled`` object, i.e. through JAX's C++
  dispatch, which checks each input's shape, dtype and sharding without a
  Python loop and moves uncommitted arrays itself. An input committed to
  another sharding makes the call raise ``ValueError`` before anything
  runs (nothing is donated); only then are the inputs placed with
  ``device_put`` and the call made again, with the same program (no
  recompile).
  """

  def __init__(self, task: Task):
    self.task = task
    self._compiled = task.compiled
    self._block = blocks(task.in_shardings[0].mesh.devices.flat) \
        if task.in_shardings else False

  def _placed(self, leaves) -> list | None:
    """The inputs, each in its planned sharding; None if all already were."""
    placed, moved = [], False
    for x, s in zip(leaves, self.task.in_shardings):
      if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)):
        x = jax.device_put(x, s)
        moved = True
      placed.append(x)
    return placed if moved else None

  def call_flat(self, leaves) -> list:
    check_live(leaves, self.task.in_shardings)
    try:
      outs = self._compiled(*leaves)
    except ValueError:
      placed = self._placed(leaves)
      if placed is None:  # not a placement problem: JAX's error stands
        raise
      outs = self._compiled(*placed)
    if self._block and outs:
      # One output stands for all: each output spans every device of the
      # mesh, and on XLA:CPU the outputs of a device's execution are defined
      # by that execution's completion, so the step has finished everywhere
      # once it is ready. Were some output of a device later, the throttle
      # would still hold: at most this step stays in flight beside the next.
      # (Walking all outputs costs ~0.15 ms per 800 leaves, ~5% of a small
      # step's whole dispatch.)
      outs[0].block_until_ready()
    return list(outs)


class LocalBackend:
  """The devices of this process (e.g. 8 simulated CPU devices)."""

  kind = "local"

  def __init__(self, devices=None):
    self.devices = tuple(jax.devices() if devices is None else devices)
    self.serial = next_serial()
    self.alive = True

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def step_runner(self, task: Task) -> LocalStepRunner:
    return LocalStepRunner(task)

  def check_stage_placement(self, stage_device_ids) -> None:
    pass  # one process holds every device

  def pipeline_runner(self, program: PipelineProgram) -> LocalPipelineRunner:
    return LocalPipelineRunner(program, blocks(self.devices))

  def shutdown(self) -> None:
    self.alive = False

  def __repr__(self):
    return f"<alpa_py local backend, {len(self.devices)} devices>"
