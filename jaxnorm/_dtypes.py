"""The dtype rules: which dtype statistics, arithmetic and state are computed in.

Statistics and normalization run in at least float32 whatever the input dtype (in bfloat16 or
float16, sums of many elements and a decay of 0.999 both round away), and complex input in at
least complex64 with a real variance. Every module asks these functions rather than restating
a rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# `Moments.count`: float32 (the contract), exact for counts up to 2**24, so that it is summed
# across devices in the same collective as the float32 sums.
COUNT_DTYPE = jnp.float32


def count_sum_dtype(n: int) -> Any:
  """The dtype in which a mask's valid elements are counted over sets of `n` elements:
  `COUNT_DTYPE` where every partial sum is an exact integer in it (n < 2**24), else int32."""
  return COUNT_DTYPE if n < 2**24 else jnp.int32


def wide_dtype(*dtypes: Any) -> Any:
  """The widest of `dtypes` and float32 (explicit, so it holds under strict dtype promotion)."""
  best = jnp.dtype(jnp.float32)
  for d in dtypes:
    d = jnp.dtype(d)
    if jnp.issubdtype(d, jnp.floating) and d.itemsize > best.itemsize:
      best = d
  return jax.dtypes.canonicalize_dtype(best)


def complex_of(dtype: Any) -> Any:
  """The complex dtype whose parts are `dtype` (float32 -> complex64, float64 -> complex128)."""
  return jnp.complex128 if jnp.dtype(dtype).itemsize >= 8 else jnp.complex64


def real_of(dtype: Any) -> Any:
  """The real dtype of `dtype`'s parts (complex64 -> float32); real dtypes unchanged."""
  return jnp.finfo(dtype).dtype


def compute_dtype(x_dtype: Any, dtype: DTypeLike | None = None) -> Any:
  """Accumulation dtype: at least float32, or at least complex64 for complex input."""
  if jnp.issubdtype(x_dtype, jnp.complexfloating):
    parts = wide_dtype(real_of(x_dtype), *(() if dtype is None else (real_of(dtype),)))
    return jax.dtypes.canonicalize_dtype(complex_of(parts))
  return wide_dtype(x_dtype if dtype is None else dtype)


def arithmetic_dtype(x_dtype: Any, stat_dtype: Any) -> Any:
  """The dtype of normalization with statistics of `stat_dtype`: the wider of the two and
  float32, complex for complex input (whose variance is real)."""
  real = wide_dtype(real_of(x_dtype), stat_dtype)
  return complex_of(real) if jnp.issubdtype(x_dtype, jnp.complexfloating) else real


def stats_dtypes(*dtypes: Any, complex_mean: bool) -> tuple[Any, Any]:
  """The real dtype of merged or updated counts and variances (at least float32, from the
  dtypes of the means and variances combined) and that of the mean: complex for a complex
  mean (`_stats.merge_many`, `merge_moments`, `sync_running_stats`, the running statistics'
  update)."""
  dtype = wide_dtype(*(real_of(d) for d in dtypes))
  if complex_mean:
    return dtype, jax.dtypes.canonicalize_dtype(complex_of(dtype))
  return dtype, dtype


def default_float() -> Any:
  """JAX's default floating dtype: float64 with `jax_enable_x64`, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)
