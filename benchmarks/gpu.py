"""jaxnorm on a GPU: achieved memory bandwidth, side by side with flax and JAX's Pallas kernels.

    python benchmarks/gpu.py [--out DIR] [--quick] [--no-sweep]

For LayerNorm and RMSNorm over the last axis (transformer activations), float32 and bfloat16,
forward and forward+backward, it times jaxnorm (its XLA path, `implementation="xla"`, which is
what `None` picks), jaxnorm's fused Pallas kernels (`implementation="pallas"`, column
"jaxnorm pallas"), flax.linen (its default fast variance), and
`jax.experimental.pallas.ops.gpu.layer_norm` / `rms_norm` (JAX's Triton kernels, column
"pallas"), with interleaved rounds and medians, and reports for each:

* the time and the ratio to flax.linen, to JAX's Pallas kernel and to jaxnorm's XLA path;
* the achieved bandwidth: the bytes a fused implementation must move divided by the time.
  Forward reads x and writes y (2 arrays); forward+backward also reads x and dy again and
  writes dx (5 arrays; parameters and statistics are negligible);
* that bandwidth as a fraction of a device-to-device copy measured in the same process (`x + 1`
  on 1 GiB), the practical ceiling.

Then a sweep over the feature size (1024 to 16384, `--sweep-features`) at a fixed element count
(`--sweep-elements`, default 2**25), for jaxnorm's two implementations and flax: kernels like
these behave non-monotonically in the aspect ratio, and `None` should pick "pallas" only for
the shape classes where this sweep measured it faster.

It also checks on the device what the CPU tests check: the maximum error against a float64
NumPy reference of the same input at offsets 0, 1e3 and 1e4 (jaxnorm's exact statistics, both
implementations, and flax's default), and jaxnorm's gradients (both implementations) against
float64 autodiff of the same formula. On the CPU the "jaxnorm pallas" column runs in Pallas
interpret mode (which checks that it runs, not its speed).
Writes `gpu_results.json` and `gpu_results.md` to `--out` (default: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing

import jaxnorm as jn

NORMS = ("layer_norm", "rms_norm")
PASSES = ("fwd", "fwd+bwd")
ARRAYS_MOVED = {"fwd": 2, "fwd+bwd": 5}
SWEEP_LIBS = ("jaxnorm", "jaxnorm pallas", "flax.linen")


def _builders(norm: str):
  """`{library: f(x, scale, bias) -> y}` for one norm over the last axis."""
  import flax.linen as nn

  eps = 1e-6
  out = {}

  def two_pass(x, g, b):  # the exact formula in plain jnp, differentiated by JAX
    xf = x.astype(jnp.float32)
    if norm == "layer_norm":
      xf = xf - xf.mean(-1, keepdims=True)
    y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + eps) * g.astype(jnp.float32)
    return (y if norm == "rms_norm" else y + b.astype(jnp.float32)).astype(x.dtype)

  if norm == "layer_norm":
    out["jaxnorm"] = lambda x, g, b: jn.layer_norm(x, g, b, epsilon=eps)
    out["jaxnorm pallas"] = lambda x, g, b: jn.layer_norm(x, g, b, epsilon=eps,
                                                          implementation="pallas")
    mod = nn.LayerNorm(epsilon=eps)
    out["flax.linen"] = lambda x, g, b: mod.apply({"params": {"scale": g, "bias": b}}, x)
  else:
    out["jaxnorm"] = lambda x, g, b: jn.rms_norm(x, g, epsilon=eps)
    out["jaxnorm pallas"] = lambda x, g, b: jn.rms_norm(x, g, epsilon=eps,
                                                        implementation="pallas")
    mod = nn.RMSNorm(epsilon=eps)
    out["flax.linen"] = lambda x, g, b: mod.apply({"params": {"scale": g}}, x)
  out["jnp two-pass"] = two_pass
  try:
    if norm == "layer_norm":
      from jax.experimental.pallas.ops.gpu import layer_norm as pallas_mod
      kernel = pallas_mod.layer_norm
    else:
      from jax.experimental.pallas.ops.gpu import rms_norm as pallas_mod
      kernel = pallas_mod.rms_norm
    out["pallas"] = lambda x, g, b: kernel(x.reshape(1, *x.shape), g, b,
                                           eps=eps).reshape(x.shape)
  except Exception as e:  # reported, not fatal
    print(f"  pallas {norm} unavailable: {type(e).__name__}: {e}")
  return out


def _with_pass(f, kind):
  if kind == "fwd":
    return jax.jit(lambda x, g, b, dy: f(x, g, b))

  def fb(x, g, b, dy):
    y, pullback = jax.vjp(f, x, g, b)
    return y, pullback(dy)

  return jax.jit(fb)


def copy_bandwidth(rounds: int, mib: int = 1024) -> float:
  """Bytes per second of `x + 1` on `mib` MiB of float32 (read and write)."""
  x = jnp.zeros((mib * 2**18,), jnp.float32)
  f = jax.jit(lambda x: x + 1)
  samples = _timing.interleaved_samples({"copy": (f, (x,))}, rounds, 20, settle=True)
  t = _timing.medians(samples)["copy"]
  return 2 * x.nbytes / t


def speed(shapes, dtypes, rounds, peak, libs=None) -> list[dict]:
  """Times every library (or those in `libs`) on every shape and dtype."""
  records = []
  for shape in shapes:
    for dtype in dtypes:
      key = jax.random.key(0)
      x = jax.random.normal(key, shape, jnp.float32).astype(dtype)
      dy = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
      g = 1 + 0.1 * jax.random.normal(jax.random.key(2), shape[-1:], jnp.float32)
      b = 0.1 * jax.random.normal(jax.random.key(3), shape[-1:], jnp.float32)
      if dtype == jnp.bfloat16:
        g, b = g.astype(dtype), b.astype(dtype)  # the Pallas kernels want one dtype
      size = x.size * x.dtype.itemsize
      for norm in NORMS:
        fns = {}
        for lib, f in _builders(norm).items():
          if libs is not None and lib not in libs:
            continue
          for kind in PASSES:
            try:
              fn = _with_pass(f, kind)
              jax.block_until_ready(fn(x, g, b, dy))
            except Exception as e:  # reported, not fatal
              print(f"  {lib} {norm} {kind} {shape} {jnp.dtype(dtype).name} failed: "
                    f"{type(e).__name__}: {str(e)[:300]}")
              continue
            fns[(lib, kind)] = (fn, (x, g, b, dy))
        times = _timing.medians(_timing.interleaved_samples(fns, rounds, 20, settle=True))
        for (lib, kind), t in times.items():
          moved = ARRAYS_MOVED[kind] * size
          ref = times.get(("flax.linen", kind))
          pal = times.get(("pallas", kind))
          xla = times.get(("jaxnorm", kind))
          records.append({
              "norm": norm, "lib": lib, "pass": kind, "shape": list(shape),
              "dtype": jnp.dtype(dtype).name, "time_us": t * 1e6,
              "bandwidth_gbs": moved / t / 1e9, "fraction_of_copy": moved / t / peak,
              "ratio_to_flax": None if ref is None else t / ref,
              "ratio_to_pallas": None if pal is None else t / pal,
              "ratio_to_xla": None if xla is None else t / xla,
          })
        print(f"  {norm} {shape} {jnp.dtype(dtype).name}: " + ", ".join(
            f"{lib} {kind} {t * 1e6:.0f} us ({ARRAYS_MOVED[kind] * size / t / peak:.0%})"
            for (lib, kind), t in sorted(times.items())), flush=True)
  return records


def exactness() -> list[dict]:
  """Max |error| vs float64 NumPy of the same float32 input, on the default device."""
  import flax.linen as nn

  rows = []
  rng = np.random.default_rng(0)
  base = rng.standard_normal((256, 512)).astype(np.float32)
  for offset in (0.0, 1e3, 1e4):
    x = (base + np.float32(offset)).astype(np.float32)
    xd = x.astype(np.float64)
    ln_ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)
    bn_ref = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)
    xj = jnp.asarray(x)
    ln = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)
    bn = nn.BatchNorm(use_running_average=False, epsilon=1e-5, use_bias=False, use_scale=False)
    bn_vars = bn.init(jax.random.key(0), xj)
    got = {
        ("layer_norm", "jaxnorm"): jn.layer_norm(xj),
        ("layer_norm", "jaxnorm pallas"): jax.jit(
            lambda x: jn.layer_norm(x, implementation="pallas"))(xj),
        ("layer_norm", "flax.linen"): ln.apply({}, xj),
        ("batch_norm", "jaxnorm"): jn.batch_norm(xj, jn.batch_norm_init(512), training=True)[0],
        ("batch_norm", "flax.linen"): bn.apply(bn_vars, xj, mutable=["batch_stats"])[0],
    }
    for (norm, lib), y in got.items():
      ref = ln_ref if norm == "layer_norm" else bn_ref
      rows.append({"norm": norm, "lib": lib, "offset": offset,
                   "max_error": float(np.abs(np.asarray(y, np.float64) - ref).max())})
  return rows


def gradients() -> list[dict]:
  """jaxnorm's gradients on the device vs float64 autodiff of the textbook formula on the CPU."""
  rows = []
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((64, 256)) + 3).astype(np.float32)
  w = rng.standard_normal((64, 256)).astype(np.float32)
  g = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
  b = (0.1 * rng.standard_normal(256)).astype(np.float32)

  def ref_ln(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + 1e-6) * g + b

  def ref_bn(x, g, b):
    m = x.mean(0)
    v = ((x - m) ** 2).mean(0)
    return (x - m) / jnp.sqrt(v + 1e-5) * g + b

  cases = {
      "layer_norm": (lambda x, g, b: jn.layer_norm(x, g, b, epsilon=1e-6), ref_ln),
      "layer_norm pallas": (lambda x, g, b: jn.layer_norm(x, g, b, epsilon=1e-6,
                                                          implementation="pallas"), ref_ln),
      "batch_norm": (lambda x, g, b: jn.batch_norm(x, jn.batch_norm_init(256), g, b,
                                                   training=True, epsilon=1e-5)[0], ref_bn),
  }
  for name, (f, ref) in cases.items():
    got = jax.jit(jax.grad(lambda x, g, b, f=f: jnp.sum(f(x, g, b) * w), (0, 1, 2)))(x, g, b)
    with jax.enable_x64(True):
      cpu = jax.devices("cpu")[0]
      args = [jax.device_put(np.asarray(a, np.float64), cpu) for a in (x, g, b)]
      wd = jax.device_put(w.astype(np.float64), cpu)
      want = jax.grad(lambda x, g, b, ref=ref, wd=wd: jnp.sum(ref(x, g, b) * wd), (0, 1, 2))(*args)
    for arg, gg, ww in zip("xgb", got, want, strict=True):
      ww = np.asarray(ww)
      rows.append({"norm": name, "grad": arg,
                   "max_rel_error": float(np.abs(np.asarray(gg, np.float64) - ww).max()
                                          / np.abs(ww).max())})
  return rows


