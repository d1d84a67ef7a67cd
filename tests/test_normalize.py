"""normalize, layer_norm, rms_norm, group_norm and instance_norm against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
import jaxnorm.equinox as jne
from tests import jaxcompat, refs

# XLA:CPU (jax 0.10.2) cannot compile float16 arithmetic for a CPU without F16C (e.g.
# XLA_FLAGS=--xla_cpu_max_isa=SSE4_2: "Symbols not found: __extendhfsf2"): a limit of XLA
# that no library code can work around, so float16 cases are skipped there, and only there.
DTYPES = [jnp.float32, jnp.bfloat16,
          pytest.param(jnp.float16, marks=pytest.mark.skipif(
              not refs.float16_compiles(), reason="XLA:CPU compiles no float16 code without F16C"))]


def _x(shape, offset=0.0, seed=0, dtype=np.float32):
  x = np.random.RandomState(seed).randn(*shape) * 2.0 + offset
  return jnp.asarray(x.astype(np.float32), dtype)


def _params(n, seed=1):
  r = np.random.RandomState(seed)
  return (r.rand(n) + 0.5).astype(np.float32), r.randn(n).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_matches_float64_and_keeps_dtype(dtype):
  x = _x((4, 3, 16), offset=1.0, dtype=dtype)
  scale, bias = _params(16)
  y = jn.layer_norm(x, scale, bias)
  assert y.dtype == dtype and y.shape == x.shape
  # The reference sees exactly the input jaxnorm saw (after rounding to `dtype`).
  x32 = np.asarray(x.astype(jnp.float32))
  ref = refs.ref_layer_norm(x32, scale, bias)
  # float32 statistics and arithmetic, then one rounding to `dtype`.
  refs.assert_within(y.astype(jnp.float32), ref,
                     refs.norm_bound(x32, ref, scale, -1, -1, 1e-6, out_dtype=dtype))


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_layer_norm_is_exact_at_large_offsets(offset):
  x = (np.random.RandomState(0).randn(32, 64) + offset).astype(np.float32)
  y = jn.layer_norm(x)
  ref = refs.ref_layer_norm(x)
  # The mean's error scales with the offset (c(64)·1e4 ≈ 2e-3 at 1e4): that is the floor.
  refs.assert_within(y, ref, refs.norm_bound(x, ref))


def test_layer_norm_over_several_axes_with_feature_axes_elsewhere():
  x = _x((3, 4, 5), offset=2.0)
  scale, bias = _params(4)
  y = jn.layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=1)
  ref = refs.ref_layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=1)
  refs.assert_within(y, ref, refs.norm_bound(x, ref, scale, (1, 2), 1))


def test_layer_norm_mask_excludes_nan_and_normalizes_every_element():
  x = np.asarray(_x((3, 8)))
  mask = np.arange(8)[None, :] < np.array([[3], [8], [5]])
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y = np.asarray(jn.layer_norm(poisoned, mask=mask))
  ref = refs.ref_layer_norm(x, mask=mask)
  bound = refs.norm_bound(x, ref, mask=mask)
  refs.assert_within(y[mask], ref[mask], bound[mask])
  assert np.isnan(y[~mask]).all()  # a NaN input stays NaN where it is, and only there
  # With finite values at masked positions, those are normalized with the valid statistics.
  refs.assert_within(jn.layer_norm(x, mask=mask), ref, bound)


def test_layer_norm_with_no_valid_element_is_finite():
  x = _x((2, 5))
  y = jn.layer_norm(x, mask=np.zeros((2, 1), bool))
  assert np.isfinite(np.asarray(y)).all()
  # Statistics of an empty reduction are mean 0, var 0: y = x / sqrt(epsilon).
  ref = np.asarray(x, np.float64) / np.sqrt(1e-6)
  refs.assert_within(y, ref, refs.output_error(x, np.zeros(2), np.zeros(2), 0.0, 0.0, None, ref,
                                               -1, -1, 1e-6))


def test_bfloat16_input_with_mean_20_normalizes_exactly():
  x = _x((64, 32), offset=20.0, dtype=jnp.bfloat16)
  y = jn.layer_norm(x)
  assert y.dtype == jnp.bfloat16
  x32 = np.asarray(x.astype(jnp.float32))
  ref = refs.ref_layer_norm(x32)
  assert np.isfinite(np.asarray(y.astype(jnp.float32))).all()
  # float32 statistics: only the final bfloat16 rounding (2**-8 relative) remains.
  refs.assert_within(y.astype(jnp.float32), ref,
                     refs.norm_bound(x32, ref, out_dtype=jnp.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64(dtype):
  x = _x((5, 24), offset=0.5, dtype=dtype)
  scale, _ = _params(24)
  y = jn.rms_norm(x, scale)
  assert y.dtype == dtype
  x32 = np.asarray(x.astype(jnp.float32))
  ref = refs.ref_rms_norm(x32, scale)
  refs.assert_within(y.astype(jnp.float32), ref,
                     refs.norm_bound(x32, ref, scale, centered=False, out_dtype=dtype))


def test_rms_norm_with_mask():
  x = np.asarray(_x((4, 10)))
  mask = np.random.RandomState(3).rand(4, 10) > 0.4
  y = np.asarray(jn.rms_norm(np.where(mask, x, np.inf).astype(np.float32), mask=mask))
  ref = refs.ref_rms_norm(x, mask=mask)
  bound = refs.norm_bound(x, ref, mask=mask, centered=False)
  refs.assert_within(y[mask], ref[mask], bound[mask])


@pytest.mark.parametrize("groups,group_size", [(4, None), (None, 2), (1, None), (8, None)])
def test_group_norm_matches_float64(groups, group_size):
  x = _x((2, 3, 3, 8), offset=1e3)
  scale, bias = _params(8)
  y = jn.group_norm(x, scale, bias, num_groups=groups, group_size=group_size)
  g = groups or 8 // group_size
  ref = refs.ref_group_norm(x, g, scale, bias)
  refs.assert_within(y, ref, refs.group_norm_bound(x, ref, g, scale))


def test_group_norm_mask_and_custom_reduction_axes():
  x = np.asarray(_x((2, 5, 6)))
  mask = np.arange(5)[None, :, None] < np.array([2, 5])[:, None, None]
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y = np.asarray(jn.group_norm(poisoned, num_groups=3, mask=mask))
  ref = refs.ref_group_norm(x, 3, mask=mask)
  valid = np.broadcast_to(mask, x.shape)
  refs.assert_within(y[valid], ref[valid], refs.group_norm_bound(x, ref, 3, mask=mask)[valid])
  # reduction over the channels only (axis 1 kept): statistics per (batch, position, group).
  y2 = jn.group_norm(x, num_groups=2, reduction_axes=-1)
  xg = x.reshape(2, 5, 2, 3).astype(np.float64)
  ref2 = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-6))
  refs.assert_within(y2, ref2.reshape(x.shape), refs.norm_bound(xg, ref2).reshape(x.shape))


def test_group_norm_with_one_channel_per_group_is_instance_norm():
  x = _x((2, 4, 4, 6), offset=5.0)
  scale, bias = _params(6)
  ref = refs.ref_layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=-1)
  # Two programs for the same statistics: each within the bound of the reference.
  bound = refs.norm_bound(x, ref, scale, (1, 2), -1)
  refs.assert_within(jn.group_norm(x, scale, bias, num_groups=None, group_size=1),
                     jn.instance_norm(x, scale, bias), 2 * bound)


def test_instance_norm_matches_float64():
  x = _x((3, 7, 5), offset=-4.0)
  scale, bias = _params(5)
  y = jn.instance_norm(x, scale, bias)
  ref = refs.ref_layer_norm(x, scale, bias, reduction_axes=1, feature_axes=-1)
  refs.assert_within(y, ref, refs.norm_bound(x, ref, scale, 1, -1))


def test_normalize_with_given_statistics_clips_negative_variance():
  x = _x((6, 3))
  m = jn.moments(x, 0)
  y = jn.normalize(x, m.mean, m.var, reduction_axes=0, epsilon=1e-5)
  ref = refs.ref_normalize(x, m.mean, m.var, None, None, 0, -1, 1e-5)
  # The statistics are given (exactly the float32 values): only the output's roundings remain.
  refs.assert_within(y, ref, refs.output_error(x, m.mean, m.var, 0.0, 0.0, None, ref, 0, -1,
                                               1e-5))
  # A negative variance (as E[x²]-E[x]² can produce) is treated as 0, never NaN.
  y_neg = jn.normalize(x, m.mean, -jnp.ones(3), reduction_axes=0, epsilon=1.0)
  ref_neg = refs.f64(x) - refs.f64(m.mean)
  refs.assert_within(y_neg, ref_neg, refs.output_error(x, m.mean, np.zeros(3), 0.0, 0.0, None,
                                                       ref_neg, 0, -1, 1.0))


def test_every_normalizer_has_jvp_and_hessian():
  x = _x((3, 4), offset=1.0)
  fns = [
      lambda v: jn.layer_norm(v),
      lambda v: jn.rms_norm(v),
      lambda v: jn.group_norm(v, num_groups=2),
      lambda v: jn.instance_norm(v[:, :, None]),
      lambda v: jn.batch_norm(v, jn.batch_norm_init(4), training=True)[0],
  ]
  for f in fns:
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    assert np.isfinite(np.asarray(tangent)).all()
    h = jax.hessian(lambda v, f=f: jnp.sum(f(v) ** 3))(x)
    assert h.shape == x.shape * 2 and np.isfinite(np.asarray(h)).all()
    # A Hessian is symmetric.
    h2 = np.asarray(h).reshape(x.size, x.size)
    np.testing.assert_allclose(h2, h2.T, atol=1e-3)


@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (0, 4, 8), (0, 8)])
def test_group_norm_of_an_empty_batch_is_empty(shape):
  """A batch of 0 (channels last, with or without spatial axes) gives an empty array and an
  empty gradient, as flax's GroupNorm and the other normalizers do."""
  import flax.linen as nn

  from jaxnorm import linen as jnn
  x = jnp.zeros(shape)
  y = jn.group_norm(x, num_groups=2)
  assert y.shape == shape and y.dtype == x.dtype
  g = jax.grad(lambda v: jnp.sum(jn.group_norm(v, num_groups=2)))(x)
  assert g.shape == shape
  for cls in (nn.GroupNorm, jnn.GroupNorm):
    layer = cls(num_groups=2)
    out = layer.apply(layer.init(jax.random.key(0), x), x)
    assert out.shape == shape


