"""Compile jaxnorm's Pallas Mosaic (TPU) kernels for TPU generations without a TPU, and report.

    JAX_PLATFORMS=cpu python benchmarks/mosaic_compile.py [--generations v5e,v6e]
        [--features 128,...,16384] [--dtypes float32,bfloat16] [--rows 4099] [--rms] [--out DIR]

Needs jax with libtpu (`pip install "jax[tpu]"`), but no TPU: each program is compiled for one
device of a deviceless topology (`jax.experimental.topologies.get_topology_desc`), which runs
the real Mosaic compiler and enforces the generation's scoped VMEM limit.

For each generation, feature size, dtype and pass (forward; backward) of layer normalization
with scale and bias (`--rms`: RMS normalization with scale) on `--rows` rows (4099 by default:
the last row block ragged), it compiles `_mosaic.forward_call` or `_mosaic.backward_call` and
prints:

* the block rows that `_mosaic.blocking` chose, and the grid;
* whether it compiled, and the number of Mosaic custom calls in the compiled program;
* the scoped VMEM the compiled kernel uses, next to `_mosaic._vmem_bytes`'s estimate and the
  generation's default limit;
* every other instruction of the compiled program whose result has at least as many elements
  as `x` (there should be none: the kernel is the only pass over arrays of `x`'s size; with
  `--rows 1` the parameter vectors are that large too, and for a few rows XLA may copy the tiny
  `x` into VMEM before the kernel), and,
  separately, the other instructions (on the statistics and the parameter vectors)
  (with the bytes of their results over the bytes of `x`);
* the passes by construction: the bytes of the custom call's operands and results (the kernel
  reads each operand and writes each result once; logical sizes, without layout padding) over
  the bytes of `x`.

Writes `mosaic_compile.json` and `mosaic_compile.md` to `--out` if given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxnorm._pallas import _mosaic

FEATURES = (128, 256, 384, 512, 1000, 1024, 2048, 4096, 8192, 16384)
HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
TRIVIAL = {"parameter", "get-tuple-element", "tuple", "bitcast", "custom-call", "constant"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\(.*?\)|\w+\[[\d,]*\])\S*\s+([\w-]+)\((.*?)\)")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _size(type_text: str) -> tuple[int, int]:
  """(elements of the largest array, bytes of all arrays) of an HLO type `f32[2,3]` or tuple."""
  most, total = 0, 0
  for dtype, dims in _ARRAY.findall(type_text):
    n = math.prod(int(d) for d in dims.split(",") if d)
    most = max(most, n)
    total += n * HLO_BYTES[dtype]
  return most, total


def _entry(text: str) -> list[tuple[str, str, str, list[str]]]:
  """(name, type, opcode, operand names) of each instruction of the ENTRY computation."""
  body = text[text.index("\nENTRY "):]
  out = []
  for line in body.splitlines()[1:]:
    if line.startswith("}"):
      break
    m = _INSTR.match(line)
    if m:
      name, type_text, opcode, operands = m.groups()
      out.append((name, type_text, opcode, re.findall(r"%([\w.-]+)", operands)))
  return out


def _used_vmem(text: str) -> int | None:
  for line in text.splitlines():
    if 'custom_call_target="tpu_custom_call"' in line:
      config = re.search(r'"used_scoped_memory_configs":\[(.*?)\]', line)
      if config:
        return sum(int(s) for s in re.findall(r'"size":"(\d+)"', config.group(1)))
  return None


def analyse(text: str, x_elems: int, x_bytes: int) -> dict:
  """Custom calls, instructions of x's size, other instructions, the kernels' bytes / x's."""
  instrs = _entry(text)
  types = {name: type_text for name, type_text, _, _ in instrs}
  calls = [i for i in instrs if i[2] == "custom-call"]
  big, small, small_bytes = [], [], 0
  for _, type_text, opcode, _ in instrs:
    if opcode in TRIVIAL:
      continue
    if _size(type_text)[0] >= x_elems:
      big.append(f"{opcode} {type_text}")
    else:
      small.append(f"{opcode} {type_text}")
      small_bytes += _size(type_text)[1]
  moved = sum(_size(types[o])[1] for c in calls for o in c[3] if o in types)
  moved += sum(_size(c[1])[1] for c in calls)
  return {"custom_calls": len(calls), "big_ops": big, "small_ops": small,
          "small_ops_out": small_bytes / x_bytes, "passes": moved / x_bytes,
          "vmem_used": _used_vmem(text)}


