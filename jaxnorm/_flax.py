"""What `jaxnorm.linen` and `jaxnorm.nnx` share: flax's dtype rule and one core call per layer.

Nothing here computes a statistic: the layers call the functional core through these
functions, which decide *which dtypes* the core sees and returns, so that the layers follow
flax's output-dtype rules exactly (flax's rule also accepts integer input, normalized in
float32, which the core refuses), and which core function a `BatchNorm` calls.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxnorm as jn

from ._dtypes import complex_of

INSTALL_HINT = ('pip install -e ".[flax]" (from a clone of the repository), or '
                'pip install "jaxnorm[flax]" (from a package index)')


def require_flax(module_name: str) -> None:
  """Raises an ImportError that says how to install flax, if it cannot be imported."""
  try:
    importlib.import_module("flax")
  except ImportError as e:
    raise ImportError(
        f"{module_name} needs flax, which is not installed. Install it with: {INSTALL_HINT}"
    ) from e


def flax_dtypes(x: jax.Array, params: tuple[Any, ...], dtype: Any) -> tuple[jax.Array, Any]:
  """Applies flax's output-dtype rule and returns `(x_for_core, out_dtype)`.

  flax returns `dtype` if given, else `jnp.result_type(x, *params)` (made inexact), under
  standard promotion (so the rule also holds when the user enables strict promotion). The core
  returns its input's dtype and computes in at least float32; handing it `x` upcast to the
  wider of `x.dtype` and `out_dtype` (an exact conversion) gives the single rounding flax does
  when the output is wider than the input (bfloat16 input, float32 parameters). Complex input
  (or `dtype=jnp.complex64`) reaches the core complex, as in flax; integer input float32.
  """
  from flax.nnx.nn import dtypes as flax_nn_dtypes  # the same function as flax.linen's

  params = tuple(p for p in params if p is not None)
  with jax.numpy_dtype_promotion("standard"):
    out = jnp.dtype(flax_nn_dtypes.canonicalize_dtype(x, *params, dtype=dtype))
    wide = jnp.dtype(jnp.promote_types(x.dtype, out))
  if not jnp.issubdtype(wide, jnp.inexact):  # integer input: flax computes in float32 too
    wide = jnp.dtype(jnp.float32)
  return (x if x.dtype == wide else x.astype(wide)), out


def normalize(fn: Callable[..., jax.Array], x: jax.Array, params: tuple[Any, ...],
              dtype: Any, **kwargs: Any) -> jax.Array:
  """`fn(x, *params, **kwargs)` (a jaxnorm normalizer) under flax's dtype rule."""
  xc, out_dtype = flax_dtypes(x, params, dtype)
  return fn(xc, *params, **kwargs).astype(out_dtype)


def per_example(fn: Callable[..., jax.Array], layer: Any, x: jax.Array,
                params: tuple[Any, ...], feat: tuple[int, ...], mask: Any) -> jax.Array:
  """`fn` (`jaxnorm.layer_norm` or `rms_norm`) configured by a linen or nnx `LayerNorm` or
  `RMSNorm` `layer` (both families name their attributes alike), under flax's dtype rule."""
  return normalize(fn, x, params, layer.dtype, reduction_axes=layer.reduction_axes,
                   feature_axes=feat, epsilon=layer.epsilon, mask=mask,
                   axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups,
                   zero_centered_scale=layer.zero_centered_scale,
                   implementation=layer.implementation)


def complex_batch(x_dtype: Any, dtype: Any, param_dtype: Any) -> bool:
  """Whether a `BatchNorm`'s batch reaches the core complex under flax's dtype rule: complex
  input, a complex `dtype` or a complex `param_dtype`."""
  return any(d is not None and jnp.issubdtype(d, jnp.complexfloating)
             for d in (x_dtype, dtype, param_dtype))


def running_mean_dtype(stat_dtype: Any, complex_input: bool) -> Any:
  """The dtype of a `BatchNorm`'s running mean: `stat_dtype`, or its complex counterpart
  (float32 -> complex64) for complex batches, whose mean is complex (the variance stays
  real)."""
  if not complex_input or jnp.issubdtype(stat_dtype, jnp.complexfloating):
    return stat_dtype
  return complex_of(stat_dtype)


def zero_centered_init(scale_init: Any, zero_centered_scale: bool) -> Any:
  """flax's default scale initializer (ones) becomes zeros for a zero-centred scale."""
  if zero_centered_scale and scale_init is jax.nn.initializers.ones:
    return jax.nn.initializers.zeros
  return scale_init


def check_features(layer: str, num_features: int, x: jax.Array, feat: tuple[int, ...],
                   axis: Any, axis_name: str = "axis") -> tuple[int, ...]:
  """The feature shape of `x` along `feat`, which must hold `num_features` elements."""
  shape = tuple(x.shape[a] for a in feat)
  size = math.prod(shape)
  if size != num_features:
    raise ValueError(
        f"{layer}(num_features={num_features}) got input of shape {x.shape}, whose feature "
        f"{axis_name}={axis!r} holds {size} features; construct it with "
        f"num_features={size}, or pass the {axis_name} that holds the features."
    )
  return shape


def batch_norm(x: jax.Array, state: Any, scale: Any, bias: Any, *, dtype: Any, renorm: bool,
               r_max: Any, d_max: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
  """`jaxnorm.batch_renorm` with `renorm=True`, else `jaxnorm.batch_norm`, under flax's dtype
  rule; the keywords are the core's."""
  xc, out_dtype = flax_dtypes(x, (scale, bias), dtype)
  if not renorm:
    y, new_state = jn.batch_norm(xc, state, scale, bias, **kwargs)
    return y.astype(out_dtype), new_state
  if kwargs["training"] and (r_max is None or d_max is None):
    raise ValueError(
        f"renorm=True needs r_max and d_max at call time in training (e.g. r_max=3.0, "
        f"d_max=5.0; r_max=1.0, d_max=0.0 is batch norm); got r_max={r_max!r}, "
        f"d_max={d_max!r}."
    )
  y, new_state = jn.batch_renorm(xc, state, scale, bias,
                                 r_max=1.0 if r_max is None else r_max,
                                 d_max=0.0 if d_max is None else d_max, **kwargs)
  return y.astype(out_dtype), new_state
