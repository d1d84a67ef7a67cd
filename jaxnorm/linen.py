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

* exact variance in at least float32 (two passes; on a GPU one read about a shift, see
  docs/guides/internals.md): no `E[x²] - E[x]²` cancellation, whatever
  `use_fast_variance` says (the flag is accepted for compatibility and has no effect);
* with `mask`, only valid elements count; with `axis_name`, devices are weighted by their
  number of valid elements (flax averages the per-device means), and a device or a whole batch
  with no valid element gives finite output and leaves `batch_stats` unchanged (flax: NaN).

Beyond flax, `BatchNorm` has `momentum=None` (exact cumulative average; adds
`batch_stats/count`), `unbiased_running_var` (PyTorch's stored variance), `update_stats`
(train with the batch's statistics without writing `batch_stats`, so the collection need not be
mutable), `renorm` (batch renormalization, with `r_max`/`d_max` given at call time) and
`virtual_batch_size` (ghost batches); `LayerNorm` and `RMSNorm` have `zero_centered_scale` and
`implementation`. `fold_batch_norms` folds BatchNorms into the layers before them and
`recompute_batch_stats` re-estimates population statistics (both in `_flax_tools`).

Integer input is accepted and normalized in float32, as flax does (the functional core refuses
it). Importing this module needs flax (`pip install -e ".[flax]"` from a clone); `import
jaxnorm` never imports it.
"""

from jaxnorm._flax import require_flax

require_flax("jaxnorm.linen")

from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax.typing import Axes, Dtype, Initializer  # noqa: E402
from jax.nn import initializers  # noqa: E402

import jaxnorm as jn  # noqa: E402
from jaxnorm import _checks, _flax, _flax_tools  # noqa: E402
from jaxnorm._dtypes import real_of  # noqa: E402

__all__ = ("BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm", "fold_batch_norms",
           "recompute_batch_stats")


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

  Complex input (or `dtype=jnp.complex64`) is normalized with a complex mean and the real
  variance `E[|x - μ|²]`, as in flax. `batch_stats/mean` is then complex64 from `init` on
  (flax creates it float32 and makes it complex64 at the first update, so the variable tree
  changes dtype after one step: a jitted training step compiles twice and a `lax.scan` carry
  fails); a float32 mean from a flax checkpoint is converted exactly. `batch_stats/var` stays
  real.

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
    renorm: batch renormalization (`jaxnorm.batch_renorm`) in training, with `r_max` and
      `d_max` passed at call time (they may be traced: a schedule costs no retrace). Off by
      default. During `init`, missing bounds default to plain batch norm (1 and 0).
    virtual_batch_size: ghost batches of that many examples in training (see
      `jaxnorm.batch_norm`); None (default) normalizes the batch as one.
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
  renorm: bool = False
  virtual_batch_size: int | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, update_stats: bool | None = None,
               r_max: Any = None, d_max: Any = None):
    """Normalizes `x` with the batch's or the running statistics.

    Args:
      x: the input.
      use_running_average: normalize with `batch_stats`; give it here or at construction,
        not both (flax's `merge_param` rule).
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the batch statistics (ignored with running averages). A batch with no valid element,
        or one whose statistics are not finite, leaves `batch_stats` unchanged.
      update_stats: overrides the attribute of the same name for this call.
      r_max: with `renorm=True`, the bound of batch renormalization's `r` (>= 1).
      d_max: with `renorm=True`, the bound of batch renormalization's `d` (>= 0).

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    update = self.update_stats if update_stats is None else update_stats
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.axis, "axis")
    stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    is_complex = _flax.complex_batch(x.dtype, self.dtype, self.param_dtype)
    mean_dtype = _flax.running_mean_dtype(stat_dtype, is_complex)
    var_dtype = real_of(stat_dtype)  # real, also for a complex param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, mean_dtype), shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, var_dtype), shape)
    ra_count = None
    if self.momentum is None:
      ra_count = self.variable("batch_stats", "count", lambda: jnp.zeros((), jnp.int32))
    scale, bias = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                          self.bias_init, self.param_dtype,
                          cast=not self.force_float32_reductions)
    count = jnp.zeros((), jnp.int32) if ra_count is None else ra_count.value
    mean = ra_mean.value
    if is_complex and not jnp.iscomplexobj(mean):  # flax.linen's float32 mean at init: exact
      mean = mean.astype(_flax.running_mean_dtype(mean.dtype, True))
    state = jn.BatchNormState(mean, ra_var.value, count)
    initializing = self.is_initializing()
    training = not use_running_average
    if training and update and not initializing:
      self._check_mutable()
    y, new_state = _flax.batch_norm(
        x, state, scale, bias, dtype=self.dtype, training=training, feature_axes=feat,
        momentum=self.momentum, epsilon=self.epsilon, mask=mask,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var,
        virtual_batch_size=self.virtual_batch_size, renorm=self.renorm,
        r_max=1.0 if initializing and r_max is None else r_max,
        d_max=0.0 if initializing and d_max is None else d_max)
    if training and update and not initializing:
      ra_mean.value = new_state.mean
      ra_var.value = new_state.var
      if ra_count is not None:
        ra_count.value = new_state.count
    return y

  def _check_mutable(self) -> None:
    if not self.is_mutable_collection("batch_stats"):
      raise ValueError(
          "BatchNorm in training (use_running_average=False) updates its running statistics, "
          "but the 'batch_stats' collection is not mutable. Apply the model with "
          "mutable=['batch_stats'] and keep the returned updates: `y, updates = "
          "model.apply(variables, x, mutable=['batch_stats'])`; or evaluate with "
          "use_running_average=True; or pass update_stats=False to normalize with the batch's "
          "statistics without updating them.")


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
    zero_centered_scale: `scale` stores γ - 1 (output :math:`\hat x(1 + \gamma) + \beta`, as
      Gemma and TransformerEngine), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: jaxnorm's choice of kernel (see
      `jaxnorm.layer_norm`; not a flax argument).
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
  zero_centered_scale: bool = False
  implementation: str | None = None

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
    scale_init = _flax.zero_centered_init(self.scale_init, self.zero_centered_scale)
    params = _params(self, shape, self.use_scale, self.use_bias, scale_init, self.bias_init,
                     self.param_dtype, cast=not self.force_float32_reductions)
    return _flax.per_example(jn.layer_norm, self, x, params, feat, mask)


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
    zero_centered_scale: `scale` stores γ - 1 (output :math:`x r (1 + \gamma)`, Gemma's
      RMSNorm), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: jaxnorm's choice of kernel (see
      `jaxnorm.layer_norm`; not a flax argument).
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
  zero_centered_scale: bool = False
  implementation: str | None = None

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
    scale_init = _flax.zero_centered_init(self.scale_init, self.zero_centered_scale)
    scale, _ = _params(self, shape, self.use_scale, False, scale_init, None,
                       self.param_dtype, cast=not self.force_float32_reductions)
    return _flax.per_example(jn.rms_norm, self, x, (scale,), feat, mask)


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
    params = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                     self.bias_init, self.param_dtype, cast=not self.force_float32_reductions)
    return _flax.normalize(jn.group_norm, x, params, self.dtype, num_groups=self.num_groups,
                           group_size=self.group_size, epsilon=self.epsilon,
                           reduction_axes=self.reduction_axes, mask=mask,
                           axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


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
    params = _params(self, shape, self.use_scale, self.use_bias, self.scale_init,
                     self.bias_init, self.param_dtype, cast=not self.force_float32_reductions)
    return _flax.normalize(jn.instance_norm, x, params, self.dtype, feature_axes=feat,
                           epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                           axis_index_groups=self.axis_index_groups)


def fold_batch_norms(
    variables: Mapping[str, Any],
    pairs: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
) -> dict[str, Any]:
  """Folds named (layer, BatchNorm) pairs of a variables tree into the layers, for inference.

  For each pair, the `Dense` or `Conv` layer's `kernel` and `bias` become those of the layer
  followed by the BatchNorm in evaluation mode (`jaxnorm.fold_batch_norm`), and the
  BatchNorm's `params` and `batch_stats` are removed (collections left empty are dropped). The
  result is the variables of the same architecture built without those BatchNorms and with a
  bias in each folded layer. The pattern is one flag in the model::

      class Net(nn.Module):
        folded: bool = False

        @nn.compact
        def __call__(self, x, train: bool = False):
          x = nn.Conv(16, (3, 3), use_bias=self.folded)(x)
          if not self.folded:
            x = jnn.BatchNorm(use_running_average=not train)(x)
          return nn.relu(x)

      folded = jnn.fold_batch_norms(variables, {"Conv_0": "BatchNorm_0"})
      Net(folded=True).apply(folded, x)   # == Net().apply(variables, x), to float32 rounding

  flax names modules per class (`Conv_0`, `Conv_1`, ...), so leaving the BatchNorms out does not
  rename the other layers.

  Args:
    variables: the trained model's variables (`params`, `batch_stats`, other collections are
      passed through).
    pairs: `{layer_path: batchnorm_path}` or `[(layer_path, batchnorm_path), ...]`, module
      paths joined by "/" as in the variables tree (`"Block_0/Conv_1"`).
    epsilon: the BatchNorms' epsilon, one float for all or `{batchnorm_path: epsilon}`.

  Returns:
    A new variables dict (plain dicts); the input is not modified.

  Raises:
    KeyError: a path that is not in the tree, with the keys found at that level.
    ValueError: `pairs` is empty, or the shapes do not fit (see `jaxnorm.fold_batch_norm`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Net(nn.Module):
    ...   folded: bool = False
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.Dense(3, use_bias=self.folded)(x)
    ...     return x if self.folded else jnn.BatchNorm(use_running_average=True)(x)
    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> variables = Net().init(jax.random.key(0), x)
    >>> variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.full(3, 4.0)
    >>> folded = jnn.fold_batch_norms(variables, {"Dense_0": "BatchNorm_0"})
    >>> sorted(folded), sorted(folded["params"])
    (['params'], ['Dense_0'])
    >>> d = Net(folded=True).apply(folded, x) - Net().apply(variables, x)
    >>> bool(jnp.abs(d).max() < 1e-5)
    True
  """
  return _flax_tools.fold_variables(variables, pairs, epsilon=epsilon)


def recompute_batch_stats(model: nn.Module, variables: Mapping[str, Any], batches: Any, *,
                          progress: bool = False, **apply_kwargs: Any) -> dict[str, Any]:
  r"""Replaces every jaxnorm `BatchNorm`'s running averages by its input's population statistics.

  After training, `batch_stats` are exponential averages over past weights, which lag the final
  weights (badly at small batch sizes). This runs `model.apply(variables, batch,
  **apply_kwargs)` over `batches` with the weights frozen, measures the input of every
  `jaxnorm.linen.BatchNorm` the forward pass calls, and merges the batches' moments exactly
  (`jaxnorm.merge_moments`: count-weighted, masked elements excluded):

  .. math::
    \mu = \frac{1}{N}\sum_{b}\sum_{i \in b} x_i, \qquad
    \sigma^2 = \frac{1}{N}\sum_{b}\sum_{i \in b} (x_i - \mu)^2

  over all N valid elements of all batches (per feature). Call it with the keyword arguments
  of an evaluation-mode forward pass (`train=False`): the BatchNorms are then re-estimated one
  after the other, in call order, each with the BatchNorms before it already using their new
  statistics, so that every layer gets the statistics of exactly the input it sees at
  inference (one pass over `batches` per BatchNorm). With training-mode arguments (every
  BatchNorm using batch statistics), one pass suffices and every batch is normalized by its own
  statistics, as fvcore's `update_bn_stats` does; nothing is written during it, so no
  collection needs to be mutable. Each pass is one compiled program; batches sharded over
  devices under plain `jax.jit` give the statistics of the whole batch. `batch_stats/count`
  (momentum=None) becomes the number of batches; a layer with `unbiased_running_var=True`
  stores the Bessel-corrected variance.

  Args:
    model: the flax.linen model.
    variables: its variables (`params`, `batch_stats`, ...).
    batches: an iterable of model inputs, each passed as the first positional argument of the
      model's call; it is iterated once per pass (a one-shot iterator is kept in a list).
    progress: show a progress bar (tqdm, if installed).
    **apply_kwargs: passed to `model.apply` (e.g. `train=False`, `mutable=...`).

  Returns:
    A new variables dict (plain dicts) in which the `mean` and `var` (and `count`) of every
    BatchNorm the forward pass calls are the population statistics of its input; everything
    else is the input's.

  Raises:
    ValueError: `batches` is empty, the model calls no jaxnorm BatchNorm, or a BatchNorm saw no
      valid element.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     return jnn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))
    >>> batches = [jnp.full((4, 3), float(i)) + jnp.arange(3.0) for i in range(3)]
    >>> model = Net()
    >>> variables = model.init(jax.random.key(0), batches[0], train=False)
    >>> new = jnn.recompute_batch_stats(model, variables, batches, train=False)
    >>> h = jnp.concatenate(batches) @ variables["params"]["Dense_0"]["kernel"]
    >>> bool(jnp.allclose(new["batch_stats"]["BatchNorm_0"]["mean"], h.mean(0), atol=1e-4))
    True
  """
  return _flax_tools.recompute_linen(model, variables, batches, BatchNorm, progress,
                                     apply_kwargs)
