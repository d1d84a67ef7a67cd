"""Batch normalization: running-statistics state, its update, and the normalizer.

The state is a NamedTuple of arrays made by `batch_norm_init` and advanced by
`update_running_stats`; `batch_norm` returns `(output, new_state)` and never mutates.

Momentum conventions, written down once:

* jaxnorm, flax, haiku, equinox and Keras use a *decay*:
  `running = momentum * running + (1 - momentum) * batch`, default 0.99.
* PyTorch uses the weight of the *new* batch: `running = (1 - m) * running + m * batch`,
  default 0.1. `momentum_from_torch(m)` converts it (0.1 -> 0.9).
* PyTorch's `momentum=None` is the exact cumulative average over all updates; here too.
* PyTorch stores the unbiased (Bessel-corrected) running variance `var * n / (n - 1)` and
  normalizes training batches with the biased one; `unbiased_running_var=True` does the same.
  Everyone else stores the biased variance (the default here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from . import _checks
from ._fused import apply, normalize_with_moments
from ._normalize import _prepare
from ._stats import AxisName, Moments, _wide_dtype


class BatchNormState(NamedTuple):
  """Running statistics of batch normalization, one entry per feature.

  Attributes:
    mean: running mean, of the feature shape.
    var: running (biased, or unbiased with `unbiased_running_var=True`) variance.
    count: number of updates that saw at least one valid element.
  """

  mean: jax.Array  # shape=feature_shape
  var: jax.Array  # shape=feature_shape
  # `count` is the contract's name; mypy reports that it shadows the method tuple.count.
  count: jax.Array  # type: ignore[assignment]  # shape=(), dtype=int32


def batch_norm_init(feature_shape: int | Sequence[int],
                    dtype: DTypeLike = jnp.float32) -> BatchNormState:
  """Initial running statistics: mean 0, variance 1, count 0.

  Evaluating before any training step therefore normalizes by `sqrt(1 + epsilon)`: finite,
  close to the identity.

  Args:
    feature_shape: the shape of the feature axes (an int for one axis).
    dtype: dtype of the running mean and variance (the update computes in float32 or wider
      and casts back).

  Returns:
    A `BatchNormState`.

  Example:
    >>> import jaxnorm as jn
    >>> jn.batch_norm_init(3)
    BatchNormState(mean=Array([0., 0., 0.], dtype=float32),
                   var=Array([1., 1., 1.], dtype=float32), count=Array(0, dtype=int32))
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
  if not all(isinstance(d, int) and d >= 0 for d in shape):
    raise ValueError(f"feature_shape must be a sequence of non-negative ints; got "
                     f"{feature_shape!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype; got {dtype!r}.")
  return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype),
                        jnp.zeros((), jnp.int32))


def momentum_from_torch(momentum: float | None) -> float | None:
  """Converts PyTorch's BatchNorm `momentum` (weight of the new batch) to jaxnorm's decay.

  PyTorch: `running = (1 - m) * running + m * batch` (default m = 0.1). jaxnorm, like flax:
  `running = momentum * running + (1 - momentum) * batch` (default 0.99). `None` (PyTorch's
  cumulative average) is the same in both.

  Example:
    >>> import jaxnorm as jn
    >>> jn.momentum_from_torch(0.1)
    0.9
  """
  if momentum is None:
    return None
  if not 0.0 < momentum <= 1.0:
    raise ValueError(f"PyTorch's momentum must lie in (0, 1]; got {momentum!r}.")
  return round(1.0 - momentum, 15)


def _check_state(state: BatchNormState, feature_shape: tuple[int, ...]) -> None:
  if not isinstance(state, BatchNormState):
    raise TypeError(f"state must be a jaxnorm.BatchNormState (see batch_norm_init); got "
                    f"{type(state).__name__}.")
  for name in ("mean", "var"):
    shape = tuple(jnp.shape(getattr(state, name)))
    if shape != tuple(feature_shape):
      raise ValueError(
          f"state.{name} has shape {shape} but the input's feature shape is "
          f"{tuple(feature_shape)}; create the state with "
          f"batch_norm_init({tuple(feature_shape)})."
      )
  if jnp.shape(state.count) != ():
    raise ValueError(f"state.count must be a scalar; got shape {jnp.shape(state.count)}.")


