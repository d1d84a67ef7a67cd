"""Property tests: normalized output has zero mean and unit variance over the valid elements."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnorm as jn
from tests import refs


def _assert_standardized(y, x, axes, mask, valid):
  """Mean 0 and variance 1 over the valid elements of each slice, to the bound of the output
  (`refs.norm_bound` with ε = 0): |mean ŷ| <= mean(b), |var ŷ - 1| <= 2 mean(|y| b) + 2 mean(b²)
  (first order, plus the square of the mean's own error)."""
  _, mean, var = refs.ref_moments(x, axes, mask)
  safe = np.where(np.expand_dims(var, axes) > 0, np.expand_dims(var, axes), 1.0)
  y_ref = (refs.f64(x) - np.expand_dims(mean, axes)) / np.sqrt(safe)
  b = refs.norm_bound(x, y_ref, None, axes, axes, 0.0, mask)
  count = np.maximum(mask.sum(axes), 1)
  avg = lambda a: np.where(mask, a, 0.0).sum(axes) / count
  got_mean = avg(y)
  got_var = avg((y - np.expand_dims(got_mean, axes)) ** 2)
  mean_bound = avg(b)
  var_bound = 2 * avg(np.abs(y_ref) * b) + 2 * avg(b * b) + mean_bound ** 2
  refs.assert_within(got_mean[valid], 0.0, mean_bound[valid] + 1e-12, "mean")
  refs.assert_within(got_var[valid], 1.0, var_bound[valid] + 1e-12, "var")


@st.composite
def problems(draw):
  ndim = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
  axes = tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=1))))
  seed = draw(st.integers(0, 2**31 - 1))
  offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
  rng = np.random.RandomState(seed)
  x = (rng.randn(*shape) * rng.uniform(0.5, 4.0) + offset).astype(np.float32)
  mask = rng.rand(*shape) < draw(st.sampled_from([0.5, 0.8, 1.0]))
  return x, axes, mask


@settings(max_examples=40, deadline=None)
@given(problems())
def test_layer_norm_output_is_standardized_over_valid_elements(problem):
  x, axes, mask = problem
  y = np.asarray(jn.layer_norm(x, reduction_axes=axes, feature_axes=axes, epsilon=0.0,
                               mask=mask), np.float64)
  count = mask.sum(axes)
  valid = count >= 2
  x64 = np.where(mask, x, 0.0).astype(np.float64)
  x_mean = x64.sum(axes, keepdims=True) / np.maximum(mask.sum(axes, keepdims=True), 1)
  spread = np.where(mask, x64 - x_mean, 0.0)
  valid &= (spread**2).sum(axes) / np.maximum(count, 1) > 1e-2  # not a constant slice
  _assert_standardized(y, x, axes, mask, valid)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_batch_norm_training_output_is_standardized_per_feature(problem):
  x, axes, mask = problem
  feat = tuple(a for a in range(x.ndim) if a not in axes)
  fshape = tuple(x.shape[a] for a in feat)
  y, state = jn.batch_norm(x, jn.batch_norm_init(fshape), training=True, feature_axes=feat,
                           epsilon=0.0, mask=mask, momentum=0.0)
  y = np.asarray(y, np.float64)
  count = mask.sum(axes)
  valid = (count >= 2) & (np.asarray(state.var) > 1e-2)
  _assert_standardized(y, x, axes, mask, valid)
  # momentum=0 stores exactly the batch statistics where the batch had a valid element.
  assert np.all(np.asarray(state.var)[count == 0] == 1.0)
