"""Running a ``PipelineProgram`` on this process's devices.

Every stage runs here; a tensor moves between submeshes with
``transfer.reshard`` (tile-overlap slices, or one ``jax.device_put`` where a
shard gathers several tiles).
"""

from __future__ import annotations

from alpa_py.compiler.pipeline_program import PipelineProgram
from alpa_py.runtime import pipeline_interpreter
from alpa_py.runtime.pipeline_interpreter import RunStats
from alpa_py.runtime.transfer import reshard


class LocalTransport:
  """The local backend's ``Transport``: one process owns every stage."""

  def __init__(self, program: PipelineProgram, leaves, block: bool):
    self._program = program
    self._inputs = dict(zip(program.invar_ids, leaves))
    self.block = block

  def owns(self, stage):
    return True

  def program(self, key):
    task = self._program.task(key[1], key[0])
    return task.compiled, task.in_shardings

  def step_value(self, t):
    return self._inputs[t]

  batch_value = step_value

  def place(self, value, sharding):
    return reshard(value, sharding)

  def receive(self, t, m):
    raise KeyError(f"tensor %{t} of micro-batch {m} was read before any "
                   "stage produced it")

  def send(self, t, m, value):
    pass


class LocalPipelineRunner:
  """Runs a pipelined step locally.

  Attributes:
    last_run_stats: ``RunStats`` of the last call (with the bytes that
      crossed stage boundaries, by kind).
  """

  def __init__(self, program: PipelineProgram, block: bool):
    self.program = program
    self._block = block
    self.last_run_stats = RunStats()

  def call_flat(self, leaves) -> list:
    transport = LocalTransport(self.program, leaves, self._block)
    outs, self.last_run_stats = pipeline_interpreter.interpret(
        self.program, transport)
    return outs
