"""Every normalizer against a float64 NumPy reference on generated inputs.

Hypothesis draws the rank (1-4), a shape from a small fixed set per rank (size-1 axes
included; few shapes, so that XLA's compilations repeat), the reduction and feature axes, a
mask of a random shape that broadcasts to the input (possibly with no valid element in a whole
reduction), NaN or Inf at masked positions, the dtype (float32, bfloat16, float16 where XLA:CPU
compiles it), an offset up to 1e4 and a spread from 1e-3 to 1e3. Each result must be within the
bound of `tests/refs.py` evaluated on the drawn data, at every position whose input is finite:
masked positions are normalized with the same statistics, so a NaN that leaked into them would
show everywhere. Outputs too large for the dtype (a reduction with no valid element normalizes
with variance 0: x / sqrt(ε)) may be infinite; all others must be finite.

Profiles (tests/conftest.py): "ci" by default, `HYPOTHESIS_PROFILE=long` for many more examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

import jaxnorm as jn
from tests import refs

# NaN and Inf at masked positions make the float64 reference's arithmetic there warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SHAPES = {
    1: [(1,), (6,)],
    2: [(1, 4), (5, 3), (3, 1)],
    3: [(2, 3, 4), (1, 5, 2), (3, 1, 2)],
    4: [(2, 1, 3, 2), (1, 2, 2, 3)],
}
OFFSETS = (0.0, 1.0, -37.5, 1e4)
SPREADS = (1e-3, 1.0, 1e3)
EPSILONS = (1e-6, 1e-3, 0.1)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dtypes():
  return st.sampled_from(DTYPES if refs.float16_compiles() else DTYPES[:2])


@st.composite
def _axes(draw, ndim, min_size=1):
  return tuple(sorted(draw(st.sets(st.integers(0, ndim - 1), min_size=min_size,
                                   max_size=ndim))))


class Problem:
  """One drawn input: x (in its dtype, NaN/Inf at some masked positions), its float64 values,
  the mask as given (None or a shape that broadcasts), and the mask broadcast to x."""

  def __init__(self, x, mask, epsilon):
    self.x = x
    self.x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    self.mask = mask
    self.full = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    self.epsilon = epsilon
    self.dtype = jnp.asarray(x).dtype

  def __repr__(self):
    return (f"Problem(x={self.x64.tolist()!r} ({self.dtype}), mask="
            f"{None if self.mask is None else np.asarray(self.mask).tolist()!r}, "
            f"epsilon={self.epsilon})")


def make_problem(shape, dtype=jnp.float32, offset=0.0, spread=1.0, seed=0, mask_shape=None,
                 p_valid=1.0, poison=False, epsilon=1e-6, values=None):
  """A `Problem` from its description (what the strategy draws, and what @example gives:
  there `values` may give x's values outright)."""
  rng = np.random.RandomState(seed)
  x = (offset + spread * rng.randn(*shape)).astype(np.float32)
  if values is not None:
    x = np.asarray(values, np.float32).reshape(shape)
  mask = None
  if mask_shape is not None:
    mask = rng.rand(*mask_shape) < p_valid
    if poison:
      bad = ~np.broadcast_to(mask, shape)
      x = np.where(bad, rng.choice([np.nan, np.inf, -np.inf], size=shape), x)
  return Problem(jnp.asarray(x).astype(dtype), mask, epsilon)


@st.composite
def problems(draw, min_rank=1):
  ndim = draw(st.integers(min_rank, 4))
  shape = draw(st.sampled_from(SHAPES[ndim]))
  mask_shape = None
  if draw(st.integers(0, 3)) > 0:  # three in four examples have a mask
    dims = [draw(st.sampled_from(sorted({d, 1}))) for d in shape]
    mask_shape = tuple(dims[draw(st.integers(0, ndim)):])
  return make_problem(shape, draw(_dtypes()), draw(st.sampled_from(OFFSETS)),
                      draw(st.sampled_from(SPREADS)), draw(st.integers(0, 2**16)), mask_shape,
                      draw(st.sampled_from((0.0, 0.3, 0.7, 1.0))), draw(st.booleans()),
                      draw(st.sampled_from(EPSILONS)))


def _pick(data, strategy, default):
  """`data.draw(strategy)`, or `default` in an explicit @example (which passes data=None)."""
  return default if data is None else data.draw(strategy)


def _params(fshape, seed, with_scale=True, with_bias=True):
  rng = np.random.RandomState(seed + 1)
  scale = np.asarray(rng.uniform(-2, 2, fshape), np.float32) if with_scale else None
  bias = np.asarray(rng.randn(*fshape), np.float32) if with_bias else None
  return scale, bias


def _events(p, red):
  """Labels for `--hypothesis-show-statistics`: what the example exercised."""
  event(f"dtype {p.dtype}")
  if p.mask is None:
    event("no mask")
  else:
    event("mask of x's shape" if np.shape(p.mask) == p.x.shape else "mask broadcast to x")
    if (p.full.sum(red) == 0).any():
      event("a reduction with no valid element")
    if not np.isfinite(p.x64).all():
      event("NaN/Inf at masked positions")
  if np.abs(p.x64[np.isfinite(p.x64)]).max(initial=0.0) > 1e3:
    event("|x| > 1e3")


def _check_output(p, y, ref, bound, what="y"):
  """y has x's dtype and shape; where x is finite, y is within `bound` of `ref`, and finite
  where `ref` fits in the dtype."""
  y = jnp.asarray(y)
  assert y.dtype == p.dtype and y.shape == p.x.shape, (y.dtype, y.shape)
  y = np.asarray(y.astype(jnp.float32), np.float64)
  finite_x = np.isfinite(p.x64)
  fits = np.abs(ref) < float(jnp.finfo(p.dtype).max) * (1 - refs.unit_roundoff(p.dtype))
  where = finite_x & fits
  note(f"worst ratio {np.max(np.where(where, np.abs(y - ref) / np.maximum(bound, 1e-300), 0))}")
  refs.assert_within(y[where], ref[where], bound[where], what)


def _fshape(shape, feat):
  return tuple(shape[a] for a in feat)


# Jitted entry points with the axes static: one compilation per (shape, axes, dtype), reused
# by every example that draws the same configuration.
_layer_norm = jax.jit(jn.layer_norm,
                      static_argnames=("reduction_axes", "feature_axes", "epsilon"))
_rms_norm = jax.jit(jn.rms_norm, static_argnames=("reduction_axes", "feature_axes", "epsilon"))
_group_norm = jax.jit(jn.group_norm, static_argnames=("num_groups", "epsilon"))
_instance_norm = jax.jit(jn.instance_norm, static_argnames=("feature_axes", "epsilon"))
_normalize = jax.jit(jn.normalize, static_argnames=("reduction_axes", "feature_axes", "epsilon"))
_moments = jax.jit(jn.moments, static_argnames=("reduction_axes",))
_batch_norm = jax.jit(jn.batch_norm, static_argnames=("training", "feature_axes", "momentum",
                                                      "epsilon"))
_batch_renorm = jax.jit(jn.batch_renorm, static_argnames=("training", "feature_axes",
                                                          "momentum", "epsilon"))


# --- layer, RMS, group and instance normalization ----------------------------------------------

@given(problems(), st.data())
@example(make_problem((3, 1), mask_shape=(1,), p_valid=0.0, poison=True), None)
def test_layer_norm(p, data):
  ndim = p.x.ndim
  red = _pick(data, _axes(ndim), (ndim - 1,))
  feat = _pick(data, _axes(ndim), (ndim - 1,))
  scale, bias = _params(_fshape(p.x.shape, feat), ndim)
  y = _layer_norm(p.x, scale, bias, reduction_axes=red, feature_axes=feat, epsilon=p.epsilon,
                  mask=p.mask)
  ref = refs.ref_layer_norm(p.x64, scale, bias, red, feat, p.epsilon, p.full)
  bound = refs.norm_bound(p.x64, ref, scale, red, feat, p.epsilon, p.full, out_dtype=p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)


@given(problems(), st.data())
# Found by the long profile: a float16 output below float16's smallest normal number (6.1e-5)
# is rounded to a multiple of 2^-24, an absolute error that refs.output_error now includes.
@example(make_problem((1,), jnp.float16 if refs.float16_compiles() else jnp.float32,
                      values=[5.054473876953125e-05], epsilon=0.1), None)
def test_rms_norm(p, data):
  ndim = p.x.ndim
  red = _pick(data, _axes(ndim), (ndim - 1,))
  feat = _pick(data, _axes(ndim), (ndim - 1,))
  scale, _ = _params(_fshape(p.x.shape, feat), ndim, with_bias=False)
  y = _rms_norm(p.x, scale, reduction_axes=red, feature_axes=feat, epsilon=p.epsilon,
                mask=p.mask)
  ref = refs.ref_rms_norm(p.x64, scale, red, feat, p.epsilon, p.full)
  bound = refs.norm_bound(p.x64, ref, scale, red, feat, p.epsilon, p.full, centered=False,
                          out_dtype=p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)


@given(problems(min_rank=2), st.data())
def test_group_norm(p, data):
  c = p.x.shape[-1]
  groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
  scale, bias = _params((c,), groups)
  y = _group_norm(p.x, scale, bias, num_groups=groups, epsilon=p.epsilon, mask=p.mask)
  ref = refs.ref_group_norm(p.x64, groups, scale, bias, p.epsilon, p.full)
  bound = refs.group_norm_bound(p.x64, ref, groups, scale, p.epsilon, p.full, out_dtype=p.dtype)
  _events(p, tuple(range(1, p.x.ndim)))
  _check_output(p, y, ref, bound)


@given(problems(min_rank=2), st.data())
def test_instance_norm(p, data):
  ndim = p.x.ndim
  feat = tuple(sorted(data.draw(st.sets(st.integers(1, ndim - 1), min_size=1))))
  red = tuple(a for a in range(1, ndim) if a not in feat)
  scale, bias = _params(_fshape(p.x.shape, feat), ndim)
  y = _instance_norm(p.x, scale, bias, feature_axes=feat, epsilon=p.epsilon, mask=p.mask)
  ref = refs.ref_layer_norm(p.x64, scale, bias, red, feat, p.epsilon, p.full)
  bound = refs.norm_bound(p.x64, ref, scale, red, feat, p.epsilon, p.full, out_dtype=p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)


@given(problems(), st.data())
def test_normalize_with_given_statistics(p, data):
  ndim = p.x.ndim
  red, feat = data.draw(_axes(ndim)), data.draw(_axes(ndim))
  stat_shape = tuple(d for i, d in enumerate(p.x.shape) if i not in red)
  rng = np.random.RandomState(ndim + len(red))
  scale_of_x = max(float(np.nanmax(np.abs(np.where(np.isfinite(p.x64), p.x64, 0)))), 1e-3)
  mean = (rng.uniform(-1, 1, stat_shape) * scale_of_x).astype(np.float32)
  var = (rng.uniform(0, 2, stat_shape) * scale_of_x ** 2 * (rng.rand(*stat_shape) < 0.8))
  var = var.astype(np.float32)
  scale, bias = _params(_fshape(p.x.shape, feat), ndim)
  y = _normalize(p.x, mean, var, scale, bias, reduction_axes=red, feature_axes=feat,
                 epsilon=p.epsilon)
  ref = refs.ref_normalize(p.x64, mean, var, scale, bias, red, feat, p.epsilon)
  zero = np.zeros(stat_shape)
  bound = refs.output_error(p.x64, mean, var, zero, zero, scale, ref, red, feat, p.epsilon,
                            p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)


# --- statistics --------------------------------------------------------------------------------

def _check_moments(m, p, red, what):
  n, mean, var = refs.ref_moments(p.x64, red, p.full)
  assert m.mean.dtype == jnp.float32 and m.var.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(m.count), n, what + ": count")
  refs.assert_within(m.mean, mean, refs.mean_error(p.x64, red, p.full), what + ": mean")
  refs.assert_within(m.var, var, refs.var_error(p.x64, red, p.full), what + ": var")
  assert np.all(np.asarray(m.var) >= 0)


