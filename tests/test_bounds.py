"""The error bounds of tests/refs.py hold, and they are tight enough to reject wrong formulas.

Every numerical test derives its tolerance from these bounds, so a bound that is too loose
would let a wrong formula pass everywhere. Here each known-wrong formula (flax's default
`E[x²] - E[x]²`, a mean of per-device means, a count off by one), evaluated in float32 on the
data of the tests that guard against it, must fall outside the bound that the right formula
must meet; and the bounds must hold for summation orders XLA does not even use.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from tests import refs

# The uneven per-device valid rows of tests/test_cross_device.py (device 0 holds none).
VALID = [0, 4, 1, 3, 2, 4, 1, 2]


def _offset_data(offset, shape=(256, 8), seed=0, scale=1.0):
  """The data of tests/test_stats.py's large-offset test."""
  return (np.random.RandomState(seed).randn(*shape) * scale + offset).astype(np.float32)


def _fast_var(x, axis):
  """flax's default (use_fast_variance=True): E[x²] - E[x]², in float32."""
  x = jnp.asarray(x, jnp.float32)
  return np.asarray(jnp.mean(x * x, axis) - jnp.mean(x, axis) ** 2, np.float64)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_fast_variance_at_large_offsets_is_outside_the_two_pass_bound(offset):
  x = _offset_data(offset)
  _, _, var = refs.ref_moments(x, 0)
  bound = refs.var_error(x, 0)
  assert np.all(bound < 1e-2 * var)  # the bound itself: ~1e-4 (1e3) and ~2e-3 (1e4) relative
  assert np.all(np.abs(_fast_var(x, 0) - var) > bound)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_layer_norm_with_the_fast_variance_is_outside_the_output_bound(offset):
  x = _offset_data(offset, shape=(32, 64))  # tests/test_normalize.py's large-offset case
  ref = refs.ref_layer_norm(x)
  xf = jnp.asarray(x)
  mean = jnp.mean(xf, -1, keepdims=True)
  var = jnp.maximum(jnp.asarray(_fast_var(x, -1), jnp.float32)[:, None], 0.0)
  wrong = np.asarray((xf - mean) / jnp.sqrt(var + 1e-6), np.float64)
  assert (np.abs(wrong - ref) > refs.norm_bound(x, ref)).any()


def _uneven():
  """The global batch of tests/test_cross_device.py's moments test: 8 devices of 4 rows."""
  rng = np.random.RandomState(0)
  x = (rng.randn(32, 3) * [1.0, 0.5, 2.0] + 1e4).astype(np.float32)
  mask = np.concatenate([np.arange(4) < k for k in VALID])[:, None]
  return x, mask


def test_a_mean_of_per_device_means_is_outside_the_mean_bound():
  x, mask = _uneven()
  _, mean, var = refs.ref_moments(x, 0, mask)
  bound = refs.mean_error(x, 0, mask)
  per_device = [refs.ref_moments(x[4 * d:4 * d + 4], 0, mask[4 * d:4 * d + 4]) for d in range(8)]
  # flax's cross-device mean: the average of the devices' means (pmean), an empty device's
  # mean counting as 0; and the kinder variant that skips empty devices.
  pmean = np.mean([m for _, m, _ in per_device], 0)
  skip_empty = np.mean([m for n, m, _ in per_device if n.all()], 0)
  assert np.all(np.abs(pmean - mean) > bound)
  assert np.all(np.abs(skip_empty - mean) > bound)
  # The variance of a mean of per-device second moments about the mean of means.
  ex2 = np.mean([v + m * m for n, m, v in per_device if n.all()], 0)
  assert np.all(np.abs(ex2 - skip_empty**2 - var) > refs.var_error(x, 0, mask))


def test_a_count_off_by_one_is_outside_the_mean_bound():
  x = _offset_data(1e4)
  n = x.shape[0]
  _, mean, _ = refs.ref_moments(x, 0)
  assert np.all(np.abs(mean * n / (n - 1) - mean) > refs.mean_error(x, 0))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_sum_bounds_hold_for_sequential_float32_sums(offset):
  """A sequential float32 sum (the deepest tree: n - 1 levels) stays within both bounds."""
  x = (np.random.RandomState(1).randn(4096) * 3.0 + offset).astype(np.float32)
  seq = np.cumsum(x, dtype=np.float32)[-1]
  err = abs(float(seq) - refs.f64(x).sum())
  abs_sum = np.abs(refs.f64(x)).sum()
  assert err <= refs.sum_factor(x.size, worst=True) * abs_sum
  assert err <= refs.sum_factor(x.size) * abs_sum
  # ... and the probabilistic bound is the tighter one at this size.
  assert refs.sum_factor(x.size) < refs.sum_factor(x.size, worst=True) / 10


def test_unit_roundoffs():
  assert refs.unit_roundoff(jnp.float32) == 2.0**-24 == refs.U32
  assert refs.unit_roundoff(jnp.bfloat16) == 2.0**-8
  assert refs.unit_roundoff(jnp.float16) == 2.0**-11
  assert refs.sum_factor(1) == 0.0
  assert refs.sum_factor(3, worst=True) == pytest.approx(2 * 2.0**-24)
