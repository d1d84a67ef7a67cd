"""Every platform's branch of the statistics, run on the CPU through its policy, against float64
on adversarial input.

`_fused.Reduction.moments` is where a normalizer's statistics take the policy's algorithm: the
two-pass variance (`_stats.two_pass`), or on a GPU (and, for wide float32 rows, a TPU) the
one-read sums about a shift (`_stats.shifted_moments`). Random normal data hides the cases
that spoil a one-read variance, so each branch meets: a leading outlier (the first element of
every set 1e6 times the spread away), a common offset of 1e4, constant sets, one huge element,
magnitudes of 1e-15 and 1e15, sets of 65536 elements, and masks that leave one element.

Every branch stays within the two-pass variance's bound (`refs.var_error`, `refs.mean_error`),
which holds for every order of summation. The one-read sums' own bound (`refs.shifted_errors`,
also order-free) is asserted too, and on these inputs it stays within 4 times the two-pass one:
the shift, the median of three leading elements, is never an outlier.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import _fused, _platform, _stats
from tests import refs

POLICIES = {p.name: p for p in (_platform.CPU, _platform.GPU, _platform.TPU, _platform.OTHER)}


def _rows(kind, n, rows=3, seed=0):
  """Adversarial rows of n elements (float32)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(rows, n))
  if kind == "leading outlier":
    x = 1 + 1e-3 * z
    x[:, 0] = 1e3
  elif kind == "offset 1e4":
    x = 1e4 + z
  elif kind == "constant":
    x = np.full((rows, n), 1e4 + 0.5)
  elif kind == "one huge element":
    x = z.copy()
    x[:, n // 3] = 1e15
  elif kind == "tiny":
    x = 1e-15 * (1 + z)
  elif kind == "huge":
    x = 1e15 * (1 + z)
  else:
    raise ValueError(kind)
  return x.astype(np.float32)


KINDS = ("leading outlier", "offset 1e4", "constant", "one huge element", "tiny", "huge")


def _check(m, x, axes, shifted_bound=None):
  """The moments `m` of `x` over `axes` within the two-pass bound (and the one-read bound)."""
  count, mean, var = refs.ref_moments(x, axes)
  np.testing.assert_array_equal(m.count, count)
  refs.assert_within(m.mean, mean, refs.mean_error(x, axes), "mean")
  refs.assert_within(m.var, var, refs.var_error(x, axes), "var")
  assert np.all(np.asarray(m.var) >= 0)
  if shifted_bound is not None:
    mean_err, var_err = shifted_bound
    refs.assert_within(m.mean, mean, mean_err, "mean (one-read bound)")
    refs.assert_within(m.var, var, var_err, "var (one-read bound)")
    assert np.all(var_err <= 4 * refs.var_error(x, axes))


def _moments(policy, axes, features, x, groups=None, mask=None):
  r = _fused.Reduction(axes, features, x.shape, None, None, True, groups, jnp.float32, policy)
  f = jax.jit(lambda x, mask: r.moments(x, mask, differentiated=True))
  return f(jnp.asarray(x), mask)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [96, 65536])
def test_rows_under_differentiation(policy, kind, n):
  """Layer normalization's statistics of each row (its branch under differentiation)."""
  p = POLICIES[policy]
  x = _rows(kind, n)
  m = _moments(p, (1,), (1,), x)
  one_read = p.rows_take(n, x.dtype) == "shifted"
  _check(m, x, (1,), refs.shifted_errors(x, (1,)) if one_read else None)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [96, 4096])
def test_batch_statistics(policy, kind, n):
  """Batch normalization's statistics of each column (blocks of the batch where shifted)."""
  p = POLICIES[policy]
  x = np.ascontiguousarray(_rows(kind, n, rows=4).T)
  m = _moments(p, (0,), (1,), x)
  blocks = _stats.shift_blocks(n)
  one_read = p.column_moments == "shifted"
  _check(m, x, (0,), refs.shifted_errors(x, (0,), blocks=blocks) if one_read else None)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("kind", KINDS)
def test_group_statistics_of_images(policy, kind):
  """Group normalization of channels-last images: 2 groups of 3 channels over 16x32
  positions, the adversarial values along the positions of every channel."""
  p = POLICIES[policy]
  x = _rows(kind, 16 * 32, rows=2 * 6, seed=3).reshape(2, 6, 16, 32).transpose(0, 2, 3, 1)
  x = np.ascontiguousarray(x)
  m = _moments(p, (1, 2, 3), (3,), x, groups=2)
  xg = x.reshape(2, 16, 32, 2, 3)
  one_read = p.column_moments == "shifted"
  bound = refs.shifted_errors(xg, (1, 2, 4), sample_axes=(1, 2)) if one_read else None
  _check(m, xg, (1, 2, 4), bound)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("axes", [(1,), (0,)])
def test_masks_that_leave_one_element(policy, axes):
  """A mask that leaves one element of each set (NaN in the rest): every branch takes the
  two-pass variance, whose result is that element with variance 0."""
  p = POLICIES[policy]
  x = _rows("leading outlier", 64, rows=4)
  keep = np.zeros((4, 64), bool)
  keep[np.arange(4), [0, 5, 17, 63]] = True
  if axes == (0,):
    x, keep = np.ascontiguousarray(x.T), np.ascontiguousarray(keep.T)
  x = np.where(keep, x, np.nan).astype(np.float32)
  m = _moments(p, axes, tuple(1 - a for a in axes), x, mask=jnp.asarray(keep))
  np.testing.assert_array_equal(m.count, 1.0)
  np.testing.assert_array_equal(m.mean, np.nansum(x, axis=axes[0]))
  np.testing.assert_array_equal(m.var, 0.0)
