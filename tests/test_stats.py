"""moments and merge_moments against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from tests import jaxcompat, refs


def _x(shape, offset=0.0, seed=0):
  return (np.random.RandomState(seed).randn(*shape) + offset).astype(np.float32)


@pytest.mark.parametrize("axes", [0, -1, (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_moments_match_float64(axes, masked):
  x = _x((6, 5, 4), offset=3.0)
  mask = np.random.RandomState(1).rand(6, 5, 4) > 0.3 if masked else None
  m = jn.moments(x, axes, mask=mask)
  n, mean, var = refs.ref_moments(x, axes, mask)
  np.testing.assert_array_equal(m.count, n)
  refs.assert_within(m.mean, mean, refs.mean_error(x, axes, mask), "mean")
  refs.assert_within(m.var, var, refs.var_error(x, axes, mask), "var")
  assert m.count.dtype == jnp.float32 and m.mean.dtype == jnp.float32
  assert m.mean.shape == m.var.shape == m.count.shape == np.asarray(mean).shape


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_moments_have_no_cancellation_at_large_offsets(offset):
  x = _x((256, 8), offset=offset)
  m = jn.moments(x, 0)
  _, mean, var = refs.ref_moments(x, 0)
  # E[x²] - E[x]² in float32 would be off by O(offset² · 6e-8), i.e. 0.06 at 1e3, 6 at 1e4;
  # the two-pass bound is ~1e-4 at 1e3 and ~2e-3 at 1e4 (tests/test_bounds.py checks both).
  refs.assert_within(m.var, var, refs.var_error(x, 0), "var")
  refs.assert_within(m.mean, mean, refs.mean_error(x, 0), "mean")


def test_masked_positions_may_hold_nan():
  x = _x((8, 6))
  mask = np.arange(8)[:, None] < 5
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  m = jn.moments(poisoned, 0, mask=mask)
  n, mean, var = refs.ref_moments(x, 0, mask)
  refs.assert_within(m.mean, mean, refs.mean_error(x, 0, mask), "mean")
  refs.assert_within(m.var, var, refs.var_error(x, 0, mask), "var")
  np.testing.assert_array_equal(m.count, n)


def test_all_masked_reduction_is_finite_zero():
  x = np.full((4, 3), np.nan, np.float32)
  m = jn.moments(x, 0, mask=np.zeros((4, 1), bool))
  np.testing.assert_array_equal(m.count, 0.0)
  np.testing.assert_array_equal(m.mean, 0.0)
  np.testing.assert_array_equal(m.var, 0.0)


def test_variance_is_never_negative_for_constant_input():
  x = np.full((1000, 3), 1e4 + 0.1, np.float32)
  m = jn.moments(x, 0)
  assert np.all(np.asarray(m.var) >= 0.0)
  # Only the float32 error of the mean remains: var <= error² (true variance 0). A constant
  # input rounds the same way at every step, so only the worst-case sum bound applies.
  assert np.all(np.asarray(m.var) <= refs.var_error(x, 0, worst=True))
  assert np.all(np.asarray(m.var) <= refs.mean_error(x, 0, worst=True) ** 2 * (1 + 1e-3))


def test_low_precision_input_accumulates_in_float32():
  x = (np.random.RandomState(0).randn(512, 4) + 20.0).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  m = jn.moments(xb, 0)
  assert m.mean.dtype == jnp.float32
  x32 = np.asarray(xb.astype(jnp.float32))
  _, mean, var = refs.ref_moments(x32, 0)
  # float32 accumulation: the float32 bounds (bfloat16's would be 2**16 times larger).
  refs.assert_within(m.mean, mean, refs.mean_error(x32, 0), "mean")
  refs.assert_within(m.var, var, refs.var_error(x32, 0), "var")


def test_dtype_argument_raises_accumulation_precision():
  with jaxcompat.enable_x64(True):
    x = jnp.asarray(_x((16, 3), offset=1e4))
    m = jn.moments(x, 0, dtype=jnp.float64)
    assert m.mean.dtype == jnp.float64 and m.count.dtype == jnp.float32
    _, _, var = refs.ref_moments(np.asarray(x), 0)
    refs.assert_within(m.var, var, refs.var_error(np.asarray(x), 0, dtype=np.float64), "var")
  # A narrower request is promoted to float32 (statistics never run below float32).
  assert jn.moments(_x((4, 2)), 0, dtype=jnp.bfloat16).mean.dtype == jnp.float32


@pytest.mark.parametrize("split", [0, 1, 7, 12])
def test_merge_moments_equals_moments_of_concatenation(split):
  x = _x((12, 3), offset=1e4)
  whole = jn.moments(x, 0)
  merged = jn.merge_moments(jn.moments(x[:split], 0), jn.moments(x[split:], 0))
  np.testing.assert_array_equal(merged.count, whole.count)
  parts = [x[:split], x[split:]]
  mean_err, var_err = refs.merge_error(
      refs.ref_moments(parts[0], 0), (refs.mean_error(parts[0], 0), refs.var_error(parts[0], 0)),
      refs.ref_moments(parts[1], 0), (refs.mean_error(parts[1], 0), refs.var_error(parts[1], 0)))
  _, mean, var = refs.ref_moments(x, 0)
  refs.assert_within(merged.mean, mean, mean_err, "merged mean")
  refs.assert_within(merged.var, var, var_err, "merged var")
  # ... and so within the sum of both bounds of the moments of the concatenation.
  refs.assert_within(merged.mean, whole.mean, mean_err + refs.mean_error(x, 0), "vs whole")
  refs.assert_within(merged.var, whole.var, var_err + refs.var_error(x, 0), "vs whole")


def test_merge_with_empty_side_is_neutral_and_empty_pair_is_finite():
  x = _x((5, 2))
  a = jn.moments(x, 0)
  empty = jn.moments(x, 0, mask=np.zeros((5, 1), bool))
  for merged in (jn.merge_moments(a, empty), jn.merge_moments(empty, a)):
    # mean_a + (mean_b - mean_a)·w with w = 0 or 1 and the other mean 0: exact.
    np.testing.assert_array_equal(merged.mean, a.mean)
    # (n_a var_a) / n_a: a product and a division.
    refs.assert_within(merged.var, a.var, 2 * refs.U32 * np.abs(np.asarray(a.var)), "var")
    np.testing.assert_array_equal(merged.count, a.count)
  both = jn.merge_moments(empty, empty)
  np.testing.assert_array_equal(both.mean, 0.0)
  np.testing.assert_array_equal(both.var, 0.0)


def test_moments_is_a_pytree_usable_under_jit_and_vmap():
  x = _x((3, 10, 4))
  m = jax.jit(jax.vmap(lambda v: jn.moments(v, 0)))(x)
  assert isinstance(m, jn.Moments) and m.mean.shape == (3, 4)
  _, mean, _ = refs.ref_moments(x, 1)
  refs.assert_within(m.mean, mean, refs.mean_error(x, 1), "mean")
