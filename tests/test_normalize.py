"""normalize, layer_norm, rms_norm, group_norm and instance_norm against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
from tests import refs

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


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
  ref = refs.ref_layer_norm(np.asarray(x.astype(jnp.float32)), scale, bias)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=refs.atol(dtype) * 4)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_layer_norm_is_exact_at_large_offsets(offset):
  x = (np.random.RandomState(0).randn(32, 64) + offset).astype(np.float32)
  y = jn.layer_norm(x)
  err = np.abs(np.asarray(y) - refs.ref_layer_norm(x)).max()
  # float32 cannot represent x to better than offset·6e-8 (6e-4 at 1e4): that is the floor.
  assert err < 2e-2, err


def test_layer_norm_over_several_axes_with_feature_axes_elsewhere():
  x = _x((3, 4, 5), offset=2.0)
  scale, bias = _params(4)
  y = jn.layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=1)
  ref = refs.ref_layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=1)
  np.testing.assert_allclose(y, ref, atol=refs.atol(jnp.float32))


def test_layer_norm_mask_excludes_nan_and_normalizes_every_element():
  x = np.asarray(_x((3, 8)))
  mask = np.arange(8)[None, :] < np.array([[3], [8], [5]])
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y = np.asarray(jn.layer_norm(poisoned, mask=mask))
  ref = refs.ref_layer_norm(x, mask=mask)
  np.testing.assert_allclose(y[mask], ref[mask], atol=refs.atol(jnp.float32))
  assert np.isnan(y[~mask]).all()  # a NaN input stays NaN where it is, and only there
  # With finite values at masked positions, those are normalized with the valid statistics.
  np.testing.assert_allclose(jn.layer_norm(x, mask=mask), ref, atol=1e-4)


def test_layer_norm_with_no_valid_element_is_finite():
  x = _x((2, 5))
  y = jn.layer_norm(x, mask=np.zeros((2, 1), bool))
  assert np.isfinite(np.asarray(y)).all()
  # Statistics of an empty reduction are mean 0, var 0: y = x / sqrt(epsilon).
  np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1e-6), rtol=1e-6)


def test_bfloat16_input_with_mean_20_normalizes_exactly():
  x = _x((64, 32), offset=20.0, dtype=jnp.bfloat16)
  y = jn.layer_norm(x)
  assert y.dtype == jnp.bfloat16
  ref = refs.ref_layer_norm(np.asarray(x.astype(jnp.float32)))
  assert np.isfinite(np.asarray(y.astype(jnp.float32))).all()
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=refs.atol(jnp.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_float64(dtype):
  x = _x((5, 24), offset=0.5, dtype=dtype)
  scale, _ = _params(24)
  y = jn.rms_norm(x, scale)
  assert y.dtype == dtype
  ref = refs.ref_rms_norm(np.asarray(x.astype(jnp.float32)), scale)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=refs.atol(dtype) * 4)


def test_rms_norm_with_mask():
  x = np.asarray(_x((4, 10)))
  mask = np.random.RandomState(3).rand(4, 10) > 0.4
  y = np.asarray(jn.rms_norm(np.where(mask, x, np.inf).astype(np.float32), mask=mask))
  np.testing.assert_allclose(y[mask], refs.ref_rms_norm(x, mask=mask)[mask], atol=2e-5)


@pytest.mark.parametrize("groups,group_size", [(4, None), (None, 2), (1, None), (8, None)])
def test_group_norm_matches_float64(groups, group_size):
  x = _x((2, 3, 3, 8), offset=1e3)
  scale, bias = _params(8)
  y = jn.group_norm(x, scale, bias, num_groups=groups, group_size=group_size)
  ref = refs.ref_group_norm(x, groups or 8 // group_size, scale, bias)
  np.testing.assert_allclose(y, ref, atol=2e-3)


def test_group_norm_mask_and_custom_reduction_axes():
  x = np.asarray(_x((2, 5, 6)))
  mask = np.arange(5)[None, :, None] < np.array([2, 5])[:, None, None]
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y = np.asarray(jn.group_norm(poisoned, num_groups=3, mask=mask))
  ref = refs.ref_group_norm(x, 3, mask=mask)
  np.testing.assert_allclose(y[np.broadcast_to(mask, x.shape)],
                             ref[np.broadcast_to(mask, x.shape)], atol=2e-5)
  # reduction over the channels only (axis 1 kept): statistics per (batch, position, group).
  y2 = jn.group_norm(x, num_groups=2, reduction_axes=-1)
  xg = x.reshape(2, 5, 2, 3).astype(np.float64)
  ref2 = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-6))
  np.testing.assert_allclose(y2, ref2.reshape(x.shape), atol=2e-5)


def test_group_norm_with_one_channel_per_group_is_instance_norm():
  x = _x((2, 4, 4, 6), offset=5.0)
  scale, bias = _params(6)
  np.testing.assert_allclose(jn.group_norm(x, scale, bias, num_groups=None, group_size=1),
                             jn.instance_norm(x, scale, bias), atol=1e-6)


def test_instance_norm_matches_float64():
  x = _x((3, 7, 5), offset=-4.0)
  scale, bias = _params(5)
  y = jn.instance_norm(x, scale, bias)
  ref = refs.ref_layer_norm(x, scale, bias, reduction_axes=1, feature_axes=-1)
  np.testing.assert_allclose(y, ref, atol=refs.atol(jnp.float32))


def test_normalize_with_given_statistics_clips_negative_variance():
  x = _x((6, 3))
  m = jn.moments(x, 0)
  y = jn.normalize(x, m.mean, m.var, reduction_axes=0, epsilon=1e-5)
  ref = refs.ref_normalize(x, m.mean, m.var, None, None, 0, -1, 1e-5)
  np.testing.assert_allclose(y, ref, atol=refs.atol(jnp.float32))
  # A negative variance (as E[x²]-E[x]² can produce) is treated as 0, never NaN.
  y_neg = jn.normalize(x, m.mean, -jnp.ones(3), reduction_axes=0, epsilon=1.0)
  np.testing.assert_allclose(y_neg, np.asarray(x) - np.asarray(m.mean), atol=1e-6)


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
