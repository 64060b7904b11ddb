"""Data-parallel pipeline stages reduce their gradients once per step.

Under ``force_data_parallel`` a stage splits every op's batch dim over all of
its devices, so each weight gradient of a micro-batch is a sum of per-device
partial sums, and the SPMD partitioner reduces it inside the stage's
backward program: one all-reduce per micro-batch. Alpa reduces once per
step instead, after accumulation. To do that, the backward program runs per
device (``shard_map`` over the stage's devices) on the ops of the step traced
at the per-device batch (``1 / D`` of the micro-batch), with that trace's
shapes but the micro-batch trace's constants (a mean's divisor stays the
micro-batch size), so that every per-device value is exactly its slice, or
its partial sum, of the micro-batch's value. Each gradient comes back
*stacked*: shape ``(D, *grad)``, dim 0 split over the devices, every device
keeping its own partial. The accumulator adds the stacked partials with no
communication; once the stage's last backward has run, its reduce program
sums dim 0 (one all-reduce, merged by XLA's combiner). A partial gradient
one stage's backward hands to another's (a tied embedding) stays stacked.

``plan_deferrals`` says why a stage cannot run this way; the stage then
keeps its per-micro-batch reduction and the plan says why. The conditions:
the per-device trace has the same ops as the micro-batch trace with every
batch dim ``D`` times smaller; every per-device value the backward computes
is a slice of the micro-batch's (no batch statistic spread back over the
batch, no random bits of a batch-sized shape drawn again, as a recomputed
dropout mask would be); and a value reduced over the batch reaches the
stage's outputs only through ops linear in it, into the accumulator or
another deferred stage's backward.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from alpa_py.compiler.graph import Literal, OpGraph, subgraph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.program import Task

# Ops linear in their operands: summing the partials commutes with them.
_LINEAR = frozenset({
    "add", "add_any", "sub", "neg", "convert_element_type", "transpose",
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "reduce_sum",
    "copy", "copy_p", "slice", "concatenate", "rev", "reduce_precision",
    "cumsum", "optimization_barrier"})
# Linear in one operand when the others are not partial sums.
_LINEAR_IN_ONE = frozenset({"mul", "dot_general"})
# Where a scalar constant differs between the two traces (a divisor that is
# the batch size), the per-device ops take the micro-batch trace's constant;
# only arithmetic may read one.
_ARITHMETIC = frozenset({"mul", "div", "add", "sub", "max", "min"})
# Random bits drawn at the per-device shape are not a slice of those drawn at
# the micro-batch's: received from the forward they are, recomputed per
# device (remat) they are not.
_RANDOM = frozenset({"random_bits", "threefry2x32", "rng_bit_generator",
                     "rng_uniform"})


def batch_derived(graph: OpGraph, batch_ids) -> set[int]:
  """Tensors computed from the batch inputs."""
  derived = set(batch_ids)
  for op in graph.ops:
    if any(isinstance(t, int) and t in derived for t in op.inputs):
      derived.update(op.outputs)
  return derived


def _same_value(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and bool(np.all(a == b))


@dataclasses.dataclass(frozen=True)
class SplitDims:
  """How the per-device trace splits each tensor.

  Attributes:
    dims: tensor id -> its dim split over the devices.
    bad: tensor id -> why its per-device value is not its slice of the
      micro-batch's value (a stage whose backward computes one cannot keep
      per-device partials).
    literals: (op index, operand position) -> the micro-batch trace's
      constant, where the two traces' constants differ.
    drawn: tensor id -> why computing it per device does not give its
      slice, although receiving it does (random bits at a smaller shape):
      a backward may read it, not compute it.
  """

  dims: dict
  bad: dict
  literals: dict
  drawn: dict = dataclasses.field(default_factory=dict)


def split_dims(full: OpGraph, local: OpGraph, batch_dims: dict, derived: set,
               factor: int) -> tuple[SplitDims | None, str | None]:
  """Checks that ``local`` is ``full`` with every batch dim ``factor`` times
  smaller and nothing else changed.

  Returns:
    (``SplitDims``, None), or (None, what differs in the ops). Besides the
    batch dims, a value that does not depend on the
    batch but has a batch-sized dim (a constant broadcast to the batch
    shape, such as a mean's cotangent) splits on that dim.
  """
  if len(full.ops) != len(local.ops) or full.invars != local.invars:
    return None, (f"the step traced at 1/{factor} of the micro-batch has "
                  f"other ops ({len(local.ops)} against {len(full.ops)})")
  for a, b in zip(full.ops, local.ops):
    if a.name != b.name or a.outputs != b.outputs or len(a.inputs) != len(
        b.inputs) or any(isinstance(x, Literal) != isinstance(y, Literal) or
                         (not isinstance(x, Literal) and x != y)
                         for x, y in zip(a.inputs, b.inputs)):
      return None, (f"op #{a.index} `{a.name}` differs when the step is "
                    f"traced at 1/{factor} of the micro-batch (a "
                    "shape-dependent branch?)")
  dims, bad, literals = {}, {}, {}
  for a, b in zip(full.ops, local.ops):
    for pos, (x, y) in enumerate(zip(a.inputs, b.inputs)):
      if isinstance(x, Literal) and not _same_value(x.value, y.value):
        literals[(a.index, pos)] = x
        if a.name not in _ARITHMETIC:
          bad.update((t, f"op #{a.index} `{a.name}` reads a constant that "
                      "depends on the batch size") for t in a.outputs)
  for t, value in full.consts.items():
    if not _same_value(value, local.consts.get(t)):
      bad[t] = f"constant %{t} depends on the batch size"
  for t, info in enumerate(full.tensors):
    small = tuple(local.tensor(t).shape)
    differ = [d for d, (x, y) in enumerate(zip(info.shape, small)) if x != y]
    if len(info.shape) != len(small) or len(differ) > 1 or any(
        info.shape[d] != factor * small[d] for d in differ):
      bad[t] = (f"tensor %{t} is {info.shape} on the micro-batch but "
                f"{small} at 1/{factor} of it")
    elif t in batch_dims:
      if differ != [batch_dims[t]]:
        bad[t] = (f"tensor %{t} {info.shape}: its batch dim "
                  f"{batch_dims[t]} does not split over {factor} devices")
      dims[t] = batch_dims[t]
    elif differ:
      if t in derived:
        bad[t] = (f"tensor %{t} {info.shape} depends on the batch and "
                  f"shrinks at 1/{factor} of it, but has no batch dim (a "
                  "batch statistic spread over the batch?)")
      dims[t] = differ[0]
  drawn = {t: (f"op #{op.index} `{op.name}` draws random bits of a "
               "batch-sized shape; drawn per device they are not the "
               "micro-batch's (a dropout mask the backward recomputes)")
           for op in full.ops if op.name in _RANDOM for t in op.outputs
           if t in dims and t not in bad}
  return SplitDims(dims, bad, literals, drawn), None


def _local_reason(gb: OpGraph, reduced, batch_dims: dict, split: SplitDims,
                  partial_in: set, partial_out: set) -> str | None:
  """Why the backward ``gb`` alone cannot keep per-device partials; None
  when it can."""
  bad = split.bad
  for t in list(gb.invars) + [t for op in gb.ops for t in op.outputs]:
    if t in bad:
      return bad[t]
  for op in gb.ops:
    for t in op.outputs:
      if t in split.drawn:
        return split.drawn[t]
  for t in gb.invars:
    if reduced(t) and t not in partial_in:
      return (f"its backward reads %{t} {gb.tensor(t).shape}, a value "
              "reduced over the batch (a batch statistic)")
  for op in gb.ops:
    ins = [t for t in op.inputs if reduced(t)]
    if not ins:
      continue
    if any(t in batch_dims for t in op.outputs):
      return (f"op #{op.index} `{op.name}` spreads a value reduced over the "
              "batch back over the batch")
    if op.name in ("add", "sub", "add_any", "concatenate") and \
        len(ins) != len(op.inputs):
      return (f"op #{op.index} `{op.name}` combines a partial sum with a "
              "value that is not one")
    if op.name in _LINEAR:
      continue
    if op.name in _LINEAR_IN_ONE and len(ins) == 1:
      continue
    if op.name == "div" and not reduced(op.inputs[1]):
      continue
    return (f"op #{op.index} `{op.name}` is not linear in the per-device "
            "partial sums")
  for t in gb.outvars:
    if reduced(t) and t not in partial_out:
      return (f"its backward returns %{t}, reduced over the batch, to a "
              "forward program")
  return None


@dataclasses.dataclass(frozen=True)
class Deferral:
  """How one stage's backward keeps per-device partials.

  Attributes:
    stacked_out: outputs returned as ``(D, *shape)`` partials (the
      accumulated gradients and partial gradients another stage adds to).
    stacked_in: inputs read as such partials (from another stage).
    accumulated: the stacked outputs its reduce program sums.
  """

  stacked_out: frozenset
  stacked_in: frozenset
  accumulated: tuple


def plan_deferrals(backwards, forwards, splits, batch_dims: dict,
                   derived: set, marked: set) -> list:
  """Which stages keep per-device partial gradients.

  Args:
    backwards, forwards: each stage's backward / forward graph.
    splits: each stage's (device count, ``SplitDims``), or a string saying
      why it cannot (e.g. its per-device trace failed).
    batch_dims: tensor id -> batch dim.
    derived: tensors computed from the batch.
    marked: the accumulated tensors.

  Returns:
    Per stage, a ``Deferral`` or a string saying why not. A partial that
    one stage's backward passes to another's (a tied weight's gradient)
    keeps both stages deferred only when both can and have the same number
    of devices (device i adds its own partials).
  """

  def reduced(t):
    return isinstance(t, int) and t in derived and t not in batch_dims

  producer = {t: k for k, gb in enumerate(backwards) for t in gb.outvars}
  bwd_readers: dict = {}
  for k, gb in enumerate(backwards):
    for t in gb.invars:
      bwd_readers.setdefault(t, set()).add(k)
  fwd_read = {t for gf in forwards for t in gf.invars}
  result: list = []
  sizes = [s if isinstance(s, str) else s[0] for s in splits]
  for k, (gb, split) in enumerate(zip(backwards, splits)):
    if isinstance(split, str):
      result.append(split)
      continue
    partial_in = {t for t in gb.invars if reduced(t) and t in producer}
    partial_out = {t for t in gb.outvars if reduced(t) and (
        t in marked or (t in bwd_readers and t not in fwd_read))}
    why = _local_reason(gb, reduced, batch_dims, split[1], partial_in,
                        partial_out)
    if why is None and not any(reduced(t) for t in gb.outvars):
      why = "its backward returns no gradient"
    result.append(why or (partial_in, partial_out))
  changed = True
  while changed:  # a partial exchanged with a stage that cannot take it
    changed = False
    for k, r in enumerate(result):
      if isinstance(r, str):
        continue
      peers = {producer[t] for t in r[0]} | {
          j for t in r[1] for j in bwd_readers.get(t, ())}
      for j in sorted(peers - {k}):
        if isinstance(result[j], str) or sizes[j] != sizes[k]:
          result[k] = (f"it exchanges partial gradients with stage {j}, "
                       "which keeps reducing per micro-batch or has another "
                       "number of devices")
          changed = True
          break
  out = []
  for k, r in enumerate(result):
    if isinstance(r, str):
      out.append(r)
      continue
    stacked_out = frozenset(r[1])
    out.append(Deferral(stacked_out, frozenset(r[0]), tuple(
        sorted(t for t in stacked_out if t in marked))))
  return out


def _spec(axes, dim: int | None) -> PartitionSpec:
  if dim is None:
    return PartitionSpec()
  return PartitionSpec(*([None] * dim), axes)


def compile_backward(gb: OpGraph, local: OpGraph, split: SplitDims,
                     deferral: Deferral, mesh) -> Task:
  """The stage backward run per device on ``local``'s shapes and the
  micro-batch's constants: values with a split dim split over all devices
  on it, stacked partials ``(D, *shape)`` split on dim 0, the rest
  replicated."""
  axes, dims = tuple(mesh.axis_names), split.dims
  ops = []
  for op in gb.ops:
    mine = local.ops[op.index]
    if any((op.index, pos) in split.literals for pos in range(len(op.inputs))):
      mine = dataclasses.replace(mine, inputs=tuple(
          split.literals.get((op.index, pos), x)
          for pos, x in enumerate(mine.inputs)))
    ops.append(mine)
  lg = subgraph(local, ops, gb.outvars)

  def spec(t, stacked):
    if t in stacked:
      return PartitionSpec(axes)
    return _spec(axes, dims.get(t))

  in_specs = tuple(spec(t, deferral.stacked_in) for t in gb.invars)
  out_specs = tuple(spec(t, deferral.stacked_out) for t in gb.outvars)

  def body(*args):
    env = {t: v[0] if t in deferral.stacked_in else v
           for t, v in zip(gb.invars, args)}
    outs = evaluate(lg, None, env=env)
    return tuple(v[None] if t in deferral.stacked_out else v
                 for t, v in zip(gb.outvars, outs))

  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                     check_vma=False)
  ins = [NamedSharding(mesh, s) for s in in_specs]
  outs = [NamedSharding(mesh, s) for s in out_specs]
  d = mesh.devices.size
  sds = [jax.ShapeDtypeStruct(
      ((d,) if t in deferral.stacked_in else ()) + tuple(gb.tensor(t).shape),
      gb.tensor(t).dtype, sharding=s) for t, s in zip(gb.invars, ins)]
  return Task.compile(fn, sds, gb.invars, gb.outvars, ins, outs,
                      local_devices=True)


def compile_reduce(graph: OpGraph, stacked, mesh) -> Task:
  """Sums each stacked accumulator over its devices: the stage's one
  gradient reduction per step."""
  stacked = tuple(stacked)
  axes = tuple(mesh.axis_names)
  d = mesh.devices.size

  def reduce(*parts):
    return tuple(p.sum(0, dtype=p.dtype) for p in parts)

  ins = [NamedSharding(mesh, PartitionSpec(axes)) for _ in stacked]
  outs = [NamedSharding(mesh, PartitionSpec()) for _ in stacked]
  sds = [jax.ShapeDtypeStruct((d,) + tuple(graph.tensor(t).shape),
                              graph.tensor(t).dtype, sharding=s)
         for t, s in zip(stacked, ins)]
  return Task.compile(reduce, sds, stacked, stacked, ins, outs,
                      local_devices=True)
