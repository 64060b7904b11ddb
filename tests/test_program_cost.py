"""Convolutions as a feature of their own, device contention, collectives
priced with the copies around them, and the price of a compiled program."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from alpa_py.compiler import calibration, calibration_pool, cluster_env
from alpa_py.compiler.cost_features import FEATURES, INDEX, program_features
from alpa_py.compiler.cost_model import (COMPUTE_FEATURES, SCHEMA_VERSION,
                                         DeviceKey, LinearCostModel)
from alpa_py.compiler.hlo_kernels import kernel_stats
from alpa_py.compiler.program import make_mesh
from alpa_py.compiler.program_cost import price_program


def _conv_and_dot(x, w, a, b):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y, a @ b


def test_convolution_flops_are_apart_from_dot_flops():
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 6))
  a = jnp.ones((16, 32))
  b = jnp.ones((32, 8))
  hlo = jax.jit(_conv_and_dot).lower(x, w, a, b).compile().as_text()
  ks = kernel_stats(hlo)
  assert ks.conv_flops == pytest.approx(2 * 2 * 8 * 8 * 6 * 3 * 3 * 4)
  assert ks.matmul_flops == pytest.approx(2 * 16 * 8 * 32)
  row = program_features(hlo)
  assert row[INDEX["conv_flops"]] == ks.conv_flops
  assert row[INDEX["matmul_flops"]] == ks.matmul_flops


def _model(**kw):
  coef = np.zeros(len(FEATURES))
  coef[INDEX["fixed"]] = 1e-4
  coef[INDEX["matmul_flops"]] = 1e-10
  coef[INDEX["conv_flops"]] = 3e-10
  coef[INDEX["nonmatmul_bytes"]] = 1e-9
  coef[INDEX["all-gather:inner:bytes"]] = 1e-9
  coef[INDEX["all-gather:inner:count"]] = 1e-5
  return LinearCostModel(key=DeviceKey.of(jax.devices()),
                         coefficients=tuple(coef), **kw)


def test_contention_scales_compute_for_fewer_devices_only():
  model = _model(contention=((1, 0.125), (2, 0.25), (4, 0.5), (8, 1.0)))
  row = np.zeros(len(FEATURES))
  row[INDEX["fixed"]] = 1.0
  row[INDEX["matmul_flops"]] = 1e9
  row[INDEX["all-gather:inner:count"]] = 2
  assert model.predict(row) == pytest.approx(1e-4 + 0.1 + 2e-5)
  assert model.predict(row, 8) == pytest.approx(1e-4 + 0.1 + 2e-5)
  assert model.predict(row, 1) == pytest.approx(1e-4 + 0.1 / 8 + 2e-5)
  assert model.contention_factor(3) in (0.25, 0.5)  # the nearest measured
  assert model.compute_time(1e9, 0, True, num_devices=2) == pytest.approx(
      0.1 / 4)
  # a convolution at its own rate
  assert model.compute_time(1e9, 0, True, is_conv=True) == pytest.approx(0.3)
  assert set(COMPUTE_FEATURES) <= set(FEATURES)


def test_collective_terms_price_a_resharding_with_its_copies():
  model = _model(collective_terms=(("all-to-all:inner", 2e-4, 8e-9),))
  # measured terms: alpha + beta * ring bytes ((n-1)/(2n) B for all-to-all)
  assert model.collective_time("all-to-all", 4, 1e6, "inner") == \
      pytest.approx(2e-4 + 8e-9 * 3 / 8 * 1e6)
  # no terms for this one: the feature coefficients
  assert model.collective_time("all-gather", 4, 1e6, "inner") == \
      pytest.approx(1e-5 + 1e-9 * 3 / 4 * 1e6)
  data = json.loads(json.dumps(model.to_json()))
  assert data["schema"] == SCHEMA_VERSION
  assert LinearCostModel.from_json(data) == model


class _Fake:
  def __init__(self, family, row):
    self.candidate = type("C", (), {"family": family, "id": family})()
    self.features = row


def test_collective_terms_are_fitted_per_kind_and_link():
  alpha, beta, fixed = 3e-4, 5e-9, 1e-4
  compiled, labels = [], {}
  for i, nbytes in enumerate((1e4, 1e5, 1e6, 4e6)):
    row = np.zeros(len(FEATURES))
    row[INDEX["fixed"]] = 1
    row[INDEX["all-to-all:outer:bytes"]] = nbytes
    row[INDEX["all-to-all:outer:count"]] = 1
    compiled.append(_Fake("collective", row))
    labels[i] = fixed + alpha + beta * nbytes
  compiled.append(_Fake("dot", np.ones(len(FEATURES))))  # not a collective
  terms = calibration.fit_collective_terms(compiled, labels, fixed)
  assert [t[0] for t in terms] == ["all-to-all:outer"]
  np.testing.assert_allclose(terms[0][1:], (alpha, beta), rtol=1e-6)


def test_an_older_schema_is_profiled_again_with_a_message(tmp_path,
                                                          monkeypatch,
                                                          caplog, recwarn):
  monkeypatch.setenv("ALPA_PY_CACHE_DIR", str(tmp_path))
  key = DeviceKey.of(jax.devices())
  data = _model().to_json()
  data["schema"] = SCHEMA_VERSION - 1
  calibration.cache_path(key.platform, key.num_devices).write_text(
      json.dumps(data))
  caplog.set_level(logging.INFO, logger="alpa_py")
  assert calibration.load(key) is None
  assert f"schema {SCHEMA_VERSION - 1}" in caplog.text
  assert not [w for w in recwarn
              if issubclass(w.category, calibration.CalibrationCacheWarning)]


def test_contention_is_measured_for_every_power_of_two():
  out = calibration_pool.measure_contention(jax.devices()[:4], size=64, reps=2)
  assert [d for d, _ in out] == [1, 2, 4]
  assert out[-1][1] == 1.0 and all(f > 0 for _, f in out)


def _psum_program():
  mesh = make_mesh(jax.devices()[:4], (4,))
  f = jax.jit(lambda x: jnp.sum(x, axis=0),
              in_shardings=NamedSharding(mesh, P(mesh.axis_names[0])),
              out_shardings=NamedSharding(mesh, P()))
  return f.lower(jnp.ones((4, 1024))).compile().as_text()


def test_a_compiled_program_is_priced_by_rates_or_by_the_model():
  hlo = _psum_program()
  prof = cluster_env.CostProfile("t", flops_per_s=1e12, mem_bytes_per_s=1e9,
                                 intra_alpha=1e-5, intra_beta=1e-9,
                                 inter_alpha=1e-4, inter_beta=1e-8,
                                 devices_per_node=8)
  cost = price_program(hlo, prof)
  ks = kernel_stats(hlo)
  # one all-reduce of 4 KiB over 4 devices: alpha (2n - 1) + beta 2 (n-1)/n B
  assert cost.communication == pytest.approx(1e-5 * 7 + 1e-9 * 1.5 * 4096)
  assert cost.compute == pytest.approx(ks.nonmatmul_bytes / 1e9)
  assert cost.seconds == pytest.approx(cost.compute + cost.communication)
  # across nodes: the inter-node link
  small = cluster_env.CostProfile("t2", flops_per_s=1e12, mem_bytes_per_s=1e9,
                                  intra_alpha=1e-5, intra_beta=1e-9,
                                  inter_alpha=1e-4, inter_beta=1e-8,
                                  devices_per_node=2)
  assert price_program(hlo, small).communication == pytest.approx(
      1e-4 * 7 + 1e-8 * 1.5 * 4096)
  model = _model(contention=((1, 0.5), (4, 1.0)))
  by_model = price_program(hlo, cluster_env.CostProfile.from_model(model))
  assert by_model.seconds == pytest.approx(
      float(model.predict(program_features(hlo), 4)))


_SLICING_FUSION = """\
HloModule m, is_scheduled=true