def compile_one(topo, generation: str, rows: int, features: int, dtype, which: str,
                centered: bool) -> dict:
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  try:
    blk = _mosaic.blocking(rows, features, dtype, generation)[which]
  except ValueError as e:  # a generation or a row the kernels do not take
    return {"generation": generation, "features": features, "dtype": jnp.dtype(dtype).name,
            "pass": which, "rows": rows, "block_rows": "-", "grid": "-", "compiled": False,
            "error": str(e)}
  x = spec((rows, features), dtype)
  vec = spec((features,), dtype)
  stat = spec((rows,), jnp.float32)
  nstats = 2 if centered else 1
  if which == "fwd":
    def f(x, *params):
      return _mosaic.forward_call(x, params, eps=1e-6, centered=centered, has_scale=True,
                                  has_bias=centered, interpret=False, generation=generation)
    args = (x, vec, vec) if centered else (x, vec)
  else:
    def f(x, dy, *rest):
      return _mosaic.backward_call(x, dy, rest[:nstats], rest[nstats], has_bias=centered,
                                   bias_dtype=dtype, centered=centered, interpret=False,
                                   generation=generation)
    args = (x, x) + (stat,) * nstats + (vec,)
  record = {"generation": generation, "features": features, "dtype": jnp.dtype(dtype).name,
            "pass": which, "rows": rows, "block_rows": blk, "grid": -(-rows // blk),
            "vmem_estimate": _mosaic._vmem_bytes(blk, features, dtype, which == "bwd"),
            "vmem_limit": _mosaic.SCOPED_VMEM[generation]}
  start = time.perf_counter()
  try:
    text = jax.jit(f).lower(*args).compile().as_text()
  except Exception as e:  # report and go on: the table says which configurations fail
    record.update(compiled=False, error=str(e).splitlines()[0][:300])
    return record
  record["compile_s"] = round(time.perf_counter() - start, 2)
  itemsize = jnp.dtype(dtype).itemsize
  record.update(compiled=True, **analyse(text, rows * features, rows * features * itemsize))
  return record


def _mib(n: int | None) -> str:
  return "?" if n is None else f"{n / 2**20:.2f}"


def markdown(records: list[dict]) -> str:
  lines = ["| gen | F | dtype | pass | block rows | grid | compiled | custom calls | "
           "VMEM used / estimate / limit (MiB) | ops at x's size | "
           "other ops (their output / x's) | kernel bytes / x's |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    if not r["compiled"]:
      lines.append(f"| {r['generation']} | {r['features']} | {r['dtype']} | {r['pass']} | "
                   f"{r['block_rows']} | {r['grid']} | no: {r['error']} | | | | | |")
      continue
    lines.append(
        f"| {r['generation']} | {r['features']} | {r['dtype']} | {r['pass']} | "
        f"{r['block_rows']} | {r['grid']} | yes | {r['custom_calls']} | "
        f"{_mib(r['vmem_used'])} / {_mib(r['vmem_estimate'])} / {_mib(r['vmem_limit'])} | "
        f"{', '.join(r['big_ops']) or 'none'} | {len(r['small_ops'])} ({r['small_ops_out']:.4f}) | "
        f"{r['passes']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--generations", default="v5e,v6e")
  parser.add_argument("--features", default=",".join(map(str, FEATURES)))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--rows", type=int, default=4099)
  parser.add_argument("--rms", action="store_true", help="RMS normalization with scale")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  from jax.experimental import topologies

  records = []
  for generation in args.generations.split(","):
    topo = topologies.get_topology_desc(topology_name=f"{generation}:2x2", platform="tpu")
    for features in map(int, args.features.split(",")):
      for dtype in map(jnp.dtype, args.dtypes.split(",")):
        for which in ("fwd", "bwd"):
          r = compile_one(topo, generation, args.rows, features, dtype, which, not args.rms)
          records.append(r)
          print(markdown([r]).splitlines()[-1], flush=True)
  table = markdown(records)
  print("\n" + table)
  smalls = sorted({op.split()[0] for r in records if r["compiled"] for op in r["small_ops"]})
  print(f"\nother ops (on the statistics and parameter vectors): {', '.join(smalls)}")
  ok = all(r["compiled"] and r["custom_calls"] == 1 and not r["big_ops"]
           and (r["vmem_used"] or 0) <= r["vmem_estimate"] for r in records)
  print("every configuration compiled to one kernel, no other op at x's size, and VMEM within "
        "the estimate:", ok)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mosaic_compile.json"), "w") as f:
      json.dump({"jax": jax.__version__, "records": records}, f, indent=1)
    with open(os.path.join(args.out, "mosaic_compile.md"), "w") as f:
      f.write(table + "\n")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
