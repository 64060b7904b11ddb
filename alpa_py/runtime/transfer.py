"""Moving arrays between meshes on the local backend.

``reshard(x, sharding)`` follows the tile-overlap plan of
``compiler/resharding.py``: each destination shard is either one source tile
slice moved with ``jax.device_put``, or assembled from several. Arrays that
already have the target sharding are returned as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from alpa_py.compiler.resharding import (covers, local_slices, plan_resharding,
                                         shard_shape)


@functools.lru_cache(maxsize=4096)
def _cached_plan(shape, src, dst, itemsize):
  return plan_resharding(shape, src, dst, itemsize)


def reshard(x: jax.Array, sharding) -> jax.Array:
  """``x`` laid out as ``sharding`` (possibly on other devices)."""
  if not isinstance(x, jax.Array):
    return jax.device_put(x, sharding)
  if x.sharding.is_equivalent_to(sharding, x.ndim):
    return x
  if not x.shape:
    return jax.device_put(x, sharding)
  plan = _cached_plan(tuple(x.shape), x.sharding, sharding, x.dtype.itemsize)
  src_data = {s.device.id: s.data for s in x.addressable_shards}
  devices = {d.id: d for d in sharding.device_set}
  blocks = []
  for dev_id, dev in sorted(devices.items()):
    parts = plan.transfers_to(dev_id)
    if len(parts) == 1 and covers(parts[0].region, parts[0].dst_tile):
      t = parts[0]
      piece = src_data[t.src][local_slices(t.region, t.src_tile)]
      blocks.append(jax.device_put(piece, dev))
      continue
    tile = parts[0].dst_tile
    block = jax.device_put(jnp.zeros(shard_shape(tile), x.dtype), dev)
    for t in parts:
      piece = jax.device_put(src_data[t.src][local_slices(t.region, t.src_tile)],
                             dev)
      block = block.at[local_slices(t.region, tile)].set(piece)
    blocks.append(block)
  return jax.make_array_from_single_device_arrays(x.shape, sharding, blocks)
