"""The 0.2.0 API: rms_norm's bias, channels-first group_norm, batch_renorm's unbiased running
variance, keyword-only configuration, default epsilons, jax.export of the state, and arguments
validated once per public call."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxnorm as jn
import jaxnorm.equinox as jne
from jaxnorm import _checks
from tests import refs


def _x(shape, seed=0, offset=0.0):
  return (np.random.default_rng(seed).normal(size=shape) + offset).astype(np.float32)


def test_rms_norm_bias_is_added_before_the_one_rounding():
  x, g, b = _x((6, 8), offset=3.0), 1 + 0.1 * _x((8,), 1), _x((8,), 2)
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
  z = (x + 1j * _x((6, 8), 3)).astype(np.complex64)
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
  x = _x(shape, offset=10.0)
  c = shape[1]
  g, b = 1 + 0.1 * _x((c,), 1), _x((c,), 2)
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


def test_batch_renorm_stores_the_unbiased_running_variance_as_batch_norm_does():
  x = _x((16, 4), offset=2.0)
  state = jn.BatchNormState(jnp.full(4, 1.0), jnp.full(4, 2.0), jnp.array(3))
  kw = dict(training=True, momentum=0.9, unbiased_running_var=True)
  _, bn = jn.batch_norm(x, state, **kw)
  _, rn = jn.batch_renorm(x, state, r_max=3.0, d_max=5.0, **kw)
  for a, b in zip(bn, rn, strict=True):
    np.testing.assert_array_equal(a, b)
  _, biased = jn.batch_renorm(x, state, r_max=3.0, d_max=5.0, training=True, momentum=0.9)
  # Bessel's factor n / (n - 1) on the batch's share of the update.
  n = 16
  batch_var = np.var(refs.f64(x), 0)
  np.testing.assert_allclose(rn.var - biased.var, 0.1 * batch_var / (n - 1), rtol=1e-4)


def test_configuration_is_keyword_only_and_epsilon_has_a_default():
  k, m, v = jnp.ones((3, 2)), jnp.zeros(2), jnp.full(2, 4.0)
  with pytest.raises(TypeError):
    jn.fold_batch_norm(k, None, m, v)  # type: ignore[misc]
  fk, fb = jn.fold_batch_norm(k, mean=m, var=v)
  np.testing.assert_allclose(fk, k / np.sqrt(4.0 + 1e-5), rtol=1e-6)
  np.testing.assert_array_equal(fb, np.zeros(2))
  with pytest.raises(TypeError):
    jn.batch_norm_init(2, jnp.float32)  # type: ignore[misc]
  with pytest.raises(TypeError):
    jax.vmap(lambda s: jn.sync_running_stats(s, "r"), axis_name="r")(  # type: ignore[misc]
        jax.tree.map(lambda a: jnp.stack([a, a]), jn.batch_norm_init(2)))
  x = _x((5, 3))
  mom = jn.moments(x, 0)
  np.testing.assert_array_equal(jn.normalize(x, mom.mean, mom.var, reduction_axes=0),
                                jn.normalize(x, mom.mean, mom.var, reduction_axes=0,
                                             epsilon=1e-5))


def _step(x, state, scale, bias):
  y, new = jn.batch_norm(x, state, scale, bias, training=True, momentum=0.9)
  return jnp.sum(y * y), new


def test_an_exported_training_step_with_the_state_serializes_and_runs():
  x, state = _x((8, 4), offset=1.0), jn.batch_norm_init(4)
  scale, bias = jnp.ones(4), jnp.zeros(4)
  step = jax.jit(jax.value_and_grad(_step, argnums=(2, 3), has_aux=True))
  exp = export.export(step, platforms=("cpu", "cuda", "tpu"))(x, state, scale, bias)
  again = export.deserialize(exp.serialize())
  got, want = again.call(x, state, scale, bias), step(x, state, scale, bias)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert isinstance(got[0][1], jn.BatchNormState)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  m = export.export(jax.jit(lambda x: jn.moments(x, 0)), platforms=("cpu",))(x)
  assert isinstance(export.deserialize(m.serialize()).call(x), jn.Moments)


def test_an_equinox_model_with_batch_norm_has_array_leaves_only():
  bn, _ = eqx.nn.make_with_state(jne.BatchNorm)(3, "batch", mode="batch")
  leaves = jax.tree.leaves(bn)
  assert all(isinstance(a, (jax.Array, bool)) for a in leaves), leaves
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), eqx.filter(bn, eqx.is_array))
  assert stacked.weight.shape == (2, 3)
  assert bn.axis_name == "batch"


PUBLIC_CALLS = {
    "layer_norm": lambda x: jn.layer_norm(x, jnp.ones(4), jnp.zeros(4)),
    "rms_norm": lambda x: jn.rms_norm(x, jnp.ones(4), jnp.zeros(4)),
    "group_norm": lambda x: jn.group_norm(x, num_groups=2),
    "instance_norm": lambda x: jn.instance_norm(x[:, None]),
    "batch_norm": lambda x: jn.batch_norm(x, jn.batch_norm_init(4), training=True),
    "batch_norm_eval": lambda x: jn.batch_norm(x, jn.batch_norm_init(4), training=False),
    "batch_renorm": lambda x: jn.batch_renorm(x, jn.batch_norm_init(4), training=True,
                                              r_max=2.0, d_max=1.0),
    "normalize": lambda x: jn.normalize(x, jnp.zeros(4), jnp.ones(4), reduction_axes=0),
    "moments": lambda x: jn.moments(x, 0, mask=jnp.ones((6, 4), bool)),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLS))
def test_each_public_call_validates_its_arguments_once(name, monkeypatch):
  calls: dict[str, int] = {}
  for check in ("check_floating", "canonicalize_axes", "check_mask", "check_param",
                "check_epsilon", "check_momentum", "check_implementation"):
    original = getattr(_checks, check)

    def counted(*args, _original=original, _name=check, **kwargs):
      calls[_name] = calls.get(_name, 0) + 1
      return _original(*args, **kwargs)

    monkeypatch.setattr(_checks, check, counted)
  PUBLIC_CALLS[name](_x((6, 4)))
  assert calls.get("check_floating") == 1, calls
  assert calls.get("check_mask", 1) == 1, calls
  assert calls.get("check_epsilon", 1) == 1, calls
  assert calls.get("check_momentum", 1) == 1, calls
  assert calls.get("check_implementation", 1) == 1, calls
  # x's scale and bias: at most one check each
  assert calls.get("check_param", 0) <= 2, calls
