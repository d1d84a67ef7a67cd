"""What `jaxnorm.linen` and `jaxnorm.nnx` share: the flax import guard and flax's dtype rule.

Nothing here computes a statistic or normalizes: the wrappers call the functional core for
that. This module only decides *which dtypes* the core sees and returns, so that the wrappers
follow flax's output-dtype rules exactly.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp

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
