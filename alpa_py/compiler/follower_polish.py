"""Followers re-choose their strategy once every layout is known.

A follower (an op merged into an operand's ILP node, ``Follow``) picks its
strategy for each strategy of that node before the solve, from its own cost
alone: it cannot see what its consumers in other nodes will ask for. A
gradient's bias ``reduce_sum`` then reduce-scatters over every axis because
that is cheapest here, and the optimizer update in another node gathers the
result again; XLA, which sees both, all-reduces over one axis instead and
gathers nothing. After the solve every other layout is fixed, so each
follower takes, among the strategies that read its followed operand as it
is, the one that costs least together with the reshardings its other
operands and its consumers (as they read it) then need.
"""

from __future__ import annotations

from alpa_py.compiler.strategies.spec import replicated


def polish_followers(graph, nodes, node_of, choice, tensor_specs, rc):
  del node_of  # (the same signature as the other solution passes)
  """Re-chooses followers' strategies given the solved layouts.

  ``tensor_specs`` is updated in place for the outputs of the followers that
  change.

  Returns:
    (op index -> its new strategy name, (op index, operand position) -> the
    spec it now reads).
  """
  ops = {op.index: op for op in graph.all_ops()}
  demand = {}
  for n, node in enumerate(nodes):
    for _, op_idx, pos, req, _ in node.reqs:
      demand[(op_idx, pos)] = req[choice[n]]
  renamed, wants = {}, {}
  for n, node in enumerate(nodes):
    for op, strats, pos, picks in node.follower_choices:
      if len(op.outputs) != 1 or op.trips != 1:
        continue
      out = op.outputs[0]
      readers = graph.consumers.get(out, ())
      if not readers:
        continue
      followed = tensor_specs.get(op.inputs[pos])

      def cost(st):
        total = st.cost
        for p, ref in enumerate(op.inputs):
          if isinstance(ref, int) and p != pos:
            info = graph.tensor(ref)
            have = tensor_specs.get(ref, replicated(len(info.shape)))
            total += rc(have, st.in_specs[p], info.nbytes)
        for c in readers:
          for q, ref in enumerate(ops[c].inputs):
            want = demand.get((c, q)) if ref == out else None
            if want is not None:
              total += rc(st.out_specs[0], want, graph.tensor(out).nbytes)
        return total

      current = strats[picks[choice[n]]]
      best = min((st for st in strats if st.in_specs[pos] == followed),
                 key=cost, default=current)
      if best.name != current.name and cost(best) < cost(current) * (1 - 1e-9):
        renamed[op.index] = best.name
        tensor_specs[out] = best.out_specs[0]
        for p in range(len(op.inputs)):
          wants[(op.index, p)] = best.in_specs[p]
  return renamed, wants