def update_running_stats(
    state: BatchNormState,
    batch: Moments,
    *,
    momentum: float | None = 0.99,
    unbiased_running_var: bool = False,
) -> BatchNormState:
  r"""Folds a batch's moments into the running statistics.

  .. math::
    \bar\mu \leftarrow m\,\bar\mu + (1 - m)\,\mu_B, \qquad
    \bar\sigma^2 \leftarrow m\,\bar\sigma^2 + (1 - m)\,\sigma^2_B

  with the decay `m = momentum` (flax's convention; PyTorch's 0.1 is
  `momentum_from_torch(0.1) == 0.9`). With `momentum=None` the weight is `1 / (count + 1)`,
  the exact cumulative average of every update so far (PyTorch's `momentum=None`; the initial
  mean 0 / variance 1 do not enter it). With `unbiased_running_var=True` the batch variance
  enters as `var * n / (n - 1)` (Bessel's correction with the batch's valid count n, as
  PyTorch stores it; n = 1 contributes 0).

  The arithmetic runs in float32 or wider whatever the state's dtype (in bfloat16, a decay of
  0.999 would round to 1), and the result has the state's dtypes. Features whose batch count
  is 0 keep their running values, and `count` advances only if some feature saw a valid element.

  Args:
    state: the running statistics.
    batch: the batch's `Moments`, of the state's feature shape.
    momentum: decay in [0, 1), or None for the cumulative average.
    unbiased_running_var: store the Bessel-corrected variance, as PyTorch does.

  Returns:
    The new `BatchNormState`, with the same structure, shapes and dtypes.

  Raises:
    ValueError: momentum outside [0, 1), or moments of another shape than the state.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> state = jn.batch_norm_init(2)
    >>> batch = jn.moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]), reduction_axes=0)
    >>> jn.update_running_stats(state, batch, momentum=None)
    BatchNormState(mean=Array([2., 4.], dtype=float32), var=Array([1., 4.], dtype=float32),
                   count=Array(1, dtype=int32))
  """
  _checks.check_momentum(momentum)
  _check_state(state, jnp.shape(batch.mean))
  dtype = _wide_dtype(state.mean.dtype, batch.mean.dtype)
  count = batch.count.astype(dtype)
  var = batch.var.astype(dtype)
  if unbiased_running_var:
    var = var * count / jnp.maximum(count - 1, jnp.ones((), dtype))
  if momentum is None:
    weight = 1 / (state.count.astype(dtype) + 1)  # weight of the new batch
  else:
    weight = jnp.asarray(1.0 - momentum, dtype)
  seen = count > 0

  def ema(old: jax.Array, new: jax.Array) -> jax.Array:
    mixed = (1 - weight) * old.astype(dtype) + weight * new.astype(dtype)
    return jnp.where(seen, mixed, old.astype(dtype)).astype(old.dtype)

  return BatchNormState(
      mean=ema(state.mean, batch.mean),
      var=ema(state.var, var),
      count=state.count + jnp.any(seen).astype(state.count.dtype),
  )


def batch_norm(
    x: ArrayLike,
    state: BatchNormState,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    feature_axes: int | Sequence[int] = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    unbiased_running_var: bool = False,
) -> tuple[jax.Array, BatchNormState]:
  r"""Batch normalization (Ioffe & Szegedy, 2015) with explicit running statistics.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

  In training, `μ, σ²` are the moments of the batch over every axis except `feature_axes`
  (population variance, two passes, at least float32; only elements where `mask` is True; with
  `axis_name`, over all named devices weighted by their valid counts), and the running
  statistics are updated with `update_running_stats`. In evaluation, the running statistics are
  used and the state is returned unchanged.

  Args:
    x: floating input.
    state: running statistics of the feature shape (`batch_norm_init`).
    scale: optional γ of the feature shape.
    bias: optional β of the feature shape.
    training: True to use and fold in the batch's statistics, False to use the running ones.
    feature_axes: axes that keep separate statistics (default: the last, channels-last).
    momentum: decay of the running statistics in [0, 1), or None for the cumulative average.
    epsilon: non-negative constant added to the variance.
    mask: optional boolean array broadcastable to `x`; True marks elements that enter the batch
      statistics. A batch with no valid element leaves the running statistics unchanged.
    axis_name: mapped axis (or axes) over which the batch is split across devices.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    unbiased_running_var: store the Bessel-corrected running variance, as PyTorch does.

  Returns:
    `(y, new_state)`: `y` of `x`'s shape and dtype, and the updated (or, in evaluation, the
    same) state.

  Raises:
    TypeError: `x` is not floating, `training` is not a bool, or `state` is not a
      BatchNormState.
    ValueError: bad axes, parameters or state of the wrong shape, a mask that does not
      broadcast, a negative epsilon, or momentum outside [0, 1).

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y, state = jn.batch_norm(x, jn.batch_norm_init(1), training=True, epsilon=0.0)
    >>> y
    Array([[-1.],
           [ 1.]], dtype=float32)
    >>> state
    BatchNormState(mean=Array([0.02], dtype=float32), var=Array([1.], dtype=float32),
                   count=Array(1, dtype=int32))
  """
  if not isinstance(training, bool):
    raise TypeError(
        f"training must be a Python bool (it selects the code path at trace time); got "
        f"{training!r}. Make it a static argument of your jitted function."
    )
  x = jnp.asarray(x)
  _checks.check_floating(x)
  feat = _checks.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  red = tuple(a for a in range(x.ndim) if a not in feat)
  x, red, feat = _prepare(x, red, feat, scale, bias, epsilon)
  _checks.check_momentum(momentum)
  _check_state(state, tuple(x.shape[a] for a in feat))
  if not training:
    mask = _checks.check_mask(mask, x.shape)  # validated for consistency, unused
    with jax.named_scope("jaxnorm.batch_norm"):
      return apply(x, state.mean, state.var, scale, bias, red, feat, epsilon), state
  mask = _checks.check_mask(mask, x.shape)
  _checks.check_axis_index_groups(axis_name, axis_index_groups)
  with jax.named_scope("jaxnorm.batch_norm"):
    y, m = normalize_with_moments(x, scale, bias, epsilon, mask, reduction_axes=red,
                                   feature_axes=feat, axis_name=axis_name,
                                   axis_index_groups=axis_index_groups, centered=True)
    new_state = update_running_stats(state, m, momentum=momentum,
                                     unbiased_running_var=unbiased_running_var)
  return y, new_state
