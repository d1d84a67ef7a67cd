"""Complex input: complex mean, real variance E[|x - μ|²], Wirtinger gradients, flax's behaviour."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from tests import flax_cases as fc

EPS32 = float(jnp.finfo(jnp.float32).eps)
OFFSET = 3.0 - 2.0j


def _data(shape, seed=0, dtype=np.complex64):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape) + OFFSET).astype(dtype)


def _ref_moments(x, axes):
  x = np.asarray(x, np.complex128)
  mean = x.mean(axes, keepdims=True)
  return mean, (np.abs(x - mean) ** 2).mean(axes, keepdims=True)


def _ref_norm(x, axes, scale=None, bias=None, eps=1e-6, centered=True):
  x = np.asarray(x, np.complex128)
  mean, var = _ref_moments(x, axes)
  if not centered:
    mean, var = 0.0, (np.abs(x) ** 2).mean(axes, keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  y = y if scale is None else y * np.asarray(scale, np.float64)
  return y if bias is None else y + np.asarray(bias, np.float64)


# Outputs of order 1 from complex64 input near 3 - 2j: float32 rounding of sums of n <= 24 terms
# of magnitude |x| <= ~6 (sqrt(n)·eps·|x| relative to std ~1.4), times |γ| + |β| <= ~5.
TOL = 5 * np.sqrt(24) * EPS32 * 6 / 1.4


def test_moments_mean_is_complex_and_var_real_non_negative():
  x = _data((4, 6))
  m = jn.moments(x, reduction_axes=1)
  assert m.mean.dtype == jnp.complex64 and m.var.dtype == jnp.float32
  mean, var = _ref_moments(x, 1)
  np.testing.assert_allclose(m.mean, mean[:, 0], atol=TOL)
  np.testing.assert_allclose(m.var, var[:, 0], atol=TOL)
  assert (np.asarray(m.var) >= 0).all()
  # across a vmapped axis: the statistics of the concatenated batch (psum of complex sums)
  mv = jax.vmap(lambda r: jn.moments(r, 0, axis_name="i"), axis_name="i")(x)
  mean, var = _ref_moments(x, (0, 1))
  np.testing.assert_allclose(mv.mean, np.full(4, mean.ravel()[0]), atol=TOL)
  np.testing.assert_allclose(mv.var, np.full(4, var.ravel()[0]), atol=TOL)
  np.testing.assert_array_equal(mv.count, np.full(4, 24.0))


def test_normalizers_on_complex_input_match_complex128():
  x = _data((4, 6))
  rng = np.random.default_rng(3)
  s, b = (jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(2))
  cases = [
      (jn.layer_norm(x, s, b), _ref_norm(x, -1, s, b)),
      (jn.rms_norm(x, s), _ref_norm(x, -1, s, centered=False)),
      (jn.group_norm(x, s, b, num_groups=2),
       _ref_norm(x.reshape(4, 2, 3), -1, s.reshape(2, 3), b.reshape(2, 3)).reshape(4, 6)),
      (jn.instance_norm(x.reshape(4, 2, 3), epsilon=1e-6), _ref_norm(x.reshape(4, 2, 3), 1)),
  ]
  mask = np.array([True, True, False, True, True, False])
  x_nan = jnp.where(mask, jnp.asarray(x), jnp.asarray(np.nan + 0j, jnp.complex64))
  mean, var = _ref_moments(x[:, mask], 1)
  cases.append((jn.layer_norm(x_nan, mask=mask)[:, mask],
                (x[:, mask] - mean) / np.sqrt(var + 1e-6)))
  m = jn.moments(x, 0)
  cases.append((jn.normalize(x, m.mean, m.var, reduction_axes=0, epsilon=1e-6),
                _ref_norm(x, 0)))
  for y, ref in cases:
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(y), ref, atol=TOL)


def test_batch_norm_says_it_takes_real_input():
  with pytest.raises(TypeError, match="complex"):
    jn.batch_norm(_data((4, 3)), jn.batch_norm_init(3), training=True)


def _ref_layer_norm_jnp(x, s, b):
  """Plain jnp complex layer norm, for JAX's own derivative."""
  mean = jnp.mean(x, -1, keepdims=True)
  d = x - mean
  var = jnp.mean(jnp.real(d * jnp.conj(d)), -1, keepdims=True)
  return d * jax.lax.rsqrt(var + 1e-6).astype(x.dtype) * s.astype(x.dtype) + b.astype(x.dtype)


def _loss(norm):
  def loss(x, s, b):
    y = norm(x, s, b)
    w = jnp.arange(1.0, 7.0).astype(y.dtype)
    return jnp.sum(jnp.abs(y * w) ** 2) + jnp.sum(jnp.real(y) * jnp.imag(y))
  return loss


def test_gradients_of_real_losses_match_autodiff_of_complex128():
  x = _data((4, 6))
  rng = np.random.default_rng(3)
  s, b = (rng.normal(size=6).astype(np.float32) for _ in range(2))
  ours = jax.grad(_loss(jn.layer_norm), argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(s),
                                                          jnp.asarray(b))
  with jax.enable_x64(True):
    args = (jnp.asarray(x, jnp.complex128), jnp.asarray(s, jnp.float64),
            jnp.asarray(b, jnp.float64))
    ref = jax.grad(_loss(_ref_layer_norm_jnp), argnums=(0, 1, 2))(*args)
    ref64 = jax.grad(_loss(jn.layer_norm), argnums=(0, 1, 2))(*args)  # jaxnorm in complex128
    ref, ref64 = [np.asarray(a) for a in ref], [np.asarray(a) for a in ref64]
  for a, r, r64 in zip(ours, ref, ref64, strict=True):
    np.testing.assert_allclose(r64, r, rtol=1e-10, atol=1e-10)
    scale = np.abs(r).max()  # the loss is a sum of squares of order 1-36
    np.testing.assert_allclose(np.asarray(a), r, atol=20 * TOL * scale)
  assert ours[0].dtype == jnp.complex64 and ours[1].dtype == jnp.float32


# --- flax's behaviour: dtype=jnp.complex64 ---------------------------------------------------

NAMES = ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")


def _kw(name):
  return {"num_groups": 2} if name == "GroupNorm" else {}


@pytest.mark.parametrize("name", NAMES)
def test_linen_and_nnx_match_flax_on_complex_input(name):
  x = jnp.asarray(_data((4, 3, 6)))
  for dtype in (jnp.complex64, None):
    kw = {**_kw(name), "dtype": dtype}
    theirs, ours = getattr(nn, name)(use_fast_variance=False, **kw), getattr(jnn, name)(**kw)
    with fc.standard_promotion():
      v = theirs.init(jax.random.key(0), x)
      y_theirs = theirs.apply(v, x)
    y_ours = ours.apply(v, x)
    assert y_ours.dtype == y_theirs.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), atol=TOL)
    t_nnx = getattr(nnx, name)(6, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)
    o_nnx = getattr(jnnx, name)(6, rngs=nnx.Rngs(0), **kw)
    with fc.standard_promotion():
      y_t = t_nnx(x)
    y_o = o_nnx(x)
    assert y_o.dtype == y_t.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(y_o), np.asarray(y_t), atol=TOL)
