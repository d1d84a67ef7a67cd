"""Complex input: complex mean, real variance E[|x - μ|²], Wirtinger gradients, flax's behaviour."""

import warnings

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
from tests import jaxcompat

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


# --- batch normalization ---------------------------------------------------------------------

def _ref_ema(old, new, momentum):
  return momentum * np.asarray(old, np.complex128) + (1 - momentum) * np.asarray(new)


def test_batch_norm_init_complex_has_complex_mean_and_real_var():
  state = jn.batch_norm_init(3, dtype=jnp.complex64)
  assert state.mean.dtype == jnp.complex64 and state.var.dtype == jnp.float32
  with pytest.raises(TypeError, match="floating or complex"):
    jn.batch_norm_init(3, dtype=jnp.int32)


def test_batch_norm_on_complex_input_matches_complex128():
  x = _data((8, 3))
  rng = np.random.default_rng(4)
  s, b = (jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(2))
  state = jn.batch_norm_init(3, dtype=jnp.complex64)
  y, new = jn.batch_norm(x, state, s, b, training=True, momentum=0.9, epsilon=1e-6)
  mean, var = _ref_moments(x, 0)
  assert y.dtype == jnp.complex64
  assert new.mean.dtype == jnp.complex64 and new.var.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _ref_norm(x, 0, s, b), atol=TOL)
  np.testing.assert_allclose(np.asarray(new.mean), _ref_ema(0, mean[0], 0.9), atol=TOL)
  np.testing.assert_allclose(np.asarray(new.var), _ref_ema(1, var[0], 0.9).real, atol=TOL)
  assert int(new.count) == 1
  # evaluation: the running statistics, complex mean and real variance
  y_eval, same = jn.batch_norm(x, new, s, b, training=False, epsilon=1e-6)
  assert same is new
  ref_mean, ref_var = np.asarray(new.mean, np.complex128), np.asarray(new.var, np.float64)
  ref = (np.asarray(x, np.complex128) - ref_mean) / np.sqrt(ref_var + 1e-6) * np.asarray(s)
  np.testing.assert_allclose(np.asarray(y_eval), ref + np.asarray(b), atol=TOL)
  # the cumulative average (momentum=None) and a mask
  m = np.array([True, True, False, True, True, True, False, True])[:, None]
  y, new = jn.batch_norm(x, state, training=True, momentum=None, epsilon=1e-6, mask=m)
  mean, var = _ref_moments(x[m[:, 0]], 0)
  np.testing.assert_allclose(np.asarray(new.mean), mean[0], atol=TOL)
  np.testing.assert_allclose(np.asarray(new.var), var[0], atol=TOL)


def test_batch_norm_complex_across_devices_and_in_ghost_batches():
  x = _data((4, 6, 3), seed=5)  # 4 devices of 6 examples
  state = jn.batch_norm_init(3, dtype=jnp.complex64)
  step = jax.vmap(lambda xi: jn.batch_norm(xi, state, training=True, momentum=0.0,
                                           epsilon=1e-6, axis_name="d"),
                  axis_name="d")
  y, new = step(x)
  flat = np.asarray(x).reshape(24, 3)
  mean, var = _ref_moments(flat, 0)
  np.testing.assert_allclose(np.asarray(y).reshape(24, 3), _ref_norm(flat, 0), atol=TOL)
  np.testing.assert_allclose(np.asarray(new.mean), np.broadcast_to(mean, (4, 3)), atol=TOL)
  np.testing.assert_allclose(np.asarray(new.var), np.broadcast_to(var, (4, 3)), atol=TOL)
  # ghost batches of 2: each normalized alone; the state gets the whole batch's exact moments
  y, new = jn.batch_norm(flat[:8], state, training=True, momentum=0.0, epsilon=1e-6,
                         virtual_batch_size=2)
  ghosts = flat[:8].reshape(4, 2, 3)
  np.testing.assert_allclose(np.asarray(y).reshape(4, 2, 3), _ref_norm(ghosts, 1), atol=TOL)
  mean, var = _ref_moments(flat[:8], 0)
  np.testing.assert_allclose(np.asarray(new.mean), mean[0], atol=TOL)
  np.testing.assert_allclose(np.asarray(new.var), var[0], atol=TOL)


def test_merge_moments_of_complex_sets_is_exact():
  x = _data((10, 2), seed=6)
  a, b = jn.moments(x[:3], 0), jn.moments(x[3:], 0)
  m = jn.merge_moments(a, b)
  mean, var = _ref_moments(x, 0)
  assert m.mean.dtype == jnp.complex64 and m.var.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(m.mean), mean[0], atol=TOL)
  np.testing.assert_allclose(np.asarray(m.var), var[0], atol=TOL)


