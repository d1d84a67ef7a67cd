"""The public surface as a whole: configuration keyword-only, epsilons with defaults, the state
through jax.export, equinox models of array leaves only, and each public call validating its
arguments once."""

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


def _x(shape, seed=0, offset=0.0):
  return (np.random.default_rng(seed).normal(size=shape) + offset).astype(np.float32)


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
    "add_layer_norm": lambda x: jn.add_layer_norm(x, x, jnp.ones(4), jnp.zeros(4)),
    "add_rms_norm": lambda x: jn.add_rms_norm(x, x, jnp.ones(4), bias=jnp.zeros(4),
                                              mask=jnp.ones((6, 4), bool)),
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
