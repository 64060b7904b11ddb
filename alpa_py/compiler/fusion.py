"""Memory traffic of non-matmul ops after XLA's fusion (a documented rule).

XLA fuses chains of cheap ops into one kernel: elementwise ops, broadcasts,
reshapes, transposes, slices and converts are fused into the ops that read
them (loop fusion), and into a reduction that reads them (input fusion).
Inside a fused kernel an intermediate never goes to memory, so pricing each
op at every byte it reads and writes (the graph's ``Op.bytes_accessed``)
over-charges a layer norm or a GELU several times. The rule used here:

* a tensor is *materialized* (written once, read by each kernel that needs
  it) unless it is made by a fusible op and every reader is a fusible op of
  the same body (step, scan body or cond branch); step and body results,
  and the results of reductions, are materialized;
* a fused kernel ends at a *root*: a fusible op with a materialized result
  (a reduction always is one); it takes in every fusible producer it
  reaches through tensors that are not materialized. A producer reached by
  two roots is computed in both kernels (XLA duplicates it rather than
  writing it out), so a kernel reads each materialized tensor its producers
  read: a softmax over scores reads the scores three times (max, sum of
  exponentials, normalise), as XLA's three kernels do;
* a root costs its kernel's traffic (the distinct materialized tensors the
  kernel reads, and its results), the fused producers nothing; any other op
  (dot, convolution, gather, scatter, sort, control flow, ...) keeps the
  bytes of all it reads and writes.

The calibrated cost model (``cost_features``) is fitted on the same
after-fusion bytes, read from the optimized HLO (``hlo_kernels``), so the
ILP's prices and the calibration measure one thing.
"""

from __future__ import annotations

_FUSIBLE = frozenset((
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e "
    "bessel_i1e bitcast_convert_type cbrt ceil clamp clz conj "
    "convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv "
    "erfc exp exp2 expm1 floor ge gt igamma igammac imag integer_pow "
    "is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter "
    "not or polygamma population_count pow real reduce_precision rem round "
    "rsqrt select_n shift_left shift_right_arithmetic shift_right_logical "
    "sign sin sinh sqrt square stop_gradient sub tan tanh xor zeta "
    "broadcast_in_dim reshape squeeze expand_dims transpose slice "
    "dynamic_slice pad rev concatenate iota").split())
# fusion roots: they take fused producers, but their result is written out
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod argmax argmin".split())

def is_fusible(name: str) -> bool:
  """Whether XLA fuses an op of primitive ``name`` with its neighbours."""
  return name in _FUSIBLE or name in _REDUCTIONS


def fused_bytes(graph) -> dict[int, float]:
  """Op index -> the bytes it moves after fusion (see the module doc), for
  every op of an ``OpGraph``, bodies included (``OpGraph.fused_bytes``
  caches it; this module does not import ``graph``, which reads it)."""
  out: dict[int, float] = {}
  kept = _body_results(graph)
  for body in graph.bodies():
    readers: dict[int, list] = {}
    for op in body:
      for t in op.inputs:
        if isinstance(t, int):  # a tensor id (not a Literal)
          readers.setdefault(t, []).append(op)
    made_here = {t: op for op in body for t in op.outputs}

    def internal(t: int) -> bool:
      maker = made_here.get(t)
      if maker is None or maker.name not in _FUSIBLE or t in kept:
        return False
      rs = readers.get(t, ())
      return bool(rs) and all(is_fusible(r.name) for r in rs)

    reads: dict[int, frozenset] = {}  # op index -> materialized tensors

    def kernel_reads(op) -> frozenset:
      """The materialized tensors read by ``op`` and the producers fused
      into it (ops come in program order, so producers are done first)."""
      got = reads.get(op.index)
      if got is None:
        got = set()
        for t in op.inputs:
          if not isinstance(t, int):
            continue
          if internal(t):
            got |= reads[made_here[t].index]
          else:
            got.add(t)
        got = reads[op.index] = frozenset(got)
      return got

    for op in body:
      if not is_fusible(op.name):
        out[op.index] = op.bytes_accessed
        continue
      read = kernel_reads(op)
      written = [t for t in op.outputs if not internal(t)]
      if not written:  # fused into the kernels that read it
        out[op.index] = 0.0
        continue
      nbytes = sum(graph.tensor(t).nbytes for t in read)
      nbytes += sum(graph.tensor(t).nbytes for t in written)
      out[op.index] = float(nbytes)
  return out


def _body_results(graph) -> set:
  """Tensors handed out of their body (written out whatever reads them)."""
  results = set(graph.outvar_set)
  for region in graph.regions.values():
    results.update(t for t in region.outvars if isinstance(t, int))
  for branches in graph.branches.values():
    for b in branches:
      results.update(b.outvars)
  return results
