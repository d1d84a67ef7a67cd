"""Inputs, per-class settings and comparison helpers shared by the Flax wrapper tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import jaxcompat

NAMES = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
# NAMES for the tests of flax.nnx's layers: flax.nnx.InstanceNorm, and jaxnorm.nnx's with it,
# exist from flax 0.12.0 (skipped, with that reason, on an older flax).
NNX_NAMES = (*NAMES[:-1], pytest.param("InstanceNorm", marks=jaxcompat.NEEDS_FLAX_INSTANCE_NORM))
SHAPE = (8, 5, 6)  # (batch, length, channels)
CHANNELS = SHAPE[-1]

# Random initializers (not ones/zeros) so that identical init trees prove the same RNG draws.
_INITS = dict(scale_init=jax.nn.initializers.uniform(2.0),
              bias_init=jax.nn.initializers.normal(0.5))

# Extra constructor arguments of each class (the same for flax and for jaxnorm).
KWARGS = {
    "BatchNorm": dict(momentum=0.9, **_INITS),
    "LayerNorm": dict(**_INITS),
    "RMSNorm": dict(scale_init=_INITS["scale_init"]),
    "GroupNorm": dict(num_groups=3, **_INITS),
    "InstanceNorm": dict(**_INITS),
}


def standard_promotion():
  """flax itself mixes dtypes implicitly, so it runs under standard promotion (the test suite
  enables strict promotion, under which jaxnorm's wrappers run)."""
  return jax.numpy_dtype_promotion("standard")


def data(dtype=jnp.float32, seed=0, offset=0.5, shape=SHAPE) -> jax.Array:
  """Well-conditioned input: std 1.5 around `offset`."""
  x = np.random.RandomState(seed).randn(*shape) * 1.5 + offset
  return jnp.asarray(x.astype(np.float32)).astype(dtype)


def mask(seed=1, shape=SHAPE) -> jax.Array:
  """About 70% valid, with every row, column and group of every reduction non-empty."""
  m = np.random.RandomState(seed).rand(*shape) > 0.3
  m[..., 0] = True
  m[:, 0, :] = True
  m[0] = True
  return jnp.asarray(m)


def assert_close(ours, theirs, atol=1e-5):
  """Same dtype and shape; values equal to `atol` (float32) or to one ulp (narrower)."""
  ours, theirs = jnp.asarray(ours), jnp.asarray(theirs)
  assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  rtol = 1e-5 if jnp.finfo(ours.dtype).bits >= 32 else 2.0 ** -(jnp.finfo(ours.dtype).nmant)
  np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64),
                             rtol=rtol, atol=atol)


def assert_trees_close(ours, theirs, atol=1e-5):
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    assert_close(a, b, atol)


def assert_trees_identical(a, b):
  """Same structure, shapes, dtypes and bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype and u.shape == v.shape, (u.dtype, v.dtype, u.shape, v.shape)
    np.testing.assert_array_equal(np.atleast_1d(u).view(np.uint8), np.atleast_1d(v).view(np.uint8))


def uneven(n_dev=4, rows=8, seed=3):
  """Per-device inputs (n_dev, rows, 3), device i around 2i, and a mask (n_dev, rows, 1) with
  2, 4, 6, ... valid rows: a mean of per-device means is far from the true mean."""
  x = np.random.RandomState(seed).randn(n_dev, rows, 3) * 2 + 2.0 * np.arange(n_dev)[:, None, None]
  x = x.astype(np.float32)
  valid = np.array([2 * (i + 1) for i in range(n_dev)])
  m = np.arange(rows)[None, :] < valid[:, None]
  return jnp.asarray(x), jnp.asarray(m[..., None])

