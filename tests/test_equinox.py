"""jaxnorm.equinox against equinox.nn itself where equinox is right, and float64 where not."""

import contextlib
import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnorm.equinox as jne
from tests import jaxcompat, refs

KEY = jax.random.key(0)
M = 0.9  # momentum of the BatchNorm tests


def _standard():
  """equinox.nn itself is written for JAX's standard promotion (conftest turns on strict)."""
  return jax.numpy_dtype_promotion("standard")


@contextlib.contextmanager
def _quiet():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


def _data(shape, dtype=jnp.float32, seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * 2.0 + offset, dtype)


def _tol(dtype, offset=0.0, n=1, gain=1.0):
  """Output tolerance: the dtype's, plus the float32 error of a mean of n values near offset.

  A float32 sum of n terms is off by about sqrt(n)·eps·Σ|x_i|, so the mean by
  sqrt(n)·eps·|offset|; normalized by the data's std (2) and scaled by the largest |γ|.
  """
  eps32 = float(jnp.finfo(jnp.float32).eps)
  return gain * (refs.atol(dtype) + np.sqrt(n) * eps32 * abs(offset) / 2.0)


def _bn_pair(mode, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode, momentum=M, **kw)
    ours = eqx.nn.make_with_state(jne.BatchNorm)(3, "batch", mode=mode, momentum=M, **kw)
  return theirs, ours


@eqx.filter_jit
def _vmapped(layer, x, state, **kw):
  return jax.vmap(lambda x, s: layer(x, s, **kw), axis_name="batch", in_axes=(0, None),
                  out_axes=(0, None))(x, state)


def _state_leaves(state):
  return [np.asarray(a) for a in jax.tree.leaves(state)]


# --- layout: the same fields, leaves and serialized weights --------------------------------


LAYERS = [
    ("BatchNorm", (3, "batch"), {"mode": "batch"}),
    ("BatchNorm", (3, "batch"), {"mode": "ema"}),
    ("BatchNorm", (3, "batch"), {"mode": "batch", "channelwise_affine": False}),
    ("LayerNorm", ((2, 3),), {}),
    ("LayerNorm", (3,), {"use_bias": False}),
    ("GroupNorm", (2, 4), {}),
    ("GroupNorm", (2,), {"channelwise_affine": False}),
    ("RMSNorm", (3,), {}),
    ("RMSNorm", (3,), {"use_bias": False, "dtype": jnp.bfloat16}),
]


@pytest.mark.parametrize("name,args,kw", LAYERS)
def test_same_fields_leaves_and_state_as_equinox(name, args, kw):
  with _quiet():
    theirs, s_theirs = eqx.nn.make_with_state(getattr(eqx.nn, name))(*args, **kw)
    ours, s_ours = eqx.nn.make_with_state(getattr(jne, name))(*args, **kw)
  assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
  # equinox's BatchNorm holds axis_name (a string) as a leaf; ours keeps it static, so that a
  # model's leaves are arrays and Python scalars only (the ones equinox serialises).
  lt, lo = _leaves(theirs), jax.tree.leaves(ours)
  assert len(lt) == len(lo)
  for a, b in zip(lt, lo, strict=True):
    assert type(a) is type(b)
    if isinstance(a, jax.Array):
      assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type)
      np.testing.assert_array_equal(a, b)
  st, so = jax.tree.leaves(s_theirs), jax.tree.leaves(s_ours)
  assert [(a.shape, a.dtype, a.weak_type) for a in st] == [(b.shape, b.dtype, b.weak_type)
                                                           for b in so]
  if name == "BatchNorm" and kw["mode"] == "batch":  # ema's buffers are jnp.empty in equinox
    for a, b in zip(st, so, strict=True):
      np.testing.assert_array_equal(a, b)


class _Net(eqx.Module):
  """A small channels-first model written against a module of norm layers."""

  bn: eqx.Module
  gn: eqx.Module
  ln: eqx.Module
  rms: eqx.Module
  head: eqx.nn.Linear

  def __init__(self, nn, key):
    self.bn = nn.BatchNorm(4, "batch", mode="ema", momentum=M)
    self.gn = nn.GroupNorm(2, 4)
    self.ln = nn.LayerNorm((4, 8, 8))
    self.rms = nn.RMSNorm(4 * 8 * 8)
    self.head = eqx.nn.Linear(4 * 8 * 8, 10, key=key)

  def __call__(self, x, state):
    x, state = self.bn(x, state)
    x = jax.nn.relu(self.gn(x))
    x = self.rms(self.ln(x).reshape(-1))
    return self.head(x), state