def test_rank0_input_with_no_reduction_axes():
  """A scalar with `reduction_axes=()`: one element, its own statistics (no IndexError)."""
  x = jnp.float32(3.0)
  m = jn.moments(x, ())
  assert (m.count, m.mean, m.var) == (1.0, 3.0, 0.0)
  y = jn.rms_norm(x, reduction_axes=(), feature_axes=(), epsilon=0.0)
  np.testing.assert_array_equal(y, jnp.float32(1.0))
  y = jn.layer_norm(x, jnp.float32(2.0), jnp.float32(0.5), reduction_axes=(), feature_axes=())
  np.testing.assert_array_equal(y, jnp.float32(0.5))
  # The default axes (-1) do not exist: the message says so and what to pass.
  with pytest.raises(ValueError, match=r"has no axes.*reduction_axes=\(\)"):
    jn.layer_norm(x)


def test_numpy_integers_are_accepted_wherever_ints_are():
  x = _x((4, 2, 6))
  state = jn.batch_norm_init((np.int64(6),))
  assert state.mean.shape == (6,)
  assert jn.batch_norm_init(np.int32(6)).mean.shape == (6,)
  np.testing.assert_array_equal(jn.group_norm(x, num_groups=2, channel_axis=np.int64(-1)),
                                jn.group_norm(x, num_groups=2, channel_axis=-1))
  got = jn.batch_norm(x, state, training=True, virtual_batch_size=np.int64(2))
  want = jn.batch_norm(x, state, training=True, virtual_batch_size=2)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def _spread_rows(scale):
  """Rows of ±[0.5, 1.5)·scale in pairs: mean about 0, every deviation at least scale / 2,
  so every square lies within float32's normal range exactly when scale² does."""
  v = np.random.RandomState(4).rand(4, 8) + 0.5
  return np.concatenate([v, -v], axis=1) * scale


