"""Cross-mesh resharding: which tile of which source device fills which part
of each destination device's shard.

``plan_resharding`` intersects every destination shard with the source tiles
(one replica per tile: the destination device itself when it holds one, else
the first) and returns the transfers; ``bytes_moved`` counts what crosses
devices. The local backend (``runtime/transfer.py``) carries a plan out with
``jax.device_put`` of each tile.
"""

from __future__ import annotations

import dataclasses
import math



def _norm(index, shape) -> tuple[tuple[int, int], ...]:
  out = []
  for sl, n in zip(index, shape):
    start, stop, step = sl.indices(n)
    assert step == 1
    out.append((start, stop))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class TileTransfer:
  """Copy ``region`` (global coordinates) from ``src`` to ``dst``."""

  dst: int  # device id
  src: int  # device id
  region: tuple[tuple[int, int], ...]
  dst_tile: tuple[tuple[int, int], ...]  # the destination shard's extent
  src_tile: tuple[tuple[int, int], ...]  # the source shard's extent


@dataclasses.dataclass(frozen=True)
class ReshardingPlan:
  shape: tuple[int, ...]
  transfers: tuple[TileTransfer, ...]
  bytes_moved: int  # between different devices

  def transfers_to(self, device_id: int) -> list[TileTransfer]:
    return [t for t in self.transfers if t.dst == device_id]


def plan_resharding(shape, src_sharding, dst_sharding, itemsize: int) -> ReshardingPlan:
  """The tile-overlap plan from one sharding to another (any devices)."""
  shape = tuple(shape)
  src_map = {d.id: _norm(idx, shape)
             for d, idx in src_sharding.devices_indices_map(shape).items()}
  dst_map = {d.id: _norm(idx, shape)
             for d, idx in dst_sharding.devices_indices_map(shape).items()}
  tiles: dict = {}
  for dev, tile in sorted(src_map.items()):
    tiles.setdefault(tile, []).append(dev)
  transfers = []
  moved = 0
  for dst, dst_tile in sorted(dst_map.items()):
    for src_tile, holders in tiles.items():
      region = tuple((max(a0, b0), min(a1, b1))
                     for (a0, a1), (b0, b1) in zip(dst_tile, src_tile))
      if any(lo >= hi for lo, hi in region) and shape:
        continue
      src = dst if dst in holders else holders[0]
      transfers.append(TileTransfer(dst, src, region, dst_tile, src_tile))
      if src != dst:
        moved += math.prod(hi - lo for lo, hi in region) * itemsize
  return ReshardingPlan(shape, tuple(transfers), moved)


def local_slices(region, tile) -> tuple[slice, ...]:
  """``region`` in the coordinates of a shard whose extent is ``tile``."""
  return tuple(slice(lo - t0, hi - t0) for (lo, hi), (t0, _) in zip(region, tile))


def covers(region, tile) -> bool:
  return tuple(region) == tuple(tile)


def shard_shape(tile) -> tuple[int, ...]:
  return tuple(hi - lo for lo, hi in tile)


