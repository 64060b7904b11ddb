"""The paged KV cache's bookkeeping: fixed-size pages, a free list, and one
page table per running sequence (the pages themselves are device arrays
owned by the engine; this is the host-side allocator)."""

from __future__ import annotations

import math


class PagePool:
  """``num_pages`` pages of ``page_size`` token slots each.

  Page ids run 0 .. num_pages - 1; the device arrays hold one more page
  (id ``num_pages``, ``scratch``) that padded batch rows write to and no
  sequence owns.
  """

  def __init__(self, num_pages: int, page_size: int):
    if not isinstance(page_size, int) or page_size <= 0:
      raise ValueError(f"page_size (={page_size!r}) must be an int > 0")
    if not isinstance(num_pages, int) or num_pages <= 0:
      raise ValueError(f"num_pages (={num_pages!r}) must be an int > 0")
    self.num_pages = num_pages
    self.page_size = page_size
    self.scratch = num_pages
    self._free = list(range(num_pages - 1, -1, -1))  # pop() takes page 0 first
    self.tables: dict[int, list[int]] = {}  # sequence id -> its pages

  def pages_for(self, tokens: int) -> int:
    return math.ceil(tokens / self.page_size)

  @property
  def free(self) -> int:
    return len(self._free)

  @property
  def used(self) -> int:
    return self.num_pages - len(self._free)

  def can_hold(self, seq: int, tokens: int) -> bool:
    """Whether ``seq`` can grow (or start) to ``tokens`` tokens now."""
    have = len(self.tables.get(seq, ()))
    return self.pages_for(tokens) - have <= len(self._free)

  def reserve(self, seq: int, tokens: int) -> list[int]:
    """Grows ``seq``'s page table to hold ``tokens`` tokens; returns it.

    Raises:
      MemoryError: not enough free pages (check ``can_hold`` first).
    """
    table = self.tables.setdefault(seq, [])
    need = self.pages_for(tokens) - len(table)
    if need > len(self._free):
      raise MemoryError(f"sequence {seq} needs {need} more KV pages; "
                        f"{len(self._free)} are free")
    for _ in range(max(need, 0)):
      table.append(self._free.pop())
    return table

  def release(self, seq: int) -> int:
    """Returns ``seq``'s pages to the free list; the number freed."""
    table = self.tables.pop(seq, [])
    self._free.extend(reversed(table))
    return len(table)

  def slot(self, seq: int, position: int) -> tuple[int, int]:
    """(page, offset) of ``seq``'s token at ``position``."""
    return self.tables[seq][position // self.page_size], \
        position % self.page_size
