"""The bodies of control flow the intra-op pass plans through.

A ``Region`` is a ``scan``'s body, a ``Branch`` one branch of a ``cond``;
``graph.build_graph`` makes them (its module docstring says how) and every
pass that looks inside control flow reads them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Region:
  """The body of one ``scan``, as planned (see ``graph``'s docstring).

  Attributes:
    op: index of the scan op.
    length: the scan's trip count.
    ops: the body's ops, in program order.
    consts_in: body tensor of each loop-invariant operand.
    carry_in: body tensor of each carried value, as an iteration reads it.
    xs_in: body tensor of each stacked operand: one iteration's slice.
    carry_out: body ref (tensor id or ``Literal``) of each carried value, as
      an iteration returns it (also the scan's final carry).
    ys_out: body ref of each stacked result: one iteration's slice.
    consts: (tensor id, value) of the body's own constants.
  """

  op: int
  length: int
  ops: tuple
  consts_in: tuple[int, ...]
  carry_in: tuple[int, ...]
  xs_in: tuple[int, ...]
  carry_out: tuple
  ys_out: tuple
  consts: tuple = ()

  @property
  def invars(self) -> tuple[int, ...]:
    """Body tensors in the order of the scan op's operands."""
    return self.consts_in + self.carry_in + self.xs_in

  @property
  def outvars(self) -> tuple:
    """Body refs in the order of the scan op's outputs."""
    return self.carry_out + self.ys_out


@dataclasses.dataclass(frozen=True)
class Branch:
  """One branch of a ``cond``, as planned (see ``graph``'s docstring).

  Attributes:
    ops: the branch's ops, in program order (each result's ``copy`` last).
    invars: branch tensor of each cond operand after the branch index.
    outvars: branch tensor of each cond result (a ``copy`` op's output).
    consts: (tensor id, value) of the branch's own constants.
  """

  ops: tuple
  invars: tuple[int, ...]
  outvars: tuple[int, ...]
  consts: tuple = ()
