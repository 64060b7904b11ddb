"""ILP nodes, and how a scan's region or a cond's branches join the ILP
(``auto_sharding``; for a cond see ``add_branches``).

A ``Node`` is one ILP variable: its strategies' costs, the spec each gives
the tensors it owns, and what it asks of the tensors it reads. A scan's
region (``graph.Region``) joins the ILP here:

* each region input (loop-invariant operand, carry, one slice of a stacked
  operand) is a node with every layout of its tensor, asking the scan's
  operand for that layout (a stacked operand: with its stacked dim whole),
  so that a resharding is paid once, before the loop; a layout of a stacked
  operand that splits the stacked dim is priced as forbidden;
* the carry is tied: the carry an iteration returns and the one the next
  reads share a layout (``ties``, priced as forbidden where they differ,
  plus the resharding every iteration would pay);
* the scan's results take the layouts of the body refs they come from (a
  stacked result with its stacked dim whole), with no variable of their own;
* the body's ops are nodes like any op, their costs times ``Op.trips``.

``timeline`` orders the ops as they run for the liveness sweep: each body
once, inside its scan's lifetime (a body's buffers are reused by every
iteration; a stacked result is allocated whole).
"""

from __future__ import annotations

import dataclasses

from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.graph import OpGraph
from alpa_py.compiler.strategies.registry import tensor_strategies
from alpa_py.compiler.strategies.spec import FORBIDDEN_PENALTY, replicated


@dataclasses.dataclass
class Node:
  cost: list[float]
  specs: dict[int, list]  # tensor -> spec per strategy
  reqs: list  # (tensor, op index, pos, spec per strategy, count_if_same_node)
  names: list[str]
  root_op: int | None = None
  # (op index, its strategy name per strategy of the node) of the ops that
  # follow this node
  followers: list = dataclasses.field(default_factory=list)
  # (op, its strategies, followed operand position, pick per strategy of
  # the node) of each follower, for ``polish_followers``
  follower_choices: list = dataclasses.field(default_factory=list)


def tensor_node(graph: OpGraph, t: int, mesh: LogicalMesh) -> Node:
  strats = tensor_strategies(graph.tensor(t), mesh)
  return Node([0.0] * len(strats), {t: [s.out_specs[0] for s in strats]},
               [], [s.name for s in strats])


def add_region_inputs(graph: OpGraph, op, region, mesh: LogicalMesh, nodes, node_of,
                ties) -> None:
  """Nodes of a scan's region inputs, with what they ask of its operands."""
  nc, nk = len(region.consts_in), len(region.carry_in)
  for t, _ in region.consts:
    nodes.append(Node([0.0], {t: [replicated(len(graph.tensor(t).shape))]},
                       [], ["constant"]))
    node_of[t] = len(nodes) - 1
  for pos, (ref, t) in enumerate(zip(op.inputs, region.invars)):
    node = tensor_node(graph, t, mesh)
    stacked = pos >= nc + nk
    if isinstance(ref, int):
      want = [((),) + s if stacked else s for s in node.specs[t]]
      node.reqs.append((ref, op.index, pos, want, True))
      if stacked and ref in node_of:
        # the stacked dim stays whole: each iteration reads its own slice
        outer = nodes[node_of[ref]]
        for s, spec in enumerate(outer.specs[ref]):
          if spec and spec[0]:
            outer.cost[s] += FORBIDDEN_PENALTY
    nodes.append(node)
    node_of[t] = len(nodes) - 1
  iterations = op.trips * region.length
  for t_in, ref in zip(region.carry_in, region.carry_out):
    if isinstance(ref, int):
      ties.append((ref, t_in, FORBIDDEN_PENALTY, iterations))


def add_region_results(graph: OpGraph, op, region, nodes, node_of) -> None:
  """A scan's results take the layouts of the body refs they come from."""
  nk = len(region.carry_in)
  for j, (out, ref) in enumerate(zip(op.outputs, region.outvars)):
    if isinstance(ref, int) and ref in node_of:
      node = nodes[node_of[ref]]
      node.specs[out] = [s if j < nk else ((),) + s for s in node.specs[ref]]
      node_of[out] = node_of[ref]
    else:
      nodes.append(Node([0.0], {out: [replicated(len(graph.tensor(out).shape))]},
                         [], ["replicated"]))
      node_of[out] = len(nodes) - 1


