"""Drop-in replacements for flax.linen's normalization layers, backed by jaxnorm's core.

Change one import line and keep the model and its checkpoints::

    from flax import linen as nn
    from jaxnorm import linen as jnn     # then nn.BatchNorm -> jnn.BatchNorm, ...

`BatchNorm`, `LayerNorm`, `RMSNorm`, `GroupNorm` and `InstanceNorm` take the constructor
arguments (same names, order and defaults) and call arguments of the `flax.linen` classes of
the same names, create the same variables (`params/scale`, `params/bias`, `batch_stats/mean`,
`batch_stats/var`, with the same shapes and dtypes, in the same order so that random
initializers draw the same numbers) and return flax's output dtype. The modules only declare
variables and call the functional core (`jaxnorm.batch_norm`, `jaxnorm.layer_norm`, ...), so
the statistics are always jaxnorm's:

* two-pass variance in at least float32: no `E[x²] - E[x]²` cancellation, whatever
  `use_fast_variance` says (the flag is accepted for compatibility and has no effect);
* with `mask`, only valid elements count; with `axis_name`, devices are weighted by their
  number of valid elements (flax averages the per-device means), and a device or a whole batch
  with no valid element gives finite output and leaves `batch_stats` unchanged (flax: NaN).

Beyond flax, `BatchNorm` has `momentum=None` (exact cumulative average; adds
`batch_stats/count`), `unbiased_running_var` (PyTorch's stored variance) and `update_stats`
(train with the batch's statistics without writing `batch_stats`, so the collection need not be
mutable). Importing this module needs flax (`pip install jaxnorm[flax]`); `import jaxnorm`
never imports it.
"""

from jaxnorm._flax_common import require_flax

require_flax("jaxnorm.linen")

from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax.typing import Axes, Dtype, Initializer  # noqa: E402
from jax.nn import initializers  # noqa: E402

import jaxnorm as jn  # noqa: E402
from jaxnorm import _checks  # noqa: E402
from jaxnorm._flax_common import flax_dtypes  # noqa: E402

__all__ = ("BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm")


def _feature_shape(x: jax.Array, axes: Axes, name: str) -> tuple[tuple[int, ...], list[int]]:
  """Canonical (sorted, non-negative) feature axes and flax's parameter shape (a list)."""
  feat = _checks.canonicalize_axes(axes, x.ndim, name)
  return feat, [x.shape[a] for a in feat]


def _params(mdl: nn.Module, shape: list[int], use_scale: bool, use_bias: bool,
            scale_init: Initializer, bias_init: Initializer | None, param_dtype: Dtype,
            cast: bool = False) -> tuple[jax.Array | None, jax.Array | None]:
  """Declares `scale` then `bias` (flax's order, so the params RNG draws match); `bias_init`
  may be None when `use_bias` is False (RMSNorm has no bias)."""
  scale = mdl.param("scale", scale_init, shape, param_dtype) if use_scale else None
  bias = None
  if use_bias:
    if bias_init is None:
      raise ValueError("use_bias=True needs a bias_init; got None.")
    bias = mdl.param("bias", bias_init, shape, param_dtype)
  if cast:  # flax's force_float32_reductions=False: parameters enter in param_dtype
    scale = None if scale is None else jnp.asarray(scale, param_dtype)
    bias = None if bias is None else jnp.asarray(bias, param_dtype)
  return scale, bias


