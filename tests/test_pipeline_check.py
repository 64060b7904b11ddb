"""Pipeline programs are checked at compile time, and a recurrent model with
checkpointed blocks (parameter-only backward ops read by two stages) runs
under PipeshardParallel and matches the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler import accumulation, layers
from alpa_py.compiler.errors import ScheduleError
from alpa_py.compiler.graph import build_graph
from alpa_py.compiler.pipeline_program import (Instr, Instruction,
                                               PipelineProgram, StageProgram,
                                               build_instructions)
from alpa_py.compiler.program import Task
from alpa_py.compiler.program_check import check_program
from recurrent_model import recurrent_pipeline


# -- the check, on hand-made programs -----------------------------------------

def _toy_graph():
  """p (a parameter), x (the batch): h = x * p (stage 0's forward),
  c = cos(p) (a parameter-only op), g = h * c (stage 1's backward) and
  d = c + p (stage 0's backward): c is read by both backwards."""
  def fn(p, x):
    h = x * p
    c = jnp.cos(p)
    return h * c, c + p
  graph = build_graph(jax.make_jaxpr(fn)(jnp.ones(4), jnp.ones(4)))
  out = {op.name + str(i): op.outputs[0]
         for i, op in enumerate(graph.ops)}
  p, x = graph.invars
  return graph, dict(p=p, x=x, h=out["mul0"], c=out["cos1"], g=out["mul2"],
                     d=out["add3"])


def _task(ins, outs):
  return Task(tuple(ins), tuple(outs), (1,), (), ())


def _program(graph, t, c_in_stage: int, n: int = 1,
             edit=lambda instructions: instructions) -> PipelineProgram:
  """The toy step on two stages (1F1B order), with c = cos(p) computed in
  the backward of stage ``c_in_stage``."""
  if c_in_stage == 1:  # the first backward to run makes c, stage 0 reads it
    b1 = _task([t["h"], t["p"]], [t["g"], t["c"]])
    b0 = _task([t["c"], t["p"]], [t["d"]])
  else:  # stage 1's backward reads c before stage 0's backward makes it
    b1 = _task([t["h"], t["c"]], [t["g"]])
    b0 = _task([t["p"]], [t["c"], t["d"]])
  stages = (StageProgram(0, _task([t["x"], t["p"]], [t["h"]]), b0, (0,), (1,)),
            StageProgram(1, _task([t["h"]], []), b1, (1,), (1,)))
  tasks = [(k, s, m) for m in range(n)
           for k, s in (("F", 0), ("F", 1), ("B", 1), ("B", 0))]
  per_step = {t["p"]}
  instructions = build_instructions(tasks, stages, per_step, set(), n)
  return PipelineProgram(stages, _task([t["p"]], [t["p"]]),
                         tuple(edit(list(instructions))),
                         (t["p"], t["x"]), (t["x"],), (), n)


def test_check_accepts_a_program_whose_reads_follow_their_producers():
  graph, t = _toy_graph()
  check_program(_program(graph, t, c_in_stage=1, n=2), graph)


def test_check_names_a_tensor_read_before_its_producer_runs():
  graph, t = _toy_graph()
  with pytest.raises(ScheduleError) as err:
    check_program(_program(graph, t, c_in_stage=0, n=2), graph)
  msg = str(err.value)
  c = t["c"]
  assert f"recv B1.0 %{c}`" in msg  # the failing instruction
  assert f"%{c} (float32[4])" in msg
  assert "the backward of stage 1 (B1) reads" in msg  # the reader's task
  assert "reader op(s) `mul` #2" in msg  # ... and its op
  assert "produced by op `cos` #1 in the backward of stage 0 (B0)" in msg
  assert "which runs for micro-batch 0 at instruction" in msg


def test_check_names_a_tensor_freed_before_its_read():
  graph, t = _toy_graph()

  def free_c_early(instructions):
    run_b1 = instructions.index(Instruction(Instr.RUN, 1, "B", 0))
    return (instructions[:run_b1 + 1]
            + [Instruction(Instr.FREE, 1, "B", 0, t["c"])]
            + instructions[run_b1 + 1:])

  program = _program(graph, t, c_in_stage=1, edit=free_c_early)
  with pytest.raises(ScheduleError, match=rf"reads tensor %{t['c']} .*"
                     r"freed at instruction \d+ \(`free B1.0"):
    check_program(program, graph)


def test_check_names_a_task_run_without_its_input():
  graph, t = _toy_graph()
  drop = Instruction(Instr.RECV, 0, "B", None, t["p"])
  program = _program(graph, t, c_in_stage=1,
                     edit=lambda ins: [i for i in ins if i != drop])
  with pytest.raises(ScheduleError, match=rf"B0\) runs for micro-batch 0 "
                     rf"without tensor %{t['p']}"):
    check_program(program, graph)


# -- the layer assignment -------------------------------------------------------

@pytest.mark.parametrize("scan", ["associative", "loop"])
def test_backward_dependencies_point_to_earlier_layers(scan):
  """In a checkpointed recurrent block, the recomputed forward has ops
  that read only parameters (softplus's ``select_n`` on the ``(width,)``
  parameter) and whose readers sit in two layers: each must run in the
  layer of its first reader, the highest."""
  state, batch, step = recurrent_pipeline(scan, remat=True)
  graph = build_graph(jax.make_jaxpr(step)(state, batch))
  n_state = len(jax.tree_util.tree_leaves(state))
  part = accumulation.partition(graph, {n_state}, 2)
  pipe_ops = sorted(part.pre + part.body, key=lambda o: o.index)
  la = layers.assign_layers(graph, pipe_ops, alpa_py.ManualLayerOption())
  seed = layers.seed_position(graph)
  bwd = [op for op in pipe_ops if op.index >= seed]
  late = [(op.index, op.name, la.layer_of[graph.producer[x]],
           la.layer_of[op.index])
          for op in bwd for x in op.inputs
          if isinstance(x, int) and graph.producer.get(x, -1) >= seed
          and graph.producer[x] in la.layer_of
          and la.layer_of[graph.producer[x]] < la.layer_of[op.index]]
  assert not late, f"(op, name, producer layer, reader layer): {late[:5]}"
  # the model does have such ops, read in both layers
  tainted = {graph.invars[n_state]}
  for op in graph.ops:
    if any(isinstance(x, int) and x in tainted for x in op.inputs):
      tainted.update(op.outputs)
  shared = [op for op in bwd
            if not any(isinstance(x, int) and x in tainted for x in op.inputs)
            and len({la.layer_of[c] for y in op.outputs
                     for c in graph.consumers.get(y, ())
                     if c in la.layer_of}) > 1]
  assert shared


# -- the recurrent model end to end --------------------------------------------

@pytest.mark.parametrize("scan,remat", [
    ("associative", True),
    pytest.param("loop", True, marks=pytest.mark.slow),
    pytest.param("lax", False, marks=pytest.mark.slow)])
def test_recurrent_model_pipeline_matches_single_device(scan, remat):
  state, batch, step = recurrent_pipeline(scan, remat=remat)
  ref_state, ref_loss = jax.jit(step)(state, batch)
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=2,
      stage_option=alpa_py.UniformStageOption(num_stages=2)))
  out_state, loss = par(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(out_state),
                  jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)


def test_compile_rejects_a_backward_op_placed_after_its_reader(monkeypatch):
  """With the old placement (a parameter-only backward op joins its lowest
  reader's layer), the compile stops with the check's error instead of the
  first call dying in the runtime."""
  def lowest_reader(graph, ops, layer_of, num_layers):
    placed = {}
    for op in reversed(ops):
      readers = [placed.get(c, layer_of.get(c)) for y in op.outputs
                 for c in graph.consumers.get(y, ())
                 if c in placed or c in layer_of]
      placed[op.index] = min(readers) if readers else num_layers - 1
    return placed

  monkeypatch.setattr(layers, "_place_input_only_ops", lowest_reader)
  state, batch, step = recurrent_pipeline("loop", remat=True)
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=2,
      stage_option=alpa_py.UniformStageOption(num_stages=2)))
  with pytest.raises(ScheduleError, match=r"the backward of stage 1 \(B1\) "
                     r"reads tensor %\d+ .* produced by op `\w+` #\d+ in the "
                     r"backward of stage 0 \(B0\)"):
    par.get_executable(state, batch)
