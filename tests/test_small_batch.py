"""Remedies for BN's batch-size dependence, and conditioning, against float64 references.

Batch renormalization (Ioffe, 2017), ghost batches (Hoffer et al., 2017), zero-centred scale,
per-example (conditional) scale and bias, and running statistics that a non-finite batch leaves
alone. References are the papers' algorithms written in float64 with `jax.numpy` (under
`jax.enable_x64`) so that JAX's autodiff of them gives the reference gradients; renorm's `r` and
`d` are constants there (`stop_gradient`), as in the paper.

Tolerances: outputs and gradients are compared with `refs.atol(float32)` relative to the
reference's magnitude (a float32 sum of n <= 64 terms of order 1 is off by about
sqrt(n)·eps·n ≈ 5e-6, well inside 2e-5), times 10 for gradients, which chain three such sums.
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
TOL = refs.atol(jnp.float32)


def _data(shape, seed=0, offset=0.5):
  r = np.random.RandomState(seed)
  return (r.randn(*shape) * 2.0 + offset).astype(np.float32)


def _close(got, want, rel=TOL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=rel * max(1.0, np.abs(want).max()))


# --- float64 references (jax.numpy, differentiable under enable_x64) --------------------------

def _stats(x, axes, mask):
  w = jnp.ones(x.shape, F64) if mask is None else jnp.broadcast_to(mask, x.shape).astype(F64)
  n = jnp.maximum(jnp.sum(w, axes, keepdims=True), 1.0)
  mean = jnp.sum(jnp.where(w > 0, x, 0.0), axes, keepdims=True) / n
  d = jnp.where(w > 0, x - mean, 0.0)
  return mean, jnp.sum(d * d, axes, keepdims=True) / n


def ref_batch_renorm(x, gamma, beta, run_mean, run_var, r_max, d_max, eps=1e-5, mask=None,
                     vbs=None):
  """Algorithm 1 of Ioffe (2017), channels last; ghost batches split axis 0."""
  shape = x.shape
  if vbs is not None:
    x = x.reshape((shape[0] // vbs, vbs) + shape[1:])
    mask = None if mask is None else jnp.broadcast_to(mask, shape).reshape(x.shape)
    gamma = gamma if gamma.ndim == 1 else gamma.reshape((x.shape[0], vbs) + gamma.shape[1:])
    beta = beta if beta.ndim == 1 else beta.reshape((x.shape[0], vbs) + beta.shape[1:])
  axes = tuple(range(1 if vbs else 0, x.ndim - 1))
  mu, var = _stats(x, axes, mask)
  sigma_b, sigma = jnp.sqrt(var + eps), jnp.sqrt(run_var + eps)
  r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
  d = jax.lax.stop_gradient(jnp.clip((mu - run_mean) / sigma, -d_max, d_max))
  y = ((x - mu) / sigma_b * r + d) * gamma + beta
  return y.reshape(shape)


def ref_ln(x, gamma, beta, centered=True, eps=1e-6):
  mean, var = _stats(x, (-1,), None)
  if not centered:
    mean, var = 0.0, jnp.mean(x * x, -1, keepdims=True)
  y = (x - mean) / jnp.sqrt(var + eps) * gamma
  return y if beta is None else y + beta


def _grad_check(f, ref, args, w, argnums):
  """jax.grad of sum(w*y + y²/4) through jaxnorm (float32) and the float64 reference."""
  loss = lambda fn, w: lambda *a: jnp.sum(w * fn(*a) + 0.25 * fn(*a) ** 2)
  got = jax.jit(jax.grad(loss(f, jnp.asarray(w)), argnums))(*args)
  with jaxcompat.enable_x64(True):
    want = jax.grad(loss(ref, jnp.asarray(w, F64)), argnums)(
        *(jnp.asarray(a, F64) for a in args))
  for g, r, i in zip(got, want, argnums, strict=True):
    assert g.shape == np.shape(args[i])  # gradients come back in the shape given
    _close(g, r, TOL * 10)


# --- batch renormalization ------------------------------------------------------------------

STATE = jn.BatchNormState(jnp.array([0.3, -1.0, 2.0, 0.0]), jnp.array([0.5, 4.0, 1.0, 9.0]),
                          jnp.array(5))


@pytest.mark.parametrize("vbs", [None, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_renorm_matches_float64_with_gradients(vbs, masked):
  x = _data((8, 3, 4))
  r = np.random.RandomState(1)
  gamma, beta = (r.rand(4) + 0.5).astype(np.float32), r.randn(4).astype(np.float32)
  mask = (r.rand(8, 3, 1) > 0.3) if masked else None
  w = r.randn(*x.shape).astype(np.float32)
  # r_max=1.5 and d_max=0.5 clip some features and leave others inside the bounds.
  y, new = jn.batch_renorm(x, STATE, gamma, beta, training=True, r_max=1.5, d_max=0.5,
                           mask=mask, momentum=0.9, virtual_batch_size=vbs)
  with jaxcompat.enable_x64(True):
    want = ref_batch_renorm(jnp.asarray(x, F64), jnp.asarray(gamma, F64),
                            jnp.asarray(beta, F64), jnp.asarray(STATE.mean, F64),
                            jnp.asarray(STATE.var, F64), 1.5, 0.5, mask=mask, vbs=vbs)
  _close(y, want)
  # The state updates exactly as batch_norm's, with the whole batch's moments.
  _, bn = jn.batch_norm(x, STATE, gamma, beta, training=True, mask=mask, momentum=0.9,
                        virtual_batch_size=vbs)
  jax.tree.map(np.testing.assert_array_equal, new, bn)
  _, mean, var = refs.ref_moments(x, (0, 1), mask)
  _close(new.mean, 0.9 * refs.f64(STATE.mean) + 0.1 * mean)
  _close(new.var, 0.9 * refs.f64(STATE.var) + 0.1 * var)

  f = lambda v, g, b: jn.batch_renorm(v, STATE, g, b, training=True, r_max=1.5, d_max=0.5,
                                      mask=mask, virtual_batch_size=vbs)[0]
  ref = lambda v, g, b: ref_batch_renorm(v, g, b, jnp.asarray(STATE.mean, F64),
                                         jnp.asarray(STATE.var, F64), 1.5, 0.5, mask=mask,
                                         vbs=vbs)
  _grad_check(f, ref, (x, gamma, beta), w, (0, 1, 2))


def test_batch_renorm_bounds_one_and_zero_are_batch_norm_bitwise():
  x, scale, bias = _data((16, 4)), np.float32([1, 2, 0.5, 3]), np.float32([0, 1, -1, 2])
  got = jn.batch_renorm(x, STATE, scale, bias, training=True, r_max=1.0, d_max=0.0)
  want = jn.batch_norm(x, STATE, scale, bias, training=True)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  got = jn.batch_renorm(x, STATE, scale, bias, training=False, r_max=3.0, d_max=5.0)
  want = jn.batch_norm(x, STATE, scale, bias, training=False)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_batch_renorm_with_wide_bounds_reproduces_the_running_statistics_output():
  """Unclipped r, d: the training output is the evaluation output, x normalized by the state."""
  x = _data((16, 4))
  y, _ = jn.batch_renorm(x, STATE, training=True, r_max=100.0, d_max=100.0)
  y_eval, _ = jn.batch_norm(x, STATE, training=False)
  _close(y, y_eval)


def test_traced_r_max_d_max_compile_once():
  traces = []

  @jax.jit
  def step(x, r_max, d_max):
    traces.append(None)
    return jn.batch_renorm(x, STATE, training=True, r_max=r_max, d_max=d_max)[0]

  x = _data((16, 4))
  for r_max, d_max in [(1.0, 0.0), (2.0, 2.5), (3.0, 5.0)]:
    got = step(x, jnp.float32(r_max), jnp.float32(d_max))
    want, _ = jn.batch_renorm(x, STATE, training=True, r_max=r_max, d_max=d_max)
    _close(got, want)
  assert len(traces) == 1


def test_batch_renorm_across_devices_equals_the_concatenated_batch():
  x = _data((4, 6, 4))
  mask = np.arange(6)[None, :, None] < np.array([6, 2, 0, 4])[:, None, None]
  f = lambda v, m, axis_name=None: jn.batch_renorm(
      v, STATE, training=True, r_max=1.5, d_max=0.5, mask=m, axis_name=axis_name)
  y, st = jax.vmap(functools.partial(f, axis_name="d"), axis_name="d")(x, mask)
  y1, st1 = f(x.reshape(24, 4), np.broadcast_to(mask, x.shape).reshape(24, 4))
  _close(np.where(mask, y, 0).reshape(24, 4), np.where(mask.reshape(24, 1), y1, 0))
  for a, b in zip(st, st1, strict=True):
    _close(a[0], b)


# --- ghost (virtual) batches ----------------------------------------------------------------

def test_ghost_batches_normalize_each_chunk_and_update_with_the_whole_batch():
  x = _data((8, 3, 4))
  mask = np.random.RandomState(2).rand(8, 3, 4) > 0.3
  mask[:, 0] = True
  y, new = jn.batch_norm(x, jn.batch_norm_init(4), training=True, momentum=0.0,
                         virtual_batch_size=2, mask=mask)
  for g in range(4):
    chunk = slice(2 * g, 2 * g + 2)
    want, *_ = refs.ref_batch_norm_train(x[chunk], mask=mask[chunk])
    _close(np.where(mask[chunk], y[chunk], 0), np.where(mask[chunk], want, 0))
  _, mean, var = refs.ref_moments(x, (0, 1), mask)  # the exact merge of the ghost batches
  _close(new.mean, mean)
  _close(new.var, var)


def test_ghost_batches_gradients_and_per_example_scale():
  x, w = _data((8, 3, 4)), _data((8, 3, 4), seed=5)
  gamma = (np.random.RandomState(3).rand(8, 1, 4) + 0.5).astype(np.float32)
  beta = np.random.RandomState(4).randn(8, 1, 4).astype(np.float32)
  f = lambda v, g, b: jn.batch_norm(v, jn.batch_norm_init(4), g, b, training=True,
                                    virtual_batch_size=4)[0]
  ref = lambda v, g, b: ref_batch_renorm(v, g, b, 0.0, 1.0, 1.0, 0.0, vbs=4)  # = batch norm
  _grad_check(f, ref, (x, gamma, beta), w, (0, 1, 2))


def _across_devices_reference(x, mask, vbs):
  """Ghost batch i = the i-th chunk of every device: (D, B, C) -> per-group batch norm."""
  d, b, c = x.shape
  g = b // vbs
  xg = x.reshape(d, g, vbs, c).transpose(1, 0, 2, 3).reshape(g, d * vbs, c)
  mg = np.broadcast_to(mask, x.shape).reshape(d, g, vbs, c).transpose(1, 0, 2, 3)
  mg = mg.reshape(g, d * vbs, c)
  ys = [refs.ref_batch_norm_train(xg[i], mask=mg[i])[0] for i in range(g)]
  y = np.stack(ys).reshape(g, d, vbs, c).transpose(1, 0, 2, 3).reshape(d, b, c)
  _, mean, var = refs.ref_moments(x.reshape(-1, c), 0, np.broadcast_to(mask, x.shape)
                                  .reshape(-1, c))
  return y, mean, var


@pytest.mark.parametrize("transform", ["vmap", "shard_map", "pmap"])
def test_ghost_batches_across_devices(transform):
  """With axis_name, ghost batch i gathers the i-th chunk of every device (google/flax#332)."""
  n_dev, b, c, vbs = 4, 6, 3, 2
  x = _data((n_dev, b, c))
  mask = np.arange(b)[None, :, None] < np.array([6, 3, 1, 5])[:, None, None]  # uneven
  f = lambda v, m: jn.batch_norm(v, jn.batch_norm_init(c), training=True, momentum=0.0,
                                 mask=m, axis_name="d", virtual_batch_size=vbs)
  m_full = np.broadcast_to(mask, x.shape)
  if transform in ("vmap", "pmap"):
    mapped = jax.vmap if transform == "vmap" else jax.pmap
    y, st = mapped(f, axis_name="d")(x, m_full)
    st = jax.tree.map(lambda a: a[0], st)
  else:
    mesh = jax.make_mesh((n_dev,), ("d",), devices=jax.devices()[:n_dev])

    def body(v, m):
      y, st = f(v[0], m[0])
      return y[None], st

    args = [jax.device_put(a, jax.NamedSharding(mesh, P("d"))) for a in (x, m_full)]
    y, st = jax.jit(jaxcompat.shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")),
                                        out_specs=(P("d"), P())))(*args)
  want, mean, var = _across_devices_reference(x, mask, vbs)
  _close(np.where(m_full, y, 0), np.where(m_full, want, 0))
  _close(st.mean, mean)
  _close(st.var, var)