class BatchNorm(nn.Module):
  r"""Batch normalization (Ioffe & Szegedy, 2015), a drop-in for `flax.linen.BatchNorm`.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

  In training (`use_running_average=False`) `μ, σ²` are the batch's moments over every axis
  but `axis` (population variance, two passes, at least float32, only where `mask` is True,
  count-weighted across `axis_name`), and `batch_stats` is updated with
  `running = momentum * running + (1 - momentum) * batch` (see
  `jaxnorm.update_running_stats`); in evaluation the running statistics are used. As in flax,
  nothing is updated while the module is initializing, and `axis_name` is ignored then.

  Variables: `params/scale`, `params/bias` (feature shape, `param_dtype`), `batch_stats/mean`,
  `batch_stats/var` (feature shape, float32, or `param_dtype` with
  `force_float32_reductions=False`) and, only with `momentum=None`, `batch_stats/count`
  (int32 scalar: the number of updates). With a numeric momentum (the default) the variable
  tree is exactly flax's, so checkpoints move both ways.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> bn = jnn.BatchNorm(use_running_average=False, momentum=0.5, epsilon=0.0)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    >>> y
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> updates["batch_stats"]["mean"]  # 0.5 * 0 + (1 - 0.5) * batch mean
    Array([ 1., 10.], dtype=float32)

  Attributes:
    use_running_average: if True, normalize with `batch_stats` instead of the batch's
      statistics (may also be given at call time, as in flax).
    axis: the feature axis or axes (default: the last).
    momentum: decay of the running statistics in [0, 1), flax's convention (PyTorch's 0.1 is
      `jaxnorm.momentum_from_torch(0.1) == 0.9`); None for the exact cumulative average of
      every update, which stores an update count in `batch_stats/count`.
    epsilon: constant added to the variance.
    dtype: output dtype (default: `result_type(x, scale, bias)`, flax's rule).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    axis_name: mapped axis (`shard_map`, `pmap`, `vmap`) the batch is split over; statistics
      are those of the whole batch, each device weighted by its number of valid elements.
    axis_index_groups: groups of devices along `axis_name` that normalize separately
      (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored: the variance is always the
      stable two-pass one (flax's default, True, computes `E[x²] - E[x]²`).
    force_float32_reductions: True (flax's default) stores `batch_stats` in float32; False
      stores them in `param_dtype` and casts the parameters to `param_dtype`, as flax does.
      Reductions run in at least float32 either way.
    unbiased_running_var: store the Bessel-corrected batch variance `var * n / (n - 1)` in
      `batch_stats/var`, as PyTorch does (normalization still uses the biased one).
    update_stats: in training, write the updated statistics to `batch_stats` (default). With
      False the batch's statistics are used but `batch_stats` is left untouched, so it need not
      be mutable. May also be given at call time.
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = False
  update_stats: bool = True

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, update_stats: bool | None = None):
    """Normalizes `x` with the batch's or the running statistics.

    Args:
      x: the input.
      use_running_average: normalize with `batch_stats`; give it here or at construction,
        not both (flax's `merge_param` rule).
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the batch statistics (ignored with running averages). A batch with no valid element
        leaves `batch_stats` unchanged.
      update_stats: overrides the attribute of the same name for this call.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    update = self.update_stats if update_stats is None else update_stats
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.axis, "axis")
    stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), shape)
    ra_count = None
    if self.momentum is None:
      ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
    scale, bias = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                          self.bias_init, self.param_dtype,
                          cast=not self.force_float32_reductions)
    xc, out_dtype = flax_dtypes(x, (scale, bias), self.dtype)
    count = jnp.zeros((), jnp.int32) if ra_count is None else ra_count.value
    state = jn.BatchNormState(ra_mean.value, ra_var.value, count)
    initializing = self.is_initializing()
    training = not use_running_average
    y, new_state = jn.batch_norm(
        xc, state, scale, bias, training=training, feature_axes=feat,
        momentum=self.momentum, epsilon=self.epsilon, mask=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var)
    if training and update and not initializing:
      ra_mean.value = new_state.mean
      ra_var.value = new_state.var
      if ra_count is not None:
        ra_count.value = new_state.count
    return y.astype(out_dtype)


