"""Serving variants of a LoRA GPT that the engine runs as they are: adapters
truncated to a lower rank, and one adapter merged into the base weights.

* :func:`truncate_rank`: every adapter's update ``(alpha / r) A B`` is
  replaced by its best rank-``r'`` approximation (truncated SVD, the
  Eckart-Young optimum in Frobenius norm), stored as a rank-``r'`` LoRA
  (with the layer's scale ``alpha / r'`` folded back in). The engine then
  serves a GPT whose ``lora_rank`` is ``r'``: fewer adapter bytes per
  decode step and per device-cache slot.
* :func:`merge_adapter`: the base weights plus one adapter's update, so
  that the adapter's requests run as the base model (``adapter=-1``) with
  no LoRA work at all: what a dedicated engine for the hottest adapter
  serves.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from alpa_py.serve.adapters import LORA_KINDS


def _lora_layers(params):
  """``(block, kind, layer dict)`` of every LoRA layer."""
  p = params["params"] if "params" in params else params
  for name in sorted(p):
    if name.startswith("block_"):
      for kind in LORA_KINDS:
        layer = p[name].get(kind) if hasattr(p[name], "get") else None
        if layer is not None and "lora_A" in layer:
          yield name, kind, layer


def _copy(params):
  return jax.tree_util.tree_map(lambda x: np.array(x), params)


def _check_cfg(cfg):
  if not getattr(cfg, "lora_adapters", 0):
    raise ValueError("a LoRA variant needs a GPT config with "
                     "lora_adapters > 0")


def _alpha(cfg) -> float:
  """The LoRA layers' alpha (the config's, else LoRADense's default)."""
  from alpa_py.models.lora import LoRADense
  return float(getattr(cfg, "lora_alpha",
                       LoRADense.__dataclass_fields__["alpha"].default))


def truncate_rank(params, cfg, rank: int):
  """``(params', cfg')``: every adapter at rank ``rank`` (< the config's
  ``lora_rank``), the truncated SVD of its update. ``rank`` equal to the
  config's rank returns an exact copy of the updates."""
  _check_cfg(cfg)
  r = cfg.lora_rank
  if not 1 <= rank <= r:
    raise ValueError(f"rank (={rank}) must lie in [1, lora_rank={r}]")
  out = _copy(params)
  alpha = _alpha(cfg)
  for _, _, layer in _lora_layers(out):
    A, B = np.asarray(layer["lora_A"]), np.asarray(layer["lora_B"])
    n, h_in, _ = A.shape
    h_out = B.shape[-1]
    A2 = np.zeros((n, h_in, rank), A.dtype)
    B2 = np.zeros((n, rank, h_out), B.dtype)
    for i in range(n):
      update = (alpha / r) * (A[i].astype(np.float64) @ B[i])
      u, s, vt = np.linalg.svd(update, full_matrices=False)
      # (alpha / rank) A2 B2 = u_k s_k vt_k, split evenly between A2, B2
      root = np.sqrt(s[:rank] * rank / alpha)
      A2[i] = u[:, :rank] * root[None, :]
      B2[i] = root[:, None] * vt[:rank]
    layer["lora_A"], layer["lora_B"] = A2, B2
  return out, dataclasses.replace(cfg, lora_rank=rank)


def merge_adapter(params, cfg, adapter: int):
  """``params'`` whose base weights include adapter ``adapter``'s update
  (its requests then run as ``adapter=-1``); the adapters stay as they
  are, so other requests are served unchanged."""
  _check_cfg(cfg)
  if not 0 <= adapter < cfg.lora_adapters:
    raise ValueError(f"adapter (={adapter}) must lie in [0, "
                     f"{cfg.lora_adapters})")
  out = _copy(params)
  scale = _alpha(cfg) / cfg.lora_rank
  for _, _, layer in _lora_layers(out):
    A, B = np.asarray(layer["lora_A"]), np.asarray(layer["lora_B"])
    kernel = layer["base"]["kernel"]
    layer["base"]["kernel"] = (kernel + scale * (A[adapter] @ B[adapter])
                               ).astype(kernel.dtype)
  return out
