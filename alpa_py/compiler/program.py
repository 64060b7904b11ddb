"""One compiled SPMD program and how a runtime receives it.

A ``Task`` is what the compiler hands to a runtime: the tensor ids it reads
and writes, the mesh and layouts of its arguments and results, and its code.
The code comes in two forms: the driver's compiled executable (run in this
process) and, on demand, a ``jax.export`` artifact (bytes) that a remote
worker deserializes for its own devices. ``portable()`` keeps only what can
travel to another process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

# Mesh axis names, in mesh-dimension order; every mesh alpa_py makes (the
# driver's and a remote worker's) uses these.
AXIS_NAMES = ("x", "y")


def make_mesh(devices, mesh_shape: tuple[int, ...]) -> Mesh:
  """A mesh with Auto axes (``jax.make_mesh`` would make Explicit ones)."""
  names = AXIS_NAMES[:len(mesh_shape)]
  arr = np.array(list(devices), dtype=object).reshape(mesh_shape)
  return Mesh(arr, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def peak_bytes(compiled) -> int:
  """Peak bytes per device of a compiled program, from XLA's memory
  analysis: arguments + outputs + temporaries - aliased buffers."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes +
             m.temp_size_in_bytes - m.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One compiled program over one mesh.

  Attributes:
    in_ids, out_ids: the tensor ids (or flat positions) it reads / writes.
    mesh_shape: its logical mesh.
    in_specs, out_specs: ``PartitionSpec`` of each argument / result.
    local_devices: whether a remote worker runs it on its own host's devices
      (a pipeline stage) rather than on the whole cluster (a global step).
    compiled: the driver's compiled executable (None once made portable).
    jitted, arg_specs: the ``jax.jit`` function and its sharded abstract
      arguments, to export it (None once made portable).
    in_shardings, out_shardings: ``NamedSharding``s on the driver's mesh.
    blob: the serialized ``jax.export`` artifact (portable form only).
  """

  in_ids: tuple[int, ...]
  out_ids: tuple[int, ...]
  mesh_shape: tuple[int, ...]
  in_specs: tuple[Any, ...]
  out_specs: tuple[Any, ...]
  local_devices: bool = False
  compiled: Any = None
  jitted: Any = None
  arg_specs: tuple[Any, ...] | None = None
  in_shardings: tuple[Any, ...] = ()
  out_shardings: tuple[Any, ...] = ()
  blob: bytes | None = None

  @classmethod
  def compile(cls, fn, arg_specs, in_ids, out_ids, in_shardings,
              out_shardings, *, donate_argnums=(), local_devices=False):
    """Jits ``fn`` with these shardings, lowers it on ``arg_specs`` and
    compiles it."""
    jitted = jax.jit(fn, in_shardings=tuple(in_shardings),
                     out_shardings=tuple(out_shardings),
                     donate_argnums=tuple(donate_argnums))
    compiled = jitted.lower(*arg_specs).compile()
    mesh = in_shardings[0].mesh if in_shardings else out_shardings[0].mesh
    return cls(tuple(in_ids), tuple(out_ids), tuple(mesh.devices.shape),
               tuple(s.spec for s in in_shardings),
               tuple(s.spec for s in out_shardings), local_devices,
               compiled, jitted, tuple(arg_specs), tuple(in_shardings),
               tuple(out_shardings))

  def memory(self) -> int:
    """XLA's peak bytes per device (see ``peak_bytes``)."""
    return peak_bytes(self.compiled)

  def hlo_text(self) -> str:
    return self.compiled.as_text()

  def portable(self) -> "Task":
    """This task without driver-side objects, with its exported code."""
    if self.blob is not None:
      return self
    blob = jax.export.export(self.jitted)(*self.arg_specs).serialize()
    return dataclasses.replace(self, compiled=None, jitted=None, arg_specs=None,
                               in_shardings=(), out_shardings=(), blob=blob)