@given(problems(), st.data())
def test_moments(p, data):
  red = data.draw(_axes(p.x.ndim))
  _events(p, red)
  _check_moments(_moments(p.x, reduction_axes=red, mask=p.mask), p, red, "moments")


@given(problems(), st.data())
def test_merge_moments_of_two_parts_is_the_whole(p, data):
  """The two parts split one reduction axis (or, where it has size 1, are the same elements
  under complementary masks)."""
  ndim = p.x.ndim
  red = data.draw(_axes(ndim))
  axis = data.draw(st.sampled_from(red))
  size = p.x.shape[axis]
  x, full = jnp.asarray(p.x), p.full
  if size > 1:
    k = data.draw(st.integers(1, size - 1))
    parts = [(jax.lax.slice_in_dim(x, lo, hi, axis=axis), np.take(full, range(lo, hi), axis))
             for lo, hi in ((0, k), (k, size))]
  else:
    half = np.random.RandomState(size).rand(*x.shape) < 0.5
    parts = [(x, full & half), (x, full & ~half)]
  ms = [_moments(xi, reduction_axes=red, mask=mi) for xi, mi in parts]
  merged = jn.merge_moments(*ms)
  stats, errs = [], []
  for xi, mi in parts:
    xi64 = np.asarray(xi.astype(jnp.float32), np.float64)
    stats.append(refs.ref_moments(xi64, red, mi))
    errs.append((refs.mean_error(xi64, red, mi), refs.var_error(xi64, red, mi)))
  n, mean, var = refs.ref_moments(p.x64, red, full)
  mean_err, var_err = refs.merge_error(stats[0], errs[0], stats[1], errs[1])
  np.testing.assert_array_equal(np.asarray(merged.count), n)
  refs.assert_within(merged.mean, mean, mean_err, "merged mean")
  refs.assert_within(merged.var, var, var_err, "merged var")


