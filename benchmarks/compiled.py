"""HBM traffic and kernels of jaxnorm and its peers on accelerators, counted by their compilers.

    python benchmarks/compiled.py [--platforms h100,v5e,v6e] [--cases ...] [--json OUT]
    python benchmarks/compiled.py --grid            # 11 shapes, small row counts included
    python benchmarks/compiled.py --collectives     # batch norm across devices
    python benchmarks/compiled.py --check           # CI: fail on traffic beyond the budget

No accelerator is needed: JAX compiles for a TPU (`jax[tpu]`, whose libtpu holds the TPU
compiler) and for an NVIDIA H100 (`jax-cuda12-plugin`, with XLA's H100 target configuration in
`benchmarks/h100_sxm.txtpb`) on a CPU-only machine, deviceless, through
`jax.experimental.topologies`. The optimized program is the one the device would run; this
script reads from it (see `_hlo_bytes`):

* kernels: fusions, custom calls (Pallas kernels) and unfused operations of the entry
  computation;
* bytes: what those kernels read and write in device memory (HBM), in passes over x (bytes / the
  bytes of x). On a TPU arrays that XLA keeps in on-chip VMEM do not count. The floor is 2
  passes forward (read x, write y) and 5 forward+backward (read x and dy, write dx, besides the
  forward's 2); statistics and parameters add a little;
* the ratio to flax.linen's bytes and to the floor, and whether the case is within the
  allowance: at most flax.linen's bytes, plus one read of x in a float32 forward pass of batch,
  group and (on a TPU) layer normalization, where the exact two-pass variance reads x once more
  when a row (a column, for batch norm) does not stay on chip; differences below 0.05 passes
  (statistics, parameters) are not counted.

These are the compilers' structure and byte counts, not timings: nothing is autotuned or run.

Which environment runs which platform (one per process is enough; each needs its own JAX
plugin, see docs/guides/performance.md):

    python3 -m venv /tmp/tpu && /tmp/tpu/bin/pip install -e ".[benchmarks]" "jax[tpu]==0.10.2"
    JAX_PLATFORMS=cpu /tmp/tpu/bin/python benchmarks/compiled.py --platforms v5e,v6e
    python3 -m venv /tmp/cuda && /tmp/cuda/bin/pip install -e ".[benchmarks]" \\
        "jax==0.10.2" "jax-cuda12-plugin==0.10.2"
    JAX_PLATFORMS=cpu /tmp/cuda/bin/python benchmarks/compiled.py --platforms h100

(the plugin without its `[with-cuda]` extra: compiling needs no CUDA libraries; the plugin's
version must be JAX's). Two processes that load libtpu at once need
`ALLOW_MULTIPLE_LIBTPU_LOAD=1`.

Cases: LayerNorm, RMSNorm, BatchNorm (training) and GroupNorm(32); forward, and forward+backward
(returning y and the gradients of x, scale and bias; BatchNorm also its new running
statistics); float32, and bfloat16 x with float32 parameters (as flax models hold them);
shapes 8192x4096, 8192x1024 and 64x32x32x128. Libraries: jaxnorm (`implementation=None`, and
`"pallas"` for layer and RMS norm), flax.linen (its default `dtype=None`, which returns float32
for bfloat16 x and float32 parameters: the reference of the allowance; and `dtype=x.dtype`, as
flax models that train in bfloat16 set it), haiku and equinox where installed. The cases are
`cases.py`'s (the registry that `run.py` and `tools/hlo_snapshot.py` share), holding the fresh
running statistics of `batch_norm_init`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _hlo_bytes  # noqa: E402
import cases  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import jaxnorm as jn  # noqa: E402

H100_CONFIG = os.path.join(HERE, "h100_sxm.txtpb")
PLATFORMS = {  # name: (platform, topology); TPU topologies are 2x2 slices, one chip is used
    "h100": ("cuda", "1x1x1"),
    "v5e": ("tpu", "v5e:2x2"),
    "v6e": ("tpu", "v6e:2x2"),
}
NORMS = ("layer_norm", "rms_norm", "batch_norm", "group_norm")  # batch_norm: in training
PASSES = cases.PASSES
DTYPES = cases.DTYPES
SHAPES = cases.COMPILED_SHAPES
GRID = cases.GRID  # `--grid`
LIBS = ("jaxnorm", "jaxnorm pallas", "flax.linen", "flax.linen dtype=x", "haiku", "equinox")
REF = "flax.linen"
FLOOR = {"fwd": 2, "fwd+bwd": 5}
BUDGET = os.path.join(HERE, "compiled_budget.json")
# The subset that `--check` (CI) compiles: jaxnorm's default path against flax.linen.
CHECK = {"norms": ("layer_norm", "rms_norm", "batch_norm"), "shapes": cases.CHECK_SHAPES,
         "dtypes": DTYPES, "passes": PASSES, "libs": ("jaxnorm", "flax.linen")}
# Statistics and parameters are 0.001-0.03 passes of x in these cases; a difference below this
# many passes is one of them (the Pallas forward kernel writing its float32 row statistics for
# the backward pass, batch norm's running statistics), not a pass over x.
TOLERANCE = 0.05


def topology(name: str, gpus: str | None = None):
  """The deviceless topology of a platform name in `PLATFORMS` (a GPU one with `gpus` GPUs,
  e.g. "1x1x4", instead of the one listed there)."""
  from jax.experimental import topologies

  platform, topo = PLATFORMS[name]
  if platform == "tpu":
    return topologies.get_topology_desc(topology_name=topo, platform="tpu")
  with open(H100_CONFIG) as f:
    config = f.read()
  return topologies.get_topology_desc(platform="cuda", target_config=config, topology=gpus or topo)


def available(name: str) -> str | None:
  """None if this interpreter can compile for `name`, else what to install."""
  platform = PLATFORMS[name][0]
  module = "libtpu" if platform == "tpu" else "jax_cuda12_plugin"
  if importlib.util.find_spec(module) is None:
    return ('jax[tpu] (pip install "jax[tpu]==<jax version>")' if platform == "tpu" else
            'the CUDA plugin (pip install "jax-cuda12-plugin==<jax version>")')
  return None


def allowance_extra(norm: str, kind: str, dtype: str, platform: str) -> int:
  """Passes of x allowed beyond flax's: one read of x for the exact variance (module doc)."""
  on_chip_rows = norm == "layer_norm" and PLATFORMS[platform][0] == "tpu"
  return int(kind == "fwd" and dtype == "float32" and (norm in ("batch_norm", "group_norm")
                                                       or on_chip_rows))


