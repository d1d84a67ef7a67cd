"""The per-example normalizers, and normalization with given statistics.

`normalize` validates and calls `_apply.apply_given`; layer, RMS, group and instance
normalization validate their arguments once and call the fused normalizer
(`_fused.fused_norm`), or for layer and RMS normalization with
`implementation="pallas"` the kernels of `_pallas`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks, _pallas
from ._apply import apply_given
from ._checks import Spec
from ._dtypes import residual_sum_dtype, wide_dtype
from ._fused import fused_norm
from ._layout import broadcast_param, split_axis
from ._stats import AxisName, residual_sum

Axes = int | Sequence[int]


def _zero_centered(scale: Any, zero_centered_scale: bool) -> Any:
  """`1 + scale` in at least float32 when the scale is stored zero-centred."""
  if not zero_centered_scale or scale is None:
    return scale
  scale = jnp.asarray(scale)
  dtype = wide_dtype(scale.dtype)
  return scale.astype(dtype) + jnp.ones((), dtype)


def _llama_scale(y: jax.Array, scale: Any, spec: Spec) -> jax.Array:
  """`scale * y` in the dtype the two promote to, one rounding of the product: the last line
  of HF's LlamaRMSNorm, `weight * hidden.to(input_dtype)` (torch promotes as jnp does)."""
  scale = jnp.asarray(scale)
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.result_type(scale, y)
  return broadcast_param(scale, spec.feature_axes, y.shape, dtype) * y.astype(dtype)


def _norm(name: str, x: jax.Array, scale: Any, bias: Any, spec: Spec,
          implementation: str | None = None, parts: tuple[jax.Array, ...] = ()) -> jax.Array:
  """Normalizes validated arguments by their own statistics, on the path `implementation`
  picks: the fused XLA normalizer, or (`"pallas"`, layer and RMS norm) the kernels.

  `None` takes the XLA path (the kernels are not yet measured on a device, so nothing chooses
  them by itself). `"pallas"` outside the kernels' plain case is a ValueError; inputs with
  more than `_pallas.MAX_FEATURES` features, or no element, take the XLA path. `parts`: x is
  their sum (`add_layer_norm`; see `fused_norm`).
  """

  def xla(x, scale, bias, spec=spec, parts=parts):
    return fused_norm(x, scale, bias, spec, parts=parts)[0]

  with jax.named_scope(f"jaxnorm.{name}"):
    if implementation != "pallas":
      return xla(x, scale, bias)
    _checks.check_pallas_case(_pallas.obstacle(x, scale, bias, spec.epsilon, spec.mask,
                                               spec.reduction_axes, spec.feature_axes,
                                               spec.axis_name))
    if x.size == 0 or x.shape[-1] > _pallas.MAX_FEATURES:
      return xla(x, scale, bias)
    scale = None if scale is None else jnp.asarray(scale)
    bias = None if bias is None else jnp.asarray(bias)
    rows = spec._replace(reduction_axes=(1,), feature_axes=(1,), mask=None)
    return _pallas.normalize_rows(
        x, scale, bias, float(spec.epsilon), centered=spec.centered,
        xla=lambda x2, s, b: xla(x2, s, b, spec=rows, parts=()))


def add_by_kernel(name: str, x: jax.Array, residual: jax.Array, scale: Any, bias: Any,
                  spec: Spec, zero_centered_scale: bool, convention: str | None, out: Any
                  ) -> tuple[jax.Array, jax.Array] | None:
  """`(y, h)` of the fused residual add (`add_layer_norm` if `spec.centered`, else
  `add_rms_norm`) by the residual kernels, which read x and the residual once and write h and
  y; None outside their case, for the caller's path (the kernels on the sum, or its error).

  Their case is the row kernels' plain case with a residual and an `out` in dtypes they take,
  some elements and at most `_pallas.MAX_FEATURES` features. An `out` wider than the sum
  (flax's layers: float32 for bfloat16 input) is the norm of the sum converted to it, which the
  kernel computes as it does every norm: in float32 from the rounded sum, rounded once.
  """
  if (_pallas.obstacle(x, scale, bias, spec.epsilon, spec.mask, spec.reduction_axes,
                       spec.feature_axes, spec.axis_name) is not None
      or any(jnp.dtype(d).name not in _pallas.DTYPES for d in (residual.dtype, out))
      or x.size == 0 or x.shape[-1] > _pallas.MAX_FEATURES):
    return None
  h_dtype = residual_sum_dtype(x.dtype, residual.dtype)
  llama = convention == "llama"
  rows = spec._replace(reduction_axes=(1,), feature_axes=(1,), mask=None)
  with jax.named_scope(f"jaxnorm.{name}"):
    g = None if llama else _zero_centered(scale, zero_centered_scale or convention == "gemma")
    g = None if g is None else jnp.asarray(g)
    b = None if bias is None else jnp.asarray(bias)

    def xla(x2, r2, g, b):
      h = residual_sum(x2, r2)
      return fused_norm(h, g, b, rows)[0].astype(out), h

    y, h = _pallas.add_normalize_rows(x, residual, g, b, float(spec.epsilon),
                                      centered=spec.centered, h_dtype=h_dtype, y_dtype=out,
                                      xla=xla)
  return (_llama_scale(y, scale, spec) if llama and scale is not None else y), h


