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


def residual_sum_dtype(x_dtype: Any, residual_dtype: Any) -> Any:
  """The dtype of `x + residual` in the fused residual add (`add_rms_norm`, `add_layer_norm`):
  the two promoted under standard promotion, so that a residual stream kept in float32 for
  bfloat16 or float16 `x` (flash-attention's `residual_in_fp32`) stays float32, and equal
  dtypes add in their own dtype, as `x + residual` does. The normalized output keeps `x`'s
  dtype: it feeds the next layer, which runs in the activations' dtype."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.dtype(jnp.promote_types(x_dtype, residual_dtype))


def residual_norm_dtype(sum_dtype: Any, out_dtype: Any) -> Any:
  """The dtype in which the fused residual add normalizes its sum for an output of `out_dtype`:
  the wider of the two (the sum converted exactly), so that a wider output (flax's layers:
  float32 out of bfloat16 input and float32 parameters) is rounded once."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.dtype(jnp.promote_types(sum_dtype, out_dtype))


def default_float() -> Any:
  """JAX's default floating dtype: float64 with `jax_enable_x64`, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


# --- flax's dtype rule, for jaxnorm.linen and jaxnorm.nnx (through _flax) -------------------
# Restated with jax alone so that this module imports no flax; tests/test_flax_compat.py checks
# it against flax's layers bit for bit.


def flax_output(x: jax.Array, params: tuple[Any, ...], dtype: Any) -> tuple[jax.Array, Any]:
  """flax's output dtype for a layer, and `x` as the core should see it: `(x_core, out)`.

  flax returns `dtype` if given, else `jnp.result_type(x, *params)` made inexact, under
  standard promotion (so the rule also holds when the user enables strict promotion). The core
  returns its input's dtype and computes in at least float32; handing it `x` upcast to the
  wider of `x.dtype` and `out` (an exact conversion) gives the single rounding flax does when
  the output is wider than the input (bfloat16 input, float32 parameters). Complex input (or
  `dtype=jnp.complex64`) reaches the core complex, as in flax; integer input float32.
  """
  wide, out = flax_dtypes(x.dtype, params, dtype)
  return (x if x.dtype == wide else x.astype(wide)), out


def flax_dtypes(x_dtype: Any, params: tuple[Any, ...], dtype: Any) -> tuple[Any, Any]:
  """`flax_output`'s dtypes for input of `x_dtype`: `(the core's input dtype, the output's)`."""
  params = tuple(p for p in params if p is not None)
  with jax.numpy_dtype_promotion("standard"):
    out = dtype
    if out is None:
      out = jnp.result_type(x_dtype, *params)
      if not jnp.issubdtype(out, jnp.inexact):
        out = jnp.promote_types(jnp.float32, out)
    if not jnp.issubdtype(out, jnp.inexact):
      raise ValueError(f"Dtype must be inexact: {out}")
    out = jnp.dtype(out)
    wide = jnp.dtype(jnp.promote_types(x_dtype, out))
  if not jnp.issubdtype(wide, jnp.inexact):  # integer input: flax computes in float32 too
    wide = jnp.dtype(jnp.float32)
  return wide, out


def flax_promote(promote_dtype: Any, dtype: Any, x: Any, *arrays: Any) -> tuple[Any, ...]:
  """flax.nnx's input promotion (a layer's `promote_dtype` to its `dtype`, under standard
  promotion), except that nothing is rounded to a narrower dtype.

  flax.nnx casts the input and the parameters to `dtype` before it normalizes, so
  `dtype=jnp.float16` on float32 input rounds `x` to float16 first: where the data have an
  offset, `x - mean` loses most of its digits (offset 300, std 1: about 3 of float16's 11 bits
  are left). Here an array that the promotion would cast to a dtype that does not hold all its
  values (float32 -> float16, bfloat16 -> float16) keeps its own dtype, and the output alone is
  cast to `dtype` (`flax_output`): flax.linen's rule, so jaxnorm's two families agree bit for
  bit.

  `promote_dtype` is None with flax 0.11, whose nnx layers have none and cast nothing (the
  installed flax's rule, `_compat.nnx_promote_dtype`): the arrays are returned as they are,
  which is again flax.linen's rule, so the two families agree with either flax.
  """
  originals = (x, *arrays)
  if promote_dtype is None:  # flax 0.11's nnx layers promote nothing: linen's rule as it is
    return originals
  with jax.numpy_dtype_promotion("standard"):
    promoted = tuple(promote_dtype(originals, dtype=dtype))
    return tuple(_unless_narrower(a, p) for a, p in zip(originals, promoted, strict=True))


def _unless_narrower(original: Any, promoted: Any) -> Any:
  """`promoted`, unless it is `original` cast to a dtype that cannot hold all its values."""
  if original is None or promoted is None:
    return promoted
  before, after = jnp.result_type(original), jnp.result_type(promoted)
  return promoted if jnp.promote_types(before, after) == after else original


def flax_complex(*dtypes: Any) -> bool:
  """Whether a flax `BatchNorm`'s batch is complex: complex input, `dtype` or `param_dtype`
  (None entries are skipped)."""
  return any(d is not None and jnp.issubdtype(d, jnp.complexfloating) for d in dtypes)


def flax_batch_stats(stat_dtype: Any, is_complex: bool) -> tuple[Any, Any]:
  """`(mean_dtype, var_dtype)` of a flax `BatchNorm`'s running statistics kept in
  `stat_dtype`: a complex batch has a complex mean (float32 -> complex64) from the start, and
  the variance is always real."""
  mean = stat_dtype
  if is_complex and not jnp.issubdtype(stat_dtype, jnp.complexfloating):
    mean = complex_of(stat_dtype)
  return mean, real_of(stat_dtype)