def build(lib: str, norm: str, shape: tuple[int, ...], dtype: Any):
  """`(fn, params)` of one case of `cases` (batch norm in training), holding the fresh state
  of `batch_norm_init`; None where `lib` lacks the case."""
  return cases.build(lib, "batch_norm_train" if norm == "batch_norm" else norm, shape, dtype,
                     cases.COUNTED)


def _spec(a: Any, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=sharding)


def compile_case(fn: Callable, params: Any, shape, dtype, kind: str, device) -> Any:
  """The compiled program of one case on `device` (deviceless); `dtype` a tuple of dtypes:
  x is a tuple of arrays of `shape`, one per dtype (the residual cases' `(x, r)`)."""
  sh = SingleDeviceSharding(device)
  dtypes = dtype if isinstance(dtype, tuple) else None
  x = (jax.ShapeDtypeStruct(shape, dtype, sharding=sh) if dtypes is None else
       tuple(jax.ShapeDtypeStruct(shape, d, sharding=sh) for d in dtypes))
  p = jax.tree.map(lambda a: _spec(a, sh), params)
  if kind == "fwd":
    return jax.jit(cases.with_pass(fn, kind)).lower(p, x).compile()
  y = jax.eval_shape(fn, p, x)[0]
  dy = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh), y)
  return jax.jit(cases.with_pass(fn, kind)).lower(p, x, dy).compile()


