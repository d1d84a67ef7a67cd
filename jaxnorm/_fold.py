"""Folding batch normalization into the linear layer before it, for inference.

In evaluation mode batch normalization is an affine map per output feature, so it can be
absorbed into the kernel and bias of the Dense or Conv layer that feeds it: the folded network
computes one matrix product (or convolution) and one bias add where the original computed a
matrix product, a bias add and a normalization.
"""

from __future__ import annotations

import jax
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