def test_ghost_batches_are_ignored_in_evaluation():
  x = _data((1, 3))  # one example: no ghost batch of 2 fits, evaluation does not need one
  got = jn.batch_norm(x, STATE3, training=False, virtual_batch_size=2)
  jax.tree.map(np.testing.assert_array_equal, got, jn.batch_norm(x, STATE3, training=False))


STATE3 = jn.BatchNormState(jnp.array([0.5, 1.0, -1.0]), jnp.array([2.0, 1.0, 0.5]),
                           jnp.array(3))


def test_ghost_batches_stay_on_their_device_without_axis_name():
  x = _data((2, 4, 3))
  y = jax.vmap(lambda v: jn.batch_norm(v, jn.batch_norm_init(3), training=True,
                                       virtual_batch_size=2)[0])(x)
  for dev in range(2):
    for g in range(2):
      want, *_ = refs.ref_batch_norm_train(x[dev, 2 * g:2 * g + 2])
      _close(y[dev, 2 * g:2 * g + 2], want)


# --- running statistics safe from a bad batch -----------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, 3e38])  # 3e38: finite, but its square is not
def test_a_non_finite_batch_leaves_the_running_statistics_unchanged(bad):
  x = _data((8, 4))
  x[3, 1] = bad
  for norm in (functools.partial(jn.batch_norm, momentum=0.9),
               functools.partial(jn.batch_renorm, r_max=3.0, d_max=5.0)):
    y, new = norm(x, STATE, training=True)
    jax.tree.map(np.testing.assert_array_equal, new, STATE)
    if not np.isfinite(bad):  # the loss sees it (an overflowing variance gives y = 0)
      assert not np.isfinite(np.asarray(y)[:, 1]).all()
  m = jn.moments(x, 0)
  jax.tree.map(np.testing.assert_array_equal, jn.update_running_stats(STATE, m), STATE)
  # The same value at a masked position is ignored: the state moves.
  mask = np.ones(x.shape, bool)
  mask[3, 1] = False
  _, new = jn.batch_norm(x, STATE, training=True, mask=mask)
  assert int(new.count) == int(STATE.count) + 1 and np.isfinite(np.asarray(new.mean)).all()


