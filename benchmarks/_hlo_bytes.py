"""HBM bytes, kernels and collectives of a compiled XLA program, read from its optimized HLO.

XLA's own cost analysis (`compiled.cost_analysis()`) counts every operand and result of every
instruction, wherever it lives: on a TPU, where XLA keeps arrays in on-chip VMEM when they fit
(layouts marked `S(1)`), it counts reads of VMEM as if they were HBM traffic, and on a GPU it
counts nothing for a custom call (a Pallas/Triton kernel). This module walks the entry
computation of the optimized program instead: every instruction that runs on the device (a
fusion, a custom call, a copy, a collective, an unfused op) reads its operands and writes its
results, and only arrays in memory space 0 (device memory, HBM) count. Async copies between
memory spaces count their HBM side only. It reads each operand of a kernel once, as XLA's cost
model does, except an operand that a fusion only slices, which counts as the slices it reads.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
          "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done",
         "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
         "send-done", "recv-done", "after-all", "partition-id", "replica-id", "opt-barrier",
         "add-dependency", "iota"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "ragged-all-to-all")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...], int]]:
  """`(dtype, dims, memory space)` of every array in an HLO type (a tuple has several)."""
  out = []
  for dt, dims, layout in _ARRAY.findall(type_text):
    if dt not in _BYTES:
      continue
    space = re.search(r"S\((\d+)\)", layout or "")
    shape = tuple(int(d) for d in dims.split(",") if d)
    out.append((dt, shape, int(space.group(1)) if space else 0))
  return out


def _size(arrays, hbm_only: bool = True) -> float:
  total = 0.0
  for dt, shape, space in arrays:
    if hbm_only and space != 0:
      continue
    n = 1
    for d in shape:
      n *= d
    total += n * _BYTES[dt]
  return total


def _matching(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO text near {text[start:start + 80]!r}")


@functools.lru_cache(maxsize=4)
def _index(hlo_text: str) -> tuple[list[str], dict[str | None, int]]:
  """The program's lines and the line where each computation starts (the ENTRY one under
  None), found once per program: `analyze` looks up a computation for every fusion."""
  lines = hlo_text.splitlines()
  starts: dict[str | None, int] = {}
  for i, line in enumerate(lines):
    if line.startswith("ENTRY"):
      starts.setdefault(None, i)
    m = re.match(r"%?([\w.\-]+) ", line)
    if m and line.rstrip().endswith("{"):
      starts.setdefault(m.group(1), i)
  return lines, starts


def parse_computation(hlo_text: str, name: str | None = None) -> list[dict[str, Any]]:
  """The instructions of one computation (the ENTRY one by default): name, opcode, result type
  text, operand names, the text between the parentheses (args) and after them (attributes)."""
  lines, starts = _index(hlo_text)
  start = starts[name]
  instrs = []
  for line in lines[start + 1:]:
    if line.strip() == "}":
      break
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
      continue
    rest = line[m.end():]
    end = _matching(rest, 0) if rest.startswith("(") else rest.index(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([a-z][\w\-]*)\(", rest)
    if not op:
      continue
    close = _matching(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():close - 1])
    instrs.append({"name": m.group(1), "opcode": op.group(1), "type": type_text,
                   "operands": operands, "args": rest[op.end():close - 1],
                   "attrs": rest[close:]})
  return instrs


def parse_entry(hlo_text: str) -> list[dict[str, Any]]:
  """The instructions of the ENTRY computation (see `parse_computation`)."""
  return parse_computation(hlo_text)


def _elements(type_text: str) -> list[str]:
  """The top-level elements of a tuple type (the type itself if it is not a tuple)."""
  if not type_text.startswith("("):
    return [type_text]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(type_text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if (ch == "," and depth == 1) or (depth == 0 and ch == ")"):
      out.append(type_text[start:i].strip())
      start = i + 1
  return out


def _sliced_operands(hlo_text: str, ins: dict[str, Any]) -> dict[int, list]:
  """For a fusion, the operands (by position) that its computation only slices, each with the
  arrays of the slices it takes: the bytes read of that operand."""
  m = re.search(r"calls=%?([\w.\-]+)", ins["attrs"])
  if ins["opcode"] != "fusion" or not m or m.group(1) not in _index(hlo_text)[1]:
    return {}
  body = parse_computation(hlo_text, m.group(1))
  params = {i["name"]: int(i["args"]) for i in body if i["opcode"] == "parameter"}
  users: dict[str, list] = {i["name"]: [] for i in body}
  for u in body:
    for operand in dict.fromkeys(u["operands"]):
      users.setdefault(operand, []).append(u)

  def slices(name: str) -> list | None:
    """The arrays sliced from `name`, through bitcasts and conversions; None if any use of it
    reads it whole."""
    found = []
    for u in users[name]:
      if u["opcode"] == "slice":
        found += [(dt, shape, 0) for dt, shape, _ in _arrays(u["type"])]
      elif u["opcode"] in ("bitcast", "convert", "reshape") and users[u["name"]]:
        inner = slices(u["name"])
        if inner is None:
          return None
        found += inner
      else:
        return None
    return found or None

  out: dict[int, list] = {}
  for name, index in params.items():
    found = slices(name)
    if found is not None:  # bytes of the slices, at the operand's element width
      width = _BYTES[_arrays(next(i["type"] for i in body if i["name"] == name))[0][0]]
      out[index] = [("u8", (int(_size([a]) * width / _BYTES[a[0]]),), 0) for a in found]
  return out


def _moved(ins: dict[str, Any], types: dict[str, list], hbm_only: bool,
           sliced: dict[int, list] | None = None) -> float:
  """Bytes one instruction reads and writes (only those in HBM with `hbm_only`); `sliced`:
  the operands read only in part (`_sliced_operands`)."""
  opc = ins["opcode"]
  if opc in ("copy-start", "slice-start"):
    # copy-start: (destination, source, context); slice-start: ((source), destination, context).
    # The source's memory space decides where the read comes from, the destination's where the
    # write goes; a slice reads only the destination's size.
    parts = _elements(ins["type"])
    dest = _arrays(parts[0] if opc == "copy-start" else parts[1])
    src = [a for name in ins["operands"] for a in types.get(name, [])]
    read = [(dt, shape, s[2]) for (dt, shape, _), s in zip(dest, src, strict=False)]
    return _size(read, hbm_only) + _size(dest, hbm_only)
  if opc == "slice":  # reads the part it writes, in its operand's memory space
    src = types.get(ins["operands"][0], [])
    out = _arrays(ins["type"])
    return _size([(dt, shape, src[0][2]) for dt, shape, _ in out], hbm_only) + _size(out, hbm_only)
  ops = []
  for k, name in enumerate(ins["operands"]):
    whole = types.get(name, [])
    if sliced and k in sliced and len(whole) == 1:  # the slices, in the operand's memory space
      ops += [(dt, shape, whole[0][2]) for dt, shape, _ in sliced[k]]
    else:
      ops += whole
  return _size(ops, hbm_only) + _size(_arrays(ins["type"]), hbm_only)


# Custom calls that only reinterpret on-chip buffers (no kernel of their own).
_VIEWS = ("ConcatBitcast",)


def _called(ins: dict[str, Any]) -> list[str]:
  """The computations a conditional or call runs (a conditional's first branch only)."""
  m = re.search(r"branch_computations=\{%?([\w.\-]+)", ins["attrs"])
  m = m or re.search(r"true_computation=%?([\w.\-]+)", ins["attrs"])
  m = m or re.search(r"to_apply=%?([\w.\-]+)", ins["attrs"])
  return [m.group(1)] if m else []


def analyze(hlo_text: str, computation: str | None = None) -> dict[str, Any]:
  """HBM bytes, kernels and collectives of an optimized program.

  Returns a dict with `bytes` (HBM, memory space 0), `bytes_any_space` (every memory space, for
  comparison with XLA's cost analysis), `kernels` (fusions, custom calls and unfused compute
  ops), `fusions`, `custom_calls`, `collectives` (a list of `(opcode, result type)`) and
  `other_ops` (the opcodes of the unfused instructions: copies, slices, unfused ops). A
  `conditional` or `call` left in the program (XLA keeps a conditional whose branch holds a
  collective, even with a constant branch index) counts as what its (first) branch runs, and
  is listed in `other_ops`.
  """
  instrs = parse_computation(hlo_text, computation)
  types = {i["name"]: _arrays(i["type"]) for i in instrs}
  out: dict[str, Any] = {"bytes": 0.0, "bytes_any_space": 0.0, "fusions": 0, "custom_calls": 0,
                         "kernels": 0, "collectives": [], "other_ops": []}
  for ins in instrs:
    opc = ins["opcode"]
    if opc in _FREE or opc.endswith("-done"):
      continue
    if opc == "custom-call" and any(f'"{v}"' in ins["attrs"] for v in _VIEWS):
      continue
    if opc in ("conditional", "call"):
      out["other_ops"].append(opc)
      for name in _called(ins):
        inner = analyze(hlo_text, name)
        for key in ("bytes", "bytes_any_space", "fusions", "custom_calls", "kernels",
                    "collectives", "other_ops"):
          out[key] += inner[key]
      continue
    sliced = _sliced_operands(hlo_text, ins)
    out["bytes"] += _moved(ins, types, True, sliced)
    out["bytes_any_space"] += _moved(ins, types, False, sliced)
    base = opc.removesuffix("-start")
    if opc == "fusion":
      out["fusions"] += 1
      out["kernels"] += 1
    elif opc == "custom-call":
      out["custom_calls"] += 1
      out["kernels"] += 1
    elif base in COLLECTIVES:
      out["collectives"].append((opc, ins["type"]))
    else:
      out["other_ops"].append(opc)
      if base not in ("copy", "slice", "dynamic-slice", "dynamic-update-slice", "send", "recv"):
        out["kernels"] += 1
  return out
