"""Why switch: flax.linen's and jaxnorm.linen's layers side by side where flax goes wrong.

    python examples/why_jaxnorm.py [--out DIR]

Runs `flax.linen.LayerNorm`/`BatchNorm` and `jaxnorm.linen.LayerNorm`/`BatchNorm` (drop-in
replacements: same constructor, call and variables) on the same inputs and compares both with a
float64 NumPy reference of that input:

1. a large offset (synthetic float32 data, mean 1e4, std 1: a case about numerics): LayerNorm
   and BatchNorm (training); flax's default `use_fast_variance=True` computes E[x²] - E[x]²,
   which cancels. Quantity: the largest error of the output.
2. uneven shards (real data: scikit-learn's digits, 64 pixels as features): BatchNorm with
   `axis_name` under `jax.shard_map` over 8 devices, each holding 16 rows of which 16, 14, ...,
   2 are valid (the rest is padding, masked out). flax averages the per-device means with equal
   weights; the truth weights every valid row once. Quantity: the batch mean and variance of one
   pixel (the digits' most variable one), read from `batch_stats` with `momentum=0`.
3. an empty shard (digits): the same with one device holding no valid row (google/flax#2417).
4. a NaN batch (digits): three training steps (a clean batch, a batch with one NaN pixel, a
   clean batch); the truth is the running average of the two clean batches, as if the bad
   batch had been skipped. Quantity: the running mean and variance of the NaN's pixel.

A value is right when it lies within a float32 tolerance of the truth: 16·u·S with u = 2**-24
and S the quantity's scale (max|x|/std for a normalized output, max|x| for a mean, max|x|² for a
variance). Every verdict is computed from the numbers. flax's opt-in exact variance
(`use_fast_variance=False`) is measured too and reported under the table: it fixes case 1, not
cases 2-4. Writes to DIR (default `results/`): `why_jaxnorm.json` (`{"title", "config", "rows",
"seconds"}`, one row per quantity, NaN written as null) and `why_jaxnorm.png` (each library's
error relative to the tolerance, one figure).

It runs on the CPU, whatever the default backend, and needs 8 CPU devices: run as a script, it
sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` itself before JAX starts (as
`examples/bn_vs_ln.py` runs it: in a process of its own).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before JAX starts: 8 CPU devices for the cross-device cases
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import argparse
import json
import math
import pathlib
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import matplotlib
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jnn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FLAX_EXACT = "flax_use_fast_variance_false"  # flax's opt-in two-pass variance, not its default
# Each library's layer by class name: flax.linen's and jaxnorm.linen's defaults, and flax with
# its exact variance (reported beside the table: it fixes case 1 only).
LIBS = {
    "flax": lambda name, **kw: getattr(nn, name)(**kw),
    "jaxnorm": lambda name, **kw: getattr(jnn, name)(**kw),
    FLAX_EXACT: lambda name, **kw: getattr(nn, name)(use_fast_variance=False, **kw),
}
U32 = 2.0 ** -24  # float32's unit roundoff
TOL_FACTOR = 16  # tolerance = TOL_FACTOR * U32 * scale
N_DEVICES, ROWS = 8, 16  # rows per device in the cross-device cases
COUNTS_UNEVEN = (16, 14, 12, 10, 8, 6, 4, 2)  # valid rows per device
COUNTS_EMPTY = (16, 14, 12, 10, 8, 6, 4, 0)  # the last device holds no valid row
OFFSET = 1e4
NAN_MOMENTUM = 0.9


# ------------------------------------------------------------------------------------- inputs


def offset_data(shape: tuple[int, int] = (256, 512), seed: int = 0) -> np.ndarray:
  """Synthetic float32 input with mean 1e4 and std 1 (case 1)."""
  return (np.random.default_rng(seed).standard_normal(shape) + OFFSET).astype(np.float32)


def digits_pixels() -> np.ndarray:
  """The 1797 digits images as rows of 64 pixel features in [0, 1], float32."""
  from sklearn.datasets import load_digits

  return (load_digits().images.reshape(-1, 64) / 16.0).astype(np.float32)


def device_batch(pixels: np.ndarray, counts: tuple[int, ...], seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(x, mask) of shape (N_DEVICES * ROWS, 64) and (N_DEVICES * ROWS, 1): device d's block of
  ROWS rows holds counts[d] random digits, then zero padding that the mask marks invalid."""
  rng = np.random.default_rng(seed)
  rows = pixels[rng.permutation(len(pixels))[:N_DEVICES * ROWS]].copy()
  mask = (np.arange(ROWS)[None, :] < np.asarray(counts)[:, None]).reshape(-1, 1)
  rows[~mask[:, 0]] = 0.0
  return rows, mask


