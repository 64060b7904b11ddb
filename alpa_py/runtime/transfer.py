"""Moving arrays between meshes on the local backend.

``reshard(x, sharding)`` follows the tile-overlap plan of
``compiler/resharding.py``: where each destination shard is one slice of one
source tile, that slice is moved with ``jax.device_put`` to its device; where
a shard gathers several tiles, ``jax.device_put`` of the whole array does the
gather. Arrays that already have the target sharding are returned as they are.
"""

from __future__ import annotations

import functools

import jax

from alpa_py.compiler.resharding import covers, local_slices, plan_resharding


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
  devices = {d.id: d for d in sharding.device_set}
  parts = {dev_id: plan.transfers_to(dev_id) for dev_id in devices}
  if any(len(p) != 1 or not covers(p[0].region, p[0].dst_tile)
         for p in parts.values()):
    # A destination shard assembled from several source tiles: JAX's own
    # cross-device copy does the gather in one call, far faster than
    # stitching tiles with scatter ops here.
    return jax.device_put(x, sharding)
  src_data = {s.device.id: s.data for s in x.addressable_shards}
  blocks = []
  for dev_id, dev in sorted(devices.items()):
    t = parts[dev_id][0]
    piece = src_data[t.src]
    if t.region != t.src_tile:
      piece = piece[local_slices(t.region, t.src_tile)]
    blocks.append(jax.device_put(piece, dev))
  return jax.make_array_from_single_device_arrays(x.shape, sharding, blocks)
