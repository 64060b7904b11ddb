"""A served model on disk: its ``GPTConfig`` as JSON and its parameters
(base weights and adapters) as an orbax checkpoint.

  DIR/config.json   GPTConfig fields (dtype by name, e.g. "float32")
  DIR/params/       orbax PyTree checkpoint of model.init's parameters

``examples/multi_lora_finetune.py --save DIR`` writes one;
``alpa-py serve --model-config DIR/config.json --adapters DIR`` serves it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


def config_to_json(cfg) -> dict:
  d = dataclasses.asdict(cfg)
  d["dtype"] = jnp.dtype(cfg.dtype).name
  return d


def load_config(path: str):
  """A ``GPTConfig`` from a JSON file of its fields.

  Raises:
    ValueError: unreadable JSON, an unknown field (the message lists the
      fields), or a model without adapters.
  """
  from alpa_py.models import GPTConfig
  try:
    with open(path) as f:
      fields = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read the model config {path!r}: {e}") from None
  if not isinstance(fields, dict):
    raise ValueError(f"the model config {path!r} must be a JSON object of "
                     "GPTConfig fields")
  known = {f.name for f in dataclasses.fields(GPTConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"the model config {path!r} has unknown field(s) "
                     f"{unknown}; GPTConfig's fields are {sorted(known)}")
  if "dtype" in fields:
    fields["dtype"] = jnp.dtype(fields["dtype"]).type
  cfg = GPTConfig(**fields)
  if cfg.lora_adapters <= 0:
    raise ValueError(f"the model config {path!r} sets lora_adapters="
                     f"{cfg.lora_adapters}; serving needs a model with "
                     "adapters (lora_adapters > 0)")
  return cfg


def _abstract_params(cfg):
  from alpa_py.models import GPT
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  ids = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), tokens,
                                              ids))


def init_params(cfg, seed: int = 0):
  """Fresh parameters of the model ``cfg`` describes."""
  from alpa_py.models import GPT
  tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
  return GPT(cfg).init(jax.random.PRNGKey(seed), tokens,
                       jnp.zeros((1,), jnp.int32))


def save(path: str, cfg, params) -> str:
  """Writes ``path/config.json`` and ``path/params``; returns ``path``."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_json(cfg), f, indent=1)
  ocp.PyTreeCheckpointer().save(os.path.join(path, "params"),
                                jax.tree_util.tree_map(np.asarray, params),
                                force=True)
  return path


def load_params(path: str, cfg):
  """The parameters in the orbax checkpoint ``path`` (or ``path/params``),
  checked against the shapes of the model ``cfg`` describes.

  Raises:
    ValueError: no checkpoint there, or one of another model's shapes.
  """
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")):
    path = os.path.join(path, "params")
  if not os.path.isdir(path):
    raise ValueError(f"no orbax checkpoint at {path!r} (--adapters takes "
                     "the directory `multi_lora_finetune.py --save` writes)")
  want = _abstract_params(cfg)
  got = ocp.PyTreeCheckpointer().restore(path)
  want_flat = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): v for k, v in
              jax.tree_util.tree_flatten_with_path(got)[0]}
  if set(want_flat) != set(got_flat):
    missing = sorted(set(want_flat) - set(got_flat))[:3]
    extra = sorted(set(got_flat) - set(want_flat))[:3]
    raise ValueError(f"the checkpoint {path!r} does not hold this model's "
                     f"parameters (missing {missing}, unexpected {extra}): "
                     "is --model-config the config it was trained with?")
  for k, w in want_flat.items():
    if tuple(np.shape(got_flat[k])) != tuple(w.shape):
      raise ValueError(f"the checkpoint {path!r} has {k} of shape "
                       f"{np.shape(got_flat[k])}; the config makes "
                       f"{tuple(w.shape)}")
  leaves = [np.asarray(got_flat[jax.tree_util.keystr(k)], w.dtype)
            for k, w in jax.tree_util.tree_flatten_with_path(want)[0]]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(want),
                                      leaves)
