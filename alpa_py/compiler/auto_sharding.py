"""The intra-operator pass: OpGraph -> ILP -> a sharding for every tensor.

1. Every step input and every op gets its strategies (``strategies``).
2. Simplification: an op whose rule declares it a follower (``Follow``:
   elementwise, reshape, transpose, ...) is merged into that operand's node:
   for each strategy of the node it takes its cheapest strategy given the
   operand's spec. The node count drops to roughly dots + reductions +
   broadcasts + inputs.
3. Edges carry resharding costs between a tensor's producer spec and each
   consumer's required spec; outputs that become next step's inputs (the new
   train state) get an edge back to that input.
4. The ILP (``ilp``) picks one strategy per node, under the memory budget.

A scan with a body (``graph.Region``) is planned through it: one strategy
per body op shared by all iterations, costs times the trip count, the carry's
layout tied, stacked dims whole (``ilp_nodes`` says how).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

from alpa_py import _progress
from alpa_py.compiler import ilp, ilp_symmetry
from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.graph import Literal, OpGraph
from alpa_py.compiler.follower_polish import polish_followers
from alpa_py.compiler.ilp_nodes import Node as _Node
from alpa_py.compiler.ilp_nodes import (add_branches, add_region_inputs,
                                        add_region_results, timeline)
from alpa_py.compiler.errors import InfeasiblePlanError as InfeasiblePlanError
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.strategy_constraints import StrategyConstraints
from alpa_py.compiler.surcharge import Surcharge
from alpa_py.compiler.strategies.loop_nest import Strategy
from alpa_py.compiler.strategies.registry import (follow_kind,
                                                  follows_min_shards,
                                                  strategies_for,
                                                  tensor_strategies)
from alpa_py.compiler.strategies.rule_table import Follow
from alpa_py.compiler.strategies.spec import (Spec,
                                              num_shards, replicated,
                                              resharding_cost)

_MEMORY_POINTS = 64


@dataclasses.dataclass(frozen=True)
class ShardingSolution:
  """The pass's result on one mesh: a spec per tensor, and the ILP stats.

  Attributes:
    mesh_shape: the logical mesh.
    tensor_specs: (tensor id, spec) for every tensor that got one.
    operand_specs: ((op index, operand position), spec) where an op needs an
      operand in another layout than its producer's.
    constrained: tensor ids whose layout the lowering pins.
    op_strategies: (op index, strategy name) of every node's root op.
    objective: predicted step time under the cost profile, seconds.
    status, num_variables, num_constraints, solve_seconds: from the solver.
    num_nodes, num_edges: ILP size after simplification.
    estimated_peak_bytes: the ILP's estimate of peak bytes per device.
  """

  mesh_shape: tuple[int, ...]
  tensor_specs: tuple
  operand_specs: tuple
  constrained: tuple
  op_strategies: tuple
  objective: float
  status: str
  num_variables: int
  num_constraints: int
  solve_seconds: float
  num_nodes: int
  num_edges: int
  estimated_peak_bytes: float

  @functools.cached_property
  def spec_of(self) -> dict[int, Spec]:
    return dict(self.tensor_specs)

  @functools.cached_property
  def operand_spec_of(self) -> dict[tuple[int, int], Spec]:
    return dict(self.operand_specs)

  @functools.cached_property
  def strategy_of(self) -> dict[int, str]:
    return dict(self.op_strategies)


def _make_rc(mesh: LogicalMesh, option: AutoShardingOption):

  @functools.lru_cache(maxsize=None)
  def rc(src, dst, nbytes):
    return resharding_cost(src, dst, nbytes, mesh, option.allow_all_gather,
                           option.allow_all_to_all)

  return rc


def _follow_target(op, graph: OpGraph, node_of, nodes):
  follow = follow_kind(op.name)
  if follow is Follow.NONE or not op.outputs:
    return None
  if any(t in graph.outvar_set for t in op.outputs):
    return None  # a step output's layout is a decision of its own (next step)
  out_size = graph.tensor(op.outputs[0]).size
  any_size = follow is Follow.ANY_SIZE
  for pos, t in enumerate(op.inputs):
    if isinstance(t, Literal) or t not in node_of:
      continue
    info = graph.tensor(t)
    if (info.size == out_size or any_size) and info.shape and \
        len(nodes[node_of[t]].cost) > 1:
      return pos, t
  return None


def _build_nodes(graph: OpGraph, mesh: LogicalMesh, option: AutoShardingOption,
                 input_specs: dict[int, Sequence[Spec]], rc,
                 constrain: StrategyConstraints,
                 surcharges: Mapping[tuple[int, str], Surcharge],
                 excluded: Mapping[int, Spec]):
  nodes: list[_Node] = []
  node_of: dict[int, int] = {}
  for i, t in enumerate(graph.invars):
    info = graph.tensor(t)
    strats = constrain.tensor(t, tensor_strategies(info, mesh))
    if i in input_specs:
      allowed = set(input_specs[i])
      strats = [s for s in strats if s.out_specs[0] in allowed] or [
          Strategy("replicated", (replicated(len(info.shape)),), (), 0.0, 0.0)]
    if t in excluded:
      strats = [s for s in strats if s.out_specs[0] != excluded[t]] or strats
    nodes.append(_Node([0.0] * len(strats),
                       {t: [s.out_specs[0] for s in strats]}, [],
                       [s.name for s in strats]))
    node_of[t] = len(nodes) - 1
  for t in graph.consts:
    info = graph.tensor(t)
    nodes.append(_Node([0.0], {t: [replicated(len(info.shape))]}, [],
                       ["constant"]))
    node_of[t] = len(nodes) - 1
  ties: list = []

  def add_ops(ops):
    for op in ops:
      region = graph.regions.get(op.index)
      if op.index in graph.branches:
        add_branches(graph, op, graph.branches[op.index], mesh, nodes,
                     node_of, ties, add_ops)
      elif region is None:
        add_op(op)
      else:
        add_region_inputs(graph, op, region, mesh, nodes, node_of, ties)
        add_ops(region.ops)
        add_region_results(graph, op, region, nodes, node_of)

  def add_op(op):
    strats = constrain(op, strategies_for(
        op, graph, mesh, prefer_reduce_scatter=option.prefer_reduce_scatter,
        allow_mixed_mesh_shape=option.allow_mixed_mesh_shape,
        fused=option.fusion_aware_bytes))
    target = _follow_target(op, graph, node_of, nodes)
    if target is not None and len(strats) > 1:
      pos, t = target
      node_idx = node_of[t]
      min_shards = follows_min_shards(op.name)
      node = nodes[node_idx]
      nbytes = graph.tensor(t).nbytes
      picks = []
      for s, spec in enumerate(node.specs[t]):
        # Follow exactly where a strategy takes the operand as it is: a
        # cheaper-looking strategy that reshards here would ignore what the
        # consumers downstream pay for the new layout.
        exact = [k for k, st in enumerate(strats) if st.in_specs[pos] == spec]
        best_k, best_key, best_c = 0, None, math.inf
        for k in exact or range(len(strats)):
          st = strats[k]
          c = st.cost + rc(spec, st.in_specs[pos], nbytes)
          # e.g. a broadcast follows by leaving its new dims whole
          key = (num_shards(st.out_specs[0], mesh.shape), c) \
              if min_shards else (c,)
          if best_key is None or key < best_key:
            best_k, best_key, best_c = k, key, c
        picks.append(best_k)
        extra = surcharges.get((op.index, strats[best_k].name))
        node.cost[s] += (best_c + (extra.seconds if extra else 0.0)) * op.trips
      node.followers.append((op.index, [strats[k].name for k in picks]))
      node.follower_choices.append((op, strats, pos, picks))
      for j, out in enumerate(op.outputs):
        node.specs[out] = [strats[k].out_specs[j] for k in picks]
        node_of[out] = node_idx
      for p, ref in enumerate(op.inputs):
        if isinstance(ref, int):
          node.reqs.append((ref, op.index, p,
                            [strats[k].in_specs[p] for k in picks], p != pos))
      return
    costs = []
    for s in strats:
      extra = surcharges.get((op.index, s.name))
      costs.append((s.cost + (extra.seconds if extra else 0.0)) * op.trips)
    node = _Node(costs, {}, [], [s.name for s in strats],
                 root_op=op.index)
    for j, out in enumerate(op.outputs):
      node.specs[out] = [s.out_specs[j] for s in strats]
    for p, ref in enumerate(op.inputs):
      if isinstance(ref, int):
        node.reqs.append((ref, op.index, p, [s.in_specs[p] for s in strats],
                          True))
    nodes.append(node)
    for out in op.outputs:
      node_of[out] = len(nodes) - 1

  add_ops(graph.ops)
  return nodes, node_of, ties


def _build_edges(graph, nodes, node_of, rc, aliases, alias_penalty, ties=()):
  """Resharding edges. ``ties``: (body carry out, body carry in, penalty,
  iterations) of the scans' carries (see ``_add_region``)."""
  trips = {op.index: op.trips for op in graph.all_ops()}
  groups: dict[tuple[int, int], list] = {}
  for v, node in enumerate(nodes):
    for t, op_idx, _, req, count_same in node.reqs:
      u = node_of[t]
      nbytes = graph.tensor(t).nbytes
      mult = trips.get(op_idx, 1)
      if u == v:
        if count_same:
          for s in range(len(node.cost)):
            node.cost[s] += rc(node.specs[t][s], req[s], nbytes) * mult
        continue
      groups.setdefault((u, v), []).append((t, req, nbytes, 0.0, mult))
  links = [(o, i, alias_penalty, 1) for o, i in aliases] + list(ties)
  for out_t, in_t, penalty, mult in links:
    u, v = node_of.get(out_t), node_of.get(in_t)
    if u is None or v is None:
      continue
    nbytes = graph.tensor(out_t).nbytes
    if u == v:
      if mult == 1:
        continue  # (a step output that is its own input: nothing to tie)
      node = nodes[u]
      for s in range(len(node.cost)):
        a, b = node.specs[out_t][s], node.specs[in_t][s]
        if a != b:
          node.cost[s] += rc(a, b, nbytes) * mult + penalty
      continue
    groups.setdefault((u, v), []).append(
        (out_t, nodes[v].specs[in_t], nbytes, penalty, mult))
  edges = []
  for (u, v), items in groups.items():
    U, V = nodes[u], nodes[v]
    u_keys = [tuple(U.specs[t][s] for t, _, _, _, _ in items)
              for s in range(len(U.cost))]
    v_keys = [tuple(req[s] for _, req, _, _, _ in items)
              for s in range(len(V.cost))]
    u_uniq = list(dict.fromkeys(u_keys))
    v_uniq = list(dict.fromkeys(v_keys))
    u_index = {k: i for i, k in enumerate(u_uniq)}
    v_index = {k: i for i, k in enumerate(v_uniq)}
    cost = []
    nonzero = False
    for uk in u_uniq:
      row = []
      for vk in v_uniq:
        c = 0.0
        for (_, _, nbytes, penalty, mult), a, b in zip(items, uk, vk):
          if a != b and b is not None:
            c += rc(a, b, nbytes) * mult + penalty
        nonzero |= c > 0
        row.append(c)
      cost.append(tuple(row))
    if not nonzero:
      continue
    edges.append(ilp.Edge(u, v, tuple(u_index[k] for k in u_keys),
                          tuple(v_index[k] for k in v_keys), tuple(cost)))
  return edges


