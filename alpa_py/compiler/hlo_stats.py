"""Collectives read from optimized HLO text: their bytes, their count per
kind, and the graph op each one was inserted for.

Counting follows what runs: XLA's combiners have already merged independent
collectives (one merged all-reduce counts once). On CPU, XLA emits a
reduce-scatter as an all-reduce whose result is only dynamic-sliced (by the
partition id); such an all-reduce counts as a reduce-scatter. A merged
all-reduce that holds both kinds counts once for each kind it holds.

``graph_eval.evaluate`` runs each op under the name scope ``op<index>``, so an
instruction's ``metadata={op_name=".../op12/..."}`` names the graph op it
came from.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
         "collective-permute")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_LINE = re.compile(r"=\s*(\(.*?\)|[a-z]+[0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                   r"([a-z\-]+)\(")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*"
                    r"(\(.*?\)|[a-z]+[0-9]*\[[0-9,]*\](?:\{[^}]*\})?|[a-z]+[0-9]*\[\])"
                    r"\s+([a-z\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
# the innermost op scope: a scan body's or cond branch's op, not the scan
# or cond around it
_OP_SCOPE = re.compile(r"op_name=\"[^\"]*/op(\d+)/")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
          "c64": 8, "c128": 16}


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _BYTES.get(dtype, np.dtype(dtype).itemsize if dtype in
                            np.sctypeDict else 4)
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Per collective kind, the bytes of its results on one device per step.

  Async pairs count once (the ``-start``); ``-done`` ops are skipped.
  """
  out = {k: 0 for k in KINDS}
  for line in hlo_text.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    op = m.group(2)
    base = op[:-6] if op.endswith("-start") else op
    if base in out and not op.endswith("-done"):
      out[base] += _shape_bytes(m.group(1))
  return out


@dataclasses.dataclass(frozen=True)
class _Instr:
  name: str
  opcode: str
  operands: tuple[str, ...]
  calls: str | None
  index: int | None  # get-tuple-element's index, parameter's number
  graph_op: int | None  # from the op<index> name scope
  shape: str = ""  # the result's shape text (a tuple for merged ops)
  replica_groups: str = ""  # a collective's replica_groups text


# replica_groups as explicit lists, an iota ([2,4]<=[8], [4,2]<=[2,4]T(1,0))
# or mesh axes (mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'a'})
_GROUPS = re.compile(r"replica_groups=(\{\{[^=]*?\}\}|\{\}|"
                     r"\[[0-9,]*\]<=\[[0-9,]*\](?:T\([0-9,]*\))?|"
                     r"mesh\[[^\]]*\](?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?"
                     r"\s*\{[^}]*\})")


def _operands(rest: str) -> tuple[str, ...]:
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    if ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
      if depth == 0:
        end = i
        break
  return tuple(re.findall(r"%([\w.\-]+)", rest[:end]))


def _parse(hlo_text: str) -> dict[str, list[_Instr]]:
  comps: dict[str, list[_Instr]] = {}
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m:
        current = comps.setdefault(m.group(1), [])
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    calls = re.search(r"calls=%([\w.\-]+)", rest)
    if opcode == "get-tuple-element":
      index = re.search(r"\bindex=(\d+)", rest)
    elif opcode == "parameter":
      index = re.match(r"(\d+)", rest)
    else:
      index = None
    scope = _OP_SCOPE.search(rest)
    groups = _GROUPS.search(rest)
    current.append(_Instr(name, opcode, _operands(rest),
                          calls.group(1) if calls else None,
                          int(index.group(1)) if index else None,
                          int(scope.group(1)) if scope else None, shape,
                          groups.group(1) if groups else ""))
  return comps


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the compiled step."""

  kinds: tuple[str, ...]  # usually one; a merged all-reduce may hold two
  graph_op: int | None  # the graph op it was inserted for, where known
  # per kind held, the bytes it works on: a reduce-scatter's operand, the
  # result of the others (of the merged elements of that kind)
  kind_bytes: tuple[tuple[str, int], ...] = ()
  replica_groups: str = ""  # the replica_groups text, as in the HLO


def _only_sliced(users, value: str, comps) -> bool:
  """Whether every user of ``value`` only dynamic-slices it."""
  if not users:
    return False
  for u in users:
    if u.opcode == "dynamic-slice" and u.operands[:1] == (value,):
      continue
    if u.opcode == "fusion" and u.calls in comps:
      body = comps[u.calls]
      params = {i.index: i.name for i in body if i.opcode == "parameter"}
      inner = [params[k] for k, o in enumerate(u.operands)
               if o == value and k in params]
      inner_users = [i for i in body if any(p in i.operands for p in inner)]
      if inner_users and all(i.opcode == "dynamic-slice" for i in inner_users):
        continue
    return False
  return True


def _element_bytes(shapes, index) -> int:
  if index is None or index >= len(shapes):
    return 0
  dtype, dims = shapes[index]
  return _shape_bytes(f"{dtype}[{dims}]")


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of the module (fusion bodies have none), in order."""
  comps = _parse(hlo_text)
  out = []
  for instrs in comps.values():
    users = collections.defaultdict(list)
    shapes = {ins.name: ins.shape for ins in instrs}
    for ins in instrs:
      for o in ins.operands:
        users[o].append(ins)
    for ins in instrs:
      op = ins.opcode
      if op.endswith("-done"):
        continue
      base = op[:-6] if op.endswith("-start") else op
      if base not in KINDS:
        continue
      if base != "all-reduce":
        # a reduce-scatter works on its operand, the others on their result
        shape = ins.shape if base != "reduce-scatter" else " ".join(
            shapes.get(o, "") for o in ins.operands)
        out.append(Collective((base,), ins.graph_op,
                              ((base, _shape_bytes(shape)),),
                              ins.replica_groups))
        continue
      parts = users[ins.name]
      shapes = _SHAPE.findall(ins.shape)
      if parts and all(u.opcode == "get-tuple-element" for u in parts):
        elements = [(u.name, users[u.name], _element_bytes(shapes, u.index))
                    for u in parts]
      else:
        elements = [(ins.name, parts, _shape_bytes(ins.shape))]
      by_kind: dict[str, int] = {}
      for v, us, nbytes in elements:
        kind = "reduce-scatter" if _only_sliced(us, v, comps) else "all-reduce"
        by_kind[kind] = by_kind.get(kind, 0) + nbytes
      out.append(Collective(tuple(sorted(by_kind)), ins.graph_op,
                            tuple(sorted(by_kind.items())),
                            ins.replica_groups))
  return out


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Per kind, how many collectives of that kind run per step."""
  counts = {k: 0 for k in KINDS}
  for c in collectives(hlo_text):
    for k in c.kinds:
      counts[k] += 1
  return counts
