"""Gradients, forward-mode derivatives and Hessians against autodiff of float64 references.

jaxnorm differentiates its normalizers with a hand-written rule (`jax.custom_jvp` in
`_fused.fused_norm`); every test here compares it with JAX's own autodiff of a
plain float64 implementation (under `jax.enable_x64`), on the float32 input jaxnorm saw.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
from tests import jaxcompat, refs

F64 = jnp.float64


# --- float64 references, differentiated by JAX's autodiff ----------------------------------

def _ref_stats(x, axes, mask, centered=True):
  w = jnp.ones(x.shape, F64) if mask is None else jnp.broadcast_to(mask, x.shape).astype(F64)
  xz = jnp.where(w > 0, x, 0.0)
  n = jnp.maximum(jnp.sum(w, axes, keepdims=True), 1.0)
  if not centered:
    return 0.0, jnp.sum(xz * xz, axes, keepdims=True) / n
  mean = jnp.sum(xz, axes, keepdims=True) / n
  d = jnp.where(w > 0, x - mean, 0.0)
  return mean, jnp.sum(d * d, axes, keepdims=True) / n


def _ref_norm(x, scale, bias, axes, mask, eps, centered=True, param_shape=None):
  mean, var = _ref_stats(x, axes, mask, centered)
  y = (x - mean) / jnp.sqrt(var + eps)
  shape = param_shape or (1,) * (x.ndim - 1) + (x.shape[-1],)
  if scale is not None:
    y = y * scale.reshape(shape)
  if bias is not None:
    y = y + bias.reshape(shape)
  return y


def ref_layer_norm(x, scale, bias, mask, eps=1e-6):
  return _ref_norm(x, scale, bias, (-1,), mask, eps)


def ref_rms_norm(x, scale, bias, mask, eps=1e-6):
  return _ref_norm(x, scale, None, (-1,), mask, eps, centered=False)


def ref_group_norm(x, scale, bias, mask, groups=4, eps=1e-6):
  c = x.shape[-1]
  shape = x.shape[:-1] + (groups, c // groups)
  mg = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(shape)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  y = _ref_norm(x.reshape(shape), None, None, axes, mg, eps).reshape(x.shape)
  if scale is not None:
    y = y * scale
  return y if bias is None else y + bias


def ref_batch_norm(x, scale, bias, mask, eps=1e-5):
  return _ref_norm(x, scale, bias, tuple(range(x.ndim - 1)), mask, eps)


# --- the functions under test ----------------------------------------------------------------

def jn_layer_norm(x, scale, bias, mask):
  return jn.layer_norm(x, scale, bias, mask=mask)


def jn_rms_norm(x, scale, bias, mask):
  return jn.rms_norm(x, scale, mask=mask)


def jn_group_norm(x, scale, bias, mask):
  return jn.group_norm(x, scale, bias, num_groups=4, mask=mask)


def jn_batch_norm(x, scale, bias, mask):
  return jn.batch_norm(x, jn.batch_norm_init(x.shape[-1]), scale, bias, training=True,
                       mask=mask)[0]


CASES = {
    "layer_norm": (jn_layer_norm, ref_layer_norm, (6, 5, 16)),
    "rms_norm": (jn_rms_norm, ref_rms_norm, (6, 5, 16)),
    "group_norm": (jn_group_norm, ref_group_norm, (3, 4, 5, 16)),
    "batch_norm": (jn_batch_norm, ref_batch_norm, (6, 5, 16)),
}


def _inputs(shape, offset=0.5, seed=0):
  r = np.random.RandomState(seed)
  x = (r.randn(*shape) * 2.0 + offset).astype(np.float32)
  c = shape[-1]
  scale = (r.rand(c) + 0.5).astype(np.float32)
  bias = r.randn(c).astype(np.float32)
  weights = r.randn(*shape).astype(np.float32)  # makes the loss's cotangent non-uniform
  mask = r.rand(*shape) > 0.3
  mask.reshape(-1, c)[:, :2] = True  # every row and column keeps valid elements
  return x, scale, bias, weights, mask


def _loss(norm, w):
  """A non-linear scalar loss, so the gradient sees a cotangent that varies per element."""
  def loss(x, scale, bias, mask):
    y = norm(x, scale, bias, mask)
    return jnp.sum(w * y + 0.25 * y * y)
  return loss


def _grads(norm, ref, x, scale, bias, w, mask, with_scale, with_bias):
  s = scale if with_scale else None
  b = bias if with_bias else None
  argnums = (0,) + ((1,) if with_scale else ()) + ((2,) if with_bias else ())
  got = jax.jit(jax.grad(_loss(norm, jnp.asarray(w)), argnums), static_argnums=())(
      jnp.asarray(x), None if s is None else jnp.asarray(s),
      None if b is None else jnp.asarray(b), None if mask is None else jnp.asarray(mask))
  with jaxcompat.enable_x64(True):
    want = jax.grad(_loss(ref, jnp.asarray(w, F64)), argnums)(
        jnp.asarray(x, F64), None if s is None else jnp.asarray(s, F64),
        None if b is None else jnp.asarray(b, F64),
        None if mask is None else jnp.asarray(mask))
    want = [np.asarray(g) for g in want]
  return [np.asarray(g, np.float64) for g in got], want


# name: (reduction axes, feature axes of the parameters, centred, epsilon, groups) of the
# statistics, in the grouped layout for group norm.
LAYOUT = {
    "layer_norm": ((-1,), (-1,), True, 1e-6, None),
    "rms_norm": ((-1,), (-1,), False, 1e-6, None),
    "group_norm": ((1, 2, 4), (3, 4), True, 1e-6, 4),
    "batch_norm": ((0, 1), (2,), True, 1e-5, None),
}


def _forward_ref(name, x, scale, bias, mask):
  """The float64 output and its bound (`refs.norm_bound`) for the float32 inputs."""
  red, feat, centered, eps, _ = LAYOUT[name]
  if name == "group_norm":
    y = refs.ref_group_norm(x, 4, scale, bias, mask=mask)
    return y, refs.group_norm_bound(x, y, 4, scale, mask=mask)
  if name == "rms_norm":
    y = refs.ref_rms_norm(x, scale, mask=mask)
  elif name == "layer_norm":
    y = refs.ref_layer_norm(x, scale, bias, mask=mask)
  else:
    y = refs.ref_batch_norm_train(x, scale, bias, mask=mask)[0]
  return y, refs.norm_bound(x, y, scale, red, feat, eps, mask, centered)


def _derivative_bounds(name, x, scale, cot, cot_err, mask):
  """`refs.derivative_bounds` of case `name`: (input, scale, bias) bounds."""
  red, feat, centered, eps, groups = LAYOUT[name]
  if groups:
    c = x.shape[-1]
    g = lambda a: None if a is None else np.broadcast_to(a, x.shape).reshape(
        x.shape[:-1] + (groups, c // groups))
    scale = None if scale is None else np.asarray(scale).reshape(groups, c // groups)
    x, cot, cot_err, mask = g(x), g(cot), g(cot_err), g(mask)
  return refs.derivative_bounds(x, red, feat, scale, cot, cot_err, eps, mask, centered)


def _grad_bounds(name, x, scale, bias, w, mask, with_scale, with_bias):
  """Bounds on the gradients of `_loss` (cotangent g = w + y/2, off by δy/2 and two
  roundings), in `_grads`' order."""
  s = scale if with_scale else None
  y, dy = _forward_ref(name, x, s, bias if with_bias else None, mask)
  cot = refs.f64(w) + 0.5 * y
  bx, bs, bb = _derivative_bounds(name, x, s, cot, 0.5 * dy + 2 * refs.U32 * np.abs(cot), mask)
  return [bx] + ([bs] if with_scale else []) + ([bb] if with_bias else [])


