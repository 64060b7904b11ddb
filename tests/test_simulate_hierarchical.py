"""The simulator's hierarchical plan (bench/hierarchical.py): submesh
space, stage DP with 1F1B memory and remat, baselines under the same model.

Small configs only (abstract shapes, a few seconds each).
"""

import math

import pytest

from alpa_py.bench import baselines, configs
from alpa_py.bench.hierarchical import (StageModel, latency, plan_pipeline,
                                        submeshes)
from alpa_py.bench.layer_costs import LayerCostTable, Mode
from alpa_py.bench.simulate_hierarchical import (alpa_flops,
                                                 hierarchical_one,
                                                 pricing_profile)

PROFILE = "v100_8x_nvlink_25gbps"


@pytest.fixture(scope="module")
def prof():
  return pricing_profile(PROFILE)


@pytest.fixture(scope="module")
def gpt_tables(prof):
  cfg = configs.get_config("gpt", "tiny")
  return {m: LayerCostTable(cfg, m, prof) for m in (2, 4)}


def test_submesh_space():
  assert submeshes(16, 8) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8)]
  assert submeshes(4, 8) == [(1, 1), (1, 2), (1, 4)]
  assert (8, 8) in submeshes(64, 8) and (6, 8) not in submeshes(64, 8)


@pytest.mark.parametrize("gpus", [12, 0, 20])
def test_bad_gpu_count_lists_valid_counts(gpus):
  with pytest.raises(ValueError, match="Valid counts: 1, 2, .* 16, 24"):
    submeshes(gpus, 8)
  with pytest.raises(ValueError, match="multiple of 8"):
    hierarchical_one("gpt", gpus, PROFILE, name="tiny")


def test_cli_bad_gpu_count_is_an_error(capsys):
  from alpa_py import cli
  rc = cli.main(["bench", "--suite", "gpt", "--simulate", PROFILE,
                 "--gpus", "8,12", "--out", "/tmp/alpa_py_sim_test"])
  assert rc == 2
  assert "Valid counts" in capsys.readouterr().err


def test_middle_layers_share_signature_and_cost(prof):
  cfg = configs.with_layers(configs.get_config("gpt", "tiny"), 5)
  full = LayerCostTable(cfg, 2, prof, proxy=False)
  proxy = LayerCostTable(cfg, 2, prof)
  sigs = [s.signature for s in full.shapes]
  assert len(set(sigs[1:-1])) == 1 and sigs[0] != sigs[1] != sigs[-1]
  assert [s.signature for s in proxy.full_shapes()] == sigs
  a = full.cost(2, (1, 2), Mode.AUTO)
  b = proxy.cost(1, (1, 2), Mode.AUTO)
  assert math.isclose(a.micro_seconds, b.micro_seconds, rel_tol=1e-9)


def test_update_ops_are_not_in_a_layer(gpt_tables):
  t = gpt_tables[2]
  for l in range(len(t.shapes)):
    joint, _, _ = t.graphs(l)
    assert not any("opt_state" in t.paths.get(x, "") for x in joint.invars)


def test_alpa_plan_at_least_megatron_same_model(gpt_tables, prof):
  models = {m: StageModel(t, 8, prof.memory_per_device)
            for m, t in gpt_tables.items()}
  alpa = min((plan_pipeline(m) for m in models.values()),
             key=lambda p: p.step_seconds)
  grid = baselines.megatron_grid(models)
  best = baselines.best(grid)
  assert alpa.fits and best.fits
  assert alpa.step_seconds <= best.step_seconds * (1 + 1e-9)
  # the same model: re-pricing a Megatron plan's stages stage by stage
  # through StageModel.price gives the grid's figure
  model = models[best.micro_batch]
  again = [model.price(*s.units, s.submesh, s.logical, Mode.MEGATRON, True,
                       s.in_flight, None if k == 0 else
                       (sum(math.prod(x.submesh) for x in best.stages[:k])
                        % 8 == 0), shard_moments=False)
           for k, s in enumerate(best.stages)]
  assert math.isclose(latency(again, model.B), best.step_seconds,
                      rel_tol=1e-9)


def test_1f1b_in_flight_and_remat_memory(gpt_tables, prof):
  model = StageModel(gpt_tables[2], 8, prof.memory_per_device)
  plan = plan_pipeline(model)
  S = len(plan.stages)
  assert [s.in_flight for s in plan.stages] == [
      min(S - k, plan.num_micro_batches) for k in range(S)]
  no, yes = model.options(0, 2, (1, 2), Mode.AUTO)
  assert yes.remat and not no.remat
  assert yes.t > no.t  # one more forward
  assert yes.mem_per < no.mem_per  # only the stage input per micro-batch


def test_nothing_fits_is_a_row_not_an_exception(gpt_tables):
  model = StageModel(gpt_tables[2], 8, budget=1024)
  plan = plan_pipeline(model)
  assert not plan.fits
  assert 1024 < plan.memory_bytes < math.inf


def test_grad_sync_once_per_step(gpt_tables, prof):
  # data parallel on 2 devices: the all-reduce is a per-step term
  c = gpt_tables[4].cost(1, (2, 1), Mode.DATA0)
  assert c.grad_sync_seconds > 0
  t = gpt_tables[4].cost(1, (1, 1), Mode.AUTO)
  assert c.micro_seconds < t.micro_seconds


def test_deepspeed_plans_price_zero_stages(prof):
  cfg = configs.get_config("moe", "tiny")
  model = StageModel(LayerCostTable(cfg, 8, prof), 8, prof.memory_per_device)
  plans = baselines.deepspeed_plans({8: model})
  assert {p.name for p in plans} >= {"deepspeed zero2", "deepspeed zero3"}
  z2 = next(p for p in plans if p.name == "deepspeed zero2")
  z3 = next(p for p in plans if p.name == "deepspeed zero3")
  assert z3.memory_bytes < z2.memory_bytes
  assert z3.step_seconds > z2.step_seconds


def test_point_row(prof):
  row = hierarchical_one("gpt", 8, PROFILE, name="tiny", micro_batches=(2,))
  p = row["plan"]
  assert p["fits"] and p["tflops_ours"] > 0 and p["tflops_alpa"] > 0
  assert row["baseline"]["name"].startswith("megatron")
  assert row["rates"]["matmul_flops_per_s"] == prof.half_flops_per_s
  assert row["published"] == {"Alpa": 61.6, "Megatron-LM": 50.4}


def test_alpa_flops_formula_matches_traced_flops(prof):
  cfg = configs.get_config("gpt", "small")
  t = LayerCostTable(cfg, 2, prof)
  traced = sum(s.fwd_flops + s.bwd_flops for s in t.full_shapes())
  formula = alpa_flops(cfg, remat=False) * 2 / cfg.batch
  assert traced == pytest.approx(formula, rel=0.1)