class LayerNorm(nn.Module):
  r"""Layer normalization (Ba et al., 2016), a drop-in for `flax.linen.LayerNorm`.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
    \mu, \sigma^2 = \text{moments}(x, \text{reduction\_axes})

  computed by `jaxnorm.layer_norm` (population variance, two passes, at least float32).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1, 1e4 + 2]])
    >>> ln = jnn.LayerNorm(epsilon=0.0)
    >>> ln.apply(ln.init(jax.random.key(0), x), x).round(4)
    Array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]], dtype=float32)

  Attributes:
    epsilon: constant added to the variance.
    dtype: output dtype (default: `result_type(x, scale, bias)`, flax's rule).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    reduction_axes: axes the statistics are computed over (default: the last).
    feature_axes: axes `scale` and `bias` run along (default: the last).
    axis_name: mapped axis to reduce over as well (a feature axis sharded across devices).
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored (always the stable variance).
    force_float32_reductions: accepted for compatibility; False casts the parameters to
      `param_dtype` as flax does, but reductions always run in at least float32.
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example of `x` over `reduction_axes`.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the statistics (every element is normalized).

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale, bias = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                          self.bias_init, self.param_dtype,
                          cast=not self.force_float32_reductions)
    xc, out_dtype = flax_dtypes(x, (scale, bias), self.dtype)
    y = jn.layer_norm(xc, scale, bias, reduction_axes=self.reduction_axes, feature_axes=feat,
                      epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups)
    return y.astype(out_dtype)


class RMSNorm(nn.Module):
  r"""Root-mean-square normalization (Zhang & Sennrich, 2019), a drop-in for
  `flax.linen.RMSNorm`.

  .. math::
    y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma

  computed by `jaxnorm.rms_norm` (mean square accumulated in at least float32).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 7.0]])
    >>> rms = jnn.RMSNorm(epsilon=0.0)
    >>> rms.apply(rms.init(jax.random.key(0), x), x)
    Array([[0.2, 1.4]], dtype=float32)

  Attributes:
    epsilon: constant added to the mean square.
    dtype: output dtype (default: `result_type(x, scale)`, flax's rule).
    param_dtype: dtype of `scale`.
    use_scale: learn a scale γ.
    scale_init: initializer of the scale (default ones).
    reduction_axes: axes the mean square is computed over (default: the last).
    feature_axes: axes `scale` runs along (default: the last).
    axis_name: mapped axis to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility; it has no effect here (nor in flax).
    force_float32_reductions: accepted for compatibility; False casts `scale` to
      `param_dtype` as flax does, but reductions always run in at least float32.
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Divides each example of `x` by its root mean square over `reduction_axes`.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the mean square.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale, _ = _params(self, shape, self.use_scale, False, self.scale_init, None,
                       self.param_dtype, cast=not self.force_float32_reductions)
    xc, out_dtype = flax_dtypes(x, (scale,), self.dtype)
    y = jn.rms_norm(xc, scale, reduction_axes=self.reduction_axes, feature_axes=feat,
                    epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                    axis_index_groups=self.axis_index_groups)
    return y.astype(out_dtype)


class GroupNorm(nn.Module):
  r"""Group normalization (Wu & He, 2018), a drop-in for `flax.linen.GroupNorm`.

  The channels (last axis) are split into groups of consecutive channels; each example's
  statistics run over `reduction_axes` and the channels of a group (`jaxnorm.group_norm`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> gn = jnn.GroupNorm(num_groups=2, epsilon=0.0)
    >>> gn.apply(gn.init(jax.random.key(0), x), x)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)

  Attributes:
    num_groups: number of channel groups (default 32); None to use `group_size`.
    group_size: number of channels per group, instead of `num_groups`.
    epsilon: constant added to the variance.
    dtype: output dtype (default: `result_type(x, scale, bias)`, flax's rule).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    reduction_axes: axes to reduce over, which must include the last (channel) axis. Default:
      every axis but the first.
    axis_name: mapped axis to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored (always the stable variance).
    force_float32_reductions: accepted for compatibility; False casts the parameters to
      `param_dtype` as flax does, but reductions always run in at least float32.
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example of channels-last `x` per group of channels.

    Args:
      x: the input, channels last; the first axis is the batch.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the statistics.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x = jnp.asarray(x)
    _, shape = _feature_shape(x, -1, "feature axis")
    scale, bias = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                          self.bias_init, self.param_dtype,
                          cast=not self.force_float32_reductions)
    xc, out_dtype = flax_dtypes(x, (scale, bias), self.dtype)
    y = jn.group_norm(xc, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
                      epsilon=self.epsilon, reduction_axes=self.reduction_axes, mask=mask,
                      axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)
    return y.astype(out_dtype)


class InstanceNorm(nn.Module):
  r"""Instance normalization (Ulyanov et al., 2016), a drop-in for `flax.linen.InstanceNorm`.

  Each example and feature is normalized over the remaining axes (all but the first and
  `feature_axes`), by `jaxnorm.instance_norm`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (batch, length, channels)
    >>> inorm = jnn.InstanceNorm(epsilon=0.0)
    >>> inorm.apply(inorm.init(jax.random.key(0), x), x)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)

  Attributes:
    epsilon: constant added to the variance.
    dtype: output dtype (default: `result_type(x, scale, bias)`, flax's rule).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    feature_axes: the channel axes (default: the last); must not include the batch axis 0.
    axis_name: mapped axis to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored (always the stable variance).
    force_float32_reductions: accepted for compatibility; False casts the parameters to
      `param_dtype` as flax does, but reductions always run in at least float32.
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example and channel of `x` over the other non-batch axes.

    Args:
      x: the input; the first axis is the batch.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the statistics.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale, bias = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                          self.bias_init, self.param_dtype,
                          cast=not self.force_float32_reductions)
    xc, out_dtype = flax_dtypes(x, (scale, bias), self.dtype)
    y = jn.instance_norm(xc, scale, bias, feature_axes=feat, epsilon=self.epsilon, mask=mask,
                         axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)
    return y.astype(out_dtype)