def _perturbed(model):
  leaves, treedef = jax.tree.flatten(model)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(treedef, [
      a + 0.1 * jax.random.normal(k, a.shape, a.dtype) if eqx.is_inexact_array(a) else a
      for a, k in zip(leaves, keys, strict=True)])


def _leaves(model):
  """A model's leaves but strings: equinox's BatchNorm.axis_name, static in jaxnorm's."""
  return [a for a in jax.tree.leaves(model) if not isinstance(a, str)]


def test_serialized_equinox_weights_load_into_the_jaxnorm_model(tmp_path):
  with _quiet():
    theirs, s_theirs = eqx.nn.make_with_state(_Net)(eqx.nn, KEY)
    ours, s_ours = eqx.nn.make_with_state(_Net)(jne, jax.random.key(1))
  theirs = _perturbed(theirs)
  x = _data((6, 4, 8, 8))
  with _standard():
    _, s_theirs = _vmapped(theirs, x, s_theirs)  # a state that has seen a batch
  eqx.tree_serialise_leaves(tmp_path / "model.eqx", theirs)
  eqx.tree_serialise_leaves(tmp_path / "state.eqx", s_theirs)
  ours = eqx.tree_deserialise_leaves(tmp_path / "model.eqx", ours)
  s_ours = eqx.tree_deserialise_leaves(tmp_path / "state.eqx", s_ours)
  for a, b in zip(_leaves(theirs), _leaves(ours), strict=True):
    np.testing.assert_array_equal(a, b)
  # mode="ema" keeps equinox's semantics: the loaded model computes what equinox computes.
  x2 = _data((6, 4, 8, 8), seed=1)
  with _standard():
    y_theirs, _ = _vmapped(theirs, x2, s_theirs)
  y_ours, _ = _vmapped(ours, x2, s_ours)
  scale = float(jnp.max(jnp.abs(y_theirs)))
  np.testing.assert_allclose(y_ours, y_theirs, atol=50 * refs.atol(jnp.float32) * scale)
  # and back again
  eqx.tree_serialise_leaves(tmp_path / "ours.eqx", ours)
  again = eqx.tree_deserialise_leaves(tmp_path / "ours.eqx", theirs)
  for a, b in zip(_leaves(again), _leaves(ours), strict=True):
    np.testing.assert_array_equal(a, b)


# --- per-example layers: equinox is right, so both agree with float64 ----------------------


def _affine(shape, seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(1 + 0.5 * rng.normal(size=shape), jnp.float32),
          jnp.asarray(rng.normal(size=shape), jnp.float32))


def _with_params(layer, w, b):
  return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (w, b))


@pytest.mark.parametrize("dtype,offset", [(jnp.float32, 0.0), (jnp.float32, 1e4),
                                          (jnp.bfloat16, 0.0)])
def test_layer_group_rms_norm_match_equinox_and_float64(dtype, offset):
  x = _data((5, 4, 6), dtype, offset=offset)
  w, b = _affine((4, 6), 1)
  wc, bc = _affine((4,), 2)
  cases = [
      ("LayerNorm", ((4, 6),), (w, b),
       lambda x: refs.ref_layer_norm(x, w, b, reduction_axes=(1, 2), feature_axes=(1, 2),
                                     epsilon=1e-5)),
      ("RMSNorm", ((4, 6),), (w, b),
       lambda x: refs.ref_rms_norm(x, w, reduction_axes=(1, 2), feature_axes=(1, 2),
                                   epsilon=1e-5) + refs.f64(b)),
      ("GroupNorm", (2, 4), (wc, bc),
       lambda x: refs.ref_group_norm(np.moveaxis(refs.f64(x), 1, -1), 2, wc, bc,
                                     epsilon=1e-5).transpose(0, 2, 1)),
  ]
  for name, args, (w_, b_), ref in cases:
    theirs = _with_params(getattr(eqx.nn, name)(*args), w_, b_)
    ours = _with_params(getattr(jne, name)(*args), w_, b_)
    y = jax.vmap(ours)(x)
    assert y.dtype == x.dtype
    # |γ| up to ~3 and |β| up to ~3 on outputs of order 1: tolerance scaled by the output size
    gain = float(jnp.max(jnp.abs(w_))) + float(jnp.max(jnp.abs(b_)))
    tol = _tol(dtype, offset, n=24, gain=gain)
    expected = ref(refs.f64(x))
    np.testing.assert_allclose(refs.f64(y), expected, atol=tol, err_msg=name)
    with _standard():
      y_theirs = jax.vmap(theirs)(x)
    np.testing.assert_allclose(refs.f64(y), refs.f64(y_theirs), atol=2 * tol, err_msg=name)
    token = jnp.arange(3.0)  # any state passes through unchanged
    y2, state = jax.vmap(ours, in_axes=(0, None), out_axes=(0, None))(x, token)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(state, token)


