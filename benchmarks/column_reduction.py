"""Why exact batch-norm statistics cost more than flax's on XLA:CPU: one reduction, four ways.

    python benchmarks/column_reduction.py [--columns 1024]

Batch norm reduces an (N, C) array over its rows. flax's default variance reduces `x` and `x²`
(`E[x²] - E[x]²`, which cancels when the mean is large against the standard deviation);
jaxnorm's exact two-pass variance reduces `(x - mean)²` after the mean. Both compile to
YNNPACK reduction fusions, but a fusion that broadcasts the per-column mean along the rows runs
slower than one that reads `x` alone. This script times the reductions by themselves, with the
same allocator settings as `benchmarks/run.py` (it restarts itself once on Linux).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import run as _run  # noqa: E402  (restarts this script with run.py's allocator settings)

  if sys.platform == "linux" and "JAXNORM_BENCH_ALLOCATOR" not in os.environ:
    _run._restart_with_allocator_settings()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

CASES = {
    "sum(x)": lambda x, m: x.sum(0),
    "sum(x * x)": lambda x, m: (x * x).sum(0),
    "sum(x), sum(x * x)  [flax's two]": lambda x, m: (x.sum(0), (x * x).sum(0)),
    "sum((x - m)²)  [jaxnorm's second pass]": lambda x, m: ((x - m) ** 2).sum(0),
}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=8192)
  ap.add_argument("--columns", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=21)
  args = ap.parse_args(argv)
  x = jax.random.normal(jax.random.key(0), (args.rows, args.columns))
  m = jnp.full((args.columns,), 0.1)
  fns = {k: jax.jit(f) for k, f in CASES.items()}
  for f in fns.values():
    jax.block_until_ready(f(x, m))
  times = {k: [] for k in fns}
  rng = np.random.default_rng(0)
  for _ in range(args.rounds):
    for k in rng.permutation(list(fns)):
      t = time.perf_counter()
      for _ in range(10):
        jax.block_until_ready(fns[k](x, m))
      times[k].append((time.perf_counter() - t) / 10)
  base = statistics.median(times["sum(x * x)"])
  print(f"{args.rows}x{args.columns} float32, reduced over rows, median of {args.rounds} rounds")
  for k, v in times.items():
    med = statistics.median(v)
    print(f"  {k:42s} {med * 1e3:8.3f} ms   {med / base:5.2f}x sum(x * x)")


if __name__ == "__main__":
  main()