@pytest.mark.parametrize("scale,epsilon", [(1e18, 1e-6), (1e-18, 0.0)])
def test_float32_statistics_are_exact_at_the_edges_of_their_range(scale, epsilon):
  """The documented range of float32 statistics (`jaxnorm.moments`): deviations whose squares
  stay normal floats. At its edges layer and RMS norm match float64 NumPy within the bounds."""
  x = _spread_rows(scale).astype(np.float32)
  y = jn.layer_norm(x, epsilon=epsilon)
  ref = refs.ref_layer_norm(x, epsilon=epsilon)
  refs.assert_within(y, ref, refs.norm_bound(x, ref, epsilon=epsilon))
  y = jn.rms_norm(x, epsilon=epsilon)
  ref = refs.ref_rms_norm(x, epsilon=epsilon)
  refs.assert_within(y, ref, refs.norm_bound(x, ref, epsilon=epsilon, centered=False))


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_outside_float32_range_as_documented_and_the_remedies(scale):
  """Beyond the range (1e20: the squares overflow; 1e-20 with epsilon=0: they underflow) no
  float32 output is right, as `moments` documents: 0 or NaN above, ±inf or NaN below. Its
  remedies match float64 NumPy: float64 input, or float32 input scaled by a power of two
  first (normalization without epsilon does not depend on the scale)."""
  x = _spread_rows(scale).astype(np.float32)
  ref = refs.ref_layer_norm(x, epsilon=0.0)
  y = np.asarray(jn.layer_norm(x, epsilon=0.0))
  if scale > 1:
    assert np.all((y == 0) | np.isnan(y))
  else:
    assert not np.isfinite(y).any()
  with jaxcompat.enable_x64(True):
    y64 = jn.layer_norm(jnp.asarray(x, jnp.float64), epsilon=0.0)
    assert y64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y64), ref, rtol=0, atol=refs.atol(np.float64))
  k = -int(np.round(np.log2(scale)))
  x_scaled = (x * np.float32(2.0**k)).astype(np.float32)  # exact: a power of two
  y = jn.layer_norm(x_scaled, epsilon=0.0)
  refs.assert_within(y, ref, refs.norm_bound(x_scaled, ref, epsilon=0.0))


