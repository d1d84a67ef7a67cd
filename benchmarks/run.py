"""Side-by-side speed and memory of jaxnorm and its peers: one command, one process.

    python benchmarks/run.py [--quick | --tiny] [--out DIR] [--hlo]

For LayerNorm, RMSNorm, GroupNorm, BatchNorm (train and eval), forward and forward+backward,
float32 and bfloat16, it times jaxnorm, flax.linen, flax.nnx, haiku, equinox and a plain-jnp
reference (peers that are not installed are skipped) with interleaved repetitions (each round
visits every case once, in a new shuffled order) and reports medians. For each case it gives the
time, the ratio to flax.linen, the ratio to one elementwise pass over the same array (`x * 2`:
read x, write y; the memory-traffic yardstick: a forward pass cannot beat about 1x,
forward+backward, which reads x and dy and writes y and dx, about 2.5x) and, for
forward+backward, the temporary memory XLA assigns to the compiled program
(`jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`) and, in results.json,
the number of fusions of each compiled program (`--hlo` prints them per case as they compile).

Forward+backward is `y, pullback = jax.vjp(f, params, x); pullback(dy)` with a fixed random
cotangent `dy`, returning `y` and every gradient (and BatchNorm's new running statistics), so
nothing is dead code. Parameters are float32; the input has the case's dtype. The cases (each
library's call, the shapes, the dtypes) are `cases.py`'s, which `compiled.py` and
`tools/hlo_snapshot.py` share.

Writes `results.json`, `results.md` (markdown tables) and `chart.png` to `--out`
(default: benchmarks/results).

On Linux the script restarts itself once with glibc's allocator told to keep freed memory
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) and to back large blocks with transparent
huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). By default glibc hands each large XLA:CPU
buffer back to the kernel when it is freed, so every call page-faults its fresh output in again:
on a 2-core machine that costs more than the normalization itself (LayerNorm forward at
8192x1024 float32: 16 ms instead of 3.4-4.4 ms, most of it system time) and makes the timings
noisy. `--system-malloc` measures with the allocator as it is.
"""

from __future__ import annotations

import os
import sys

# This checkout's benchmarks and jaxnorm (not another checkout's editable install).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing

if __name__ == "__main__":
  _timing.use_allocator_settings()

import argparse
import datetime
import json
import platform
import re
import time

import cases
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn

NORMS = cases.NORMS
LIBS = ("jaxnorm", "flax.linen", "flax.nnx", "haiku", "equinox", "jnp")
REF = "flax.linen"
CONFIGS = cases.TIMED_CONFIGS  # (shape, dtype) groups per mode
REPS = {"full": 7, "quick": 3, "tiny": 2}
MIN_SAMPLE_S = {"full": 0.02, "quick": 0.01, "tiny": 0.001}


def _fwd(fn):
  return jax.jit(fn)


def _fwd_bwd(fn):
  return jax.jit(cases.with_pass(fn, "fwd+bwd"))


def fusion_count(compiled) -> int:
  """The number of fusions in a compiled program's entry computation (its kernels on CPU)."""
  text = compiled.as_text()
  return len(re.findall(r"\bfusion\(", text[text.index("ENTRY"):]))


def _label(shape, dtype) -> str:
  return f"{'x'.join(map(str, shape))} {dtype}"


