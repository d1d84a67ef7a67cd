"""The benchmark cases, in one place: norms, shapes, dtypes and each library's call.

`run.py` (timings), `compiled.py` (device-memory bytes on accelerators, deviceless) and
`tools/hlo_snapshot.py` (the programs a restructuring must leave as they were) all build their
cases here, so that a case means the same call in each of them: a number that one script prints
and another checks is then about the same program.

A builder returns `(fn, params)` with `fn(params, x) -> (y, aux)`: `aux` is BatchNorm's new
running statistics in training (None otherwise); params are float32, x has the case's dtype.
The builder returns None for a case its library does not have (Pallas group norm).

What a case closes over (the running statistics; the parameters' values, where a script runs
them) is a `Values`: the timings use statistics away from the identity so that nothing folds
away, the compiled counts the fresh state of `batch_norm_init` as a model starts with; each
script keeps the values its published figures were taken with.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxnorm as jn

# The normalizers, as `run.py` names them; `compiled.py` counts training batch norm only and
# calls it "batch_norm".
NORMS = ("layer_norm", "rms_norm", "group_norm", "batch_norm_train", "batch_norm_eval")
DTYPES = ("float32", "bfloat16")
PASSES = ("fwd", "fwd+bwd")
GROUPS = 32  # GroupNorm's groups in every case
PALLAS_NORMS = ("layer_norm", "rms_norm")  # where jaxnorm has its own kernels

# Shapes (channels last). The timed ones: 8192 rows of 1024 and 4096 features, an image batch
# and a small batch; `quick` and `tiny` are their subsets for a short run and the test suite.
TIMED_SHAPES = ((8192, 1024), (8192, 4096), (64, 32, 32, 128), (32, 256))
TIMED_CONFIGS = {  # (shape, dtype) groups per mode of run.py
    "full": [(s, d) for s in TIMED_SHAPES for d in DTYPES],
    "quick": [((8192, 1024), "float32"), ((8192, 1024), "bfloat16"), ((32, 256), "float32")],
    "tiny": [((64, 128), "float32")],
}
# The compiled counts: the timed shapes without the small batch (the grid has small ones).
COMPILED_SHAPES = ((8192, 4096), (8192, 1024), (64, 32, 32, 128))
# Rows 256 to 16384 by features 256 to 4096, and two image shapes: a choice that pays at 8192
# rows can cost at 256.
GRID = tuple((r, c) for r in (256, 2048, 16384) for c in (256, 1024, 4096)) + (
    (64, 32, 32, 128), (32, 56, 56, 64))
# The subset that CI compiles: (32, 56, 56, 64) is ResNet50's first stage, where XLA:GPU once
# wrote the shifted x out; (256, 1024) a small batch, where blocks of a few rows once wrote a
# quarter of x.
CHECK_SHAPES = ((256, 1024), (8192, 1024), (32, 56, 56, 64))


@dataclasses.dataclass(frozen=True)
class Values:
  """The concrete numbers a case holds: `affine(c)` the scale and bias (float32, shape (c,)),
  `running(c)` BatchNorm's running mean and variance."""
  affine: Callable[[int], dict[str, jax.Array]]
  running: Callable[[int], tuple[jax.Array, jax.Array]]


def _random_affine(c: int) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(1))
  return {"scale": 1 + 0.1 * jax.random.normal(k1, (c,)), "bias": 0.1 * jax.random.normal(k2, (c,))}


def _unit_affine(c: int) -> dict[str, jax.Array]:
  return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}


TIMED = Values(_random_affine, lambda c: (jnp.full((c,), 0.1, jnp.float32),
                                          jnp.full((c,), 1.5, jnp.float32)))
COUNTED = Values(_unit_affine, lambda c: (jnp.zeros((c,), jnp.float32),
                                          jnp.ones((c,), jnp.float32)))


