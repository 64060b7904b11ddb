"""Kernels read from optimized HLO text: matmul FLOPs, the bytes that the
other kernels move, and how many kernels one step launches.

These describe a program as XLA compiled it (after SPMD partitioning and
fusion), per device: a fusion is one kernel whose bytes are its operands and
its result, whatever it computes inside. An operand that a kernel only
slices (``slice`` / ``dynamic-slice``, in a fusion's body also through
bitcasts, copies, reshapes, transposes and converts) counts the bytes of
its slices, not the whole array: a Megatron-style plan's head split reads
one device's heads out of the fused QKV projection this way. A kernel
whose body holds a ``dot`` or ``convolution`` is a matmul kernel: its
FLOPs count, its bytes do not.
Collectives are left to ``hlo_stats`` (they have features of their own) and
so are instructions that launch nothing (parameters, tuples, bitcasts).

Kernel-level computations are the entry computation and the bodies of
control flow (``while``, ``conditional``); a loop body counts once (its trip
count is not in the text).
"""

from __future__ import annotations

import dataclasses
import math
import re

from alpa_py.compiler.hlo_stats import KINDS

_COMP = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*"
                    r"(\(.*?\)|[a-z]+[0-9]*\[[0-9,]*\](?:\{[^}]*\})?)"
                    r"\s+([a-z\-]+)\((.*)$")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_CONTROL = re.compile(r"\b(?:body|condition|true_computation|"
                      r"false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CALLS = re.compile(r"\b(?:calls|to_apply)=%([\w.\-]+)")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1,
          "f8e5m2": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
          "c128": 16}
# instructions that launch no kernel of their own
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
         "partition-id", "replica-id", "after-all", "add-dependency",
         "opt-barrier", "while", "conditional", "call", "domain"}
_COLLECTIVE = set(KINDS) | {k + "-start" for k in KINDS}


@dataclasses.dataclass(frozen=True)
class KernelStats:
  """What the kernels of one device's program do per step.

  Attributes:
    matmul_flops: FLOPs of dot instructions (and GEMM library calls).
    nonmatmul_bytes: operand + result bytes of every other kernel.
    launches: kernels launched (collectives excluded).
    conv_flops: FLOPs of convolutions (and convolution library calls):
      kept apart because a device runs them at a rate of their own.
  """

  matmul_flops: float
  nonmatmul_bytes: float
  launches: int
  conv_flops: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Instr:
  name: str
  shape: str
  opcode: str
  rest: str


def _dims(shape: str) -> list[int]:
  m = _SHAPE.search(shape)
  if not m or not m.group(2):
    return []
  return [int(d) for d in m.group(2).split(",")]