# --- batch normalization and renormalization ---------------------------------------------------

def _state(fshape, seed, offset, spread):
  rng = np.random.RandomState(seed)
  return jn.BatchNormState(
      jnp.asarray(np.asarray(offset + spread * rng.randn(*fshape), np.float32)),
      jnp.asarray(np.asarray(spread ** 2 * rng.uniform(0.25, 4, fshape), np.float32)),
      jnp.asarray(rng.randint(0, 5), jnp.int32))


def _batch_axes(p, data):
  """Drawn feature axes of batch (re)normalization, its reduction axes and feature shape."""
  feat = _pick(data, _axes(p.x.ndim, min_size=0), ())
  red = tuple(a for a in range(p.x.ndim) if a not in feat)
  return feat, red, _fshape(p.x.shape, feat)


def _state_like(p, fshape, seed):
  """Running statistics near the data's own: the finite values' mean and spread."""
  finite = p.x64[np.isfinite(p.x64)]
  center = float(finite.mean()) if finite.size else 0.0
  spread = max(float(finite.std()) if finite.size else 1.0, 1e-3)
  return _state(fshape, seed, center, spread)


def _check_state(new, old, n, mean, var, mean_err, var_err, momentum):
  """The running statistics after one update (`refs.ema_error`), unchanged where the batch had
  no valid element; the count advances iff some feature had one."""
  old_mean, old_var = refs.f64(old.mean), refs.f64(old.var)
  m = 1.0 - 1.0 / (int(old.count) + 1) if momentum is None else momentum
  seen = n > 0
  want_mean = np.where(seen, m * old_mean + (1 - m) * mean, old_mean)
  want_var = np.where(seen, m * old_var + (1 - m) * var, old_var)
  refs.assert_within(new.mean, want_mean,
                     np.where(seen, refs.ema_error(m, old_mean, mean, mean_err), 0), "mean")
  refs.assert_within(new.var, want_var,
                     np.where(seen, refs.ema_error(m, old_var, var, var_err), 0), "var")
  assert int(new.count) == int(old.count) + int(seen.any())
  assert new.mean.dtype == old.mean.dtype and new.count.dtype == jnp.int32