def test_a_bad_batch_on_one_device_leaves_every_device_state_unchanged():
  x = _data((4, 5, 4))
  x[2, 1, 0] = np.nan
  f = lambda v: jn.batch_norm(v, STATE, training=True, axis_name="d")[1]
  st = jax.vmap(f, axis_name="d")(x)
  for a, b in zip(st, STATE, strict=True):
    np.testing.assert_array_equal(a, np.broadcast_to(b, a.shape))


# --- zero-centred scale ---------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_zero_centered_scale_is_one_plus_gamma(norm):
  x, w = _data((6, 16)), _data((6, 16), seed=1)
  gamma = (np.random.RandomState(2).randn(16) * 0.1).astype(np.float32)
  beta = np.random.RandomState(3).randn(16).astype(np.float32)
  if norm == "layer_norm":
    f = lambda v, g, b: jn.layer_norm(v, g, b, zero_centered_scale=True)
    ref = lambda v, g, b: ref_ln(v, 1 + g, b)
  else:
    f = lambda v, g, b: jn.rms_norm(v, g, zero_centered_scale=True) + 0 * b
    ref = lambda v, g, b: ref_ln(v, 1 + g, None, centered=False) + 0 * b
  with jaxcompat.enable_x64(True):
    want = ref(*(jnp.asarray(a, F64) for a in (x, gamma, beta)))
  _close(f(x, gamma, beta), want)
  _grad_check(f, ref, (x, gamma, beta), w, (0, 1))
  # zeros in the zero-centred form are the identity scale.
  plain = getattr(jn, norm)(x)
  np.testing.assert_array_equal(getattr(jn, norm)(x, np.zeros(16, np.float32),
                                                  zero_centered_scale=True), plain)


