"""The fused residual add of pre-norm transformers: `x + residual` and its normalization.

`add_rms_norm` and `add_layer_norm` return `(norm(x + residual), x + residual)`, the step
between two sublayers of a pre-norm block, as Liger-Kernel, TransformerEngine and
flash-attention's layer norm fuse it. They are the unfused composition, validated once: XLA
fuses the add into the normalizer's kernels, so the forward pass reads x and the residual and
writes the sum and the output, and the derivative is that of the composition (the sum's
cotangent is the new residual's plus the normalizer's). With `implementation="pallas"` the
plain case runs the residual kernels of `_pallas` (`_normalize.add_by_kernel`): one forward
kernel reads both inputs and writes both outputs, the backward kernel runs on the sum.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.typing import ArrayLike, DTypeLike

from . import _checks
from ._dtypes import residual_norm_dtype
from ._normalize import Axes, add_by_kernel, layer, rms
from ._stats import AxisName, residual_sum


def _sum(x: jax.Array, residual: jax.Array, out: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """`(h, the normalization's input)`: the sum, converted to `out` where that is wider."""
  h = residual_sum(x, residual)
  wide = residual_norm_dtype(h.dtype, out)
  return h, (h if wide == h.dtype else h.astype(wide))


def add_rms_norm(
    x: ArrayLike,
    residual: ArrayLike,
    scale: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    zero_centered_scale: bool = False,
    implementation: str | None = None,
    convention: str | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""Adds `x` to the residual stream and RMS-normalizes the sum: one step of a pre-norm block.

  .. math::
    h = x + r, \qquad y = \mathrm{rms\_norm}(h)

  Returns `(y, h)`: `y` feeds the next sublayer, `h` is the new residual stream. It equals
  `h = x + residual; (rms_norm(h, ...), h)` and is differentiable in both inputs (and `scale`,
  `bias`) with that composition's derivative, a cotangent on each output.

  Dtypes: with `x` and `residual` of one dtype, `h` is rounded to it and `y` is the norm of
  the rounded `h` (the unfused composition bit for bit). Under `jax.jit` XLA may keep a
  bfloat16 or float16 sum in float32 inside its fused kernel (its default excess precision, as
  for the unfused composition, which it still equals), so that `y` is the norm of the unrounded
  sum; the Pallas kernels always normalize the returned `h`. A wider `residual` (float32 for
  bfloat16 or float16 `x`, flash-attention's `residual_in_fp32`) makes `h` float32, the
  dtypes promoted, and `y` keeps `x`'s dtype: the norm of the float32 `h`, rounded once.

  Args:
    x: the sublayer's output (real floating).
    residual: the residual stream, of `x`'s shape; its dtype may be wider than `x`'s.
    scale: optional γ, as in `rms_norm`.
    bias: optional β, as in `rms_norm`.
    reduction_axes: axes of the mean square (default: the last).
    feature_axes: axes `scale` and `bias` run along (default: the last).
    epsilon: non-negative constant added to the mean square.
    mask: optional boolean array broadcastable to `x`: the elements that enter the statistics
      (every element of `h` is returned).
    axis_name: mapped axis (or axes) to reduce over as well, as in `rms_norm`.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    zero_centered_scale: `scale` stores γ - 1, as in `rms_norm`.
    implementation: None, `"xla"` or `"pallas"`, as in `rms_norm`; in the kernels' plain case
      `"pallas"` runs one forward kernel that reads `x` and `residual` and writes `h` and `y`.
    convention: None, `"llama"` or `"gemma"`, as in `rms_norm`; with a wider residual,
      `"llama"` rounds the normalized value to `x`'s dtype (or `dtype`) before the scale.
    dtype: `y`'s dtype (None: `x`'s); a wider one than the sum's normalizes the sum converted
      to it, one rounding (flax's layers return float32 for bfloat16 input so).

  Returns:
    `(y, h)`: `y` of `x`'s shape and dtype, or `dtype` (with `convention="llama"` and a
    `scale`, the dtype of `scale * y`), `h` of `x`'s shape in `x` and `residual`'s promoted
    dtype.

  Raises:
    TypeError: `x` or `residual` is not real floating, or `mask` is not boolean.
    ValueError: `residual` of another shape than `x`, and `rms_norm`'s errors.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x, r = jnp.array([[2.0, 4.0]]), jnp.array([[-1.0, 3.0]])
    >>> y, h = jn.add_rms_norm(x, r, epsilon=0.0)
    >>> h
    Array([[1., 7.]], dtype=float32)
    >>> y
    Array([[0.2, 1.4]], dtype=float32)
    >>> y, h = jn.add_rms_norm(x.astype(jnp.bfloat16), r)  # a float32 residual stream
    >>> y.dtype, h.dtype
    (dtype(bfloat16), dtype('float32'))
  """
  where = "add_rms_norm"
  x, residual, spec, out = _checks.residual_spec(
      x, residual, scale, bias, where=where, implementation=implementation,
      zero_centered_scale=zero_centered_scale, dtype=dtype, reduction_axes=reduction_axes,
      feature_axes=feature_axes, epsilon=epsilon, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups)
  _checks.check_convention(convention, zero_centered_scale, bias)
  rms_spec = spec._replace(centered=False)
  if implementation == "pallas" and (got := add_by_kernel(
      where, x, residual, scale, bias, rms_spec, zero_centered_scale, convention, out)):
    return got
  with jax.named_scope(f"jaxnorm.{where}"):
    h, hn = _sum(x, residual, out)
    narrow = None if hn.dtype == out else out
    y = rms(hn, scale, bias, spec, zero_centered_scale, implementation, convention, narrow)
  return y, h


