"""The linen and nnx options for batch renorm, ghost batches and zero-centred scale.

The wrappers only declare variables and call the core, so every claim here is an identity
(wrapper == core, linen == nnx), checked bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx

C = 4


def _x(seed=0, shape=(8, 3, C)):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32) * 2 + 1)


def _eq(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("renorm,vbs", [(True, None), (False, 4), (True, 2)])
def test_batch_norm_options_equal_the_core_in_linen_and_nnx(renorm, vbs):
  x1, x2 = _x(0), _x(1)
  kw = {"momentum": 0.9, "renorm": renorm, "virtual_batch_size": vbs}
  call = {"r_max": jnp.float32(1.5), "d_max": jnp.float32(0.5)} if renorm else {}

  # Core: two training steps, eagerly and under jit (traced bounds), then evaluation.
  core = jn.batch_renorm if renorm else jn.batch_norm
  core_step = lambda x, st, c: core(x, st, jnp.ones(C), jnp.zeros(C), training=True,
                                    momentum=0.9, virtual_batch_size=vbs, **c)
  ys, ys_jit = [], []
  state = state_jit = jn.batch_norm_init(C)
  for x in (x1, x2):
    y, state = core_step(x, state, call)
    ys.append(y)
    y, state_jit = jax.jit(core_step)(x, state_jit, call)
    ys_jit.append(y)

  # linen, under jit with the bounds traced.
  bn = jnn.BatchNorm(use_running_average=False, **kw)
  variables = bn.init(jax.random.key(0), x1, **call)
  step = jax.jit(lambda v, x, c: bn.apply(v, x, mutable=["batch_stats"], **c))
  for x, want in zip((x1, x2), ys_jit, strict=True):
    y, upd = step(variables, x, call)
    variables = {**variables, **upd}
    _eq(y, want)
  _eq(variables["batch_stats"]["mean"], state_jit.mean)
  _eq(variables["batch_stats"]["var"], state_jit.var)

  # nnx.
  m = jnnx.BatchNorm(C, rngs=nnx.Rngs(0), **kw)
  for x, want in zip((x1, x2), ys, strict=True):
    _eq(m(x, **call), want)
  _eq(m.mean[...], state.mean)
  _eq(m.var[...], state.var)
  m.eval()
  _eq(m(x1), jn.batch_norm(x1, state, jnp.ones(C), jnp.zeros(C), training=False)[0])


def test_a_non_finite_batch_leaves_batch_stats_unchanged_in_the_wrappers():
  x = np.array(_x())
  x[0, 0, 1] = np.nan
  bn = jnn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), _x())
  y, upd = bn.apply(variables, x, mutable=["batch_stats"])
  jax.tree.map(_eq, upd["batch_stats"], variables["batch_stats"])
  assert np.isnan(np.asarray(y)).any()
  m = jnnx.BatchNorm(C, rngs=nnx.Rngs(0))
  before = (np.asarray(m.mean[...]), np.asarray(m.var[...]))
  m(x)
  _eq(m.mean[...], before[0])
  _eq(m.var[...], before[1])


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_zero_centered_scale_in_linen_and_nnx(name):
  x = _x()
  ours = getattr(jnn, name)(zero_centered_scale=True)
  variables = ours.init(jax.random.key(0), x)
  _eq(variables["params"]["scale"], jnp.zeros(C))  # the identity in the zero-centred form
  gamma = jnp.asarray(np.random.RandomState(5).randn(C).astype(np.float32) * 0.1)
  params = {**variables["params"], "scale": gamma}
  y = ours.apply({"params": params}, x)
  core = jn.layer_norm if name == "LayerNorm" else jn.rms_norm
  args = (gamma, params["bias"]) if name == "LayerNorm" else (gamma,)
  _eq(y, core(x, *args, zero_centered_scale=True))
  m = getattr(jnnx, name)(C, zero_centered_scale=True, rngs=nnx.Rngs(0))
  _eq(m.scale[...], jnp.zeros(C))
  m.scale[...] = gamma
  _eq(m(x), y)
  # An explicit initializer is kept.
  kept = getattr(jnnx, name)(C, zero_centered_scale=True, scale_init=nnx.initializers.constant(
      0.5), rngs=nnx.Rngs(0))
  _eq(kept.scale[...], jnp.full(C, 0.5))