def run(mode: str, out_dir: str, libs: tuple[str, ...] = LIBS,
        norms: tuple[str, ...] = NORMS, log=print, hlo: bool = False) -> dict:
  available = [lib for lib in libs if cases.have(lib)]
  skipped = [lib for lib in libs if lib not in available]
  records, failures = [], []
  t_start = time.perf_counter()
  for shape, dtype_name in CONFIGS[mode]:
    dtype = jnp.dtype(dtype_name)
    kx, kd = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(kx, shape, jnp.float32) * 2 + 0.5).astype(dtype)
    # The yardstick: one elementwise pass (read x, write y).
    programs = {("elementwise", "-", "fwd"): (jax.jit(lambda x: x * 2).lower(x).compile(), (x,),
                                              None)}
    for norm in norms:
      for lib in available:
        try:
          fn, params = cases.build(lib, norm, shape, dtype, cases.TIMED)
          fwd = _fwd(fn).lower(params, x).compile()
          y = fwd(params, x)[0]
          dy = jax.random.normal(kd, y.shape, jnp.float32).astype(y.dtype)
          fb = _fwd_bwd(fn).lower(params, x, dy).compile()
        except Exception as e:  # a peer that cannot run this case: report it, go on
          msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
          failures.append({"norm": norm, "lib": lib, "shape": list(shape),
                           "dtype": dtype_name, "error": msg})
          log(f"  skipped {lib} {norm} {_label(shape, dtype_name)}: {msg}")
          continue
        mem = fb.memory_analysis()
        temp = None if mem is None else int(mem.temp_size_in_bytes)
        programs[(norm, lib, "fwd")] = (fwd, (params, x), None)
        programs[(norm, lib, "fwd+bwd")] = (fb, (params, x, dy), temp)
        if hlo:
          log(f"  fusions {lib:10s} {norm:16s} {_label(shape, dtype_name):22s} "
              f"fwd {fusion_count(fwd):3d}  fwd+bwd {fusion_count(fb):3d}")
    # Calibrate the number of calls per sample so that a sample lasts MIN_SAMPLE_S.
    inner = {}
    for key, (c, args, _) in programs.items():
      jax.block_until_ready(c(*args))
      t = _timing.per_call(c, args, 1)
      inner[key] = max(1, min(1000, int(MIN_SAMPLE_S[mode] / max(t, 1e-7))))
    samples = _timing.interleaved_samples(
        {key: (c, args) for key, (c, args, _) in programs.items()}, REPS[mode], inner)
    med = _timing.medians(samples)
    ew = med[("elementwise", "-", "fwd")]
    for (norm, lib, kind), (compiled, _, temp) in programs.items():
      if norm == "elementwise":
        continue
      ref = med.get((norm, REF, kind))
      ref_temp = programs.get((norm, REF, kind), (None, None, None))[2]
      records.append({
          "norm": norm, "lib": lib, "pass": kind, "shape": list(shape), "dtype": dtype_name,
          "fusions": fusion_count(compiled),
          "time_ms": med[(norm, lib, kind)] * 1e3,
          "samples_ms": [s * 1e3 for s in samples[(norm, lib, kind)]],
          "ratio_to_flax": None if ref is None else med[(norm, lib, kind)] / ref,
          "ratio_to_elementwise": med[(norm, lib, kind)] / ew,
          "elementwise_ms": ew * 1e3,
          "temp_bytes": temp,
          "temp_ratio_to_flax": (None if temp is None or not ref_temp else temp / ref_temp),
      })
    log(f"[{time.perf_counter() - t_start:6.1f}s] {_label(shape, dtype_name)}: "
        f"{len(programs) - 1} cases, elementwise {ew * 1e3:.3f} ms")
  result = {
      "meta": {
          "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "mode": mode, "jax": jax.__version__, "jaxnorm": jn.__version__,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "allocator_env": _timing.allocator_env(),
          "python": sys.version.split()[0], "reference": REF, "libs": available,
          "skipped_libs": skipped, "failed_cases": failures, "reps": REPS[mode],
          "seconds": time.perf_counter() - t_start,
      },
      "records": records,
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(result))
  chart(result, os.path.join(out_dir, "chart.png"))
  return result


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def summary(result: dict) -> list[str]:
  """jaxnorm's time per case, in ms and as a ratio to flax.linen's: one column per input."""
  recs = [r for r in result["records"] if r["lib"] == "jaxnorm"]
  inputs = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in recs))
  by = {(r["norm"], r["pass"], tuple(r["shape"]), r["dtype"]): r for r in recs}
  head = ["case", "pass"] + [_label(s, d).replace(" float32", " f32").replace(" bfloat16", " bf16")
                             for s, d in inputs]
  lines = ["jaxnorm's time in ms (its ratio to flax.linen's):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for norm in NORMS:
    for kind in ("fwd", "fwd+bwd"):
      row = [norm, kind]
      for s, d in inputs:
        r = by.get((norm, kind, s, d))
        ratio = "" if r is None or r["ratio_to_flax"] is None else f" ({r['ratio_to_flax']:.2f}×)"
        row.append("–" if r is None else f"{r['time_ms']:.3g}{ratio}")
      lines.append("| " + " | ".join(row) + " |")
  return lines + [""]


def markdown(result: dict) -> str:
  meta, recs = result["meta"], result["records"]
  libs = meta["libs"]
  lines = [
      f"Run {meta['date']} · jax {meta['jax']} · {meta['backend']} ({meta['device']}, "
      f"{meta['cpu_count']} cores) · mode {meta['mode']} · median of {meta['reps']} "
      f"interleaved rounds. Allocator: "
      f"{' '.join(f'{k}={v}' for k, v in meta.get('allocator_env', {}).items()) or 'default'}.",
      "",
      *summary(result),
      "Times in ms. `×flax`: jaxnorm's time / flax.linen's. `×ew`: time / one elementwise pass "
      "over the same array (floor ≈1 forward, ≈2.5 forward+backward). `temp`: compiled "
      "temporary memory of forward+backward in MiB, jaxnorm / flax.linen.",
      "",
  ]
  groups = {}
  for r in recs:
    groups.setdefault((tuple(r["shape"]), r["dtype"]), []).append(r)
  head = ["case", "pass"] + libs + ["×flax", "×ew", "temp jn/flax"]
  for (shape, dtype), rs in groups.items():
    by = {(r["norm"], r["pass"], r["lib"]): r for r in rs}
    lines += [f"**{_label(shape, dtype)}** (elementwise pass {rs[0]['elementwise_ms']:.3f} ms)",
              "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for norm in NORMS:
      for kind in ("fwd", "fwd+bwd"):
        row = [norm, kind]
        for lib in libs:
          r = by.get((norm, kind, lib))
          row.append(_fmt(None if r is None else r["time_ms"], ".3f"))
        j, fl = by.get((norm, kind, "jaxnorm")), by.get((norm, kind, REF))
        row.append(_fmt(j and j["ratio_to_flax"], ".2f"))
        row.append(_fmt(j and j["ratio_to_elementwise"], ".2f"))
        if kind == "fwd+bwd" and j and fl and j["temp_bytes"] is not None:
          row.append(f"{j['temp_bytes'] / 2**20:.1f} / {fl['temp_bytes'] / 2**20:.1f}")
        else:
          row.append("")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  for f in meta.get("failed_cases", []):
    lines.append(f"- {f['lib']} {f['norm']} {_label(f['shape'], f['dtype'])} did not run: "
                 f"{f['error']}")
  return "\n".join(lines) + "\n"


def chart(result: dict, path: str) -> None:
  """Bar chart: every library's time relative to flax.linen, per case (log scale)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  recs = result["records"]
  libs = result["meta"]["libs"]
  groups = sorted({(tuple(r["shape"]), r["dtype"]) for r in recs}, key=str)
  fig, axes = plt.subplots(len(groups), 1, figsize=(14, 3.2 * len(groups)), squeeze=False)
  columns = [(n, k) for n in NORMS for k in ("fwd", "fwd+bwd")]
  width = 0.8 / len(libs)
  for ax, (shape, dtype) in zip(axes[:, 0], groups, strict=True):
    by = {(r["norm"], r["pass"], r["lib"]): r for r in recs
          if tuple(r["shape"]) == shape and r["dtype"] == dtype}
    for i, lib in enumerate(libs):
      vals = [(by.get((n, k, lib)) or {}).get("ratio_to_flax") or np.nan for n, k in columns]
      ax.bar(np.arange(len(columns)) + i * width, vals, width, label=lib)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{n}\n{k}" for n, k in columns], fontsize=7)
    ax.set_ylabel("time / flax.linen")
    ax.set_title(_label(shape, dtype), fontsize=9)
  axes[0, 0].legend(ncol=len(libs), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  g = ap.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true", help="fewer shapes and rounds (< 3 minutes)")
  g.add_argument("--tiny", action="store_true", help="one small shape, for the test suite")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  ap.add_argument("--libs", default=",".join(LIBS), help="comma-separated subset of the peers")
  ap.add_argument("--norms", default=",".join(NORMS), help="comma-separated subset of the cases")
  ap.add_argument("--hlo", action="store_true",
                  help="print each case's fusion count in the compiled HLO (also in results.json)")
  ap.add_argument("--system-malloc", action="store_true",
                  help="keep glibc's default allocator settings (see the module docstring)")
  args = ap.parse_args(argv)
  mode = "tiny" if args.tiny else "quick" if args.quick else "full"
  libs = tuple(name for name in args.libs.split(",") if name)
  bad = [name for name in libs if name not in LIBS]
  if bad:
    ap.error(f"unknown --libs {bad}; choose from {list(LIBS)}")
  norms = tuple(n for n in args.norms.split(",") if n)
  if any(n not in NORMS for n in norms):
    ap.error(f"unknown --norms {norms}; choose from {list(NORMS)}")
  result = run(mode, args.out, libs, norms, hlo=args.hlo)
  print(markdown(result))
  print(f"wrote {args.out}/results.json, results.md, chart.png "
        f"in {result['meta']['seconds']:.0f} s")


if __name__ == "__main__":
  main()