def test_masks_leave_masked_elements_out():
  x = _data((3, 4, 6))
  mask = np.ones((4, 6), bool)
  mask[:, 4:] = False
  x_nan = jnp.where(mask, x, jnp.nan)
  ln = jne.LayerNorm((4, 6))
  y = jax.vmap(lambda x: ln(x, mask=mask))(x_nan)
  expected = refs.ref_layer_norm(x, reduction_axes=(1, 2), feature_axes=(1, 2), epsilon=1e-5,
                                 mask=mask)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, expected, 0),
                             atol=refs.atol(jnp.float32))
  gn = jne.GroupNorm(2, 4)
  y = jax.vmap(lambda x: gn(x, mask=mask))(x_nan)
  expected = refs.ref_group_norm(np.moveaxis(refs.f64(x), 1, -1), 2, epsilon=1e-5,
                                 mask=np.moveaxis(mask, 0, -1)).transpose(0, 2, 1)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, expected, 0),
                             atol=refs.atol(jnp.float32))


# --- BatchNorm -------------------------------------------------------------------------


def _ref_zero_debiased(batches, spatial):
  """Float64 zero-debiased EMA of the batch mean and variance, as equinox documents it."""
  hm = hv = 0.0
  for x in batches:
    _, mean, var = refs.ref_moments(x, (0,) + spatial)
    hm, hv = M * hm + (1 - M) * mean, M * hv + (1 - M) * var
  t = len(batches)
  return hm / (1 - M**t), hv / (1 - M**t)


def test_batch_mode_training_matches_equinox_and_inference_is_zero_debiased():
  (theirs, s_theirs), (ours, s_ours) = _bn_pair("batch")
  batches = [_data((8, 3, 5), seed=s, offset=s) for s in range(3)]
  for t, x in enumerate(batches, 1):
    with _standard():
      y_theirs, s_theirs = _vmapped(theirs, x, s_theirs)
    y_ours, s_ours = _vmapped(ours, x, s_ours)
    y_ref = refs.ref_batch_norm_train(x, feature_axes=1)[0]
    np.testing.assert_allclose(y_ours, y_ref, atol=refs.atol(jnp.float32))
    np.testing.assert_allclose(y_ours, y_theirs, atol=2 * refs.atol(jnp.float32))
    mean_ref, var_ref = _ref_zero_debiased(batches[:t], (2,))
    x_inf = _data((4, 3, 5), seed=9)
    y_inf, _ = _vmapped(ours, x_inf, s_ours, inference=True)
    expected = (refs.f64(x_inf) - mean_ref[:, None]) / np.sqrt(var_ref[:, None] + 1e-5)
    np.testing.assert_allclose(y_inf, expected, atol=refs.atol(jnp.float32) * 4)
    # equinox: its variance average starts at 1 and is debiased as if it started at 0.
    with _standard():
      y_theirs_inf, _ = _vmapped(theirs, x_inf, s_theirs, inference=True)
    eqx_var = var_ref + M**t / (1 - M**t)
    np.testing.assert_allclose(
        y_theirs_inf, (refs.f64(x_inf) - mean_ref[:, None]) / np.sqrt(eqx_var[:, None] + 1e-5),
        atol=refs.atol(jnp.float32) * 4)
    if t == 1:  # equinox's excess after one step at momentum 0.9: 9 + v against v
      np.testing.assert_allclose(eqx_var - var_ref, 9.0, rtol=1e-12)


def test_batch_mode_before_any_step_uses_mean_0_var_1():
  (theirs, s_theirs), (ours, s_ours) = _bn_pair("batch")
  x = _data((4, 3, 5))
  with _standard():
    y_theirs, _ = _vmapped(theirs, x, s_theirs, inference=True)
  y_ours, _ = _vmapped(ours, x, s_ours, inference=True)
  np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-6)


