"""The benchmark harness keeps working (no timing assertions)."""

import json
import math

import pytest

from alpa_py import cli
from alpa_py.bench import configs, simulate
from alpa_py.compiler import hlo_stats


@pytest.mark.slow  # `alpa-py bench --suite gpt --config tiny --quick` by hand
def test_quick_bench_writes_every_figure(tmp_path, capsys):
  assert cli.main(["bench", "--quick", "--suite", "gpt", "--config", "tiny",
                   "--profiles", "cpu,a100_8x_nvlink_100gbps",
                   "--out", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "gpt_tiny.json").read_text())
  assert (tmp_path / "gpt_tiny.png").read_bytes()[:4] == b"\x89PNG"
  plans = {r["plan"] for r in result["rows"]}
  assert plans == {"jit", "data", "zero2", "zero3", "auto", "megatron"}
  for r in result["rows"]:
    assert r["measured_step_seconds"] > 0 and r["memory_per_device"] > 0
    for prof in ("cpu", "a100_8x_nvlink_100gbps"):
      assert math.isfinite(r["predicted"][prof]["step_seconds"])
  assert result["checks"]["auto_memory_le_data_parallel"]
  assert "checks:" in capsys.readouterr().out


def test_hlo_collective_bytes():
  text = """
  %all-reduce.1 = f32[128,64]{1,0} all-reduce(f32[128,64]{1,0} %x), replica_groups={}
  %ag = (bf16[8,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(bf16[1,16]{1,0} %y)
  %agd = bf16[8,16]{1,0} all-gather-done(%ag)
  %mul = f32[4]{0} multiply(f32[4]{0} %a, f32[4]{0} %b)
  """
  got = hlo_stats.collective_bytes(text)
  assert got["all-reduce"] == 128 * 64 * 4
  assert got["all-gather"] == 2 * 8 * 16 * 2
  assert got["reduce-scatter"] == 0


def test_named_configs_have_the_published_sizes():
  import jax
  for suite, sizes in simulate.WEAK_SCALING.items():
    for name in sizes.values():
      state = configs.make_state(configs.get_config(suite, name), abstract=True)
      n = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
      target = float(name[:-1]) * (1e9 if name.endswith("B") else 1e6)
      assert 0.7 * target < n < 1.35 * target, (suite, name, n)


def test_simulation_allocates_nothing_and_reports_published():
  row = simulate.simulate_intra_op("moe", 8, "v100_8x_nvlink_25gbps")
  assert row["published"] == {"Alpa": 45.8, "DeepSpeed": 40.0}
  assert row["predicted_tflops_per_gpu"] > 0
  assert row["mesh"] == [1, 8]


def test_unknown_config():
  with pytest.raises(ValueError, match="no gpt config named 'huge'"):
    configs.get_config("gpt", "huge")
