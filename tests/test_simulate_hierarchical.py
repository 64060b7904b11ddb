"""The simulator's hierarchical plan (bench/hierarchical.py): submesh
space, stage DP with 1F1B memory and remat, baselines under the same model.

Small configs only (abstract shapes, a few seconds each).
"""

import dataclasses
import math

import pytest

from alpa_py.bench import baselines, configs, layer_costs
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


def test_fusion_aware_tables_price_fused_regions(prof):
  # the same layer, priced per fused region: a fused op moves no more bytes
  # than it reads and writes, so no strategy costs more, and the matmul
  # FLOPs are the same
  cfg = configs.get_config("gpt", "tiny")
  plain = LayerCostTable(cfg, 2, prof)
  fused = LayerCostTable(cfg, 2, prof, fusion_aware=True)
  for l in range(len(plain.shapes)):
    assert fused.shapes[l].fwd_flops == plain.shapes[l].fwd_flops
    for logical in ((1, 1), (1, 2)):
      a = plain.cost(l, logical, Mode.AUTO).micro_seconds
      b = fused.cost(l, logical, Mode.AUTO).micro_seconds
      assert b <= a * (1 + 1e-9)
  one = [plain.cost(l, (1, 1), Mode.AUTO).micro_seconds -
         fused.cost(l, (1, 1), Mode.AUTO).micro_seconds
         for l in range(len(plain.shapes))]
  assert max(one) > 0  # a GPT layer's norms and GELU do fuse


def test_the_optimizers_state_is_what_the_memory_model_holds(prof):
  # Alpa's MoE suite trains with Adafactor (factored second moments), its
  # GPT suite with AdamW (two full moments): the state per parameter byte
  # comes from the traced optimizer, and so do memory and update time
  assert configs.get_config("moe", "70B").optimizer == "adafactor"
  assert configs.get_config("gpt", "350M").optimizer == "adamw"
  adamw_cfg = configs.get_config("moe", "tiny")
  ada_cfg = dataclasses.replace(adamw_cfg, optimizer="adafactor")
  adamw, ada = LayerCostTable(adamw_cfg, 8, prof), LayerCostTable(ada_cfg, 8,
                                                                  prof)
  assert adamw.opt_state_ratio == pytest.approx(2.0, rel=1e-3)  # + a count
  # tiny dims (< 128) are not factored: one full second moment
  assert ada.opt_state_ratio == pytest.approx(1.0, rel=1e-3)
  big = configs.make_state(configs.get_config("moe", "380M"), abstract=True)
  ratio = layer_costs._tree_bytes(big.opt_state) / layer_costs._tree_bytes(
      big.params)
  assert 0 < ratio < 0.01  # factored: rows + columns per weight matrix
  a = StageModel(adamw, 8, prof.memory_per_device).options(
      0, 1, (1, 8), Mode.AUTO)[0]
  b = StageModel(ada, 8, prof.memory_per_device).options(
      0, 1, (1, 8), Mode.AUTO)[0]
  assert b.mem_fixed < a.mem_fixed and b.step < a.step
  assert b.t == pytest.approx(a.t)  # the micro-batch is the same work
  with pytest.raises(ValueError, match="optimizer"):
    configs.make_optimizer(dataclasses.replace(adamw_cfg, optimizer="sgd"))


def test_wide_resnet_is_planned_in_stages_beside_pp_dp():
  row = hierarchical_one("wresnet", 8, PROFILE, name="tiny",
                         micro_batches=(4,))
  p, b = row["plan"], row["baseline"]
  assert row["optimizer"] == "adamw"  # the CPU config; Alpa's used SGD
  assert p["fits"] and p["tflops_ours"] > 0
  assert p["tflops_alpa"] == p["tflops_ours"]  # Alpa counted XLA's FLOPs
  assert b["name"] == "pp-dp" and b["fits"]
  # PP-DP stages are plainly data parallel: (d, 1) meshes, no weight split
  assert all(st["logical"][1] == 1 for st in b["stages"])
  # PP-DP is the same DP over a subset of the stage plans
  assert p["step_seconds"] <= b["step_seconds"] * 1.03
  units = [u for s in p["stages"] for u in range(*s["units"])]
  assert units == list(range(4))  # depth 8: four bottleneck blocks
  assert configs.get_config("wresnet", "2B").optimizer == "sgd-momentum"
