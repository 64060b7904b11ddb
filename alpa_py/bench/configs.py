"""Named model configs mirroring Alpa's suite, plus small CPU configs.

Each config builds a plain training step ``step(state, batch)`` over real
arrays, or over ``jax.ShapeDtypeStruct``s only (``abstract=True``: no
parameter is allocated, for simulating large models). The optimizer is the
one Alpa's benchmark used for the suite (``alpa/benchmark/alpa``:
``optax.adamw`` for GPT in ``benchmark_one_case_gpt_bert.py``, Adafactor for
MoE in ``benchmark_one_case_moe.py``, SGD with Nesterov momentum 0.9 for
Wide-ResNet in ``benchmark_one_case_wresnet.py``); the small CPU configs use
AdamW.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from alpa_py.models import GPT, GPTConfig, MoEModel, WideResNet
from alpa_py.models.gpt import lm_loss


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark model at one batch size."""

  suite: str
  name: str
  model: dict
  batch: int
  seq: int = 0  # tokens per sequence (gpt, moe)
  image: int = 0  # image side (wresnet)
  optimizer: str = "adamw"  # "adamw", "adafactor" or "sgd-momentum"
  # compute precision of the simulated (pipeline) step: "bf16" or "fp32"
  # (Alpa ran GPT and MoE in fp16, Wide-ResNet in fp32:
  # ``suite_paper_wresnet.py``)
  dtype: str = "bf16"


def _gpt(name, h, layers, heads, batch=1024, seq=1024, vocab=51200,
         mlp_ratio=4):
  return BenchConfig("gpt", name, dict(hidden=h, num_layers=layers,
                                       num_heads=heads, vocab_size=vocab,
                                       seq_len=seq, mlp_ratio=mlp_ratio),
                     batch, seq=seq)


def _moe(name, h, layers, heads, experts, batch=1024, seq=1024, vocab=32000,
         optimizer="adafactor"):
  return BenchConfig("moe", name, dict(hidden=h, num_layers=layers,
                                       num_heads=heads, num_experts=experts,
                                       vocab_size=vocab, seq_len=seq,
                                       moe_every=2, group_size=1024),
                     batch, seq=seq, optimizer=optimizer)


def _wres(name, depth, channels, width, batch=1536, image=224, classes=1024,
          optimizer="sgd-momentum"):
  return BenchConfig("wresnet", name, dict(depth=depth, base_channels=channels,
                                           width_factor=width,
                                           num_classes=classes), batch,
                     image=image, optimizer=optimizer, dtype="fp32")


CONFIGS = {c.suite + ":" + c.name: c for c in [
    # Alpa's GPT-3 configs (seq 1024, vocab 51200)
    _gpt("350M", 1024, 24, 16), _gpt("760M", 1536, 24, 16),
    _gpt("1.3B", 2048, 24, 32), _gpt("2.6B", 2560, 32, 32),
    _gpt("6.7B", 4096, 32, 32), _gpt("15B", 5120, 48, 40),
    _gpt("39B", 8192, 48, 64),
    # GShard-style MoE, an MoE feed-forward every other layer
    _moe("380M", 768, 8, 16, 16), _moe("690M", 768, 8, 16, 32),
    _moe("1.3B", 768, 16, 16, 32), _moe("2.4B", 1024, 16, 16, 32),
    _moe("10B", 1536, 16, 16, 64), _moe("27B", 2048, 16, 32, 96),
    _moe("70B", 2048, 32, 32, 128),
    # Wide-ResNet (bottleneck, width factor 2), image 224, 1024 classes;
    # channels chosen so that the parameter counts match the names
    _wres("250M", 50, 128, 2), _wres("500M", 50, 176, 2),
    _wres("1B", 50, 256, 2), _wres("2B", 50, 352, 2), _wres("4B", 50, 496, 2),
    _wres("6.8B", 50, 640, 2), _wres("13B", 101, 640, 2),
    # small configs that run on 8 CPU devices in seconds
    _gpt("tiny", 128, 2, 4, batch=16, seq=64, vocab=1024),
    _gpt("small", 256, 4, 8, batch=32, seq=128, vocab=2048),
    # shaped otherwise: a wide MLP (16x the width) on few layers, and a deep
    # narrow stack
    _gpt("wide", 128, 2, 4, batch=16, seq=64, vocab=512, mlp_ratio=16),
    _gpt("deep", 64, 12, 4, batch=32, seq=32, vocab=256),
    _moe("tiny", 64, 2, 4, 8, batch=16, seq=32, vocab=512, optimizer="adamw"),
    _moe("small", 128, 4, 4, 8, batch=32, seq=64, vocab=1024,
         optimizer="adamw"),
    _wres("tiny", 8, 8, 2, batch=16, image=32, classes=10, optimizer="adamw"),
]}