def _compilable(platforms, log):
  """The platforms this Python can compile for; each other one is logged as skipped."""
  for plat in platforms:
    missing = available(plat)
    if missing:
      log(f"{plat}: skipped, this Python lacks {missing}")
    else:
      yield plat


def measure(platforms, norms, shapes, dtypes, passes, libs, log=print) -> list[dict]:
  """One record per (platform, norm, shape, dtype, pass, library)."""
  records = []
  for plat in _compilable(platforms, log):
    device = topology(plat).devices[0]
    for shape in shapes:
      for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        xbytes = dtype.itemsize
        for d in shape:
          xbytes *= d
        for norm in norms:
          for kind in passes:
            group = []
            for lib in libs:
              rec = {"platform": plat, "norm": norm, "shape": list(shape), "dtype": dtype_name,
                     "pass": kind, "lib": lib}
              if lib == "flax.linen dtype=x" and dtype_name == "float32":
                continue  # flax.linen itself
              if not cases.have(lib):
                continue
              try:
                built = build(lib, norm, shape, dtype)
                if built is None:
                  continue
                compiled = compile_case(*built, shape, dtype, kind, device)
              except Exception as e:  # a peer that cannot run a case: reported, not fatal
                rec["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                group.append(rec)
                continue
              a = _hlo_bytes.analyze(compiled.as_text())
              rec.update(status="ok", kernels=a["kernels"], fusions=a["fusions"],
                         custom_calls=a["custom_calls"], bytes=a["bytes"],
                         passes=a["bytes"] / xbytes, x_bytes=xbytes,
                         collectives=len(a["collectives"]))
              group.append(rec)
            ref = next((r for r in group if r["lib"] == REF and r["status"] == "ok"), None)
            same = next((r for r in group if r["lib"] == "flax.linen dtype=x"
                         and r["status"] == "ok"), None)
            for r in group:
              if r["status"] != "ok":
                continue
              r["ratio_to_floor"] = r["passes"] / FLOOR[kind]
              if ref is not None:
                extra = allowance_extra(norm, kind, dtype_name, plat)
                r["ratio_to_flax"] = r["bytes"] / ref["bytes"]
                r["allowed_bytes"] = ref["bytes"] + extra * xbytes
                r["within_allowance"] = r["bytes"] <= r["allowed_bytes"] + TOLERANCE * xbytes
              if same is not None:
                r["ratio_to_flax_dtype_x"] = r["bytes"] / same["bytes"]
            records += group
            log(line(group))
  return records


def residual_floor(kind: str, dtypes: tuple[Any, Any]) -> float:
  """The residual add's floor in passes of x: forward, read x and r and write h and y (4 of
  one dtype; a float32 r and h count twice for bfloat16 x); forward+backward also reads dy and
  dh and writes dx and dr (equal in value for one dtype, but two outputs, two buffers)."""
  x, r = (jnp.dtype(d).itemsize for d in dtypes)
  h = max(x, r)
  fwd = x + r + h + x
  return (fwd if kind == "fwd" else fwd + x + h + x + r) / x


def measure_residual(platforms, norms, shapes, dtypes, passes, libs, log=print) -> list[dict]:
  """The fused residual add against flax.linen's unfused norm of `x + r` (`cases`'s residual
  cases): one record per (platform, norm, shape, dtypes, pass, library), passes of x counted
  in bytes of x; the goal is the floor forward and at most flax.linen's bytes forward and
  backward."""
  records = []
  for plat in _compilable(platforms, log):
    device = topology(plat).devices[0]
    for shape in shapes:
      for name in dtypes:
        pair = cases.residual_dtypes(name)
        xbytes = pair[0].itemsize * shape[0] * shape[1]
        for norm in norms:
          for kind in passes:
            group = []
            for lib in libs:
              if lib == "flax.linen dtype=x" and name == "float32":
                continue
              built = cases.build_residual(lib, norm, shape, pair[0], cases.COUNTED)
              a = _hlo_bytes.analyze(compile_case(*built, shape, pair, kind, device).as_text())
              group.append({"platform": plat, "norm": norm, "shape": list(shape),
                            "dtype": name, "pass": kind, "lib": lib, "status": "ok",
                            "kernels": a["kernels"], "bytes": a["bytes"],
                            "passes": a["bytes"] / xbytes, "x_bytes": xbytes})
            ref = next(r for r in group if r["lib"] == REF)
            floor = residual_floor(kind, pair)
            for r in group:
              r["ratio_to_floor"] = r["passes"] / floor
              r["ratio_to_flax"] = r["bytes"] / ref["bytes"]
              r["within_allowance"] = r["bytes"] <= ref["bytes"] + TOLERANCE * xbytes
            records += group
            log(line(group) + f" | floor {floor:.2f}p")
  return records


def line(group: list[dict]) -> str:
  """One printed row per case: every library's kernels and passes."""
  r0 = group[0] if group else {}
  head = (f"{r0.get('platform', '?'):5s} {r0.get('norm', '?'):11s} "
          f"{'x'.join(map(str, r0.get('shape', []))):13s} {r0.get('dtype', '?'):8s} "
          f"{r0.get('pass', '?'):7s}")
  cells = []
  for r in group:
    if r["status"] != "ok":
      cells.append(f"{r['lib']}: {r['status']}")
      continue
    cell = f"{r['lib']}: {r['kernels']}k {r['passes']:.2f}p"
    if r["lib"].startswith("jaxnorm") and "ratio_to_flax" in r:
      ok = "ok" if r["within_allowance"] else "OVER"
      cell += f" (x{r['ratio_to_flax']:.2f} flax, x{r['ratio_to_floor']:.2f} floor, {ok})"
    cells.append(cell)
  return head + " | " + " | ".join(cells)


def markdown(records: list[dict], libs=LIBS) -> str:
  """Per platform, one table: kernels and passes of x per library, jaxnorm's ratios."""
  out = []
  for plat in dict.fromkeys(r["platform"] for r in records):
    rs = [r for r in records if r["platform"] == plat]
    present = [lib for lib in libs if any(r["lib"] == lib for r in rs)]
    out += [f"**{plat}** (kernels / passes of x; jaxnorm: ×flax, ×floor, allowance)", "",
            "| case | shape | dtype | pass | " + " | ".join(present) + " | jaxnorm ×flax "
            "| ×floor | within |", "|" + "---|" * (len(present) + 7)]
    keys = list(dict.fromkeys((r["norm"], tuple(r["shape"]), r["dtype"], r["pass"])
                              for r in rs))
    for key in keys:
      by = {r["lib"]: r for r in rs if (r["norm"], tuple(r["shape"]), r["dtype"], r["pass"])
            == key}
      cells = []
      for lib in present:
        r = by.get(lib)
        if r is None:
          cells.append("–")
        elif r["status"] != "ok":
          cells.append("failed")
        else:
          cells.append(f"{r['kernels']} / {r['passes']:.2f}")
      j = by.get("jaxnorm", {})
      jp = by.get("jaxnorm pallas", {})
      ratio = f"{j['ratio_to_flax']:.2f}" if "ratio_to_flax" in j else "–"
      if "ratio_to_flax" in jp:
        ratio += f" (pallas {jp['ratio_to_flax']:.2f})"
      floor = f"{j['ratio_to_floor']:.2f}" if "ratio_to_floor" in j else "–"
      within = "–" if "within_allowance" not in j else ("yes" if j["within_allowance"]
                                                         else "**no**")
      if "within_allowance" in jp:
        within += " (pallas " + ("yes" if jp["within_allowance"] else "**no**") + ")"
      norm, shape, dtype, kind = key
      out.append(f"| {norm} | {'x'.join(map(str, shape))} | {dtype} | {kind} | "
                 + " | ".join(cells) + f" | {ratio} | {floor} | {within} |")
    out.append("")
  return "\n".join(out)


def _key(r: dict) -> str:
  return (f"{r['platform']} {r['norm']} {'x'.join(map(str, r['shape']))} {r['dtype']} "
          f"{r['pass']} {r['lib']}")


def check(platforms, budget_path: str = BUDGET, log=print) -> int:
  """Compiles `CHECK` and fails (returns 1) on traffic beyond the allowance or the budget.

  A case within the allowance passes. A case beyond it passes only if `budget_path` records it
  as a known excess (with its reason) and its bytes are at most the recorded ceiling (today's
  bytes), so that traffic cannot grow unseen; a recorded case that is now within the allowance
  is reported, so that its entry can go.
  """
  with open(budget_path) as f:
    known = {e["case"]: e for e in json.load(f)["known"]}
  records = measure(platforms, CHECK["norms"], CHECK["shapes"], CHECK["dtypes"],
                    CHECK["passes"], CHECK["libs"], log=log)
  failures, checked = [], 0
  for r in records:
    if not r["lib"].startswith("jaxnorm"):
      continue
    key = _key(r)
    if r["status"] != "ok" or "within_allowance" not in r:
      failures.append(f"{key}: did not compile ({r['status']})")
      continue
    checked += 1
    entry = known.get(key)
    if r["within_allowance"]:
      if entry is not None:
        log(f"now within the allowance, remove its entry from {budget_path}: {key}")
      continue
    if entry is None:
      extra = allowance_extra(r["norm"], r["pass"], r["dtype"], r["platform"])
      failures.append(f"{key}: {r['passes']:.3f} passes of x, above the allowance "
                      f"{r['allowed_bytes'] / r['x_bytes']:.3f} (flax.linen's bytes"
                      f"{' + one read of x' if extra else ''}) and not a recorded excess")
    elif r["passes"] > entry["ceiling_passes"] + 0.005:
      failures.append(f"{key}: {r['passes']:.3f} passes of x, above its recorded ceiling "
                      f"{entry['ceiling_passes']:.3f} ({entry['reason']})")
  for msg in failures:
    log(f"FAIL {msg}")
  log(f"{checked} cases checked, {len(failures)} failed")
  return 1 if failures or not checked else 0


# ---------------------------------------------------------------------------------------------
# Across devices: batch norm in training with its statistics reduced over a mesh.


def collectives(platforms, log=print) -> list[dict]:
  """Batch norm training over 4 devices: shard_map with axis_name, and jit of sharded input.

  TPU: a v5e 2x2 slice; GPU: four H100s (topology 1x1x4). Prints the collectives of the
  forward and forward+backward programs (8192x1024 float32 and bfloat16, the batch sharded).
  """
  from jax.experimental import topologies
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  out = []
  for plat in _compilable(platforms, log):
    topo = topology(plat, gpus="1x1x4")
    mesh = topologies.make_mesh(topo, (4,), ("batch",))
    c = 1024
    state = jn.batch_norm_init(c)
    p = cases.COUNTED.affine(c)

    def plain(p, x, state=state):
      return jn.batch_norm(x, state, p["scale"], p["bias"], training=True)

    def per_shard(p, x, state=state):
      return jn.batch_norm(x, state, p["scale"], p["bias"], training=True, axis_name="batch")

    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("batch")),
                           out_specs=(P("batch"), P()))
    for dtype_name in DTYPES:
      dtype = jnp.dtype(dtype_name)
      xs = jax.ShapeDtypeStruct((8192, c), dtype, sharding=NamedSharding(mesh, P("batch")))
      replicated = NamedSharding(mesh, P())
      ps = jax.tree.map(lambda a, replicated=replicated: _spec(a, replicated), p)
      dys = xs
      for how, fn in (("jit", plain), ("shard_map", mapped)):
        for kind in PASSES:
          f = cases.with_pass(fn, kind)
          args = (ps, xs) if kind == "fwd" else (ps, xs, dys)
          compiled = jax.jit(f).lower(*args).compile()
          a = _hlo_bytes.analyze(compiled.as_text())
          rec = {"platform": plat, "how": how, "dtype": dtype_name, "pass": kind,
                 "collectives": [f"{op} {t}" for op, t in a["collectives"]],
                 "kernels": a["kernels"], "conditionals": a["other_ops"].count("conditional"),
                 "passes_per_device": a["bytes"] / (xs.size // 4 * dtype.itemsize)}
          out.append(rec)
          log(f"{plat:5s} {how:9s} {dtype_name:8s} {kind:7s} {a['kernels']:2d} kernels, "
              f"{rec['passes_per_device']:.2f} passes of the local x, {rec['conditionals']} "
              f"conditionals, {len(a['collectives'])} collectives: "
              + "; ".join(re.sub(r"\{[^}]*\}", "", c) for c in rec["collectives"]))
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--platforms", default="h100,v5e,v6e",
                  help=f"comma-separated, of {list(PLATFORMS)}; those this Python cannot "
                       "compile for are skipped with a note")
  ap.add_argument("--cases", default=",".join(NORMS), help=f"comma-separated, of {NORMS}")
  ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES))
  ap.add_argument("--grid", action="store_true",
                  help="the grid of shapes instead of --shapes: rows 256, 2048, 16384 by "
                       "features 256, 1024, 4096, and 64x32x32x128, 32x56x56x64")
  ap.add_argument("--dtypes", default=",".join(DTYPES))
  ap.add_argument("--passes", default=",".join(PASSES))
  ap.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, of {LIBS}")
  ap.add_argument("--json", help="write the records to this file")
  ap.add_argument("--markdown", help="write the tables to this file")
  ap.add_argument("--check", action="store_true",
                  help="CI: compile a subset and fail on traffic beyond the allowance or the "
                       "recorded budget (benchmarks/compiled_budget.json)")
  ap.add_argument("--budget", default=BUDGET, help="the recorded known excesses for --check")
  ap.add_argument("--collectives", action="store_true",
                  help="batch norm across 4 devices: print the collectives instead")
  ap.add_argument("--residual", action="store_true",
                  help="the fused residual add (add_layer_norm, add_rms_norm) against "
                       "flax.linen's norm of x + r, at cases.RESIDUAL_SHAPES and "
                       "RESIDUAL_DTYPES (--shapes, --dtypes to narrow; --cases, --libs ignored)")
  args = ap.parse_args(argv)
  platforms = [p for p in args.platforms.split(",") if p]
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad:
    ap.error(f"unknown --platforms {bad}; choose from {list(PLATFORMS)}")
  meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "jax": jax.__version__, "jaxnorm": jn.__version__}
  try:
    import flax
    meta["flax"] = flax.__version__
  except ImportError:
    pass
  print(f"jax {meta['jax']}, jaxnorm {meta['jaxnorm']}, flax {meta.get('flax', '-')}",
        flush=True)
  if args.check:
    sys.exit(check(platforms, args.budget))
  if args.collectives:
    result = {"meta": meta, "collectives": collectives(platforms)}
  elif args.residual:
    shapes = ([tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
              if args.shapes != ap.get_default("shapes") else cases.RESIDUAL_SHAPES)
    dtypes = (args.dtypes.split(",") if args.dtypes != ap.get_default("dtypes")
              else cases.RESIDUAL_DTYPES)
    records = measure_residual(platforms, cases.RESIDUAL_NORMS, shapes, dtypes,
                               args.passes.split(","), cases.RESIDUAL_LIBS)
    result = {"meta": meta, "records": records}
    text = markdown(records, cases.RESIDUAL_LIBS)
    print(text)
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(text)
  else:
    norms = [n for n in args.cases.split(",") if n]
    if any(n not in NORMS for n in norms):
      ap.error(f"unknown --cases {norms}; choose from {list(NORMS)}")
    shapes = (list(GRID) if args.grid else
              [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s])
    libs = [lib for lib in args.libs.split(",") if lib]
    if any(lib not in LIBS for lib in libs):
      ap.error(f"unknown --libs {libs}; choose from {list(LIBS)}")
    records = measure(platforms, norms, shapes, args.dtypes.split(","),
                      args.passes.split(","), libs)
    result = {"meta": meta, "records": records}
    text = markdown(records, libs)
    print(text)
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