def test_ema_mode_matches_equinox_step_by_step():
  (theirs, s_theirs), (ours, s_ours) = _bn_pair("ema")
  for s in range(3):
    x = _data((8, 3, 5), seed=s, offset=s)
    with _standard():
      y_theirs, s_theirs = _vmapped(theirs, x, s_theirs)
    y_ours, s_ours = _vmapped(ours, x, s_ours)
    scale = float(jnp.max(jnp.abs(y_theirs)))
    np.testing.assert_allclose(y_ours, y_theirs, atol=2 * refs.atol(jnp.float32) * scale)
    for a, b in zip(_state_leaves(s_ours), _state_leaves(s_theirs), strict=True):
      if a.dtype == bool:
        np.testing.assert_array_equal(a, b)
      else:  # statistics of order 1-4 with offsets up to 2
        np.testing.assert_allclose(a, b, atol=refs.atol(jnp.float32) * 8)
  x = _data((4, 3, 5), seed=9)
  with _standard():
    y_theirs, _ = _vmapped(eqx.nn.inference_mode(theirs), x, s_theirs)
  y_ours, _ = _vmapped(eqx.nn.inference_mode(ours), x, s_ours)
  np.testing.assert_allclose(y_ours, y_theirs, atol=refs.atol(jnp.float32) * 8)


def test_bfloat16_and_offset_1e4():
  x32 = _data((16, 3, 4), offset=1e4)
  (theirs, s_theirs), _ = _bn_pair("ema")
  with _standard(), pytest.raises(TypeError, match=r"lax\.select"):
    _vmapped(theirs, x32.astype(jnp.bfloat16) - 1e4, s_theirs)
  for x in (x32, (x32 - 1e4).astype(jnp.bfloat16)):
    for mode in ("batch", "ema"):
      _, (bn, state) = _bn_pair(mode)
      y, state = _vmapped(bn, x, state)
      assert y.dtype == x.dtype
      offset = 1e4 if x.dtype == jnp.float32 else 0.0
      np.testing.assert_allclose(refs.f64(y), refs.ref_batch_norm_train(x, feature_axes=1)[0],
                                 atol=_tol(x.dtype, offset, n=64))
      assert all(a.dtype != jnp.bfloat16 for a in jax.tree.leaves(state))


def test_mask_and_cross_device_statistics_weighted_by_count():
  """pmap over 2 devices x vmap over 3 examples, uneven masks: the concatenated batch's."""
  # axis_name is static (a field, not a leaf): set at construction.
  bn, state = eqx.nn.make_with_state(jne.BatchNorm)(3, ("dev", "batch"), mode="batch",
                                                    momentum=M)
  x = _data((2, 3, 3, 5))
  mask = np.ones((2, 3, 1, 5), bool)
  mask[0, :, :, 1:] = False  # device 0: one valid element per example, device 1: five
  x = jnp.where(mask, x, jnp.nan)
  step = jax.pmap(
      jax.vmap(lambda x, m, s: bn(x, s, mask=m), axis_name="batch", in_axes=(0, 0, None),
               out_axes=(0, None)),
      axis_name="dev", in_axes=(0, 0, None), out_axes=(0, None), devices=jax.devices()[:2])
  y, new = step(x, mask, state)
  flat_x, flat_m = x.reshape(6, 3, 5), np.broadcast_to(mask, x.shape).reshape(6, 3, 5)
  y_ref, _, mean, var = refs.ref_batch_norm_train(flat_x, feature_axes=1, mask=flat_m)
  np.testing.assert_allclose(np.where(flat_m, y.reshape(6, 3, 5), 0), np.where(flat_m, y_ref, 0),
                             atol=refs.atol(jnp.float32))
  hidden_mean, hidden_var = _state_leaves(new)[1:]
  np.testing.assert_allclose(hidden_mean, (1 - M) * mean, atol=1e-6)
  np.testing.assert_allclose(hidden_var, (1 - M) * var, atol=1e-6)