def nan_batches(pixels: np.ndarray, pixel: int, batch: int = 32, seed: int = 1
                ) -> list[np.ndarray]:
  """Three digits batches; the second has a NaN in `pixel` of its first row (case 4)."""
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(pixels))[:3 * batch].reshape(3, batch)
  batches = [pixels[i].copy() for i in idx]
  batches[1][0, pixel] = np.nan
  return batches


# ------------------------------------------------------------------------------ the two layers


def _init(module, x):
  return module.init(jax.random.key(0), x)


def output_error(lib, name: str, x: np.ndarray) -> float:
  """Max |y - y_float64| of `lib`'s LayerNorm or BatchNorm (training) with default settings."""
  x64 = x.astype(np.float64)
  if name == "LayerNorm":
    module, axis, eps = lib("LayerNorm"), -1, 1e-6
    y = module.apply(_init(module, x), x)
  else:
    module, axis, eps = lib("BatchNorm", use_running_average=False), 0, 1e-5
    y, _ = module.apply(_init(module, x), x, mutable=["batch_stats"])
  ref = (x64 - x64.mean(axis, keepdims=True)) / np.sqrt(x64.var(axis, keepdims=True) + eps)
  y = np.asarray(y, np.float64)
  return float(np.abs(y - ref).max()) if np.isfinite(y).all() else math.nan


def sharded_batch_stats(lib, x: np.ndarray, mask: np.ndarray, mesh: Mesh
                        ) -> tuple[np.ndarray, np.ndarray]:
  """The batch mean and variance that `lib`'s BatchNorm(axis_name=...) computes under
  `jax.shard_map`, each device holding its block of rows: `batch_stats` after one step with
  momentum 0 (the running statistics are then the batch's)."""
  module = lib("BatchNorm", use_running_average=False, axis_name="devices", momentum=0.0)
  variables = _init(module, x[:1])

  def step(xs, ms):
    _, upd = module.apply(variables, xs, mask=ms, mutable=["batch_stats"])
    return upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

  rows = NamedSharding(mesh, P("devices"))
  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("devices"), P("devices")),
                            out_specs=(P(), P())))
  mean, var = f(jax.device_put(x, rows), jax.device_put(mask, rows))
  return np.asarray(mean, np.float64), np.asarray(var, np.float64)


def running_stats_after(lib, batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """`batch_stats` of `lib`'s BatchNorm(momentum=0.9) after a training step on each batch."""
  module = lib("BatchNorm", use_running_average=False, momentum=NAN_MOMENTUM)
  variables = _init(module, batches[0])
  step = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"])[1])
  for x in batches:
    variables = {**variables, **step(variables, x)}
  stats = variables["batch_stats"]
  return np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)


# ---------------------------------------------------------------------------------- the rows


def judge(value: float, truth: float, tol: float) -> bool:
  """Right: finite and within `tol` of the truth."""
  return bool(math.isfinite(value) and abs(value - truth) <= tol)


def row(rid: str, case: str, quantity: str, data: str, truth: float, values: dict[str, float],
        scale: float) -> dict[str, Any]:
  tol = TOL_FACTOR * U32 * scale
  ok = {lib: judge(v, truth, tol) for lib, v in values.items()}

  def word(lib):
    v = values[lib]
    if ok[lib]:
      return "right"
    return "NaN" if math.isnan(v) else f"off by {abs(v - truth):.2g}"

  if ok["jaxnorm"] and not ok["flax"]:
    verdict = f"jaxnorm right, flax {word('flax')}"
  elif ok["jaxnorm"]:
    verdict = "both right"
  else:
    verdict = f"jaxnorm {word('jaxnorm').upper()}, flax {word('flax')}"
  return {"id": rid, "case": case, "quantity": quantity, "data": data, "truth": float(truth),
          "flax": values["flax"], "jaxnorm": values["jaxnorm"], "tolerance": tol,
          "flax_ok": ok["flax"], "jaxnorm_ok": ok["jaxnorm"], "verdict": verdict,
          FLAX_EXACT: values[FLAX_EXACT], f"{FLAX_EXACT}_ok": ok[FLAX_EXACT]}