def _ref_norm_jnp(axis):
  """Plain jnp complex normalization over `axis`, for JAX's own derivative."""
  def norm(x, s, b):
    mean = jnp.mean(x, axis, keepdims=True)
    d = x - mean
    var = jnp.mean(jnp.real(d * jnp.conj(d)), axis, keepdims=True)
    return (d * jax.lax.rsqrt(var + 1e-6).astype(x.dtype) * s.astype(x.dtype)
            + b.astype(x.dtype))
  return norm


def _loss(norm):
  def loss(x, s, b):
    y = norm(x, s, b)
    w = jnp.arange(1.0, y.shape[-1] + 1.0).astype(y.dtype)
    return jnp.sum(jnp.abs(y * w) ** 2) + jnp.sum(jnp.real(y) * jnp.imag(y))
  return loss


def _assert_gradients_match_complex128(ours_fn, ref_fn, x, s, b):
  """Gradients of a real loss of `ours_fn` in complex64 against JAX's autodiff of `ref_fn` in
  complex128; `ours_fn` in complex128 must agree with that reference to 1e-10."""
  ours = jax.grad(_loss(ours_fn), argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(s),
                                                     jnp.asarray(b))
  with jaxcompat.enable_x64(True):
    args = (jnp.asarray(x, jnp.complex128), jnp.asarray(s, jnp.float64),
            jnp.asarray(b, jnp.float64))
    ref = [np.asarray(a) for a in jax.grad(_loss(ref_fn), argnums=(0, 1, 2))(*args)]
    ref64 = [np.asarray(a) for a in jax.grad(_loss(ours_fn), argnums=(0, 1, 2))(*args)]
  for a, r, r64 in zip(ours, ref, ref64, strict=True):
    np.testing.assert_allclose(r64, r, rtol=1e-10, atol=1e-10)
    scale = np.abs(r).max()  # the loss is a sum of squares of order 1-36
    np.testing.assert_allclose(np.asarray(a), r, atol=20 * TOL * scale)
  assert ours[0].dtype == jnp.complex64 and ours[1].dtype == jnp.float32


def test_batch_norm_gradients_match_autodiff_of_complex128():
  x = _data((6, 4), seed=7)
  rng = np.random.default_rng(8)
  s, b = (rng.normal(size=4).astype(np.float32) for _ in range(2))

  def ours_fn(x, s, b):
    return jn.batch_norm(x, jn.batch_norm_init(4, dtype=x.dtype), s, b, training=True,
                         epsilon=1e-6)[0]

  _assert_gradients_match_complex128(ours_fn, _ref_norm_jnp(0), x, s, b)


def test_gradients_of_real_losses_match_autodiff_of_complex128():
  x = _data((4, 6))
  rng = np.random.default_rng(3)
  s, b = (rng.normal(size=6).astype(np.float32) for _ in range(2))
  _assert_gradients_match_complex128(jn.layer_norm, _ref_norm_jnp(-1), x, s, b)


_MASKED = {
    "layer_norm": lambda x, s, b, m: jn.layer_norm(x, s, b, mask=m),
    "rms_norm": lambda x, s, b, m: jn.rms_norm(x, s, b, mask=m),
    "batch_norm": lambda x, s, b, m: jn.batch_norm(
        x, jn.batch_norm_init(x.shape[-1], dtype=x.dtype), s, b, training=True, mask=m)[0],
}


@pytest.mark.parametrize("name", sorted(_MASKED))
def test_masked_nan_does_not_reach_complex_gradients(name):
  """NaN at masked positions and a loss that ignores them: finite gradients, the same as with
  zeros there (the docs' promise, kept for real input by the fused derivative)."""
  norm = _MASKED[name]
  x = _data((4, 6), seed=5)
  rng = np.random.default_rng(6)
  s, b = (jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((4, 6)) < 0.7)
  nan = jnp.asarray(np.nan + 1j * np.nan, jnp.complex64)
  poisoned, zeroed = (jnp.where(mask, jnp.asarray(x), fill) for fill in (nan, 0j))

  def loss(v, s, b):
    y = jnp.where(mask, norm(v, s, b, mask), 0)
    return jnp.sum(jnp.real(y) + 0.25 * jnp.abs(y) ** 2)

  g_nan = jax.grad(loss, (0, 1, 2))(poisoned, s, b)
  g_zero = jax.grad(loss, (0, 1, 2))(zeroed, s, b)
  for a, z in zip(g_nan, g_zero, strict=True):
    assert np.isfinite(np.asarray(a)).all()
    # The same valid values, and masked ones never enter a sum: bitwise.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(z))


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