def get_config(suite: str, name: str) -> BenchConfig:
  key = f"{suite}:{name}"
  if key not in CONFIGS:
    names = sorted(k.split(":")[1] for k in CONFIGS if k.startswith(suite + ":"))
    raise ValueError(f"no {suite} config named {name!r}; choose one of {names}")
  return CONFIGS[key]


def with_layers(cfg: BenchConfig, num_layers: int) -> BenchConfig:
  """The same config with ``num_layers`` blocks (a proxy of its distinct
  layers, for the simulator)."""
  return dataclasses.replace(cfg, model={**cfg.model, "num_layers": num_layers})


def make_model(cfg: BenchConfig, pipeline: bool = False):
  """The config's model; ``pipeline``: as the simulator plans it, with the
  config's compute precision (parameters stay float32) and a pipeline
  boundary marker between layers."""
  dtype = jnp.bfloat16 if pipeline and cfg.dtype == "bf16" else jnp.float32
  if cfg.suite == "gpt":
    m = dict(cfg.model)
    return GPT(GPTConfig(vocab_size=m["vocab_size"], seq_len=m["seq_len"],
                         hidden=m["hidden"], num_heads=m["num_heads"],
                         num_layers=m["num_layers"],
                         mlp_ratio=m.get("mlp_ratio", 4), dtype=dtype,
                         pipeline_boundaries=pipeline))
  if cfg.suite == "moe":
    if pipeline:
      return MoEModel(**cfg.model, dtype=dtype, pipeline_boundaries=True)
    return MoEModel(**cfg.model)
  if pipeline:
    return WideResNet(**cfg.model, dtype=dtype, pipeline_boundaries=True)
  return WideResNet(**cfg.model)


def make_batch(cfg: BenchConfig, abstract: bool = False, batch: int | None = None):
  b = batch or cfg.batch
  if cfg.suite in ("gpt", "moe"):
    shape, dtype = (b, cfg.seq), jnp.int32
    if abstract:
      return {"x": jax.ShapeDtypeStruct(shape, dtype)}
    vocab = cfg.model["vocab_size"]
    return {"x": jax.random.randint(jax.random.PRNGKey(0), shape, 0, vocab)}
  img = (b, cfg.image, cfg.image, 3)
  if abstract:
    return {"x": jax.ShapeDtypeStruct(img, jnp.float32),
            "y": jax.ShapeDtypeStruct((b,), jnp.int32)}
  return {"x": jax.random.normal(jax.random.PRNGKey(0), img),
          "y": jax.random.randint(jax.random.PRNGKey(1), (b,), 0,
                                  cfg.model["num_classes"])}


def _loss(cfg: BenchConfig, out, batch):
  if cfg.suite in ("gpt", "moe"):
    return lm_loss(out, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(
      out.astype(jnp.float32), batch["y"]).mean()


def make_step(cfg: BenchConfig):
  def loss_of(params, apply_fn, batch):
    return _loss(cfg, apply_fn(params, batch["x"]), batch)

  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_of)(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads), loss

  return step


def make_pipeline_step(cfg: BenchConfig):
  """The step as a pipeline sees it: the gradient marked with
  ``alpa_py.value_and_grad`` (for accumulation and layer construction)."""
  import alpa_py  # the package imports this module's users

  def step(state, batch):
    def loss_of(params):
      return _loss(cfg, state.apply_fn(params, batch["x"]), batch)
    loss, grads = alpa_py.value_and_grad(loss_of)(state.params)
    return state.apply_gradients(grads=grads), loss

  return step


def make_optimizer(cfg: BenchConfig) -> optax.GradientTransformation:
  """The config's optimizer (see the module doc)."""
  if cfg.optimizer == "adafactor":
    return optax.adafactor(1e-3)
  if cfg.optimizer == "adamw":
    return optax.adamw(1e-4)
  if cfg.optimizer == "sgd-momentum":
    return optax.sgd(0.1, momentum=0.9, nesterov=True)
  raise ValueError(f"config {cfg.suite}:{cfg.name}: optimizer "
                   f"{cfg.optimizer!r} is not 'adamw', 'adafactor' or "
                   "'sgd-momentum'")


def make_state(cfg: BenchConfig, abstract: bool = False, pipeline: bool = False):
  model = make_model(cfg, pipeline=pipeline)
  sample = make_batch(cfg, abstract=True, batch=1)["x"]
  tx = make_optimizer(cfg)

  def init():
    params = model.init(jax.random.PRNGKey(0), jnp.zeros(sample.shape, sample.dtype))
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=tx)

  if abstract:
    return jax.eval_shape(init)
  return init()


def num_params(state) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(state.params))
