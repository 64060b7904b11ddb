"""Six model styles, as their libraries' docs write them (``model_zoo``),
under ShardParallel, Zero3Parallel and a 2-stage PipeshardParallel: each
equals the single-device step (``jax.jit``; ``equinox.filter_jit`` for the
Equinox module passed whole)."""

import jax
import numpy as np
import pytest

import alpa_py
from model_zoo import ZOO

DEVICES = jax.devices()[:4]
METHODS = {
    "shard": lambda: alpa_py.ShardParallel(devices=DEVICES),
    "zero3": lambda: alpa_py.Zero3Parallel(devices=DEVICES),
    "pipeshard": lambda: alpa_py.PipeshardParallel(
        devices=DEVICES, num_micro_batches=2,
        layer_option=alpa_py.AutoLayerOption(layer_num=2),
        stage_option=alpa_py.UniformStageOption(num_stages=2)),
}


def _reference(style, step):
  if style == "equinox":
    import equinox as eqx
    return eqx.filter_jit(step)
  return jax.jit(step)


def _arrays(tree):
  return [x for x in jax.tree_util.tree_leaves(tree)
          if isinstance(x, (jax.Array, np.ndarray))]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("style", sorted(ZOO))
def test_model_style_equals_single_device(style, method):
  args, step = ZOO[style]()
  ref = _reference(style, step)(*args)
  par = alpa_py.parallelize(step, method=METHODS[method]())
  out = par(*args)
  assert len(_arrays(out)) == len(_arrays(ref))
  for a, b in zip(_arrays(out), _arrays(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5)