# --- per-example (conditional) scale and bias -----------------------------------------------

def _ref_per_example(name, x, g, b):
  if name == "layer_norm":
    return ref_ln(x, g, b)
  if name == "rms_norm":
    return ref_ln(x, g, None, centered=False)
  if name == "batch_norm":
    axes = (0, 1)
  elif name == "instance_norm":
    axes = (1,)
  else:  # group_norm, 2 groups of 4 channels
    xg = x.reshape(x.shape[:-1] + (2, 4))
    mean, var = _stats(xg, (1, 3), None)
    return ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * g + b
  mean, var = _stats(x, axes, None)
  eps = 1e-5 if name == "batch_norm" else 1e-6
  return (x - mean) / jnp.sqrt(var + eps) * g + b


PER_EXAMPLE = {
    "layer_norm": lambda v, g, b: jn.layer_norm(v, g, b),
    "rms_norm": lambda v, g, b: jn.rms_norm(v, g),
    "batch_norm": lambda v, g, b: jn.batch_norm(v, jn.batch_norm_init(8), g, b,
                                                training=True)[0],
    "instance_norm": lambda v, g, b: jn.instance_norm(v, g, b),
    "group_norm": lambda v, g, b: jn.group_norm(v, g, b, num_groups=2),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
@pytest.mark.parametrize("shape", [(4, 1, 8), (5, 1), (1, 8)])
def test_per_example_scale_and_bias_match_float64(name, shape):
  """FiLM-style (batch, 1, features) parameters and other broadcasting shapes."""
  if name == "group_norm" and shape == (5, 1):
    pytest.skip("group norm's parameters run along channels (or broadcast over them)")
  x, w = _data((4, 5, 8)), _data((4, 5, 8), seed=7)
  r = np.random.RandomState(8)
  g, b = (r.rand(*shape) + 0.5).astype(np.float32), r.randn(*shape).astype(np.float32)
  f = PER_EXAMPLE[name]
  ref = lambda v, g_, b_: _ref_per_example(name, v, g_, b_)
  with jaxcompat.enable_x64(True):
    want = ref(*(jnp.asarray(a, F64) for a in (x, g, b)))
  _close(f(x, g, b), want)
  argnums = (0, 1) if name == "rms_norm" else (0, 1, 2)  # rms_norm has no bias
  _grad_check(f, ref, (x, g, b), w, argnums)


def test_normalize_with_given_statistics_takes_per_example_parameters():
  x, w = _data((4, 5, 8)), _data((4, 5, 8), seed=3)
  r = np.random.RandomState(4)
  g, b = (r.rand(4, 1, 8) + 0.5).astype(np.float32), r.randn(4, 1, 8).astype(np.float32)

  def f(v, g_, b_):
    m = jn.moments(v, -1)
    return jn.normalize(v, m.mean, m.var, g_, b_, reduction_axes=-1, epsilon=1e-6)

  _grad_check(f, ref_ln, (x, g, b), w, (0, 1, 2))


def test_per_example_scale_channels_first_and_feature_shape_precedence():
  """A feature-shaped parameter runs along feature_axes; others broadcast as in NumPy."""
  x = _data((4, 8, 5))  # channels first
  g = (np.random.RandomState(0).rand(4, 8, 1) + 0.5).astype(np.float32)
  y, _ = jn.batch_norm(x, jn.batch_norm_init(8), g, training=True, feature_axes=1)
  with jaxcompat.enable_x64(True):
    x64 = jnp.asarray(x, F64)
    mean, var = _stats(x64, (0, 2), None)
    want = (x64 - mean) / jnp.sqrt(var + 1e-5) * jnp.asarray(g, F64)
  _close(y, want)
  g8 = g[0, :, 0]  # exactly the feature shape: along axis 1, not broadcast over the last axis
  y8, _ = jn.batch_norm(x, jn.batch_norm_init(8), g8, training=True, feature_axes=1)
  _close(y8, np.asarray(want) / g * g8[None, :, None])


def test_per_example_scale_keeps_no_normalized_copy_for_the_backward_pass():
  x = _data((64, 32))
  g = (np.random.RandomState(0).rand(64, 1) + 0.5).astype(np.float32)
  for f in (lambda v, s: jn.layer_norm(v, s), lambda v, s: jn.rms_norm(v, s),
            lambda v, s: jn.batch_norm(v, jn.batch_norm_init(32), s, training=True)[0],
            lambda v, s: jn.batch_renorm(v, STATE32, s, training=True, r_max=2.0,
                                         d_max=1.0, virtual_batch_size=16)[0]):
    _, pullback = jax.vjp(f, jnp.asarray(x), jnp.asarray(g))
    big = [r for r in jax.tree.leaves(pullback) if np.size(r) >= x.size]
    assert len(big) <= 1, [np.shape(r) for r in jax.tree.leaves(pullback)]


STATE32 = jn.batch_norm_init(32)
