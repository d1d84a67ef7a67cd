"""Folding normalizations' affine parameters into neighbouring linear layers, for inference.

In evaluation mode batch normalization is an affine map per output feature, so it can be
absorbed into the kernel and bias of the Dense or Conv layer that feeds it: the folded network
computes one matrix product (or convolution) and one bias add where the original computed a
matrix product, a bias add and a normalization.

Layer and RMS normalization are not affine in their input, but their own affine part (scale
γ, offset β) is, so a Dense layer that reads their output can absorb it: the norm keeps only
its normalization, which is what a fused norm kernel without parameters computes fastest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from ._apply import reciprocal_std
from ._dtypes import wide_dtype


def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    offset: ArrayLike | None = None,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  r"""Folds an evaluation-mode batch normalization into the layer before it.

  For a layer `z = x · W + b` (Dense, or a convolution of any rank) followed by
  `y = (z - μ) γ / sqrt(σ² + ε) + β`:

  .. math::
    s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    W' = W \cdot \operatorname{diag}(s), \qquad b' = (b - \mu)\, s + \beta

  so that `x · W' + b' = y`. `W`'s last axis must be the output features (flax's layout for
  `Dense`, `Conv` and `ConvTranspose`: `(..., in, out)`); `s` runs along it. The arithmetic runs
  in float32 or wider and `ε` enters exactly as `jaxnorm.batch_norm` adds it (a negative stored
  variance is clipped to 0 there and here), so the folded layer equals layer → BatchNorm to
  float32 rounding. The folded kernel keeps `kernel`'s dtype; the folded bias has `bias`'s
  dtype, or `kernel`'s when there was no bias. The layer's own arrays are positional, the
  BatchNorm's keyword-only, so that no two arrays of the same shape can be swapped silently.

  Args:
    kernel: floating kernel, output features last.
    bias: the layer's bias of shape `(features,)`, or None for a layer without bias.
    mean: the BatchNorm's mean (`batch_stats/mean`), shape `(features,)`.
    var: its (biased) variance (`batch_stats/var`), shape `(features,)`.
    scale: its γ (`params/scale`), or None for `use_scale=False`.
    offset: its β (`params/bias`), or None for `use_bias=False`.
    epsilon: the BatchNorm's epsilon (default 1e-5, flax's and jaxnorm's batch norm's).

  Returns:
    `(kernel, bias)` of the folded layer, of `kernel`'s shape and `(features,)`.

  Raises:
    TypeError: `kernel`, a statistic or a parameter is not floating (complex included).
    ValueError: `kernel` is a scalar, a statistic or parameter does not have the shape
      `(features,)`, or epsilon is negative.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]])  # (in, out)
    >>> mean, var = jnp.array([1.0, 0.0]), jnp.array([4.0, 1.0])
    >>> k, b = jn.fold_batch_norm(kernel, mean=mean, var=var, offset=jnp.array([0.5, 0.0]),
    ...                           epsilon=0.0)
    >>> k
    Array([[0.5, 2. ],
           [1.5, 4. ]], dtype=float32)
    >>> b
    Array([0., 0.], dtype=float32)
  """
  given = {"bias": bias, "mean": mean, "var": var, "scale": scale, "offset": offset}
  kernel, arrays = _checks.fold_args(kernel, epsilon, given)
  with jax.named_scope("jaxnorm.fold_batch_norm"):
    return _fold(kernel, arrays, epsilon)


def _fold(kernel: jax.Array, arrays: dict[str, jax.Array | None],
          epsilon: float) -> tuple[jax.Array, jax.Array]:
  dtype = wide_dtype(*(v.dtype for v in (kernel, *arrays.values()) if v is not None))
  mul = reciprocal_std(arrays["var"], epsilon, dtype)  # type: ignore[arg-type]
  if arrays["scale"] is not None:
    mul = mul * arrays["scale"].astype(dtype)
  shift = -arrays["mean"].astype(dtype)  # type: ignore[union-attr]
  if arrays["bias"] is not None:
    shift = arrays["bias"].astype(dtype) + shift
  new_bias = shift * mul
  if arrays["offset"] is not None:
    new_bias = new_bias + arrays["offset"].astype(dtype)
  bias_dtype = kernel.dtype if arrays["bias"] is None else arrays["bias"].dtype
  return (kernel.astype(dtype) * mul).astype(kernel.dtype), new_bias.astype(bias_dtype)


def fold_norm_into_dense(
    kernel: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    scale: ArrayLike,
    offset: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  r"""Folds a layer or RMS normalization's scale and offset into the Dense layer after it.

  For a norm `y = n(x) γ + β` (layer norm: `n(x) = (x - μ) / sqrt(σ² + ε)`; RMS norm: no β)
  feeding `z = y · W + b`:

  .. math::
    W' = \operatorname{diag}(\gamma)\, W, \qquad b' = \beta\, W + b

  so that `n(x) · W' + b' = z`: the norm then runs without parameters (`use_scale=False,
  use_bias=False`, or scale 1 and offset 0). The identity is exact in real arithmetic (in
  float64 it holds to float64 rounding); in float32, `W'` is one rounding of `γ W` and `b'` a
  float32 sum of `features + 1` terms. One norm feeding several Dense layers (q, k and v) is
  folded into each of them with the same γ and β.

  `W`'s first axis must be the normalized features: flax's `Dense` kernel `(features, out)` or
  a `DenseGeneral` kernel over the last axis `(features, *out)` (then `bias` has shape `out`).
  A stack of kernels with leading batch axes (scanned layers) is not accepted: fold each
  layer's slice, e.g. with `jax.vmap(fold_norm_into_dense)`. The arithmetic runs in float32 or
  wider at the highest matmul precision; the folded kernel keeps `kernel`'s dtype, the folded
  bias has `bias`'s dtype, or `kernel`'s when there was no bias. A norm with
  `zero_centered_scale=True` stores `γ - 1`: pass `scale + 1`.

  Args:
    kernel: floating kernel, normalized features first.
    bias: the Dense layer's bias, shape `kernel.shape[1:]`, or None for a layer without bias.
    scale: the norm's γ (`params/scale`), shape `(features,)`.
    offset: the norm's β (`params/bias`), shape `(features,)`, or None (RMS norm, or a layer
      norm with `use_bias=False`).

  Returns:
    `(kernel, bias)` of the folded Dense layer, of `kernel`'s shape and `kernel.shape[1:]`.

  Raises:
    TypeError: an array is not floating (complex included).
    ValueError: `kernel` has fewer than two axes, `scale` is None, or a shape does not agree.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]])  # (features, out)
    >>> k, b = jn.fold_norm_into_dense(kernel, jnp.array([0.5, 0.0]),
    ...                                scale=jnp.array([2.0, 1.0]), offset=jnp.array([1.0, -1.0]))
    >>> k
    Array([[2., 4.],
           [3., 4.]], dtype=float32)
    >>> b
    Array([-1.5, -2. ], dtype=float32)
  """
  kernel, bias, scale, offset = _checks.fold_norm_args(kernel, bias, scale, offset)
  with jax.named_scope("jaxnorm.fold_norm_into_dense"):
    return _fold_norm(kernel, bias, scale, offset)


def _fold_norm(kernel: jax.Array, bias: jax.Array | None, scale: jax.Array,
               offset: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  dtype = wide_dtype(*(v.dtype for v in (kernel, bias, scale, offset) if v is not None))
  wide = kernel.astype(dtype)
  gamma = scale.astype(dtype).reshape((-1,) + (1,) * (kernel.ndim - 1))
  new_bias = jnp.zeros(kernel.shape[1:], dtype) if bias is None else bias.astype(dtype)
  if offset is not None:  # HIGHEST: a default-precision matmul may round to bfloat16 on GPU/TPU
    new_bias = new_bias + jnp.tensordot(offset.astype(dtype), wide, axes=(0, 0),
                                        precision=jax.lax.Precision.HIGHEST)
  bias_dtype = kernel.dtype if bias is None else bias.dtype
  return (wide * gamma).astype(kernel.dtype), new_bias.astype(bias_dtype)