def offset_rows() -> list[dict[str, Any]]:
  x = offset_data()
  x64 = x.astype(np.float64)
  out = []
  for name, axis in (("LayerNorm", -1), ("BatchNorm", 0)):
    scale = float(np.abs(x64).max() / x64.std(axis).min())
    values = {lib: output_error(mod, name, x) for lib, mod in LIBS.items()}
    what = "" if name == "LayerNorm" else " (training)"
    out.append(row(f"offset_{name.lower()}", f"1. offset 1e4: {name}{what}",
                   "max |y - y_float64|", f"synthetic {x.shape[0]}x{x.shape[1]} float32, mean "
                   f"{OFFSET:g}, std 1", 0.0, values, scale))
  return out


def device_rows(pixels: np.ndarray, pixel: int, mesh: Mesh) -> list[dict[str, Any]]:
  out = []
  for rid, counts, title in (("uneven", COUNTS_UNEVEN, "2. uneven shards"),
                             ("empty", COUNTS_EMPTY, "3. an empty shard")):
    x, mask = device_batch(pixels, counts)
    valid = x[mask[:, 0]].astype(np.float64)[:, pixel]
    got = {lib: sharded_batch_stats(mod, x, mask, mesh) for lib, mod in LIBS.items()}
    data = (f"digits, pixel {pixel}; {N_DEVICES} devices x {ROWS} rows, valid rows "
            + ", ".join(map(str, counts)))
    peak = float(np.abs(valid).max())
    for k, (what, truth, scale) in enumerate((("mean", valid.mean(), peak),
                                             ("var", valid.var(), peak ** 2))):
      values = {lib: float(stats[k][pixel]) for lib, stats in got.items()}
      out.append(row(f"{rid}_{what}", f"{title}: BatchNorm, shard_map",
                     f"batch {what}", data, float(truth), values, scale))
  return out


def nan_rows(pixels: np.ndarray, pixel: int) -> list[dict[str, Any]]:
  batches = nan_batches(pixels, pixel)
  m, v = 0.0, 1.0  # the initial running statistics; the NaN batch skipped
  for b in (batches[0], batches[2]):
    b = b.astype(np.float64)[:, pixel]
    m = NAN_MOMENTUM * m + (1 - NAN_MOMENTUM) * b.mean()
    v = NAN_MOMENTUM * v + (1 - NAN_MOMENTUM) * b.var()
  got = {lib: running_stats_after(mod, batches) for lib, mod in LIBS.items()}
  peak = float(np.nanmax(np.abs(np.stack(batches)[:, :, pixel])))
  data = (f"digits, pixel {pixel}; batches of {len(batches[0])}: clean, one NaN, clean; "
          f"momentum {NAN_MOMENTUM}")
  out = []
  # The running variance starts at 1: its scale is at least 1.
  for k, (what, truth, scale) in enumerate((("mean", m, peak), ("var", v, max(peak, 1) ** 2))):
    values = {lib: float(stats[k][pixel]) for lib, stats in got.items()}
    out.append(row(f"nan_{what}", "4. a NaN batch: BatchNorm, 3 steps",
                   f"running {what}", data, truth, values, scale))
  return out


# ----------------------------------------------------------------------------- table, figure


def fmt(v: float | None) -> str:
  if v is None or math.isnan(v):
    return "NaN"
  return "0" if v == 0 else f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.2g}"


def table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'case':<38} {'quantity':<20} {'truth':>9} {'flax.linen':>11} "
          f"{'jaxnorm.linen':>13}  verdict")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['case']:<38} {r['quantity']:<20} {fmt(r['truth']):>9} "
                 f"{fmt(r['flax']):>11} {fmt(r['jaxnorm']):>13}  {r['verdict']}")
  return "\n".join(lines)


