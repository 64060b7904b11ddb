"""The first pass of every compile: trace the step into an ``OpGraph``.

The step is traced on abstract flat inputs (one micro-batch of the batch
arguments when accumulating). Tracing also finds which outputs are the next
value of which inputs (the new train state), so that the ILP can keep their
layouts equal and the step can run again on its own outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from alpa_py import _progress
from alpa_py.compiler import accumulation, unroll
from alpa_py.compiler.batch_dims import batch_seeds, infer_batch_dims
from alpa_py.compiler.graph import OpGraph, build_graph
from alpa_py.driver.signature import Signature, hide_static


@dataclasses.dataclass(frozen=True)
class TracedStep:
  """The traced step.

  Attributes:
    graph: the step's ``OpGraph``.
    out_tree: the output pytree structure (non-array outputs held in it
      as ``StaticLeaf`` nodes).
    alias_pairs: (flat output, flat input) pairs of state fed back.
    input_shapes: the traced shape of each flat input.
    out_names: readable name of each flat output.
    num_micro_batches: micro-batches the batch inputs were split into.
    batch_inputs: flat positions of the batch inputs.
  """

  graph: OpGraph
  out_tree: Any
  alias_pairs: tuple[tuple[int, int], ...]
  input_shapes: tuple[tuple[int, ...], ...]
  out_names: tuple[str, ...]
  num_micro_batches: int
  batch_inputs: frozenset[int] = frozenset()

  @functools.cached_property
  def batch_dims(self) -> dict[int, int]:
    """Tensor id -> batch dim, seeded with dim 0 of the batch inputs
    (inferred once: every re-plan of the step reads it)."""
    return infer_batch_dims(self.graph, batch_seeds(self.graph,
                                                    self.batch_inputs))

  @property
  def graph_aliases(self) -> list[tuple[int, int]]:
    """Alias pairs as (output tensor id, input tensor id) of the graph."""
    g = self.graph
    return [(g.outvars[o], g.invars[i]) for o, i in self.alias_pairs
            if isinstance(g.outvars[o], int)]


def find_aliases(out, sig: Signature, leaves) -> list[tuple[int, int]]:
  """(flat output, flat input) pairs: an output subtree that is an argument's
  next value (same tree structure, shapes and dtypes), e.g. the new state."""
  candidates = [(0, out)]
  if isinstance(out, (tuple, list)):
    offset = 0
    for item in out:
      candidates.append((offset, item))
      offset += len(jax.tree_util.tree_leaves(item))
  arg_offsets = {}
  offset = 0
  for n, treedef in zip(sig.dyn_argnums, sig.treedefs):
    arg_offsets[n] = (offset, treedef)
    offset += treedef.num_leaves
  pairs = []
  used = set()
  for out_off, sub in candidates:
    sub_leaves, sub_def = jax.tree_util.tree_flatten(sub)
    for n in sig.dyn_argnums:
      if n in sig.batch or n in used:
        continue
      in_off, treedef = arg_offsets[n]
      if treedef != sub_def:
        continue
      ok = all(getattr(a, "shape", None) == b.shape and
               getattr(a, "dtype", None) == b.dtype
               for a, b in zip(sub_leaves, leaves[in_off:in_off + len(sub_leaves)]))
      if ok:
        pairs.extend((out_off + k, in_off + k) for k in range(len(sub_leaves)))
        used.add(n)
        break
  return pairs


def out_names_of(out_tree) -> tuple[str, ...]:
  """``out[...]`` path names of a pytree's flat leaves."""
  dummy = jax.tree_util.tree_unflatten(out_tree, list(range(out_tree.num_leaves)))
  flat, _ = jax.tree_util.tree_flatten_with_path(hide_static(dummy))
  return tuple(f"out{jax.tree_util.keystr(p)}" for p, _ in flat)


def trace_jaxpr(fun: Callable, sig: Signature, leaves_sds):
  """Traces ``fun`` on abstract flat inputs: (ClosedJaxpr, out tree, aliases)."""
  info = {}

  def flat_fun(*leaves):
    # non-array outputs (an Equinox module's functions) are returned as they
    # are, from the tree structure, as ``equinox.filter_jit`` returns them
    out = hide_static(fun(*sig.rebuild_args(leaves)))
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    info["tree"] = out_tree
    info["aliases"] = find_aliases(out, sig, leaves)
    return out_leaves

  closed = jax.make_jaxpr(flat_fun)(*leaves_sds)
  return closed, info["tree"], tuple(info["aliases"])


def trace_step(fun: Callable, sig: Signature, num_micro_batches: int = 1,
               unroll_layer_scans: bool = False) -> TracedStep:
  """Traces the step on one micro-batch (the whole batch when ``n == 1``).

  With ``unroll_layer_scans`` (pipelines), each scan over layers is
  unrolled into its iterations (``compiler/unroll.py``).

  Raises:
    ValueError: ``num_micro_batches`` does not divide a batch input.
  """
  shapes = accumulation.micro_batch_shapes(sig.avals, sig.owners, sig.batch,
                                           sig.paths, num_micro_batches)
  sds = [aval.sds(shape) for shape, aval in zip(shapes, sig.avals)]
  with _progress.step("tracing"):
    closed, out_tree, alias_pairs = trace_jaxpr(fun, sig, sds)
    run = unroll.unrolled(closed) if unroll_layer_scans else None
    if run is not None:
      closed = jax.make_jaxpr(run)(*sds)
      _progress.log("scans over layers unrolled into their iterations")
  graph = build_graph(closed)
  _progress.log(f"graph: {graph.summary()}")
  return TracedStep(graph, out_tree, alias_pairs, tuple(map(tuple, shapes)),
                    out_names_of(out_tree), num_micro_batches,
                    sig.batch_inputs)
