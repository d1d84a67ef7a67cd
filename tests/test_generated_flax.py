"""jaxnorm.linen, jaxnorm.nnx and jaxnorm.equinox against flax and equinox on generated settings.

Hypothesis draws a class, an input shape from a small set, constructor arguments the original
accepts (axes, use_bias/use_scale, dtype/param_dtype, group counts and sizes, momentum,
epsilon), the input dtype and a mask (every reduction keeps at least one valid element: the
originals give NaN for an empty one, jaxnorm finite output, a deliberate difference tested in
tests/test_generated.py). Ours and the original must build the same variable tree (names,
shapes, dtypes, and values: the same random draws), and give the same outputs and updated
statistics within rounding (flax with `use_fast_variance=False`, its two-pass variance).

The documented deliberate differences are left out of the draws: flax.nnx rounds the input and
the parameters to a narrower `dtype` first and evaluates `BatchNorm` with running statistics
rounded to `dtype` (jaxnorm/nnx.py), flax.nnx spreads custom `GroupNorm.reduction_axes` wrongly,
equinox's `BatchNorm(mode="batch")` starts its variance average at 1 (only the training output
is compared there) and raises on bfloat16 input (jaxnorm/equinox.py). flax.nnx's parameters have
the shape (num_features,), so its BatchNorm, LayerNorm and RMSNorm get one feature axis (the
last for the latter two).
"""

import contextlib
import math
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnorm.equinox as jne
from jaxnorm import linen as jnn
from jaxnorm import nnx as jnnx
from tests import flax_cases as fc

