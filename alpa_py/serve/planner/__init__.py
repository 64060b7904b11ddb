"""A serving planner in the manner of JellyBean: model variants and workers
chosen at minimum cost under an accuracy threshold and required rates.

The problem (:class:`Problem`): a workflow DAG whose sources inject items
at given rates; each other node is an operator with model variants; the
rate an operator must carry is ``R[v] = min over inputs u of R[u] *
ratio(u, v)``; an end-to-end accuracy table over variant combinations and
a threshold; workers with hourly prices, ordered tiers (0: nearest the
sources) and per-(operator, worker, variant) latency (items/s = 1000 /
latency in ms, one item at a time); link prices in $/GB from source to
worker and from worker to worker, and per-edge message sizes in KB per
variant pair.

Costs, JellyBean's definitions (see docs/research/jellybean_optimizer.md):

* compute: the full hourly price of every worker an operator uses (a
  worker serves one operator, whatever share of its throughput is used);
* communication, $/h: bandwidth in KB/s times 3600 / 1024^2 (GB/h) times
  the link's price (already multiplied by the scaling factor, 0.1 in the
  VQA example). A source (taken to sit in tier 0) sending to a worker of
  tier > 0 pays that link for ``rate_w * m``. Worker ``a`` of ``u`` sends
  worker ``b`` of ``v`` the share ``r_a r_b m / R[u]`` (each sender's
  output spread over receivers in proportion to their rates); it costs
  the ``a -> b`` link when ``tier(b) > tier(a)``, nothing within a tier,
  and sending to a lower tier is not allowed.

Planners, each returning a :class:`Plan`:

* :func:`jellybean_plan`: JellyBean's heuristic, rewritten here: variant
  combinations that meet the threshold, ranked by the summed relative cost
  of their variants (the beam search's ranking; the per-operator accuracy
  samples its beam needs are not among the published inputs, so the
  combinations are enumerated, which is what its beam keeps at width 10
  on the VQA example), then per combination a greedy multi-tier worker
  assignment over up to 10 topological orders, and the cheapest result.
* :func:`optimal_plan`: a MILP (OR-Tools, SCIP) over variants, workers and
  rates together. The only nonlinear term, ``sum r_a r_b`` over worker
  pairs of an edge, is exact per class pair (workers grouped by identical
  link prices; with tier-uniform prices one product per tier pair) and
  each product is bounded from above through a binary expansion of the
  receivers' rate (``rate_bits`` bits) with McCormick inequalities, so
  the MILP's objective is an upper bound on the plan's true cost that is
  at most ``discretisation`` above it. The plan is re-priced with the
  exact formulas; its optimality gap counts the solver's gap plus that
  term.
"""

from alpa_py.serve.planner.jellybean import jellybean_plan
from alpa_py.serve.planner.loader import VQA_EXAMPLE, load_jellybean
from alpa_py.serve.planner.milp import optimal_plan
from alpa_py.serve.planner.problem import (GB_PER_HOUR, Plan, PlanError,
                                           Problem, check, plan_costs,
                                           restrict)

__all__ = ["GB_PER_HOUR", "Plan", "PlanError", "Problem", "VQA_EXAMPLE",
           "check", "jellybean_plan", "load_jellybean", "optimal_plan",
           "plan_costs", "restrict"]