def exact_variance_note(rows: list[dict[str, Any]]) -> str:
  """What flax's opt-in `use_fast_variance=False` changes, from the rows' numbers."""
  wrong = [r for r in rows if not r["flax_ok"]]
  fixed = [r["case"] for r in wrong if r[f"{FLAX_EXACT}_ok"]]
  still = [r for r in rows if not r[f"{FLAX_EXACT}_ok"]]
  cases = list(dict.fromkeys(r["case"].split(":")[0] for r in still))
  return (f"flax with its opt-in use_fast_variance=False: right in {len(fixed)} of the "
          f"{len(wrong)} rows its default gets wrong ({'; '.join(fixed) or 'none'}); still "
          f"wrong in {len(still)} ({'; '.join(cases) or 'none'}).")


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Each library's |value - truth| / tolerance per row, on one log axis; NaN at the edge."""
  floor, edge = 1e-3, 1e7
  fig, ax = plt.subplots(figsize=(9.5, 5.6))
  ys = np.arange(len(rows))[::-1]
  for k, (lib, color) in enumerate((("flax", "tab:red"), ("jaxnorm", "tab:blue"))):
    for y, r in zip(ys, rows, strict=True):
      v = r[lib]
      nan = v is None or math.isnan(v)
      rel = edge if nan else min(max(abs(v - r["truth"]) / r["tolerance"], floor), edge)
      off = 0.2 if k == 0 else -0.2
      ax.barh(y + off, rel, left=floor, height=0.38, color=color, hatch="//" if nan else None,
              alpha=0.85, label=f"{lib}.linen" if y == ys[0] else None)
      ax.text(rel * 1.3 if not nan else edge / 3, y + off,
              "NaN" if nan else fmt(abs(v - r["truth"])), va="center",
              ha="left" if not nan else "right", fontsize=7,
              color="white" if nan else "black")
  ax.axvline(1.0, color="black", lw=1, ls="--")
  ax.text(1.1, ys[0] + 0.55, "float32 tolerance", fontsize=7)
  ax.set_xscale("log")
  ax.set_xlim(floor, edge * 1.5)
  ax.set_yticks(ys, [f"{r['case']}\n{r['quantity']}" for r in rows], fontsize=7)
  ax.set_xlabel("|value - float64 truth| / float32 tolerance  (labels: |value - truth|)")
  ax.set_title("flax.linen vs jaxnorm.linen where flax goes wrong (left of the line: right)",
               fontsize=9)
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --------------------------------------------------------------------------------------- main


def cpu_mesh() -> Mesh:
  devices = jax.devices("cpu")
  if len(devices) < N_DEVICES:
    raise RuntimeError(
        f"the cross-device cases need {N_DEVICES} CPU devices; JAX has {len(devices)}. Run "
        f"this file as a script (it sets them), or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES} before JAX starts.")
  return Mesh(np.asarray(devices[:N_DEVICES]), ("devices",))


def most_variable_pixel(pixels: np.ndarray) -> int:
  return int(np.argmax(pixels.astype(np.float64).var(0)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="results/", help="output directory (default: results/)")
  args = ap.parse_args(argv)
  t = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  mesh = cpu_mesh()
  pixels = digits_pixels()
  pixel = most_variable_pixel(pixels)
  # On the CPU whatever the default backend, so that the 8-device mesh and every case share
  # one platform.
  with jax.default_device(mesh.devices.flat[0]):
    rows = offset_rows() + device_rows(pixels, pixel, mesh) + nan_rows(pixels, pixel)
  seconds = time.perf_counter() - t
  result = {
      "title": "flax.linen vs jaxnorm.linen against a float64 NumPy truth",
      "config": {
          "flax": flax.__version__, "jaxnorm": jaxnorm.__version__, "jax": jax.__version__,
          "platform": "cpu (whatever the default backend)", "cross_device": f"jax.shard_map "
          f"over {N_DEVICES} CPU devices", "layers": "default settings of both libraries "
          "(flax: use_fast_variance=True)",
          "tolerance": f"{TOL_FACTOR} * 2**-24 * scale; scale = max|x|/std (normalized "
                       "output), max|x| (mean), max|x|**2 (variance)",
      },
      "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in r.items()} for r in rows],
      "seconds": seconds,
  }
  (out / "why_jaxnorm.json").write_text(json.dumps(result, indent=1, allow_nan=False))
  plot(rows, out / "why_jaxnorm.png")
  print(f"flax.linen {flax.__version__} vs jaxnorm.linen {jaxnorm.__version__}, default "
        f"settings, against a float64 NumPy truth (right: within {TOL_FACTOR}·u·scale, "
        f"u = 2^-24)\n")
  print(table(rows))
  print("\n" + exact_variance_note(rows))
  print(f"Data: case 1 synthetic (numerics); cases 2-4 scikit-learn's digits, pixel {pixel} "
        f"(the most variable). Wrote {out}/why_jaxnorm.json and why_jaxnorm.png in "
        f"{time.perf_counter() - t:.0f} s.", flush=True)
  return result


if __name__ == "__main__":
  main()
