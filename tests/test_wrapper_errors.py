"""The flax layers' errors at the core's standard: the argument, the value and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

X = np.ones((4, 6), np.float32)


@pytest.mark.parametrize("make", [
    lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.LayerNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.RMSNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.InstanceNorm(3, rngs=nnx.Rngs(0)),
    lambda: jnnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)),
])
def test_nnx_layer_with_the_wrong_num_features_names_both_and_the_fix(make):
  layer = make()
  with pytest.raises(ValueError, match=r"num_features=(3|4)\) got input of shape \(4, 6\).*"
                                       r"holds 6 features; construct it with num_features=6"):
    layer(X)


def test_linen_batch_norm_in_training_without_mutable_batch_stats_says_how():
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
    bn.apply(variables, X)
  # Evaluation and update_stats=False need no mutable collection.
  jnn.BatchNorm(use_running_average=True).apply(variables, X)
  bn.apply(variables, X, update_stats=False)


def test_integer_input_follows_flax_in_the_layers_and_is_refused_by_the_core():
  xi = np.arange(24, dtype=np.int32).reshape(4, 6)
  ln = jnn.LayerNorm()
  y = ln.apply(ln.init(jax.random.key(0), xi), xi)
  assert y.dtype == jnp.float32  # flax's rule: normalized in float32
  np.testing.assert_allclose(y, jn.layer_norm(xi.astype(np.float32)), rtol=1e-6)
  with pytest.raises(TypeError, match=r"x must have a floating dtype .* got int32. Cast it"):
    jn.layer_norm(xi)


@pytest.mark.parametrize("make, axis", [
    (lambda: jnnx.BatchNorm(3, rngs=nnx.Rngs(0)), "axis=-1"),
    (lambda: jnnx.LayerNorm(3, rngs=nnx.Rngs(0)), "feature_axes=-1"),
])
def test_nnx_size_message_names_the_argument_once(make, axis):
  with pytest.raises(ValueError) as info:
    make()(X)
  msg = str(info.value)
  assert f"whose {axis} holds 6 features" in msg and "feature feature_axes" not in msg, msg