def markdown(result: dict) -> str:
  meta = result["meta"]
  lines = [f"{meta['date']} · {meta['device']} · jax {meta['jax']} · copy bandwidth "
           f"{meta['copy_gbs']:.0f} GB/s (x + 1, {meta['copy_mib']} MiB, read and write)", "",
           "| norm | shape | dtype | pass | library | time (µs) | GB/s | of copy | ×flax "
           "| ×pallas | ×jaxnorm xla |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for section in ("speed", "sweep"):
    if section == "sweep" and result.get("sweep"):
      lines += ["", f"Feature-size sweep at {result['meta']['sweep_elements']} elements:", "",
                lines[2], lines[3]]
    for r in result.get(section, []):
      lines.append(
          f"| {r['norm']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['pass']} | "
          f"{r['lib']} | {r['time_us']:.0f} | {r['bandwidth_gbs']:.0f} | "
          f"{r['fraction_of_copy']:.0%} | "
          + " | ".join("–" if r.get(k) is None else f"{r[k]:.2f}"
                       for k in ("ratio_to_flax", "ratio_to_pallas", "ratio_to_xla")) + " |")
  lines += ["", "| norm | library | offset | max error vs float64 |", "|---|---|---|---|"]
  lines += [f"| {r['norm']} | {r['lib']} | {r['offset']:g} | {r['max_error']:.3g} |"
            for r in result["exactness"]]
  lines += ["", "| jaxnorm gradient | of | max error / max |grad| vs float64 |", "|---|---|---|"]
  lines += [f"| {r['norm']} | {r['grad']} | {r['max_rel_error']:.3g} |"
            for r in result["gradients"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("--quick", action="store_true", help="one shape, few rounds")
  ap.add_argument("--shapes", help="comma-separated, e.g. 8192x4096,32768x4096")
  ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy yardstick")
  ap.add_argument("--no-sweep", action="store_true", help="skip the feature-size sweep")
  ap.add_argument("--sweep-elements", type=int, default=2**25,
                  help="elements of x in each shape of the sweep")
  ap.add_argument("--sweep-features", default="1024,2048,4096,8192,16384",
                  help="comma-separated feature sizes of the sweep")
  args = ap.parse_args(argv)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
  rounds = 3 if args.quick else 9
  shapes = [(8192, 1024)] if args.quick else [(8192, 1024), (8192, 4096), (32768, 4096)]
  if args.shapes:
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
  t0 = time.perf_counter()
  peak = copy_bandwidth(rounds, args.copy_mib)
  print(f"copy bandwidth {peak / 1e9:.0f} GB/s", flush=True)
  result = {"meta": {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
      "copy_gbs": peak / 1e9, "copy_mib": args.copy_mib, "rounds": rounds}}
  result["exactness"] = exactness()
  result["gradients"] = gradients()
  print("exactness and gradients checked", flush=True)
  result["speed"] = speed(shapes, (jnp.float32, jnp.bfloat16), rounds, peak)
  result["meta"]["sweep_elements"] = args.sweep_elements
  result["sweep"] = [] if args.no_sweep else speed(
      [(max(1, args.sweep_elements // int(f)), int(f)) for f in args.sweep_features.split(",")],
      (jnp.float32, jnp.bfloat16), rounds, peak, libs=SWEEP_LIBS)
  result["meta"]["seconds"] = time.perf_counter() - t0
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
    json.dump(result, f, indent=1)
  text = markdown(result)
  with open(os.path.join(args.out, "gpu_results.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
