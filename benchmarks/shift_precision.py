"""Precision of jaxnorm's moments: the two-pass variance against the one-read formulas.

    python benchmarks/shift_precision.py

On a GPU, batch normalization computes its moments by `jaxnorm._stats.shifted_moments` and
layer normalization under differentiation by `jaxnorm._stats.streamed_moments`
(docs/guides/internals.md, "One read on GPUs"); this runs each formula on the CPU, in float32, on
normal data at offset 0 and 1e4, and prints the largest relative error of the variance and
absolute error of the mean against float64. XLA:CPU runs the streamed reduction in order, one
long sequential sum about each set's first element: its worst order. A GPU's reduction sums
short runs in each thread and merges the threads' partial results in a tree; "streamed, runs"
merges the same partial results in that order (runs of 32 elements), here on the CPU.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _platform, _stats

FORMULAS = {
    "two-pass": lambda x, axes: _stats.reduce(x, axes, None, None, None, jnp.float32, True,
                                              policy=_platform.CPU),
    "one shift": lambda x, axes: _stats.shifted_moments(x, axes, jnp.float32),
    "blocks": lambda x, axes: _stats.shifted_moments(x, axes, jnp.float32, blocked=True),
    "streamed": lambda x, axes: _stats.streamed_moments(x, axes, jnp.float32),
    "streamed, runs": lambda x, axes: _streamed_in_runs(x, axes[0]),
}


def _streamed_in_runs(x, axis, run=32):
  """The moments of `streamed_moments` with its merges in a GPU's order: sequential runs of
  `run` elements, then a tree of the runs' partial results."""
  x = jnp.moveaxis(x, axis, -1)
  n = x.shape[-1]
  x = x.reshape(x.shape[:-1] + (n // run, run))
  parts = _stats.shifted_partials(x, (x.ndim - 1,))
  while parts[0].shape[-1] > 1:
    parts = _stats.merge_shifted(tuple(p[..., 0::2] for p in parts),
                                  tuple(p[..., 1::2] for p in parts))
  k, s1, s2, _ = (p[..., 0] for p in parts)
  return _stats.moments_about(k, s1, s2, n)


def main() -> None:
  rng = np.random.default_rng(0)
  print("variance: max relative error; mean: max absolute error (float32 against float64)")
  for what, shape, axes in (("rows", (64, 8192), (1,)), ("columns", (8192, 64), (0,))):
    for offset in (0.0, 1e4):
      x = (rng.normal(size=shape) + offset).astype(np.float32)
      var = np.var(x.astype(np.float64), axis=axes)
      mean = x.astype(np.float64).mean(axes)
      cells = []
      for name, f in FORMULAS.items():
        m = jax.jit(f, static_argnums=1)(x, axes)
        cells.append(f"{name}: var {np.max(np.abs(np.asarray(m.var, np.float64) - var) / var):.1e}"
                     f" mean {np.max(np.abs(np.asarray(m.mean, np.float64) - mean)):.1e}")
      print(f"{what:7s} {shape} offset {offset:g}: " + " | ".join(cells))


if __name__ == "__main__":
  main()
