"""Eager calls compile once: identical calls outside `jax.jit` of the public functions, of their
`jax.grad` (on the XLA path and through the Pallas kernels), and of the linen, nnx and equinox
layers trace and compile the first time only.

Compilations are counted from JAX's own `/jax/core/compile/backend_compile_duration` events;
time per call and memory over many calls are benchmarks/eager.py's (timings do not belong in
tests on a shared machine).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.equinox as jeqx
import jaxnorm.linen as jlinen
import jaxnorm.nnx as jnnx
from tests import jaxcompat

_EVENT = "/jax/core/compile/backend_compile_duration"
_count = [0]


def _listener(event, duration, **kwargs):
  del duration, kwargs
  if event == _EVENT:
    _count[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)

_X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32) + 3)
_G, _B = jnp.linspace(0.5, 1.5, 16), jnp.zeros(16)
_IMAGES = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 8)).astype(np.float32))


def _linen_apply(module):
  layer = module.BatchNorm(use_running_average=False, momentum=0.9)
  variables = layer.init(jax.random.key(0), _X)
  return lambda: layer.apply(variables, _X, mutable=["batch_stats"])


def _nnx_call():
  layer = jnnx.BatchNorm(16, rngs=nnx.Rngs(0))
  return lambda: layer(_X)


def _equinox_call():
  layer, state = eqx.nn.make_with_state(jeqx.BatchNorm)(16, axis_name="batch", momentum=0.9,
                                                      mode="batch")
  return lambda: jax.vmap(layer, axis_name="batch", in_axes=(0, None),
                          out_axes=(0, None))(_X, state)


CASES = {
    "moments": lambda: lambda: jn.moments(_X, 0),
    "normalize": lambda: lambda: jn.normalize(_X, jnp.ones(16), jnp.full(16, 2.0),
                                              reduction_axes=0),
    "layer_norm": lambda: lambda: jn.layer_norm(_X, _G, _B),
    "rms_norm": lambda: lambda: jn.rms_norm(_X, _G),
    "group_norm": lambda: lambda: jn.group_norm(_IMAGES, num_groups=2),
    "instance_norm": lambda: lambda: jn.instance_norm(_IMAGES),
    "batch_norm (training)": lambda: lambda: jn.batch_norm(
        _X, jn.batch_norm_init(16), _G, _B, training=True, momentum=0.9),
    "batch_norm (evaluation)": lambda: lambda: jn.batch_norm(
        _X, jn.batch_norm_init(16), training=False),
    "batch_renorm": lambda: lambda: jn.batch_renorm(
        _X, jn.batch_norm_init(16), training=True, momentum=0.9, r_max=3.0, d_max=5.0),
    "layer_norm (pallas)": lambda: lambda: jn.layer_norm(_X, _G, _B, implementation="pallas"),
    "grad(layer_norm (pallas))": lambda: lambda: jax.grad(lambda x, g: jn.layer_norm(
        x, g, implementation="pallas").sum(), (0, 1))(_X, _G),
    "grad(layer_norm)": lambda: lambda: jax.grad(
        lambda x, g, b: jn.layer_norm(x, g, b).sum(), (0, 1, 2))(_X, _G, _B),
    "grad(rms_norm)": lambda: lambda: jax.grad(lambda x: (jn.rms_norm(x) ** 2).sum())(_X),
    "grad(batch_norm)": lambda: lambda: jax.grad(lambda x: (jn.batch_norm(
        x, jn.batch_norm_init(16), training=True)[0] ** 2).sum())(_X),
    "add_layer_norm": lambda: lambda: jn.add_layer_norm(_X, _X, _G, _B),
    "add_rms_norm (float32 residual)": lambda: lambda: jn.add_rms_norm(
        _X.astype(jnp.bfloat16), _X, _G),
    "grad(add_rms_norm)": lambda: lambda: jax.grad(
        lambda x, r: sum(a.sum() for a in jn.add_rms_norm(x, r, _G)), (0, 1))(_X, _X),
    "add_rms_norm (pallas, float32 residual)": lambda: lambda: jn.add_rms_norm(
        _X.astype(jnp.bfloat16), _X, _G, implementation="pallas"),
    "grad(add_layer_norm (pallas))": lambda: lambda: jax.grad(
        lambda x, r: sum(a.sum() for a in jn.add_layer_norm(x, r, _G, _B,
                                                            implementation="pallas")),
        (0, 1))(_X, _X),
    "linen AddLayerNorm.apply": lambda: (lambda layer, v: lambda: layer.apply(v, _X, _X))(
        jlinen.AddLayerNorm(), jlinen.AddLayerNorm().init(jax.random.key(0), _X, _X)),
    "linen BatchNorm.apply": lambda: _linen_apply(jlinen),
    "linen LayerNorm.init": lambda: lambda: jlinen.LayerNorm().init(jax.random.key(0), _X),
    "nnx BatchNorm.__call__": _nnx_call,
    "equinox BatchNorm.__call__": _equinox_call,
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=jaxcompat.NEEDS_PALLAS) if "pallas" in n else n for n in sorted(CASES)])
def test_identical_eager_calls_compile_once(name):
  call = CASES[name]()
  jax.block_until_ready(call())  # the first call compiles what it needs
  before = _count[0]
  for _ in range(3):
    jax.block_until_ready(call())
  assert _count[0] == before, f"{name}: {_count[0] - before} compilations in 3 identical calls"


def test_flax_itself_compiles_once_too():
  """The reference the counting is held to: flax's layer, called the same way."""
  call = _linen_apply(fnn)
  jax.block_until_ready(call())
  before = _count[0]
  for _ in range(3):
    jax.block_until_ready(call())
  assert _count[0] == before