def add_branches(graph: OpGraph, op, branches, mesh: LogicalMesh, nodes,
                 node_of, ties, add_ops) -> None:
  """A cond's branches (``graph.Branch``) join the ILP.

  Each branch input is a node with every layout of its tensor, asking the
  cond's operand for it (a resharding before the branch runs). Each
  branch's ops are added by ``add_ops``, except the ``copy`` that returns
  each result: it is a node of its own with every layout, reading the
  branch's value (a resharding at the branch output where they differ),
  and the copies of one result are tied across branches, so that every
  branch returns it in one layout, the cond result's.
  """
  for branch in branches:
    for t, _ in branch.consts:
      nodes.append(Node([0.0], {t: [replicated(len(graph.tensor(t).shape))]},
                         [], ["constant"]))
      node_of[t] = len(nodes) - 1
    for pos, (ref, t) in enumerate(zip(op.inputs[1:], branch.invars), 1):
      node = tensor_node(graph, t, mesh)
      if isinstance(ref, int):
        node.reqs.append((ref, op.index, pos, list(node.specs[t]), True))
      nodes.append(node)
      node_of[t] = len(nodes) - 1
    copies = branch.ops[len(branch.ops) - len(branch.outvars):]
    add_ops(branch.ops[:len(branch.ops) - len(branch.outvars)])
    for copy in copies:
      t, ref = copy.outputs[0], copy.inputs[0]
      node = tensor_node(graph, t, mesh)
      node.root_op = copy.index
      if isinstance(ref, int):
        node.reqs.append((ref, copy.index, 0, list(node.specs[t]), True))
      nodes.append(node)
      node_of[t] = len(nodes) - 1
  first = branches[0]
  for j, out in enumerate(op.outputs):
    for other in branches[1:]:
      ties.append((other.outvars[j], first.outvars[j], FORBIDDEN_PENALTY, 1))
    node = nodes[node_of[first.outvars[j]]]
    node.specs[out] = list(node.specs[first.outvars[j]])
    node_of[out] = node_of[first.outvars[j]]


def timeline(graph: OpGraph):
  """Ops in the order they run, each body once (inside its scan's lifetime),
  and each tensor's (define, last use) positions in that order."""
  order, define, last = [], {}, {}
  for t in list(graph.invars) + list(graph.consts):
    define[t] = -1

  def use(t, pos):
    if isinstance(t, int):
      last[t] = max(last.get(t, -1), pos)

  def walk(ops):
    for op in ops:
      pos = len(order)
      order.append(op)
      for t in op.outputs:
        define[t] = pos
      region = graph.regions.get(op.index)
      if region is not None:
        # the scan's operands, results and the body's inputs live while it runs
        body_in = list(region.invars) + [t for t, _ in region.consts]
        for t in body_in:
          define[t] = pos
        walk(region.ops)
        end = len(order) - 1
        for t in list(op.inputs) + list(op.outputs) + body_in + list(
            region.outvars):
          use(t, end)
      elif op.index in graph.branches:
        # every branch is swept (an upper bound: one of them runs)
        for branch in graph.branches[op.index]:
          body_in = list(branch.invars) + [t for t, _ in branch.consts]
          for t in body_in:
            define[t] = len(order)
          walk(branch.ops)
          for t in body_in + list(branch.outvars):
            use(t, len(order) - 1)
        for t in list(op.inputs) + list(op.outputs):
          use(t, len(order) - 1)
      else:
        for t in op.inputs:
          use(t, pos)

  walk(graph.ops)
  for t in graph.outvars:
    use(t, len(order))
  for t in graph.invars:
    last[t] = len(order)  # arguments stay allocated for the whole step
  last = {t: last.get(t, d) for t, d in define.items()}
  return order, define, last