def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    reduction_axes: Axes,
    feature_axes: Axes = -1,
    epsilon: float = 1e-5,
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
    epsilon: non-negative constant added to the variance (default 1e-5, batch norm's, as
      `jax.nn.standardize`).

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
  x, spec = _checks.normalizer_spec(x, scale, bias, reduction_axes=reduction_axes,
                                    feature_axes=feature_axes, epsilon=epsilon)
  mean, var = _checks.check_statistics(mean, var, x, spec.reduction_axes)
  with jax.named_scope("jaxnorm.normalize"):
    return apply_given(x, mean, var, scale, bias, spec)


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

  with the population variance computed in two passes in at least float32 (see `moments`; on a
  GPU, under differentiation, in one read about a shift, as precise: docs/guides/internals.md),
  and :math:`\gamma` replaced by :math:`1 + \gamma` with `zero_centered_scale=True`.
  The result does not depend on the other examples of the batch. With `mask`, only the valid
  elements enter the statistics and every element is normalized with them (as in flax). With
  `axis_name`, the reduction also runs over the named devices, for a feature axis sharded across
  them (tensor parallelism). In float32 the statistics hold for deviations from about 1e-19 to
  1e19 in magnitude (see `moments`, "Range", for what happens outside and the remedies).

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
  x, spec = _checks.normalizer_spec(x, scale, bias, reduction_axes=reduction_axes,
                                    feature_axes=feature_axes, epsilon=epsilon, mask=mask,
                                    axis_name=axis_name, axis_index_groups=axis_index_groups)
  _checks.check_implementation(implementation)
  _checks.check_bool(zero_centered_scale, "zero_centered_scale")
  return layer(x, scale, bias, spec, zero_centered_scale, implementation)


def layer(x: jax.Array, scale: Any, bias: Any, spec: Spec, zero_centered_scale: bool,
          implementation: str | None, parts: tuple[jax.Array, ...] = ()) -> jax.Array:
  """`layer_norm` of validated arguments (also `add_layer_norm`'s, whose x is the sum of
  `parts`)."""
  scale = _zero_centered(scale, zero_centered_scale)
  return _norm("layer_norm", x, scale, bias, spec, implementation, parts)


def rms_norm(
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
    convention: str | None = None,
) -> jax.Array:
  r"""Root-mean-square normalization (Zhang & Sennrich, 2019): no centring.

  .. math::
    y = \frac{x}{\sqrt{\frac{1}{n}\sum_i m_i x_i^2 + \epsilon}}\,\gamma + \beta

  (:math:`\gamma` replaced by :math:`1 + \gamma` with `zero_centered_scale=True`). The bias
  :math:`\beta` is optional (RMSNorm has none in the paper; equinox's and several language
  models' have one); it is added in the arithmetic dtype, before the one rounding to `x.dtype`.

  The mean square is accumulated in at least float32 over the valid elements (`mask`) and,
  with `axis_name`, over the named devices; in float32 it holds for magnitudes from about
  1e-19 to 1e19 (see `moments`, "Range").

  Args:
    x: floating or complex input (complex mean, real variance; see `moments`).
    scale: optional γ of the feature shape, or of any shape that broadcasts to `x`
      (per-example conditioning; its gradient comes back in that shape).
    bias: optional β, of the feature shape or a shape that broadcasts to `x`.
    reduction_axes: axes to compute the mean square over (default: the last).
    feature_axes: axes `scale` and `bias` run along (default: the last).
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
    convention: where the roundings fall, for bit-for-bit parity with Hugging Face
      transformers (docs/guides/transformers.md). None: one rounding, of the whole result, to
      `x.dtype`. `"llama"` (LlamaRMSNorm, also Mistral's, Qwen2's, T5's): the normalized value
      is rounded to `x.dtype` and then multiplied by `scale` in the dtype the two promote to,
      which is the output's dtype (`x.dtype` when `scale` has it, as in a bfloat16 checkpoint);
      no `bias` (HF's has none) and no `zero_centered_scale`. `"gemma"` (GemmaRMSNorm, Gemma
      1/2/3, including their QK-norms and post-norms): the same as `zero_centered_scale=True`
      (`1 + scale` in float32, one rounding at the end), which it implies. Derivatives pass
      straight through the roundings, as autodiff of HF's formula written in JAX does.

  Returns:
    The normalized array, of `x`'s shape and dtype (with `convention="llama"` and a `scale`,
    the dtype of `scale * x`).

  Raises:
    TypeError: `x` is not floating or `mask` is not boolean.
    ValueError: bad axes, `scale` or `bias` of the wrong shape, a mask that does not
      broadcast, a negative epsilon, an unknown `implementation` or `convention`, `"pallas"`
      outside the plain case, or `convention="llama"` with a `bias` or `zero_centered_scale`.

  Example:
    >>> import jax.numpy as jnp, jaxnorm as jn
    >>> jn.rms_norm(jnp.array([1.0, 7.0]), epsilon=0.0)
    Array([0.2, 1.4], dtype=float32)
    >>> jn.rms_norm(jnp.array([1.0, 7.0]), bias=jnp.array([1.0, 0.0]), epsilon=0.0)
    Array([1.2, 1.4], dtype=float32)
  """
  x, spec = _checks.normalizer_spec(x, scale, bias, reduction_axes=reduction_axes,
                                    feature_axes=feature_axes, epsilon=epsilon, mask=mask,
                                    axis_name=axis_name, axis_index_groups=axis_index_groups)
  _checks.check_implementation(implementation)
  _checks.check_bool(zero_centered_scale, "zero_centered_scale")
  _checks.check_convention(convention, zero_centered_scale, bias)
  return rms(x, scale, bias, spec, zero_centered_scale, implementation, convention)