def _nbytes(shape: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += n * _BYTES.get(dtype, 4)
  return total


def _operands(rest: str) -> list[str]:
  depth = 1
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", rest[:i])
  return re.findall(r"%([\w.\-]+)", rest)


def _parse(hlo_text: str):
  comps: dict[str, list[_Instr]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m:
        current = comps.setdefault(m.group(2), [])
        if m.group(1):
          entry = m.group(2)
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      current.append(_Instr(*m.groups()))
  return comps, entry


# ops that a fused kernel computes per output element from the same element
# of their operand: sliced later, they read only the slice
_PER_ELEMENT = {"bitcast", "copy", "reshape", "transpose", "convert"}


def _sliced_bytes(value: str, users) -> int | None:
  """Bytes read of ``value`` inside a fused computation when every use of
  it is a slice of it (through bitcasts, copies, reshapes, transposes and
  converts, which a fused kernel computes only where it is read); None
  where any use reads it whole."""
  if not users.get(value):
    return None
  total = 0
  for u in users[value]:
    if u.opcode in ("slice", "dynamic-slice") and \
        _operands(u.rest)[:1] == [value]:
      total += _nbytes(u.shape)
      continue
    inner = _sliced_bytes(u.name, users) if u.opcode in _PER_ELEMENT else None
    if inner is None:
      return None
    total += inner
  return total


def _operand_bytes(ins: _Instr, shapes: dict[str, str], comps) -> int:
  """Bytes a kernel reads: every operand whole, except a slice's operand
  and a fusion's operands that its body only slices (the bytes of the
  slices)."""
  ops = _operands(ins.rest)
  full = [_nbytes(shapes.get(o, "")) for o in ops]
  if ins.opcode in ("slice", "dynamic-slice") and full:
    return min(full[0], _nbytes(ins.shape)) + sum(full[1:])
  callee = _CALLS.search(ins.rest) if ins.opcode == "fusion" else None
  if callee is None or callee.group(1) not in comps:
    return sum(full)
  body = comps[callee.group(1)]
  params, users = {}, {}
  for i in body:
    if i.opcode == "parameter":
      m = re.match(r"\s*(\d+)", i.rest)
      if m:
        params[int(m.group(1))] = i.name
    for o in _operands(i.rest):
      users.setdefault(o, []).append(i)
  total = 0
  for k, nbytes in enumerate(full):
    read = _sliced_bytes(params[k], users) if k in params else None
    total += nbytes if read is None else min(nbytes, read)
  return total


def _int_list(rest: str, attr: str) -> list[int]:
  m = re.search(attr + r"=\{([0-9,]*)\}", rest)
  return [int(v) for v in m.group(1).split(",") if v] if m else []


def _dot_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  ops = _operands(ins.rest)
  lhs = _dims(shapes.get(ops[0], "")) if ops else []
  contract = _int_list(ins.rest, "lhs_contracting_dims")
  k = math.prod(lhs[d] for d in contract if d < len(lhs))
  return 2.0 * math.prod(_dims(ins.shape)) * k


def _conv_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  ops = _operands(ins.rest)
  kernel = _dims(shapes.get(ops[1], "")) if len(ops) > 1 else []
  labels = re.search(r"dim_labels=[^_]*_([0-9a-z]+)->", ins.rest)
  out_features = 1
  if labels and "o" in labels.group(1) and kernel:
    out_features = kernel[labels.group(1).index("o")]
  per_output = math.prod(kernel) / max(out_features, 1) if kernel else 1
  return 2.0 * math.prod(_dims(ins.shape)) * per_output


def _gemm_flops(ins: _Instr, shapes: dict[str, str]) -> float:
  # a library GEMM call: for [m, k] x [k, n] -> [m, n], k = sqrt(|A||B|/|C|)
  ops = _operands(ins.rest)
  if len(ops) < 2:
    return 0.0
  a = math.prod(_dims(shapes.get(ops[0], "")))
  b = math.prod(_dims(shapes.get(ops[1], "")))
  c = math.prod(_dims(ins.shape)) or 1
  return 2.0 * c * math.sqrt(a * b / c)


_CONV_CALL = re.compile(r"custom_call_target=\"[^\"]*conv", re.I)
_GEMM_CALL = re.compile(r"custom_call_target=\"[^\"]*(gemm|matmul)", re.I)


def _instr_flops(ins: _Instr, shapes: dict[str, str], comps,
                 seen) -> tuple[float, float]:
  """(dot FLOPs, convolution FLOPs) of a dot / convolution / library call,
  or of those in what ``ins`` calls (a fusion's body)."""
  if ins.opcode == "dot":
    return _dot_flops(ins, shapes), 0.0
  if ins.opcode == "convolution":
    return 0.0, _conv_flops(ins, shapes)
  if ins.opcode == "custom-call" and _CONV_CALL.search(ins.rest):
    return 0.0, _conv_flops(ins, shapes)
  if ins.opcode == "custom-call" and _GEMM_CALL.search(ins.rest):
    return _gemm_flops(ins, shapes), 0.0
  dot = conv = 0.0
  for callee in _CALLS.findall(ins.rest):
    if callee in comps and callee not in seen:
      body = comps[callee]
      inner = {i.name: i.shape for i in body}
      for i in body:
        d, c = _instr_flops(i, inner, comps, seen | {callee})
        dot += d
        conv += c
  return dot, conv


def _kernel_level(comps, entry: str) -> list[str]:
  out, todo = [], [entry]
  while todo:
    c = todo.pop()
    if c in out or c not in comps:
      continue
    out.append(c)
    for ins in comps[c]:
      todo.extend(_CONTROL.findall(ins.rest))
      for group in _BRANCHES.findall(ins.rest):
        todo.extend(re.findall(r"%([\w.\-]+)", group))
  return out


def kernel_stats(hlo_text: str) -> KernelStats:
  """Matmul and convolution FLOPs, non-matmul bytes and kernel launches of
  one device's program, from its optimized HLO text (``compiled.as_text()``)."""
  comps, entry = _parse(hlo_text)
  if entry is None:
    return KernelStats(0.0, 0.0, 0)
  flops, conv, nbytes, launches = 0.0, 0.0, 0.0, 0
  for comp in _kernel_level(comps, entry):
    shapes = {i.name: i.shape for i in comps[comp]}
    for ins in comps[comp]:
      op = ins.opcode
      if op in _FREE or op.endswith("-done") or op in _COLLECTIVE or \
          op == "collective-permute-start" or op == "collective-permute":
        continue
      launches += 1
      f, c = _instr_flops(ins, shapes, comps, frozenset())
      if f > 0 or c > 0:
        flops += f
        conv += c
        continue
      nbytes += _nbytes(ins.shape) + _operand_bytes(ins, shapes, comps)
  return KernelStats(flops, nbytes, launches, conv)