# No feature axis: one scalar statistic over every axis (a shape () state), first found while
# writing these tests (the reference's parameters then had shape ()).
_SCALAR_STATE = make_problem((2, 3), mask_shape=(3,), p_valid=0.5, poison=True, offset=1e4)


@given(problems(), st.data(), st.sampled_from((0.0, 0.9, 0.99, None)))
@example(_SCALAR_STATE, None, None)
def test_batch_norm_training(p, data, momentum):
  ndim = p.x.ndim
  feat, red, fshape = _batch_axes(p, data)
  state = _state(fshape, ndim, 0.0, 1.0)
  scale, bias = _params(fshape, ndim)
  y, new = _batch_norm(p.x, state, scale, bias, training=True, feature_axes=feat,
                       momentum=momentum, epsilon=p.epsilon, mask=p.mask)
  ref, n, mean, var = refs.ref_batch_norm_train(p.x64, scale, bias, feat, p.epsilon, p.full)
  bound = refs.norm_bound(p.x64, ref, scale, red, feat, p.epsilon, p.full, out_dtype=p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)
  _check_state(new, state, n, mean, var, refs.mean_error(p.x64, red, p.full),
               refs.var_error(p.x64, red, p.full), momentum)


@given(problems(), st.data())
@example(_SCALAR_STATE, None)
def test_batch_norm_evaluation(p, data):
  ndim = p.x.ndim
  feat, red, fshape = _batch_axes(p, data)
  state = _state_like(p, fshape, ndim + 1)
  scale, bias = _params(fshape, ndim)
  y, new = _batch_norm(p.x, state, scale, bias, training=False, feature_axes=feat,
                       epsilon=p.epsilon, mask=p.mask)
  for a, b in zip(new, state, strict=True):  # evaluation returns the state unchanged
    np.testing.assert_array_equal(a, b)
  ref = refs.ref_normalize(p.x64, state.mean, state.var, scale, bias, red, feat, p.epsilon)
  zero = np.zeros(fshape)
  bound = refs.output_error(p.x64, state.mean, state.var, zero, zero, scale, ref, red, feat,
                            p.epsilon, p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)