@pytest.mark.parametrize("check_vma", [False, True])
def test_shard_map_around_the_per_example_vmap_as_the_guide_says(check_vma):
  """docs/guides/equinox.md, "Across devices": shard_map over 2 devices x vmap over 3
  examples, axis_name=("dev", "batch"); with check_vma on, JAX refuses the vmap axis."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  bn, state = eqx.nn.make_with_state(jne.BatchNorm)(3, ("dev", "batch"), mode="batch",
                                                    momentum=M)
  x = _data((6, 3, 5))
  mesh = jax.make_mesh((2,), ("dev",), devices=jax.devices()[:2])
  step = jaxcompat.shard_map(
      jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None)), mesh=mesh,
      in_specs=(P("dev"), P()), out_specs=(P("dev"), P()), check_vma=check_vma)
  xs = jax.device_put(x, NamedSharding(mesh, P("dev")))
  if check_vma:
    with pytest.raises(ValueError, match=r"check_vma=False.*jax\.pmap"):
      step(xs, state)
    return
  y, _ = step(xs, state)
  y_ref = refs.ref_batch_norm_train(x, feature_axes=1)[0]
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=refs.atol(jnp.float32))


# --- an equinox model trained on digits with jaxnorm's layers -------------------------------


def test_filter_jit_training_on_digits():
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.data[:256] / 16.0).astype(np.float32)
  y = digits.target[:256].astype(np.int32)

  class Net(eqx.Module):
    hidden: eqx.nn.Linear
    bn: jne.BatchNorm
    gn: jne.GroupNorm
    ln: jne.LayerNorm
    rms: jne.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.hidden = eqx.nn.Linear(64, 32, key=k1)
      self.bn = jne.BatchNorm(32, "batch", mode="batch", momentum=M)
      self.gn = jne.GroupNorm(4, 32)
      self.ln = jne.LayerNorm(32)
      self.rms = jne.RMSNorm(32)
      self.head = eqx.nn.Linear(32, 10, key=k2)

    def __call__(self, x, state):
      x, state = self.bn(self.hidden(x), state)
      x = jax.nn.relu(self.gn(x))
      return self.head(self.rms(self.ln(x))), state

  model, state = eqx.nn.make_with_state(Net)(KEY)
  opt = optax.sgd(0.1, momentum=0.9)  # adam's bias correction fails under strict promotion
  opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
  traces = []

  def loss_fn(model, state, xb, yb):
    logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                             out_axes=(0, None))(xb, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), state

  @eqx.filter_jit
  def step(model, state, opt_state, xb, yb):
    traces.append(1)
    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, xb, yb)
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, opt_state, loss

  losses = []
  for _ in range(4):
    for i in range(0, 256, 64):
      model, state, opt_state, loss = step(model, state, opt_state, x[i:i + 64], y[i:i + 64])
      losses.append(loss)
  losses = np.asarray(losses)
  assert len(traces) == 1
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
  logits, _ = _vmapped(eqx.nn.inference_mode(model), x, state)
  assert np.mean(np.argmax(logits, -1) == y) > 0.8  # chance is 0.1


def test_momentum_one_freezes_the_running_statistics():
  """momentum=1.0 (frozen statistics, e.g. for fine-tuning), which equinox accepts: mode="ema"
  keeps the first batch's statistics as equinox does; mode="batch" keeps its initial mean 0 and
  variance 1 (equinox's zero debiasing divides by 1 - 1**t = 0 there)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs, s_theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema",
                                                                momentum=1.0)
    ours, s_ours = eqx.nn.make_with_state(jne.BatchNorm)(3, "batch", mode="ema", momentum=1.0)
    batch, s_batch = eqx.nn.make_with_state(jne.BatchNorm)(3, "batch", mode="batch",
                                                           momentum=1.0)
  x_inf = _data((4, 3, 5), seed=9)
  before, _ = _vmapped(batch, x_inf, s_batch, inference=True)
  for s in range(3):
    x = _data((8, 3, 5), seed=s, offset=s)
    with _standard():
      _, s_theirs = _vmapped(theirs, x, s_theirs)
    _, s_ours = _vmapped(ours, x, s_ours)
    _, s_batch = _vmapped(batch, x, s_batch)
  for a, b in zip(_state_leaves(s_ours), _state_leaves(s_theirs), strict=True):
    np.testing.assert_allclose(a, b, atol=refs.atol(jnp.float32) * 8)
  after, _ = _vmapped(batch, x_inf, s_batch, inference=True)
  np.testing.assert_array_equal(after, before)


def test_batch_mode_per_feature_count_keeps_hidden_channels_exact():
  """mode="batch", channel 1 hidden by the mask in the first step: its debiased statistics
  are the second batch's (mean 30, variance 100), not shrunk toward the initial zeros."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bn, state = eqx.nn.make_with_state(jne.BatchNorm)(2, "batch", mode="batch", momentum=M,
                                                      per_feature_count=True)
  x1 = jnp.float32([[[1.0], [7.0]], [[3.0], [7.0]]])  # (batch, channels, length)
  x2 = jnp.float32([[[20.0], [20.0]], [[40.0], [40.0]]])
  _, state = _vmapped(bn, x1, state, mask=jnp.asarray([[True], [False]]))
  _, state = _vmapped(bn, x2, state)
  x_inf = _data((4, 2, 3), seed=9)
  y, _ = _vmapped(bn, x_inf, state, inference=True)
  # channel 0: the debiased average of (2, 1) and (30, 100) with weights M and 1 (over 1 + M)
  mean = np.float64([(M * 2 + 30) / (1 + M), 30.0])
  var = np.float64([(M * 1 + 100) / (1 + M), 100.0])
  expected = (refs.f64(x_inf) - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
  np.testing.assert_allclose(y, expected, atol=refs.atol(jnp.float32) * 4)