def add_layer_norm(
    x: ArrayLike,
    residual: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    zero_centered_scale: bool = False,
    implementation: str | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""Adds `x` to the residual stream and layer-normalizes the sum: one step of a pre-norm
  block.

  .. math::
    h = x + r, \qquad y = \mathrm{layer\_norm}(h)

  Returns `(y, h)`, equal to `h = x + residual; (layer_norm(h, ...), h)` and differentiable
  as that composition; the dtypes as in `add_rms_norm` (`h` in the promoted dtype, `y` in
  `x`'s, one rounding of a float32 `h`'s norm).

  Args:
    x: the sublayer's output (real floating).
    residual: the residual stream, of `x`'s shape; its dtype may be wider than `x`'s.
    scale: optional γ, as in `layer_norm`.
    bias: optional β, as in `layer_norm`.
    reduction_axes: axes of the statistics (default: the last).
    feature_axes: axes `scale` and `bias` run along (default: the last).
    epsilon: non-negative constant added to the variance.
    mask: optional boolean array broadcastable to `x`: the elements that enter the statistics.
    axis_name: mapped axis (or axes) to reduce over as well, as in `layer_norm`.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    zero_centered_scale: `scale` stores γ - 1, as in `layer_norm`.
    implementation: None, `"xla"` or `"pallas"`, as in `layer_norm` (and `add_rms_norm`).
    dtype: `y`'s dtype (None: `x`'s), as in `add_rms_norm`.

  Returns:
    `(y, h)`: `y` of `x`'s shape and dtype (or `dtype`), `h` in `x` and `residual`'s promoted
    dtype.

  Raises:
    TypeError: `x` or `residual` is not real floating, or `mask` is not boolean.
    ValueError: `residual` of another shape than `x`, and `layer_norm`'s errors.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x, r = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 1.0, 1.0]])
    >>> y, h = jn.add_layer_norm(x, r, epsilon=0.0)
    >>> h
    Array([[2., 3., 4.]], dtype=float32)
    >>> y.round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
  """
  where = "add_layer_norm"
  x, residual, spec, out = _checks.residual_spec(
      x, residual, scale, bias, where=where, implementation=implementation,
      zero_centered_scale=zero_centered_scale, dtype=dtype, reduction_axes=reduction_axes,
      feature_axes=feature_axes, epsilon=epsilon, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups)
  if implementation == "pallas" and (got := add_by_kernel(
      where, x, residual, scale, bias, spec, zero_centered_scale, None, out)):
    return got
  with jax.named_scope(f"jaxnorm.{where}"):
    h, hn = _sum(x, residual, out)
    y = layer(hn, scale, bias, spec, zero_centered_scale, implementation, (x, residual))
  return (y if y.dtype == out else y.astype(out)), h
