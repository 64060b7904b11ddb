"""Train a GPT with ShardParallel on a Ray cluster.

On one machine (two simulated hosts of 4 CPU devices, a local Ray cluster
started and stopped by alpa_py):

  python examples/ray_cluster.py

On a real cluster, start Ray on every node first (see README, "Multi-node
clusters"), then on the head node:

  python examples/ray_cluster.py --address auto --num-nodes 2 --devices-per-node 8
"""

import argparse
import os
import sys
import tempfile

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--address", default=None)
  ap.add_argument("--num-nodes", type=int, default=2)
  ap.add_argument("--devices-per-node", type=int, default=4)
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()
  total = args.num_nodes * args.devices_per_node
  # the driver plans and exports for the whole mesh: give it as many devices
  os.environ.setdefault("XLA_FLAGS",
                        f"--xla_force_host_platform_device_count={total}")
  import jax
  import optax
  import orbax.checkpoint as ocp
  from flax.training import train_state

  import alpa_py
  from alpa_py.models import GPT, GPTConfig
  from alpa_py.models.gpt import lm_loss

  cluster = alpa_py.init(cluster="ray", address=args.address,
                         num_nodes=args.num_nodes,
                         num_devices_per_node=args.devices_per_node)
  print(f"{cluster.num_hosts} hosts, {cluster.num_devices} devices "
        f"({cluster.platform})")
  cfg = GPTConfig(vocab_size=512, seq_len=32, hidden=128, num_heads=4,
                  num_layers=2)
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (16, 32), 0, 512)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(1), tokens),
      tx=optax.adamw(1e-3))

  @alpa_py.parallelize(method=alpa_py.ShardParallel(
      mesh_shape=(args.num_nodes, args.devices_per_node)))
  def train_step(state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: lm_loss(state.apply_fn(p, tokens), tokens))(state.params)
    return state.apply_gradients(grads=grads), loss

  try:
    for i in range(args.steps):
      state, loss = train_step(state, tokens)
      print(f"step {i}: loss {float(loss):.4f}")  # fetches only the loss
    ckpt = os.path.join(tempfile.mkdtemp(), "state")
    ocp.PyTreeCheckpointer().save(ckpt, jax.tree_util.tree_map(np.asarray, state))
    print(f"checkpoint written to {ckpt}")
  finally:
    alpa_py.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