def _normal(shape, seed=0, offset=0.0):
  return (np.random.default_rng(seed).normal(size=shape) + offset).astype(np.float32)


def test_rms_norm_bias_is_added_before_the_one_rounding():
  x, g, b = _normal((6, 8), offset=3.0), 1 + 0.1 * _normal((8,), 1), _normal((8,), 2)
  y = jn.rms_norm(x, g, b)
  y_nb = refs.ref_rms_norm(x, g)
  # The unbiased part's bound, then one float32 addition: u·(|y| + |b|).
  bound = (refs.norm_bound(x, y_nb, g, centered=False)
           + refs.U32 * (np.abs(y_nb) + np.abs(refs.f64(b))))
  refs.assert_within(y, y_nb + refs.f64(b), bound, "rms_norm with bias")
  # bfloat16 input: the bias enters in float32, and the output is rounded once.
  y16 = jn.rms_norm(x.astype(jnp.bfloat16), g, b)
  wide = jn.rms_norm(x.astype(jnp.bfloat16).astype(np.float32), g, b)
  np.testing.assert_array_equal(y16, wide.astype(jnp.bfloat16))
  # Its gradient is the cotangent's sum, as for layer norm's bias.
  db = jax.grad(lambda b: jnp.sum(jn.rms_norm(x, g, b) * x))(b)
  np.testing.assert_allclose(db, x.sum(0), rtol=1e-6)
  # jaxnorm.equinox.RMSNorm(use_bias=True) keeps complex input complex.
  z = (x + 1j * _normal((6, 8), 3)).astype(np.complex64)
  layer = jne.RMSNorm(8, dtype=jnp.complex64)
  out = jax.vmap(layer)(z)
  assert out.dtype == jnp.complex64
  np.testing.assert_allclose(out, jax.vmap(lambda v: jn.rms_norm(
      v, layer.weight, layer.bias, epsilon=layer.eps))(z), rtol=1e-6)
  z64 = np.asarray(z, np.complex128)
  ms = np.mean(np.abs(z64) ** 2, -1, keepdims=True)
  np.testing.assert_allclose(out, z64 / np.sqrt(ms + layer.eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,groups", [((3, 8, 5, 4), 2), ((3, 8), 4), ((2, 6, 7), 3)])
def test_group_norm_channels_first_equals_channels_last(shape, groups):
  x = _normal(shape, offset=10.0)
  c = shape[1]
  g, b = 1 + 0.1 * _normal((c,), 1), _normal((c,), 2)
  first = jn.group_norm(x, g, b, num_groups=groups, channel_axis=1)
  last = jnp.moveaxis(jn.group_norm(np.moveaxis(x, 1, -1), g, b, num_groups=groups), -1, 1)
  y_ref = np.moveaxis(refs.ref_group_norm(np.moveaxis(x, 1, -1), groups, g, b), -1, 1)
  bound = np.moveaxis(refs.group_norm_bound(np.moveaxis(x, 1, -1), np.moveaxis(y_ref, 1, -1),
                                            groups, g), -1, 1)
  refs.assert_within(first, y_ref, bound, "channels first")
  refs.assert_within(last, y_ref, bound, "channels last")
  with pytest.raises(ValueError, match="channel_axis=0 is the batch axis"):
    jn.group_norm(x, num_groups=1, channel_axis=0)
  with pytest.raises(ValueError, match=r"num_groups=5 must be a positive divisor .* \(axis 1"):
    jn.group_norm(x, num_groups=5, channel_axis=1)