def test_linen_batch_norm_on_complex_input_matches_flax_with_a_stable_tree():
  x = jnp.asarray(_data((8, 3), seed=9))
  kw = dict(momentum=0.9, epsilon=1e-6)
  theirs, ours = nn.BatchNorm(use_fast_variance=False, **kw), jnn.BatchNorm(**kw)
  train = dict(use_running_average=False, mutable=["batch_stats"])
  with fc.standard_promotion():
    v_theirs = theirs.init(jax.random.key(0), x, use_running_average=False)
    y_theirs, u_theirs = theirs.apply(v_theirs, x, **train)
    e_theirs = theirs.apply({**v_theirs, **u_theirs}, x, use_running_average=True)
  v_ours = ours.init(jax.random.key(0), x, use_running_average=False)
  # flax creates a float32 mean that becomes complex64 at the first update; ours is complex64
  # from init on, so the variable tree keeps its dtypes from step to step.
  assert v_theirs["batch_stats"]["mean"].dtype == jnp.float32
  assert v_ours["batch_stats"]["mean"].dtype == jnp.complex64
  assert v_ours["batch_stats"]["var"].dtype == jnp.float32
  fc.assert_trees_identical(v_ours["params"], v_theirs["params"])
  for variables in (v_ours, v_theirs):  # flax's own init variables load too
    y, u = ours.apply(variables, x, **train)
    assert jax.tree.map(lambda a: a.dtype, u) == jax.tree.map(
        lambda a: a.dtype, {"batch_stats": v_ours["batch_stats"]})
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_theirs), atol=TOL)
    for k in ("mean", "var"):
      np.testing.assert_allclose(np.asarray(u["batch_stats"][k]),
                                 np.asarray(u_theirs["batch_stats"][k]), atol=TOL)
    e = ours.apply({**variables, **u}, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(e), np.asarray(e_theirs), atol=TOL)


def test_nnx_batch_norm_keeps_the_imaginary_part_of_the_running_mean():
  x = jnp.asarray(_data((8, 3), seed=10))
  kw = dict(dtype=jnp.complex64, momentum=0.5, epsilon=1e-6)
  ours = jnnx.BatchNorm(3, rngs=nnx.Rngs(0), **kw)
  theirs = nnx.BatchNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)
  assert ours.mean[...].dtype == jnp.complex64 and ours.var[...].dtype == jnp.float32
  y = ours(x)
  with fc.standard_promotion(), pytest.warns(np.exceptions.ComplexWarning):
    warnings.simplefilter("ignore", FutureWarning)  # flax's cast of the complex mean, too
    y_theirs = theirs(x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_theirs), atol=TOL)  # batch statistics
  mean, var = _ref_moments(x, 0)
  np.testing.assert_allclose(np.asarray(ours.mean[...]), _ref_ema(0, mean[0], 0.5), atol=TOL)
  np.testing.assert_allclose(np.asarray(ours.var[...]), _ref_ema(1, var[0], 0.5).real,
                             atol=TOL)
  # jaxnorm.linen computes the same (bit for bit)
  mod_linen = jnn.BatchNorm(use_running_average=False, **kw)
  variables = {"params": {"scale": ours.scale[...], "bias": ours.bias[...]},
               "batch_stats": {"mean": jnp.zeros(3, jnp.complex64),
                               "var": jnp.ones(3, jnp.float32)}}
  y_linen, upd = mod_linen.apply(variables, x, mutable=["batch_stats"])
  fc.assert_trees_identical((y, ours.mean[...], ours.var[...]),
                            (y_linen, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]))
  # evaluation: flax.nnx lost the imaginary part of the mean (about -1 after one step here)
  ours.eval()
  theirs.eval()
  ref = (np.asarray(x, np.complex128) - _ref_ema(0, mean[0], 0.5)) / np.sqrt(
      _ref_ema(1, var[0], 0.5).real + 1e-6)
  with fc.standard_promotion():
    err_theirs = np.abs(np.asarray(theirs(x)) - ref).max()
  np.testing.assert_allclose(np.asarray(ours(x)), ref, atol=TOL)
  assert err_theirs > 0.5

