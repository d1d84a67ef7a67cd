"""What `jaxnorm.linen` and `jaxnorm.nnx` share: the flax import guard and flax's dtype rule.

Nothing here computes a statistic or normalizes: the wrappers call the functional core for
that. This module only decides *which dtypes* the core sees and returns, so that the wrappers
follow flax's output-dtype rules exactly, and which core function a `BatchNorm` calls.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp

import jaxnorm as jn
from jaxnorm._stats import _complex_of

INSTALL_HINT = "pip install jaxnorm[flax]"


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
  (or `dtype=jnp.complex64`) reaches the core complex, as in flax.
  """
  from flax.nnx.nn import dtypes as flax_nn_dtypes  # the same function as flax.linen's

  with jax.numpy_dtype_promotion("standard"):
    out = jnp.dtype(flax_nn_dtypes.canonicalize_dtype(x, *params, dtype=dtype))
    wide = jnp.dtype(jnp.promote_types(x.dtype, out))
  if not jnp.issubdtype(wide, jnp.inexact):  # integer input: flax computes in float32 too
    wide = jnp.dtype(jnp.float32)
  return (x if x.dtype == wide else x.astype(wide)), out


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
  return _complex_of(stat_dtype)


def zero_centered_init(scale_init: Any, zero_centered_scale: bool) -> Any:
  """flax's default scale initializer (ones) becomes zeros for a zero-centred scale."""
  if zero_centered_scale and scale_init is jax.nn.initializers.ones:
    return jax.nn.initializers.zeros
  return scale_init


def batch_norm_or_renorm(x: jax.Array, state: Any, scale: Any, bias: Any, *, renorm: bool,
                         r_max: Any, d_max: Any, unbiased_running_var: bool,
                         **kwargs: Any) -> tuple[jax.Array, Any]:
  """`jaxnorm.batch_renorm` with `renorm=True`, else `jaxnorm.batch_norm` (same keywords)."""
  if not renorm:
    return jn.batch_norm(x, state, scale, bias, unbiased_running_var=unbiased_running_var,
                         **kwargs)
  if unbiased_running_var:
    raise ValueError("unbiased_running_var=True is not supported with renorm=True (batch "
                     "renormalization corrects toward the stored, biased variance).")
  if kwargs["training"] and (r_max is None or d_max is None):
    raise ValueError(
        f"renorm=True needs r_max and d_max at call time in training (e.g. r_max=3.0, "
        f"d_max=5.0; r_max=1.0, d_max=0.0 is batch norm); got r_max={r_max!r}, "
        f"d_max={d_max!r}."
    )
  return jn.batch_renorm(x, state, scale, bias, r_max=1.0 if r_max is None else r_max,
                         d_max=0.0 if d_max is None else d_max, **kwargs)