def _memory_constraints(graph: OpGraph, nodes, node_of, mesh_shape):
  run_order, define, last = timeline(graph)
  n_ops = len(run_order)
  pos_of = {op.index: i for i, op in enumerate(run_order)}
  # replicated live bytes at each point, by a sweep
  delta = [0.0] * (n_ops + 2)
  for t, d in define.items():
    b = graph.tensor(t).nbytes
    delta[d + 1] += b
    delta[last[t] + 1] -= b
  live, acc = [], 0.0
  for i in range(n_ops + 1):
    acc += delta[i]
    live.append(acc)
  order = sorted(range(len(live)), key=lambda i: -live[i])
  points = sorted(set(order[:_MEMORY_POINTS // 2]) |
                  set(range(0, len(live), max(1, len(live) //
                                              (_MEMORY_POINTS // 2)))))
  roots = {pos_of[node.root_op]: n for n, node in enumerate(nodes)
           if node.root_op is not None and len(node.cost) > 1}
  # an op that may read a large operand in a new layout (a gathered copy)
  # is a point of its own, wherever the sweep's peak lies
  big = 0.1 * max(live, default=0.0)
  points = sorted(set(points) | {
      p + 1 for p, n in roots.items()
      if any(graph.tensor(t).nbytes >= big and pos_of[op_idx] == p
             for t, op_idx, _, _, _ in nodes[n].reqs)})
  constraints = []
  for p in points:
    point = p - 1  # live after op p-1 ran, before op p
    per_node: dict[int, list[float]] = {}
    for t, d in define.items():
      if d <= point <= last[t] and t in node_of:
        n = node_of[t]
        specs = nodes[n].specs.get(t)
        if specs is None:
          continue
        nbytes = graph.tensor(t).nbytes
        row = per_node.setdefault(n, [0.0] * len(nodes[n].cost))
        for s, spec in enumerate(specs):
          row[s] += nbytes / num_shards(spec, mesh_shape)
    if point >= 0 and point in roots:
      # The operands an op reads in a layout other than their producer's
      # are copies (an all-gather's output, say) that live while it runs.
      # Counted for every strategy: conservative where no copy is made.
      n = roots[point]
      for t, op_idx, _, req, _ in nodes[n].reqs:
        if pos_of[op_idx] != point or not graph.tensor(t).shape:
          continue
        nbytes = graph.tensor(t).nbytes
        row = per_node.setdefault(n, [0.0] * len(nodes[n].cost))
        for s, spec in enumerate(req):
          if spec is not None:
            row[s] += nbytes / num_shards(spec, mesh_shape)
    label = (f"after op {point} ({run_order[point].name})" if point >= 0
             else "at step start")
    constraints.append(ilp.MemoryConstraint(
        tuple((n, tuple(b)) for n, b in per_node.items()), label))
  return constraints


def _peak_bytes(graph, nodes, node_of, choice, mesh_shape, constraints):
  if not constraints:
    constraints = _memory_constraints(graph, nodes, node_of, mesh_shape)
  return max((sum(b[choice[n]] for n, b in m.terms) for m in constraints),
             default=0.0)


def run_auto_sharding(graph: OpGraph, mesh: LogicalMesh,
                      option: AutoShardingOption, *,
                      input_specs: dict[int, Sequence[Spec]] | None = None,
                      aliases: Sequence[tuple[int, int]] = (),
                      alias_penalty: float = 0.0,
                      batch_dims: Mapping[int, int] | None = None,
                      surcharges: Mapping[tuple[int, str], Surcharge]
                      | None = None,
                      excluded_specs: Mapping[int, Spec] | None = None
                      ) -> ShardingSolution:
  """Chooses a spec for every tensor of ``graph`` on ``mesh``.

  Args:
    graph: the flattened step.
    mesh: logical mesh with its cost profile.
    option: the pass options (``AutoShardingOption``).
    input_specs: graph input position -> the specs it may take (methods with
      a constrained strategy space use this).
    aliases: (output tensor, input tensor) pairs: the output is fed back as
      that input on the next step.
    alias_penalty: extra cost when an aliased pair differs (a constrained
      method makes it large).
    batch_dims: tensor id -> its batch dim (``batch_dims.infer_batch_dims``);
      with ``force_batch_dim_to_mesh_dim`` or ``force_data_parallel``, every
      op keeps these dims on the data axes.
    surcharges: (op index, strategy name) -> a ``Surcharge``: collectives
      XLA added for that op under that strategy in an earlier compile; their
      time is added to the strategy's cost.
    excluded_specs: graph input tensor id -> a layout it may not take
      (``runner_up_exclusions``: the next-best plan for the heaviest arrays).

  Returns:
    The solution.

  Raises:
    InfeasiblePlanError: no plan fits ``option.memory_budget_per_device``,
      or a heavy op cannot be split (``allow_recompute_heavy_op=False``).
  """
  rc = _make_rc(mesh, option)
  constrain = StrategyConstraints(graph, mesh, option, batch_dims or {})
  nodes, node_of, ties = _build_nodes(graph, mesh, option, input_specs or {},
                                      rc, constrain, surcharges or {},
                                      excluded_specs or {})
  edges = _build_edges(graph, nodes, node_of, rc, aliases, alias_penalty, ties)
  budget = option.memory_budget_per_device
  memory = ()
  if budget is not None:
    memory = tuple(_memory_constraints(graph, nodes, node_of, mesh.shape))
  problem = ilp.Problem(tuple(tuple(n.cost) for n in nodes), tuple(edges),
                        memory, budget, option.solver_time_limit_s)
  free = sum(1 for n in nodes if len(n.cost) > 1)
  _progress.log(f"mesh {mesh.shape}: ILP over {len(nodes)} nodes ({free} with "
                f"a choice), {len(edges)} edges, {len(memory)} memory points")
  result = ilp.solve(problem, ilp_symmetry.SymmetryOption()
                     if option.tie_repeated_layers else None)
  if isinstance(result, ilp.Infeasible) and budget is None:
    raise InfeasiblePlanError(
        f"the ILP solver found no sharding on mesh {mesh.shape} within "
        f"solver_time_limit_s={option.solver_time_limit_s} (solver status "
        f"{result.status}; {result.num_variables} variables). Raise "
        "AutoShardingOption(solver_time_limit_s=...), or give "
        "ShardParallel(mesh_shape=...) a mesh to search alone.")
  if isinstance(result, ilp.Infeasible):
    raise InfeasiblePlanError(
        f"no sharding on mesh {mesh.shape} fits memory_budget_per_device="
        f"{budget:.0f} bytes: at least {result.min_bytes_needed:.0f} "
        f"bytes per device are needed ({result.worst_point}; solver status "
        f"{result.status}). Raise the budget, use more devices, or reduce the "
        "batch / model size.")
  _progress.log(f"mesh {mesh.shape}: {result.status} objective "
                f"{result.objective * 1e3:.3f} ms in {result.solve_seconds:.2f} s "
                f"({result.num_variables} variables, {result.num_constraints} "
                "constraints)")
  return _solution(graph, nodes, node_of, result, mesh, edges, memory, rc)


def _solution(graph, nodes, node_of, result, mesh, edges, memory, rc):
  choice = result.choice
  inputs = set(graph.invars)
  tensor_specs = {}
  for t, n in node_of.items():
    specs = nodes[n].specs.get(t)
    if specs is not None:
      tensor_specs[t] = specs[choice[n]]
  renamed, wants = polish_followers(graph, nodes, node_of, choice,
                                    tensor_specs, rc)
  operand_specs = {}
  for n, node in enumerate(nodes):
    for t, op_idx, pos, req, _ in node.reqs:
      if op_idx in graph.branches:
        continue  # a cond's branch reshards its own input (``add_branches``)
      want = wants.get((op_idx, pos), req[choice[n]])
      if want is not None and want != tensor_specs.get(t):
        operand_specs[(op_idx, pos)] = want
  # every tensor is held to its chosen layout, followers' included: left
  # free, XLA's propagation re-shards a follower (a layer norm's chain) its
  # own way and adds collectives the plan never priced. A broadcast's result
  # is the exception: it keeps its new dims whole in the plan (it is free to
  # slice), and held whole XLA would materialize it whole, where left free
  # it is made only as the slice its readers take.
  broadcasts = {t for op in graph.all_ops() if follows_min_shards(op.name)
                for t in op.outputs}
  constrained = [t for t in tensor_specs
                 if t not in inputs and t not in broadcasts]
  op_strategies = []
  for n, node in enumerate(nodes):
    if node.root_op is not None:
      op_strategies.append((node.root_op, node.names[choice[n]]))
    op_strategies.extend((i, renamed.get(i, names[choice[n]]))
                         for i, names in node.followers)
  peak = _peak_bytes(graph, nodes, node_of, choice, mesh.shape, list(memory))
  return ShardingSolution(
      mesh_shape=mesh.shape, tensor_specs=tuple(sorted(tensor_specs.items())),
      operand_specs=tuple(sorted(operand_specs.items())),
      constrained=tuple(sorted(constrained)),
      op_strategies=tuple(sorted(op_strategies)), objective=result.objective,
      status=result.status, num_variables=result.num_variables,
      num_constraints=result.num_constraints,
      solve_seconds=result.solve_seconds, num_nodes=len(nodes),
      num_edges=len(edges), estimated_peak_bytes=peak)