def _assert_within(got, want, bounds):
  for g, r, b in zip(got, want, bounds, strict=True):
    assert g.shape == r.shape
    refs.assert_within(g, r, b)


def _assert_close(got, want, rel):
  for g, r in zip(got, want, strict=True):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, atol=rel * max(1.0, np.abs(r).max()))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("with_scale,with_bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("masked", [False, True])
def test_grad_matches_float64_autodiff(name, with_scale, with_bias, masked):
  norm, ref, shape = CASES[name]
  x, scale, bias, w, mask = _inputs(shape)
  m = mask if masked else None
  got, want = _grads(norm, ref, x, scale, bias, w, m, with_scale, with_bias)
  _assert_within(got, want, _grad_bounds(name, x, scale, bias, w, m, with_scale, with_bias))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_grad_is_exact_at_large_offsets(name, offset):
  if name == "rms_norm":
    pytest.skip("RMS normalization does not centre: an offset is its signal, not noise")
  norm, ref, shape = CASES[name]
  x, scale, bias, w, mask = _inputs(shape, offset=offset)
  x = (x - offset) / 2 + offset  # std 1 around the offset
  got, want = _grads(norm, ref, x, scale, bias, w, mask, True, True)
  # The mean's error scales with the offset (c(n)·1e4), and x̂, so every gradient, inherits it.
  _assert_within(got, want, _grad_bounds(name, x, scale, bias, w, mask, True, True))


def test_grad_in_bfloat16_matches_float64_of_the_rounded_input():
  x, scale, bias, w, _ = _inputs((6, 32))
  xb = jnp.asarray(x, jnp.bfloat16)
  got = jax.grad(lambda v: jnp.sum(jnp.asarray(w) * jn.layer_norm(v, scale, bias)
                                   .astype(jnp.float32)))(xb)
  assert got.dtype == jnp.bfloat16
  with jaxcompat.enable_x64(True):
    s64, b64 = jnp.asarray(scale, F64), jnp.asarray(bias, F64)
    want = jax.grad(lambda v: jnp.sum(jnp.asarray(w, F64) * ref_layer_norm(v, s64, b64, None)))(
        jnp.asarray(np.asarray(xb.astype(jnp.float32)), F64))
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want),
                             atol=refs.atol(jnp.bfloat16) * max(1, np.abs(want).max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_nan_does_not_reach_gradients(name):
  """NaN at masked positions and a loss that ignores them: finite, unchanged gradients."""
  norm, _, shape = CASES[name]
  x, scale, bias, w, mask = _inputs(shape)
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  zeroed = np.where(mask, x, 0.0).astype(np.float32)

  def loss(v, s, b):
    y = jnp.where(jnp.asarray(mask), norm(v, s, b, jnp.asarray(mask)), 0.0)
    return jnp.sum(w * y + 0.25 * y * y)

  g_nan = jax.grad(loss, (0, 1, 2))(jnp.asarray(poisoned), scale, bias)
  g_zero = jax.grad(loss, (0, 1, 2))(jnp.asarray(zeroed), scale, bias)
  for a, b in zip(g_nan, g_zero, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert np.isfinite(a).all()
    # The same program on the same valid values (masked ones never enter a sum): bitwise.
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_jvp_matches_float64(name, masked):
  norm, ref, shape = CASES[name]
  x, scale, bias, _, mask = _inputs(shape)
  m = mask if masked else None
  r = np.random.RandomState(3)
  tx, ts, tb = (r.randn(*a.shape).astype(np.float32) for a in (x, scale, bias))
  y, t = jax.jvp(lambda v, s, b: norm(v, s, b, m), (x, scale, bias), (tx, ts, tb))
  with jaxcompat.enable_x64(True):
    y64, t64 = jax.jvp(lambda v, s, b: ref(v, s, b, m),
                       tuple(jnp.asarray(a, F64) for a in (x, scale, bias)),
                       tuple(jnp.asarray(a, F64) for a in (tx, ts, tb)))
  # y: the forward bound. t = r γ (tx - mean(tx) - x̂ mean(x̂ tx)) + x̂ tγ + tβ: the
  # derivative bound with h = γ tx (exact tangents), plus x̂'s error (y's bound over |γ|) times
  # |tγ| and two roundings.
  _, y_bound = _forward_ref(name, x, scale, bias, m)
  bx, _, _ = _derivative_bounds(name, x, scale, tx, np.zeros_like(x, np.float64), m)
  t_bound = (bx + np.max(y_bound * np.abs(ts) / np.abs(scale))
             + 2 * refs.U32 * np.abs(np.asarray(t64)).max())
  _assert_within([np.asarray(y), np.asarray(t)], [np.asarray(y64), np.asarray(t64)],
                 [y_bound, t_bound])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_hessian_matches_float64(name, masked):
  norm, ref, _ = CASES[name]
  shape = (4, 8) if name != "group_norm" else (2, 3, 8)
  x, scale, bias, w, mask = _inputs(shape)
  m = mask if masked else None
  h = jax.hessian(lambda v: _loss(norm, jnp.asarray(w))(v, scale, bias, m))(x)
  with jaxcompat.enable_x64(True):
    h64 = jax.hessian(lambda v: _loss(ref, jnp.asarray(w, F64))(
        v, jnp.asarray(scale, F64), jnp.asarray(bias, F64), m))(jnp.asarray(x, F64))
  _assert_close([np.asarray(h)], [np.asarray(h64)], 1e-3)


def test_epsilon_is_differentiable():
  x, scale, bias, w, _ = _inputs((4, 16))
  got = jax.grad(lambda e: jnp.sum(w * jn.layer_norm(x, scale, bias, epsilon=e)))(0.5)
  with jaxcompat.enable_x64(True):
    want = jax.grad(lambda e: jnp.sum(jnp.asarray(w, F64) * _ref_norm(
        jnp.asarray(x, F64), jnp.asarray(scale, F64), jnp.asarray(bias, F64), (-1,), None,
        e)))(jnp.asarray(0.5, F64))
  # dL/dε = -Σ w γ x̂ r² / 2: each term off by x̂'s error d (`norm_bound` without scale) and
  # r²'s relative 2ρ, the rows' and the total's sums by c(64) of their absolute values.
  _, mean, var = refs.ref_moments(x, -1)
  r2 = 1 / (var[:, None] + 0.5)
  xhat = (refs.f64(x) - mean[:, None]) * np.sqrt(r2)
  d = refs.norm_bound(x, xhat, None, -1, -1, 0.5)
  rho = refs.var_error(x, -1)[:, None] * r2 / 2 + 4 * refs.U32
  terms = 0.5 * r2 * np.abs(refs.f64(w) * refs.f64(scale))
  bound = (terms * (np.abs(xhat) * (2 * rho + 4 * refs.U32 + refs.sum_factor(x.size)) + d)).sum()
  refs.assert_within(float(got), float(want), bound)


def test_batch_norm_running_statistics_are_differentiable():
  """The batch moments returned into the new state carry exact derivatives too."""
  x, *_ = _inputs((6, 8))
  f = lambda v: jn.batch_norm(v, jn.batch_norm_init(8), training=True, momentum=0.0)[1].var
  got = jax.jacrev(f)(x)
  with jaxcompat.enable_x64(True):
    want = jax.jacrev(lambda v: _ref_stats(v, (0,), None)[1][0])(jnp.asarray(x, F64))
  # d var_j / d x_ij = 2 (x_ij - μ_j) / n: off by 2 (|μ̂ - μ| + 2u |x - μ|) / n.
  _, mean, _ = refs.ref_moments(x, 0)
  n = x.shape[0]
  per = 2 * (refs.mean_error(x, 0) + 2 * refs.U32 * np.abs(refs.f64(x) - mean)) / n  # (6, 8)
  bound = np.zeros(want.shape)  # (8, 6, 8): output feature j, input (i, k); nonzero for k = j
  for j in range(x.shape[1]):
    bound[j, :, j] = per[:, j]
  refs.assert_within(got, want, bound)


def test_backward_keeps_only_the_input_and_small_statistics():
  """Residuals of the gradient: `x` itself plus per-row float32 statistics, no copy of x."""
  x, scale, bias, *_ = _inputs((64, 32))
  for f in (lambda v, s, b: jn.layer_norm(v, s, b),
            lambda v, s, b: jn.rms_norm(v, s),
            lambda v, s, b: jn.batch_norm(v, jn.batch_norm_init(32), s, b, training=True)[0]):
    _, pullback = jax.vjp(f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    residuals = jax.tree.leaves(pullback)  # the pullback closes over exactly the residuals
    big = [r for r in residuals if np.size(r) >= x.size]
    assert len(big) <= 1, [(np.shape(r), np.result_type(r)) for r in residuals]


@pytest.mark.parametrize("transform", ["vmap", "shard_map"])
def test_cross_device_gradient_equals_single_device(transform):
  """Gradients through the collectives: 4 devices with uneven masks (one empty) == one batch."""
  n_dev, rows, c = 4, 5, 8
  x, scale, bias, w, _ = _inputs((n_dev * rows, c))
  valid = np.array([5, 1, 0, 3])
  mask = (np.arange(rows)[None, :] < valid[:, None]).reshape(-1)[:, None]
  mask = np.broadcast_to(mask, x.shape)
  x = np.where(mask, x, np.nan).astype(np.float32)

  def loss(v, s, b, m, wv, axis_name):
    y, st = jn.batch_norm(v, jn.batch_norm_init(c), s, b, training=True, mask=m,
                          axis_name=axis_name, momentum=0.0)
    # The statistics are replicated on every device, whose losses are summed: count them once.
    share = 1.0 if axis_name is None else 1.0 / n_dev
    return jnp.sum(wv * jnp.where(m, y, 0.0)) + share * jnp.sum(st.mean + st.var)

  whole = jax.grad(functools.partial(loss, axis_name=None), (0, 1, 2))(x, scale, bias, mask, w)
  split = lambda a: a.reshape(n_dev, rows, c)

  def per_device(v, m, wv):
    return jax.grad(functools.partial(loss, axis_name="d"), (0, 1, 2))(v, scale, bias, m, wv)

  if transform == "vmap":
    gx, gs, gb = jax.vmap(per_device, axis_name="d")(split(x), split(mask), split(w))
    gs, gb = gs.sum(0), gb.sum(0)  # each device's parameter gradient is its own share
  else:
    mesh = jax.make_mesh((n_dev,), ("d",), devices=jax.devices()[:n_dev])

    # JAX 0.6.0's own jax.grad fails inside a checked shard_map (jaxcompat says why).
    checked = jaxcompat.grad_in_checked_shard_map()

    def body(v, m, wv):
      # scale and bias are replicated: shard_map already sums their cotangents over devices
      # where it types values as varying (its checks on); without them, the sum is written.
      gx, gs, gb = per_device(v[0], m[0], wv[0])
      if not checked:
        gs, gb = jax.lax.psum((gs, gb), "d")
      return gx[None], gs, gb

    args = [jax.device_put(split(a), jax.NamedSharding(mesh, P("d"))) for a in (x, mask, w)]
    gx, gs, gb = jaxcompat.shard_map(body, mesh=mesh, in_specs=(P("d"),) * 3,
                                     out_specs=(P("d"), P(), P()), check_vma=checked)(*args)
  # Both are within the derivative bounds of the exact gradient (cotangent w, exact, where
  # valid) plus that of the statistics' own term, d(mean + var)/dx = (1 + 2 (x - μ)) / n.
  bx, bs, bb = refs.derivative_bounds(x, (0,), (1,), scale, np.where(mask, w, 0.0),
                                      np.zeros(x.shape), 1e-5, mask)
  n = mask.sum(0)
  bx += np.max((2 * refs.mean_error(x, 0, mask) + 5 * refs.U32 * np.nanmax(np.abs(x), 0)) / n)
  refs.assert_within(np.asarray(gx).reshape(x.shape)[mask], whole[0][mask], 2 * bx)
  refs.assert_within(gs, whole[1], 2 * bs)
  refs.assert_within(gb, whole[2], 2 * bb)
  assert np.isfinite(np.asarray(gx)).all()