def build_jaxnorm(norm, shape, dtype, values=TIMED, implementation=None):
  """jaxnorm's functional API; `implementation="pallas"` its own kernels (layer and RMS norm)."""
  c = shape[-1]
  p = values.affine(c)
  kw = {} if implementation is None else {"implementation": implementation}
  if norm == "layer_norm":
    return lambda p, x: (jn.layer_norm(x, p["scale"], p["bias"], **kw), None), p
  if norm == "rms_norm":
    return lambda p, x: (jn.rms_norm(x, p["scale"], **kw), None), {"scale": p["scale"]}
  if implementation is not None:
    return None
  if norm == "group_norm":
    return lambda p, x: (jn.group_norm(x, p["scale"], p["bias"], num_groups=GROUPS), None), p
  mean, var = values.running(c)
  state = jn.BatchNormState(mean, var, jnp.zeros((), jnp.int32))
  training = norm == "batch_norm_train"

  def fn(p, x):
    y, new = jn.batch_norm(x, state, p["scale"], p["bias"], training=training)
    return y, (new if training else None)
  return fn, p


def build_jnp(norm, shape, dtype, values=TIMED):
  """Plain jnp, two-pass float32 statistics, differentiated by autodiff."""
  c = shape[-1]
  p = values.affine(c)

  def ln(x, red, g, b, eps, center=True):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, red, keepdims=True) if center else 0.0
    var = jnp.mean(jnp.square(xf - mean), red, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * g
    return (y if b is None else y + b).astype(x.dtype)

  if norm == "layer_norm":
    return lambda p, x: (ln(x, -1, p["scale"], p["bias"], 1e-6), None), p
  if norm == "rms_norm":
    return (lambda p, x: (ln(x, -1, p["scale"], None, 1e-6, center=False), None),
            {"scale": p["scale"]})
  if norm == "group_norm":
    def gn(p, x):
      xg = x.reshape(x.shape[:-1] + (GROUPS, c // GROUPS))
      red = tuple(range(1, x.ndim - 1)) + (x.ndim,)
      xf = xg.astype(jnp.float32)
      mean = jnp.mean(xf, red, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), red, keepdims=True)
      y = ((xf - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(x.shape)
      return (y * p["scale"] + p["bias"]).astype(x.dtype), None
    return gn, p
  mean0, var0 = values.running(c)
  red = tuple(range(len(shape) - 1))
  if norm == "batch_norm_eval":
    return (lambda p, x: (((x.astype(jnp.float32) - mean0) * jax.lax.rsqrt(var0 + 1e-5)
                           * p["scale"] + p["bias"]).astype(x.dtype), None), p)

  def bn(p, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, red)
    var = jnp.mean(jnp.square(xf - mean), red)
    y = ((xf - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]).astype(x.dtype)
    stats = (0.99 * mean0 + 0.01 * jax.lax.stop_gradient(mean),
             0.99 * var0 + 0.01 * jax.lax.stop_gradient(var))
    return y, stats
  return bn, p


def build_linen(norm, shape, dtype, values=TIMED, same_dtype=False):
  """flax.linen with its default `dtype=None` (float32 out for bfloat16 x and float32
  parameters: the reference of every ratio), or `same_dtype`: `dtype=x.dtype`, as flax models
  that train in bfloat16 set it. Its parameters are the ones its `init` makes."""
  import flax.linen as nn
  c = shape[-1]
  kw = {"dtype": dtype} if same_dtype else {}
  if norm == "layer_norm":
    m = nn.LayerNorm(epsilon=1e-6, **kw)
  elif norm == "rms_norm":
    m = nn.RMSNorm(epsilon=1e-6, **kw)
  elif norm == "group_norm":
    m = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, **kw)
  else:
    m = nn.BatchNorm(use_running_average=norm == "batch_norm_eval", momentum=0.99, epsilon=1e-5,
                     **kw)
  x0 = jnp.zeros((2,) + tuple(shape[1:]), dtype)
  params = m.init(jax.random.key(0), x0)["params"]
  if not norm.startswith("batch_norm"):
    return lambda p, x: (m.apply({"params": p}, x), None), params
  mean, var = values.running(c)
  stats = {"mean": mean, "var": var}
  if norm == "batch_norm_eval":
    return lambda p, x: (m.apply({"params": p, "batch_stats": stats}, x), None), params
  return (lambda p, x: m.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"]),
          params)


def build_nnx(norm, shape, dtype, values=TIMED):
  from flax import nnx
  c = shape[-1]
  rngs = nnx.Rngs(0)
  if norm == "layer_norm":
    m = nnx.LayerNorm(c, rngs=rngs)
  elif norm == "rms_norm":
    m = nnx.RMSNorm(c, rngs=rngs)
  elif norm == "group_norm":
    m = nnx.GroupNorm(c, num_groups=GROUPS, rngs=rngs)
  else:
    m = nnx.BatchNorm(c, use_running_average=norm == "batch_norm_eval", momentum=0.99,
                      epsilon=1e-5, rngs=rngs)
    mean, var = values.running(c)
    m.mean[...], m.var[...] = mean, var
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  training = norm == "batch_norm_train"

  def fn(p, x):
    # A fresh copy of the non-parameter state, so that BatchNorm may update it in this trace.
    mod = nnx.merge(graphdef, p, jax.tree.map(jnp.copy, rest))
    y = mod(x)
    return y, (nnx.state(mod, nnx.BatchStat) if training else None)
  return fn, params


def build_haiku(norm, shape, dtype, values=TIMED):
  """haiku's layers with their own initial values (`values` does not apply)."""
  import haiku as hk
  x0 = jnp.zeros((2,) + tuple(shape[1:]), dtype)
  training = norm == "batch_norm_train"

  def forward(x, is_training=training):
    if norm == "layer_norm":
      return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6)(x)
    if norm == "rms_norm":
      return hk.RMSNorm(axis=-1, eps=1e-6)(x)
    if norm == "group_norm":
      return hk.GroupNorm(groups=GROUPS, eps=1e-6)(x)
    return hk.BatchNorm(True, True, 0.99, eps=1e-5)(x, is_training=is_training)

  t = hk.transform_with_state(forward)
  # Initialized in training mode: haiku creates the running averages only there.
  params, state = t.init(jax.random.key(0), x0, True)
  if norm == "batch_norm_eval":
    # Give the running averages some history so that evaluation does not raise.
    _, state = t.apply(params, state, None, jnp.ones((4,) + tuple(shape[1:]), dtype), True)

  def fn(p, x):
    y, new = t.apply(p, state, None, x)
    return y, (new if training else None)
  return fn, params


def build_equinox(norm, shape, dtype, values=TIMED):
  """equinox.nn's layers with their own initial values (`values` does not apply)."""
  import equinox as eqx
  c = shape[-1]
  training = norm == "batch_norm_train"
  state = None
  if norm == "layer_norm":
    m = eqx.nn.LayerNorm(c, eps=1e-6)
  elif norm == "rms_norm":
    m = eqx.nn.RMSNorm(c, eps=1e-6, use_bias=False)
  elif norm == "group_norm":
    m = eqx.nn.GroupNorm(GROUPS, c, eps=1e-6)
  else:
    m, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", eps=1e-5, mode="ema")
  params, static = eqx.partition(m, eqx.is_inexact_array)

  def fn(p, x):
    mod = eqx.combine(p, static)
    if norm in ("layer_norm", "rms_norm"):
      return jax.vmap(mod)(x.reshape(-1, c)).reshape(x.shape), None
    if norm == "group_norm":  # equinox is channels-first: the layout moves are part of its cost
      xc = jnp.moveaxis(x, -1, 1)
      return jnp.moveaxis(jax.vmap(mod)(xc), 1, -1), None
    call = lambda xi, st: mod(xi, st, inference=not training)
    y, new = jax.vmap(call, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x.reshape(-1, c), state)
    return y.reshape(x.shape), (new if training else None)
  return fn, params


# The fused residual add (`add_layer_norm`, `add_rms_norm`): x and the residual stream r in,
# (y, h = x + r) out, against flax's unfused `LayerNorm()(x + r)`. The shapes: lm1b's 4096x512
# and a large model's 16384x4096; the dtypes name x's, then r's where it differs (a float32
# residual stream for bfloat16 x, flash-attention's `residual_in_fp32`).
RESIDUAL_NORMS = ("add_layer_norm", "add_rms_norm")
RESIDUAL_SHAPES = ((4096, 512), (16384, 4096))
RESIDUAL_DTYPES = ("float32", "bfloat16", "bfloat16+float32")
RESIDUAL_LIBS = ("jaxnorm", "jaxnorm pallas", "flax.linen", "flax.linen dtype=x")


def residual_dtypes(name: str) -> tuple[Any, Any]:
  """`(x's dtype, r's dtype)` of a `RESIDUAL_DTYPES` name."""
  x, _, r = name.partition("+")
  return jnp.dtype(x), jnp.dtype(r or x)


def build_residual(lib, norm, shape, dtype, values=TIMED):
  """`(fn, params)` of a residual case, `fn(params, (x, r)) -> ((y, h), None)`: jaxnorm's
  fused call (`"jaxnorm pallas"`: with `implementation="pallas"`, the residual kernels), or
  flax.linen's norm of `h = x + r` (`dtype`: x's, for `"flax.linen dtype=x"`)."""
  c = shape[-1]
  p = values.affine(c)
  if lib in ("jaxnorm", "jaxnorm pallas"):
    impl = "pallas" if lib == "jaxnorm pallas" else None
    if norm == "add_layer_norm":
      return (lambda p, xr: (jn.add_layer_norm(*xr, p["scale"], p["bias"],
                                               implementation=impl), None)), p
    return (lambda p, xr: (jn.add_rms_norm(*xr, p["scale"], implementation=impl), None),
            {"scale": p["scale"]})
  import flax.linen as nn
  kw = {"dtype": dtype} if lib == "flax.linen dtype=x" else {}
  m = (nn.LayerNorm if norm == "add_layer_norm" else nn.RMSNorm)(epsilon=1e-6, **kw)
  params = m.init(jax.random.key(0), jnp.zeros((2, c), dtype))["params"]

  def fn(p, xr):
    h = xr[0] + xr[1]
    return (m.apply({"params": p}, h), h), None
  return fn, params


@dataclasses.dataclass(frozen=True)
class Library:
  """A library's builder and the module it needs (a library not installed is skipped)."""
  module: str
  build: Callable[..., tuple[Callable, Any] | None]


LIBRARIES = {
    "jaxnorm": Library("jaxnorm", build_jaxnorm),
    "jaxnorm pallas": Library("jaxnorm", lambda *a, **k: build_jaxnorm(
        *a, **k, implementation="pallas")),
    "flax.linen": Library("flax", build_linen),
    "flax.linen dtype=x": Library("flax", lambda *a, **k: build_linen(*a, **k, same_dtype=True)),
    "flax.nnx": Library("flax", build_nnx),
    "haiku": Library("haiku", build_haiku),
    "equinox": Library("equinox", build_equinox),
    "jnp": Library("jax", build_jnp),
}


def have(lib: str) -> bool:
  """Whether `lib`'s module is installed."""
  return importlib.util.find_spec(LIBRARIES[lib].module) is not None


def build(lib: str, norm: str, shape: tuple[int, ...], dtype: Any, values: Values = TIMED):
  """`(fn, params)` of one case (see the module docstring), or None where `lib` lacks it."""
  return LIBRARIES[lib].build(norm, shape, dtype, values)


def with_pass(fn: Callable, kind: str) -> Callable:
  """The forward pass, or forward+backward `(p, x, dy) -> (y, aux, grads)`: `y, pullback =
  jax.vjp(fn, p, x)` with the cotangent dy, returning y, aux and every gradient, so that
  nothing is dead code."""
  if kind == "fwd":
    return fn

  def fb(p, x, dy):
    y, pullback, aux = jax.vjp(fn, p, x, has_aux=True)
    return y, aux, pullback(dy)
  return fb
