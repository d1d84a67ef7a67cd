"""Precision of jaxnorm's moments: the two-pass variance against the one-read formulas.

    python benchmarks/shift_precision.py

On a GPU, batch normalization and layer normalization under differentiation compute their
moments by `jaxnorm._stats.shifted_moments` (docs/guides/internals.md, "One read on GPUs"):
sums about a shift K, the median of each set's first three elements. This runs each formula on
the CPU, in float32, and prints the largest relative error of the variance and absolute error
of the mean against float64, on normal data at offset 0 and 1e4 and on rows whose first
element is an outlier (`1 + 1e-3·N(0, 1)` with `x[0] = 1e3`). "first element" is the shift
that the median replaced (K = x[0], as a reduction that takes its shifts from the data in
order has it): the outlier spoils it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _platform, _stats


def _first_element_shift(x, axes):
  k = jax.lax.index_in_dim(x, 0, axes[0], keepdims=True)
  d = x - k
  n = x.shape[axes[0]]
  return _stats.from_shifted_sums(jnp.squeeze(k, axes), jnp.sum(d, axes), jnp.sum(d * d, axes),
                                  n)


FORMULAS = {
    "two-pass": lambda x, axes: _stats.two_pass(x, None, reduction_axes=axes,
                                                dtype=jnp.float32, policy=_platform.CPU),
    "median shift": lambda x, axes: _stats.shifted_moments(x, axes, jnp.float32),
    "blocks": lambda x, axes: _stats.shifted_moments(x, axes, jnp.float32, blocked=True),
    "first element": _first_element_shift,
}


def cases(rng):
  """(name, x, axes): rows and columns of normal data, and rows led by an outlier."""
  for what, shape, axes in (("rows", (64, 8192), (1,)), ("columns", (8192, 64), (0,))):
    for offset in (0.0, 1e4):
      yield (f"{what} {shape} offset {offset:g}",
             (rng.normal(size=shape) + offset).astype(np.float32), axes)
  for n in (1024, 65536):
    x = 1 + 1e-3 * rng.normal(size=(4, n))
    x[:, 0] = 1e3
    yield f"rows (4, {n}) leading outlier", x.astype(np.float32), (1,)


def main() -> None:
  rng = np.random.default_rng(0)
  print("variance: max relative error; mean: max absolute error (float32 against float64)")
  for name, x, axes in cases(rng):
    var = np.var(x.astype(np.float64), axis=axes)
    mean = x.astype(np.float64).mean(axes)
    cells = []
    for formula, f in FORMULAS.items():
      m = jax.jit(f, static_argnums=1)(x, axes)
      cells.append(f"{formula}: var {np.max(np.abs(np.asarray(m.var, np.float64) - var) / var):.1e}"
                   f" mean {np.max(np.abs(np.asarray(m.mean, np.float64) - mean)):.1e}")
    print(f"{name}: " + " | ".join(cells))


if __name__ == "__main__":
  main()
