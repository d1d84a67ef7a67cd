"""Normalization with given statistics, and the per-example normalizers built on `moments`.

The public normalizers validate their arguments here and call the fused normalizer of
`_fused`: `normalize` its `apply` (the one place where `(x - mean) * rsqrt(var + epsilon) *
scale + bias` is written), layer, RMS, group and instance normalization its
`normalize_with_moments`, which computes the statistics with the single statistics path of
`_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from ._fused import apply_given, check_implementation, dispatch
from ._stats import AxisName, _wide_dtype

Axes = int | Sequence[int]


def _feature_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[a] for a in feature_axes)


def _prepare(x: ArrayLike, reduction_axes: Axes, feature_axes: Axes, scale: Any, bias: Any,
             epsilon: Any, params: tuple[str, str] = ("scale", "bias"),
             ) -> tuple[jax.Array, tuple[int, ...], tuple[int, ...]]:
  """Validates the arguments shared by every normalizer."""
  x = jnp.asarray(x)
  _checks.check_floating(x, allow_complex=True)
  red = _checks.canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  feat = _checks.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  fshape = _feature_shape(x.shape, feat)
  for name, p in zip(params, (scale, bias), strict=True):
    _checks.check_param(p, fshape, name, f"input's feature axes {feat}", x.shape)
  _checks.check_epsilon(epsilon)
  return x, red, feat


def _zero_centered(scale: Any, zero_centered_scale: bool) -> Any:
  """`1 + scale` in at least float32 when the scale is stored zero-centred."""
  if not isinstance(zero_centered_scale, bool):
    raise TypeError(f"zero_centered_scale must be a bool; got {zero_centered_scale!r}.")
  if not zero_centered_scale or scale is None:
    return scale
  scale = jnp.asarray(scale)
  dtype = _wide_dtype(scale.dtype)
  return scale.astype(dtype) + jnp.ones((), dtype)


def _normalize_by_moments(name: str, x: jax.Array, red: tuple[int, ...],
                          feat: tuple[int, ...], scale: Any, bias: Any, epsilon: Any,
                          mask: Any, axis_name: Any, axis_index_groups: Any,
                          centered: bool = True, implementation: str | None = None,
                          groups: int | None = None) -> jax.Array:
  """Computes the statistics through the one statistics path and normalizes with them."""
  mask = _checks.check_mask(mask, x.shape)
  _checks.check_axis_index_groups(axis_name, axis_index_groups)
  with jax.named_scope(f"jaxnorm.{name}"):
    return dispatch(x, scale, bias, epsilon, mask, reduction_axes=red, feature_axes=feat,
                    axis_name=axis_name, axis_index_groups=axis_index_groups,
                    centered=centered, implementation=implementation, groups=groups)


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    reduction_axes: Axes,
    feature_axes: Axes = -1,
    epsilon: float,
) -> jax.Array:
  r"""Normalizes `x` with precomputed statistics.

  .. math::
    y = \frac{x - \mu}{\sqrt{\max(\sigma^2, 0) + \epsilon}}\,\gamma + \beta

  The arithmetic runs in at least float32 and the result is cast back to `x.dtype`. A negative
  variance (possible with statistics computed elsewhere as `E[x²] - E[x]²`) is clipped to 0.

  Args:
    x: floating or complex input (complex mean, real variance; see `moments`).
    mean: mean over `reduction_axes`, of `x`'s shape with those axes removed.
    var: variance, of the same shape as `mean`.
    scale: optional γ of the feature shape `[x.shape[a] for a in feature_axes]`.
    bias: optional β of the feature shape.
    reduction_axes: the axes the statistics were reduced over.
    feature_axes: the axes `scale` and `bias` run along.
    epsilon: non-negative constant added to the variance.

  Returns:
    The normalized array, of `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not floating.
    ValueError: bad axes, a statistic or parameter of the wrong shape, or a negative epsilon.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0, 3.0], [2.0, 6.0]])
    >>> m = jn.moments(x, reduction_axes=0)
    >>> jn.normalize(x, m.mean, m.var, reduction_axes=0, epsilon=0.0)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  x, red, feat = _prepare(x, reduction_axes, feature_axes, scale, bias, epsilon)
  stat_shape = tuple(d for i, d in enumerate(x.shape) if i not in red)
  mean, var = jnp.asarray(mean), jnp.asarray(var)
  for name, s in (("mean", mean), ("var", var)):
    if s.shape != stat_shape:
      raise ValueError(
          f"{name} must have the input's shape {x.shape} without reduction_axes {red}, i.e. "
          f"{stat_shape}; got shape {s.shape}."
      )
  with jax.named_scope("jaxnorm.normalize"):
    return apply_given(x, mean, var, scale, bias, red, feat, epsilon)


def layer_norm(
    x: ArrayLike,
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
) -> jax.Array:
  r"""Layer normalization (Ba et al., 2016): statistics of each example over its features.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
    \mu, \sigma^2 = \text{moments}(x, \text{reduction\_axes})

  with the population variance computed in two passes in at least float32 (see `moments`), and
  :math:`\gamma` replaced by :math:`1 + \gamma` with `zero_centered_scale=True`.
  The result does not depend on the other examples of the batch. With `mask`, only the valid
  elements enter the statistics and every element is normalized with them (as in flax). With
  `axis_name`, the reduction also runs over the named devices, for a feature axis sharded across
  them (tensor parallelism).

  Args:
    x: floating or complex input (complex mean, real variance; see `moments`).
    scale: optional γ of the feature shape `[x.shape[a] for a in feature_axes]`, or of any
      shape that broadcasts to `x` (per-example conditioning, e.g. `(batch, 1, features)`:
      its gradient comes back in that shape).
    bias: optional β, of the feature shape or a shape that broadcasts to `x`.
    reduction_axes: axes to compute the statistics over (default: the last).
    feature_axes: axes `scale` and `bias` run along (default: the last).
    epsilon: non-negative constant added to the variance.
    mask: optional boolean array broadcastable to `x`; True marks elements that enter the
      statistics.
    axis_name: mapped axis (or axes) to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    zero_centered_scale: `scale` stores γ - 1 (Gemma, TransformerEngine), so that the output is
      :math:`\hat x(1 + \gamma) + \beta` and weight decay pulls the layer to the identity.
    implementation: None (choose: this release always takes the XLA path), `"xla"` or
      `"pallas"`: the fused Pallas kernels (Triton on GPU, interpret mode on CPU; opt-in and
      not yet measured on a GPU), for the plain case only: reduction and parameters over the
      last axis, no mask, no axis_name, float32/bfloat16/float16. See
      docs/guides/gpu_kernels.md.

  Returns:
    The normalized array, of `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not floating or `mask` is not boolean.
    ValueError: bad axes, parameters of the wrong shape, a mask that does not broadcast, a
      negative epsilon, an unknown `implementation`, or `"pallas"` outside the plain case.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1, 1e4 + 2]])
    >>> jn.layer_norm(x, epsilon=0.0).round(4)
    Array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]], dtype=float32)
  """
  x, red, feat = _prepare(x, reduction_axes, feature_axes, scale, bias, epsilon)
  check_implementation(implementation)
  scale = _zero_centered(scale, zero_centered_scale)
  return _normalize_by_moments("layer_norm", x, red, feat, scale, bias, epsilon, mask,
                               axis_name, axis_index_groups, implementation=implementation)


def rms_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
    zero_centered_scale: bool = False,
    implementation: str | None = None,
) -> jax.Array:
  r"""Root-mean-square normalization (Zhang & Sennrich, 2019): no centring, no bias.

  .. math::
    y = \frac{x}{\sqrt{\frac{1}{n}\sum_i m_i x_i^2 + \epsilon}}\,\gamma

  (:math:`\gamma` replaced by :math:`1 + \gamma` with `zero_centered_scale=True`).

  The mean square is accumulated in at least float32 over the valid elements (`mask`) and,
  with `axis_name`, over the named devices.

  Args:
    x: floating or complex input (complex mean, real variance; see `moments`).
    scale: optional γ of the feature shape, or of any shape that broadcasts to `x`
      (per-example conditioning; its gradient comes back in that shape).
    reduction_axes: axes to compute the mean square over (default: the last).
    feature_axes: axes `scale` runs along (default: the last).
    epsilon: non-negative constant added to the mean square.
    mask: optional boolean array broadcastable to `x`.
    axis_name: mapped axis (or axes) to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    zero_centered_scale: `scale` stores γ - 1 (Gemma's RMSNorm): the output is
      :math:`x r (1 + \gamma)`.
    implementation: None (choose: this release always takes the XLA path), `"xla"` or
      `"pallas"`: the fused Pallas kernels (Triton on GPU, interpret mode on CPU; opt-in and
      not yet measured on a GPU), for the plain case only: reduction and parameters over the
      last axis, no mask, no axis_name, float32/bfloat16/float16. See
      docs/guides/gpu_kernels.md.

  Returns:
    The normalized array, of `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not floating or `mask` is not boolean.
    ValueError: bad axes, `scale` of the wrong shape, a mask that does not broadcast, a
      negative epsilon, an unknown `implementation`, or `"pallas"` outside the plain case.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> jn.rms_norm(jnp.array([1.0, 7.0]), epsilon=0.0)
    Array([0.2, 1.4], dtype=float32)
  """
  x, red, feat = _prepare(x, reduction_axes, feature_axes, scale, None, epsilon)
  check_implementation(implementation)
  scale = _zero_centered(scale, zero_centered_scale)
  return _normalize_by_moments("rms_norm", x, red, feat, scale, None, epsilon, mask,
                               axis_name, axis_index_groups, centered=False,
                               implementation=implementation)


def _resolve_groups(channels: int, num_groups: int | None, group_size: int | None) -> int:
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"Give exactly one of num_groups and group_size; got num_groups={num_groups!r}, "
        f"group_size={group_size!r} (num_groups defaults to 32: pass num_groups=None to use "
        f"group_size)."
    )
  if group_size is not None:
    if group_size <= 0 or channels % group_size:
      raise ValueError(
          f"group_size={group_size!r} must be a positive divisor of the number of channels, "
          f"{channels}."
      )
    return channels // group_size
  assert num_groups is not None  # exactly one of the two is given (checked above)
  if num_groups <= 0 or channels % num_groups:
    raise ValueError(
        f"num_groups={num_groups!r} must be a positive divisor of the number of channels, "
        f"{channels} (the input's last axis)."
    )
  return num_groups


def group_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    epsilon: float = 1e-6,
    reduction_axes: Axes | None = None,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
) -> jax.Array:
  r"""Group normalization (Wu & He, 2018) of channels-last input.

  The C channels (last axis) are split into G groups of C/G consecutive channels; each
  example's statistics are computed over its spatial axes and the channels of a group:

  .. math::
    y_{b,\dots,c} = \frac{x_{b,\dots,c} - \mu_{b,g(c)}}{\sqrt{\sigma^2_{b,g(c)} + \epsilon}}
      \gamma_c + \beta_c

  Args:
    x: floating or complex input of rank >= 2, batch axis first, channels last.
    scale: optional γ of shape (C,).
    bias: optional β of shape (C,).
    num_groups: number of groups G (flax's default, 32); pass None to use `group_size`.
    group_size: number of channels per group, instead of `num_groups`.
    epsilon: non-negative constant added to the variance.
    reduction_axes: axes to reduce over; they must include the last (channel) axis. Default:
      every axis but the first.
    mask: optional boolean array broadcastable to `x`.
    axis_name: mapped axis (or axes) to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).

  Returns:
    The normalized array, of `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not floating or `mask` is not boolean.
    ValueError: rank < 2, groups that do not divide the channels, bad axes or parameter
      shapes, a mask that does not broadcast, or a negative epsilon.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> jn.group_norm(x, num_groups=2, epsilon=0.0)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(
        f"group_norm expects input of rank >= 2 (batch first, channels last); got shape "
        f"{x.shape}."
    )
  if reduction_axes is None:
    reduction_axes = tuple(range(1, x.ndim))
  x, red, _ = _prepare(x, reduction_axes, -1, scale, bias, epsilon)
  if x.ndim - 1 not in red:
    raise ValueError(
        f"reduction_axes={reduction_axes!r} must include the last (channel) axis, "
        f"{x.ndim - 1}."
    )
  channels = x.shape[-1]
  groups = _resolve_groups(channels, num_groups, group_size)
  if math.prod(x.shape[a] for a in red if a != x.ndim - 1) > 1:
    # Spatial axes (images): the statistics are reduced per channel over them, then per group
    # of channels (`groups=`), on x as it is. One reduction over a (..., groups,
    # channels // groups) view took XLA:CPU 1.5-3x as long at 64x32x32x128.
    return _normalize_by_moments("group_norm", x, red, (x.ndim - 1,), scale, bias, epsilon,
                                 mask, axis_name, axis_index_groups, groups=groups)
  # No spatial extent (features of an MLP): each group is a row of the (..., groups,
  # channels // groups) view, normalized as layer norm normalizes its rows. Reducing x per
  # channel first would reduce nothing, and broadcasting each group's statistics back over its
  # channels made XLA:CPU 4x slower here (8192x1024 float32: 29 ms instead of 7).
  mask = _checks.check_mask(mask, x.shape)
  grouped = x.shape[:-1] + (groups, channels // groups)
  red_g = tuple(a for a in red if a != x.ndim - 1) + (x.ndim,)
  mask_g = None if mask is None else mask.reshape(grouped)
  scale_g, bias_g = (_grouped_param(p, x.shape, groups) for p in (scale, bias))
  y = _normalize_by_moments("group_norm", x.reshape(grouped), red_g, (x.ndim - 1, x.ndim),
                            scale_g, bias_g, epsilon, mask_g, axis_name, axis_index_groups)
  return y.reshape(x.shape)


def _grouped_param(p: Any, shape: tuple[int, ...], groups: int) -> jax.Array | None:
  """A (validated) group-norm parameter with its channel axis split into (groups, size)."""
  if p is None:
    return None
  p = jnp.asarray(p)
  channels = shape[-1]
  if p.shape == (channels,):
    return jnp.reshape(p, (groups, channels // groups))
  full = (1,) * (len(shape) - p.ndim) + p.shape  # per-example: broadcasts to the input
  last = (groups, channels // groups) if full[-1] == channels else (1, 1)
  return jnp.reshape(p, full[:-1] + last)


def instance_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    feature_axes: Axes = -1,
    epsilon: float = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
) -> jax.Array:
  r"""Instance normalization (Ulyanov et al., 2016): each example and channel on its own.

  The statistics are reduced over every axis except the batch axis (the first) and
  `feature_axes`, i.e. over the spatial axes of channels-last input:

  .. math::
    y_{b,\dots,c} = \frac{x_{b,\dots,c} - \mu_{b,c}}{\sqrt{\sigma^2_{b,c} + \epsilon}}
      \gamma_c + \beta_c

  Args:
    x: floating or complex input of rank >= 2, batch axis first.
    scale: optional γ of the feature shape.
    bias: optional β of the feature shape.
    feature_axes: the channel axes (default: the last); must not include the batch axis.
    epsilon: non-negative constant added to the variance.
    mask: optional boolean array broadcastable to `x`.
    axis_name: mapped axis (or axes) to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).

  Returns:
    The normalized array, of `x`'s shape and dtype.

  Raises:
    TypeError: `x` is not floating or `mask` is not boolean.
    ValueError: rank < 2, bad axes or parameter shapes, a mask that does not broadcast, or a
      negative epsilon.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (batch, length, channels)
    >>> jn.instance_norm(x, epsilon=0.0)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(
        f"instance_norm expects input of rank >= 2 (batch first); got shape {x.shape}."
    )
  feat = _checks.canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  if 0 in feat:
    raise ValueError(
        f"feature_axes={feature_axes!r} includes the batch axis 0; instance normalization "
        f"keeps the batch axis and the feature axes."
    )
  red = tuple(a for a in range(1, x.ndim) if a not in feat)
  x, red, feat = _prepare(x, red, feat, scale, bias, epsilon)
  return _normalize_by_moments("instance_norm", x, red, feat, scale, bias, epsilon, mask,
                               axis_name, axis_index_groups)