@given(problems(), st.data(), st.sampled_from((1.0, 1.5, 3.0)), st.sampled_from((0.0, 0.5, 5.0)))
@example(_SCALAR_STATE, None, 3.0, 0.5)
def test_batch_renorm_training(p, data, r_max, d_max):
  ndim = p.x.ndim
  feat, red, fshape = _batch_axes(p, data)
  state = _state_like(p, fshape, ndim + 2)
  scale, bias = _params(fshape, ndim)
  y, new = _batch_renorm(p.x, state, scale, bias, training=True, r_max=r_max, d_max=d_max,
                         feature_axes=feat, momentum=0.9, epsilon=p.epsilon, mask=p.mask)
  ref, n, mean, var = refs.ref_batch_renorm_train(p.x64, state.mean, state.var, r_max, d_max,
                                                  scale, bias, feat, p.epsilon, p.full)
  bound = refs.renorm_bound(p.x64, ref, state.mean, state.var, r_max, d_max, scale, bias, feat,
                            p.epsilon, p.full, p.dtype)
  _events(p, red)
  _check_output(p, y, ref, bound)
  _check_state(new, state, n, mean, var, refs.mean_error(p.x64, red, p.full),
               refs.var_error(p.x64, red, p.full), 0.9)


def test_ci_profile_is_reproducible():
  """The default profile derandomizes, so that CI draws the same examples on every run."""
  if settings._current_profile == "ci":
    assert settings().derandomize and settings().deadline is None