KEY = jax.random.key(0)
# Each example builds and compiles two modules: half the profile's examples per test.
FEWER = settings(max_examples=max(1, settings().max_examples // 2))
SHAPES = [(4, 6), (3, 2, 6), (2, 3, 1, 4)]  # channels last, batch first
DTYPES = (jnp.float32, jnp.bfloat16)
_INITS = fc.KWARGS["LayerNorm"]  # random scale and bias initializers


def _subset(draw, axes, min_size=1):
  return tuple(sorted(draw(st.sets(st.sampled_from(axes), min_size=min_size,
                                   max_size=len(axes)))))


@st.composite
def settings_(draw, family):
  """(class name, input shape, constructor kwargs, reduction axes, input dtype, masked)."""
  name = draw(st.sampled_from(fc.NAMES))
  shape = draw(st.sampled_from(SHAPES))
  nd = len(shape)
  kw = {"epsilon": draw(st.sampled_from((1e-6, 1e-5, 0.1)))}
  if name != "RMSNorm":
    kw["use_bias"] = draw(st.booleans())
  kw["use_scale"] = draw(st.booleans())
  kw["param_dtype"] = draw(st.sampled_from(DTYPES))
  x_dtype = draw(st.sampled_from(DTYPES))
  dtypes = (None, jnp.float32, jnp.bfloat16)
  if family == "nnx":  # flax.nnx rounds to a narrower dtype first (documented difference)
    with fc.standard_promotion():
      dtypes = tuple(d for d in dtypes if d is None
                     or jnp.promote_types(jnp.promote_types(x_dtype, kw["param_dtype"]), d) == d)
  kw["dtype"] = draw(st.sampled_from(dtypes))
  kw["scale_init"] = _INITS["scale_init"]
  if name != "RMSNorm":
    kw["bias_init"] = _INITS["bias_init"]
  if name == "BatchNorm":
    kw["momentum"] = draw(st.sampled_from((0.0, 0.5, 0.9, 0.99)))
    axis = (draw(st.sampled_from(range(1, nd))),) if family == "nnx" else _subset(
        draw, range(1, nd))
    kw["axis"] = axis[0] if len(axis) == 1 else axis
    red = tuple(a for a in range(nd) if a not in axis)
  elif name in ("LayerNorm", "RMSNorm"):
    red = _subset(draw, range(1, nd))
    feat = (nd - 1,) if family == "nnx" else _subset(draw, range(1, nd))
    kw["reduction_axes"], kw["feature_axes"] = red, feat
  elif name == "GroupNorm":
    c = shape[-1]
    divisors = [g for g in range(1, c + 1) if c % g == 0]
    if draw(st.booleans()):
      kw["num_groups"] = draw(st.sampled_from(divisors))
    else:
      kw["num_groups"], kw["group_size"] = None, draw(st.sampled_from(divisors))
    red = tuple(range(1, nd))
    if family == "linen" and nd > 2 and draw(st.booleans()):  # nnx: documented difference
      red = _subset(draw, range(1, nd - 1), min_size=0) + (nd - 1,)
      kw["reduction_axes"] = red
  else:  # InstanceNorm
    feat = _subset(draw, range(1, nd))
    kw["feature_axes"] = feat
    red = tuple(a for a in range(1, nd) if a not in feat)
  return name, shape, kw, red, x_dtype, draw(st.booleans())


def _mask(name, shape, red, seed):
  """About 70% valid; every reduction over `red` keeps the element at index 0 of each reduced
  axis (for group norm, the first position of every channel, so every group keeps one)."""
  m = np.random.RandomState(seed).rand(*shape) > 0.3
  keep = tuple(a for a in red if not (name == "GroupNorm" and a == len(shape) - 1))
  m[tuple(0 if a in keep else slice(None) for a in range(len(shape)))] = True
  return jnp.asarray(m)


def _call_kw(name, train):
  return {"use_running_average": not train} if name == "BatchNorm" else {}


def _with_mask(m):
  return {} if m is None else {"mask": m}


def _jit_apply(module, train):
  """module.apply, jitted (one compilation per example instead of one per primitive)."""
  name = type(module).__name__

  def apply(v, x, m):
    if train:
      return module.apply(v, x, mutable=["batch_stats"], **_with_mask(m), **_call_kw(name, True))
    return module.apply(v, x, **_call_kw(name, False))
  return jax.jit(apply)


@FEWER
@given(settings_("linen"), st.integers(0, 100))
def test_linen_matches_flax_linen(setting, seed):
  name, shape, kw, red, x_dtype, masked = setting
  theirs = getattr(nn, name)(use_fast_variance=False, **kw)
  ours = getattr(jnn, name)(**kw)
  x, x2 = fc.data(x_dtype, seed, shape=shape), fc.data(x_dtype, seed + 1, -0.3, shape=shape)
  m = _mask(name, shape, red, seed) if masked else None
  train = _jit_apply(theirs, True), _jit_apply(ours, True)
  with fc.standard_promotion():
    v = jax.jit(theirs.init, static_argnames="use_running_average")(KEY, x,
                                                                    **_call_kw(name, True))
    y_t, upd_t = train[0](v, x, m)
  v_o = jax.jit(ours.init, static_argnames="use_running_average")(KEY, x, **_call_kw(name, True))
  fc.assert_trees_identical(v_o, v)
  y_o, upd_o = train[1](v, x, m)
  fc.assert_close(y_o, y_t)
  fc.assert_trees_close(upd_o, upd_t)
  if name == "BatchNorm":
    v_next = {**v, **upd_t}
    with fc.standard_promotion():
      e_t = _jit_apply(theirs, False)(v_next, x2, None)
    fc.assert_close(_jit_apply(ours, False)(v_next, x2, None), e_t)


def _nnx_kwargs(name, shape, kw):
  kw = dict(kw)
  if name == "BatchNorm":
    n = shape[kw["axis"]]
  elif name in ("LayerNorm", "RMSNorm", "InstanceNorm"):
    n = math.prod(shape[a] for a in kw["feature_axes"])
  else:
    n = shape[-1]
  return n, kw


@FEWER
@given(settings_("nnx"), st.integers(0, 100))
def test_nnx_matches_flax_nnx(setting, seed):
  name, shape, kw, red, x_dtype, masked = setting
  n, kw = _nnx_kwargs(name, shape, kw)
  theirs = getattr(nnx, name)(n, use_fast_variance=False, rngs=nnx.Rngs(seed), **kw)
  ours = getattr(jnnx, name)(n, rngs=nnx.Rngs(seed), **kw)
  fc.assert_trees_identical(nnx.state(ours), nnx.state(theirs))
  x, x2 = fc.data(x_dtype, seed, shape=shape), fc.data(x_dtype, seed + 1, -0.3, shape=shape)
  m = _mask(name, shape, red, seed) if masked else None
  with fc.standard_promotion():
    y_t = theirs(x, **_with_mask(m))
  fc.assert_close(ours(x, **_with_mask(m)), y_t)  # BatchNorm: training
  fc.assert_trees_close(nnx.state(ours), nnx.state(theirs))
  if name == "BatchNorm":
    # flax.nnx evaluates with the running statistics rounded to `dtype` (documented): compare
    # where the computation is float32.
    with fc.standard_promotion():
      compute = kw["dtype"] or jnp.promote_types(x_dtype, kw["param_dtype"])
    if compute == jnp.float32:
      theirs.eval()
      ours.eval()
      with fc.standard_promotion():
        e_t = theirs(x2)
      fc.assert_close(ours(x2), e_t)


@eqx.filter_jit
def _vmapped(layer, x):
  return jax.vmap(layer)(x)


@contextlib.contextmanager
def _quiet():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


@st.composite
def eqx_settings(draw):
  name = draw(st.sampled_from(("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")))
  shape = draw(st.sampled_from(SHAPES))  # (batch, channels, spatial...) channels first
  c = shape[1]
  eps = draw(st.sampled_from((1e-6, 1e-5, 0.1)))
  if name == "BatchNorm":
    kw = dict(input_size=c, axis_name="batch", eps=eps,
              channelwise_affine=draw(st.booleans()),
              momentum=draw(st.sampled_from((0.0, 0.5, 0.9, 0.99))),
              mode=draw(st.sampled_from(("ema", "batch"))))
    return name, shape, kw, jnp.float32  # equinox raises on bfloat16 input (documented)
  dtype = draw(st.sampled_from((None, jnp.bfloat16)))
  x_dtype = draw(st.sampled_from(DTYPES))
  if name == "GroupNorm":
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    kw = dict(groups=groups, channels=c, eps=eps, channelwise_affine=draw(st.booleans()),
              dtype=dtype)
  else:
    kw = dict(shape=shape[1:], eps=eps, use_weight=draw(st.booleans()),
              use_bias=draw(st.booleans()), dtype=dtype)
  return name, shape, kw, x_dtype


def _perturb(layer, seed):
  """Random weight and bias (equinox initializes them to ones and zeros)."""
  def leaf(a, i):
    if not eqx.is_inexact_array(a):
      return a
    r = np.random.RandomState(seed + i).uniform(-2, 2, a.shape)
    return jnp.asarray(r, a.dtype)
  leaves, treedef = jax.tree.flatten(layer)
  return jax.tree.unflatten(treedef, [leaf(a, i) for i, a in enumerate(leaves)])


@FEWER
@given(eqx_settings(), st.integers(0, 100))
def test_equinox_matches_equinox(setting, seed):
  name, shape, kw, x_dtype = setting
  with _quiet():
    theirs, s_t = eqx.nn.make_with_state(getattr(eqx.nn, name))(**kw)
    ours, s_o = eqx.nn.make_with_state(getattr(jne, name))(**kw)
  for t, o in ((theirs, ours), (s_t, s_o)):
    arrays = [[(a.shape, a.dtype) for a in jax.tree.leaves(tree) if eqx.is_array(a)]
              for tree in (t, o)]
    assert arrays[0] == arrays[1]
  theirs, ours = _perturb(theirs, seed), _perturb(ours, seed)
  x = fc.data(x_dtype, seed, shape=shape)
  if name != "BatchNorm":
    with fc.standard_promotion():
      y_t = _vmapped(theirs, x)
    fc.assert_close(_vmapped(ours, x), y_t)
    return

  @eqx.filter_jit
  def step(layer, state, x):
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

  for t in range(2):
    xt = fc.data(x_dtype, seed + t, offset=t, shape=shape)
    with fc.standard_promotion():
      y_t, s_t = step(theirs, s_t, xt)
    y_o, s_o = step(ours, s_o, xt)
    fc.assert_close(y_o, y_t)
    if kw["mode"] == "ema":  # "batch": equinox's variance average starts at 1 (documented)
      for a, b in zip(jax.tree.leaves(s_o), jax.tree.leaves(s_t), strict=True):
        if a.dtype == bool:
          np.testing.assert_array_equal(a, b)
        else:
          fc.assert_close(a, b)
