"""Fine-tune 8 LoRA adapters of one base GPT in one batch.

Every batch mixes sequences of 8 tasks (sequence i belongs to adapter i % 8);
each token goes through its own adapter via the batched multi-LoRA operator.
The base weights are frozen (optax.set_to_zero), only the adapters learn,
and the step runs under ``@alpa_py.parallelize`` on 8 simulated devices.

  python examples/multi_lora_finetune.py [--steps 30] [--save DIR]

``--save DIR`` writes the trained model (DIR/config.json and an orbax
checkpoint DIR/params) for ``alpa-py serve --model-config DIR/config.json
--adapters DIR``.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

import alpa_py  # noqa: E402
from alpa_py.models import GPT, GPTConfig  # noqa: E402
from alpa_py.models.lora import is_lora_param  # noqa: E402

NUM_ADAPTERS = 8


def task_batch(key, batch, seq, vocab):
  """Adapter a's sequences count up in steps of a + 1 (mod vocab)."""
  ids = jnp.arange(batch) % NUM_ADAPTERS
  start = jax.random.randint(key, (batch, 1), 0, vocab)
  tokens = (start + jnp.arange(seq)[None, :] * (ids[:, None] + 1)) % vocab
  return {"tokens": tokens.astype(jnp.int32), "adapter": ids.astype(jnp.int32)}


def per_adapter_loss(logits, tokens, adapter):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].mean(1)
  onehot = jax.nn.one_hot(adapter, NUM_ADAPTERS)
  return (onehot * nll[:, None]).sum(0) / jnp.maximum(onehot.sum(0), 1)


def config(seq=16, vocab=64, hidden=64, layers=2) -> GPTConfig:
  return GPTConfig(vocab_size=vocab, seq_len=seq, hidden=hidden, num_heads=4,
                   num_layers=layers, lora_adapters=NUM_ADAPTERS, lora_rank=8)


def build(batch=16, seq=16, vocab=64, hidden=64, layers=2, lr=3e-2):
  cfg = config(seq, vocab, hidden, layers)
  model = GPT(cfg)
  data = task_batch(jax.random.PRNGKey(0), batch, seq, vocab)
  params = model.init(jax.random.PRNGKey(1), data["tokens"], data["adapter"])
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "lora" if is_lora_param(path) else "frozen", params)
  tx = optax.multi_transform({"lora": optax.adam(lr),
                              "frozen": optax.set_to_zero()}, labels)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)

  @alpa_py.parallelize
  def train_step(state, batch):
    def loss_fn(p):
      logits = state.apply_fn(p, batch["tokens"], batch["adapter"])
      losses = per_adapter_loss(logits, batch["tokens"], batch["adapter"])
      return losses.mean(), losses
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), losses

  return state, train_step, (batch, seq, vocab)


def run(steps=30, verbose=True):
  """Trains; returns (first losses, last losses, base identical?)."""
  first, last, same, _ = train(steps, verbose)
  return first, last, same


def train(steps=30, verbose=True):
  """Trains; returns (first losses, last losses, base identical?, the
  trained state)."""
  state, train_step, (batch, seq, vocab) = build()
  base_before = jax.tree_util.tree_map_with_path(
      lambda path, x: None if is_lora_param(path) else np.asarray(x),
      state.params)
  first = last = None
  for i in range(steps):
    data = task_batch(jax.random.PRNGKey(100 + i), batch, seq, vocab)
    state, losses = train_step(state, data)
    losses = np.asarray(losses)
    first = losses if first is None else first
    last = losses
    if verbose and (i % 10 == 0 or i == steps - 1):
      print(f"step {i:3d}  per-adapter loss: "
            + " ".join(f"{v:.3f}" for v in losses))
  base_after = jax.tree_util.tree_map_with_path(
      lambda path, x: None if is_lora_param(path) else np.asarray(x),
      state.params)
  same = all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(base_before), jax.tree_util.tree_leaves(base_after)))
  return first, last, same, state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--save", default=None,
                  help="write the trained model here (for alpa-py serve)")
  args = ap.parse_args()
  first, last, same, state = train(args.steps)
  if args.save:
    from alpa_py.serve import checkpoint
    print("saved to", checkpoint.save(args.save, config(), state.params))
  print("every adapter's loss fell:", bool(np.all(last < first)))
  print("base weights bit-identical after training:", same)
  return 0 if np.all(last < first) and same else 1


if __name__ == "__main__":
  sys.exit(main())