def rms(x: jax.Array, scale: Any, bias: Any, spec: Spec, zero_centered_scale: bool,
        implementation: str | None, convention: str | None, dtype: Any = None) -> jax.Array:
  """`rms_norm` of validated arguments (also `add_rms_norm`'s); `dtype`: the activations'
  dtype when it is narrower than x's (`add_rms_norm` of a float32 residual stream), to which
  `"llama"` rounds the normalized value and every other convention the result."""
  spec = spec._replace(centered=False)
  if convention == "llama":
    y = _norm("rms_norm", x, None, None, spec, implementation)
    y = y if dtype is None else y.astype(dtype)
    return y if scale is None else _llama_scale(y, scale, spec)
  scale = _zero_centered(scale, zero_centered_scale or convention == "gemma")
  y = _norm("rms_norm", x, scale, bias, spec, implementation)
  return y if dtype is None else y.astype(dtype)


def group_norm(
    x: ArrayLike,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    epsilon: float = 1e-6,
    reduction_axes: Axes | None = None,
    channel_axis: int = -1,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Any = None,
) -> jax.Array:
  r"""Group normalization (Wu & He, 2018), channels last or first.

  The C channels (`channel_axis`, the last by default) are split into G groups of C/G
  consecutive channels; each example's statistics are computed over its spatial axes and the
  channels of a group:

  .. math::
    y_{b,\dots,c} = \frac{x_{b,\dots,c} - \mu_{b,g(c)}}{\sqrt{\sigma^2_{b,g(c)} + \epsilon}}
      \gamma_c + \beta_c

  Args:
    x: floating or complex input of rank >= 2, batch axis first.
    scale: optional γ of shape (C,), or of a shape that broadcasts to `x` (per example).
    bias: optional β of shape (C,), or of a shape that broadcasts to `x`.
    num_groups: number of groups G (flax's default, 32); pass None to use `group_size`.
    group_size: number of channels per group, instead of `num_groups`.
    epsilon: non-negative constant added to the variance.
    reduction_axes: axes to reduce over; they must include the channel axis. Default: every
      axis but the first.
    channel_axis: the channel axis: -1 for channels-last input (flax, NHWC), 1 for
      channels-first input (PyTorch, equinox, NCHW). It cannot be the batch axis 0.
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
    >>> jn.group_norm(x[:, :, None], num_groups=2, epsilon=0.0, channel_axis=1)[..., 0]
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """
  x, spec = _checks.group_norm_spec(
      x, scale, bias, num_groups=num_groups, group_size=group_size, epsilon=epsilon,
      reduction_axes=reduction_axes, channel_axis=channel_axis, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups)
  (ch,) = spec.feature_axes
  last = x.ndim - 1
  if ch == last and math.prod(x.shape[a] for a in spec.reduction_axes if a != last) > 1:
    # Channels last with spatial axes (images): statistics per channel over them, then per
    # group of channels, on x as it is (docs/guides/internals.md, "Group normalization").
    return _norm("group_norm", x, scale, bias, spec)
  # Otherwise each group is normalized over a (..., groups, channels // groups, ...) view,
  # as layer norm normalizes its rows.
  groups = spec.groups
  assert groups is not None  # group_norm_spec sets it
  split = lambda a: split_axis(a, x.shape, ch, groups, spec.feature_axes)
  x_g, scale_g, bias_g = split(x), split(scale), split(bias)
  view = spec._replace(reduction_axes=tuple(sorted(a if a < ch else a + 1
                                                   for a in spec.reduction_axes)),
                       feature_axes=(ch, ch + 1), mask=split(spec.mask), groups=None)
  y = _norm("group_norm", x_g, scale_g, bias_g, view)
  return y.reshape(x.shape)


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
  x, spec = _checks.instance_norm_spec(x, scale, bias, feature_axes=feature_axes,
                                       epsilon=epsilon, mask=mask, axis_name=axis_name,
                                       axis_index_groups=axis_index_groups)
  return _norm("instance_norm", x, scale, bias, spec)