%fused_slice (p0: s32[8], p1: u32[], p2: f32[16,32,192]) -> f32[16,32,16] {
  %p2 = f32[16,32,192]{1,0,2} parameter(2)
  %copy = f32[16,32,192]{2,1,0} copy(%p2)
  %bc = f32[16,32,12,16]{3,2,1,0} bitcast(%copy)
  %zero = s32[] constant(0)
  %p0 = s32[8]{0} parameter(0)
  %p1 = u32[] parameter(1)
  %at = s32[1]{0} dynamic-slice(%p0, %p1), dynamic_slice_sizes={1}
  %i = s32[] bitcast(%at)
  %ds = f32[16,32,1,16]{3,2,1,0} dynamic-slice(%bc, %zero, %zero, %i, %zero), dynamic_slice_sizes={16,32,1,16}
  ROOT %out = f32[16,32,16]{2,1,0} bitcast(%ds)
}

%fused_add (q0: f32[16,32,192]) -> f32[16,32,192] {
  %q0 = f32[16,32,192]{2,1,0} parameter(0)
  ROOT %twice = f32[16,32,192]{2,1,0} add(%q0, %q0)
}

ENTRY %main (a: f32[16,32,192], t: s32[8]) -> (f32[16,32,16], f32[16,32,192], f32[4,32,192]) {
  %a = f32[16,32,192]{1,0,2} parameter(0)
  %t = s32[8]{0} parameter(1)
  %pid = u32[] partition-id()
  %head = f32[16,32,16]{2,1,0} fusion(%t, %pid, %a), kind=kLoop, calls=%fused_slice
  %whole = f32[16,32,192]{2,1,0} fusion(%a), kind=kLoop, calls=%fused_add
  %rows = f32[4,32,192]{2,1,0} slice(%a), slice={[0:4], [0:32], [0:192]}
  ROOT %r = (f32[16,32,16]{2,1,0}, f32[16,32,192]{2,1,0}, f32[4,32,192]{2,1,0}) tuple(%head, %whole, %rows)
}
"""


def test_an_operand_read_only_as_slices_counts_the_slices_bytes():
  # a fusion that dynamic-slices one head out of a [16, 32, 192] array
  # (through a layout copy and a bitcast) reads that head, not the array,
  # and one entry of the offset table; a fusion that reads the array whole
  # counts it whole, and a plain slice its rows
  ks = kernel_stats(_SLICING_FUSION)
  head = 16 * 32 * 16 * 4
  whole = 16 * 32 * 192 * 4
  rows = 4 * 32 * 192 * 4
  assert ks.launches == 3
  assert ks.nonmatmul_bytes == (4 + 4 + head + head) + 2 * whole \
      + 2 * rows


def test_a_compiled_slice_of_a_large_array_is_priced_by_its_slice():
  x = jnp.ones((4096, 256))
  hlo = jax.jit(lambda x: x[:16] * 2.0).lower(x).compile().as_text()
  # well under one read of the whole 4 MiB array
  assert kernel_stats(hlo).nonmatmul_bytes < 0.1 * x.size * 4
