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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing

if __name__ == "__main__":
  _timing.use_allocator_settings()

import argparse

import jax
import jax.numpy as jnp

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
  med = _timing.medians(_timing.interleaved_samples(
      {k: (jax.jit(f), (x, m)) for k, f in CASES.items()}, args.rounds, 10))
  base = med["sum(x * x)"]
  print(f"{args.rows}x{args.columns} float32, reduced over rows, median of {args.rounds} rounds")
  for k, t in med.items():
    print(f"  {k:42s} {t * 1e3:8.3f} ms   {t / base:5.2f}x sum(x * x)")


if __name__ == "__main__":
  main()
