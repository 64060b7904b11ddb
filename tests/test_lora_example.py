"""The multi-LoRA fine-tuning example: 8 adapters learn, the base does not."""

import importlib.util
import pathlib

import numpy as np
import pytest


def _example():
  path = pathlib.Path(__file__).parent.parent / "examples" / "multi_lora_finetune.py"
  spec = importlib.util.spec_from_file_location("multi_lora_finetune", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_eight_adapters_learn_and_base_is_frozen():
  first, last, base_identical = _example().run(steps=20, verbose=False)
  assert first.shape == (8,)
  assert np.all(last < first), (first, last)
  assert base_identical


@pytest.mark.slow
def test_serving_example_answers_as_the_full_model():
  import sys
  path = pathlib.Path(__file__).parent.parent / "examples"
  sys.path.insert(0, str(path))
  try:
    spec = importlib.util.spec_from_file_location(
        "multi_lora_serving", path / "multi_lora_serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    *_, state = mod.finetune.train(steps=3, verbose=False)
    assert mod.serve_adapters(state, vocab=64, new=4, verbose=False)
  finally:
    sys.path.remove(str(path))
