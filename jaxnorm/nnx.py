"""Drop-in replacements for flax.nnx's normalization layers, backed by jaxnorm's core.

Change one import line and keep the model and its state::

    from flax import nnx
    from jaxnorm import nnx as jnnx      # then nnx.BatchNorm -> jnnx.BatchNorm, ...

`BatchNorm`, `LayerNorm`, `RMSNorm`, `GroupNorm` and `InstanceNorm` take the constructor
arguments of the `flax.nnx` classes of the same names (`num_features`, `rngs`, `dtype`,
`param_dtype`, `promote_dtype`, `*_metadata`, ...), hold the same `nnx.Param` (`scale`,
`bias`) and `nnx.BatchStat` (`mean`, `var`) attributes with the same shapes and dtypes (so
`nnx.state` of a flax model loads into ours with `nnx.update` and back), draw the same random
numbers from `rngs`, and return flax's output dtype. `BatchNorm` follows `model.train()`,
`model.eval()`, `nnx.view(model, use_running_average=...)` and `use_running_average` at
construction or call; its statistics updates work inside `nnx.jit`.

The modules only declare variables and call the functional core, so the statistics are
jaxnorm's: exact variance in at least float32 (two passes; on a GPU one read about a shift,
see docs/guides/internals.md) whatever `use_fast_variance` says (accepted, no effect),
count-weighted across `axis_name`, finite output and unchanged `BatchStat`s for a batch with
no valid element. Deliberate differences from flax.nnx:

* a `dtype` narrower than the input (`dtype=jnp.float16` or `jnp.bfloat16` on float32 input)
  is the output's dtype only: the input and the parameters are normalized at their own
  precision and the result is rounded once, as flax.linen does. flax.nnx rounds the input and
  the parameters to `dtype` first, which loses the digits of `x - mean` where the data have an
  offset. So `jaxnorm.nnx` and `jaxnorm.linen` agree bit for bit in every configuration, and
  differ from flax.nnx there by flax.nnx's input rounding;
* `BatchNorm` in evaluation uses the running statistics as stored (float32), where flax first
  rounds them to `dtype` (so with `dtype=jnp.bfloat16` flax evaluates in bfloat16 arithmetic);
* `BatchNorm` on complex input (`dtype=jnp.complex64`) keeps a complex64 running mean, where
  flax.nnx stores it in float32 and drops its imaginary part;
* `GroupNorm` with custom `reduction_axes` is correct (flax.nnx spreads the group statistics
  along axis 1).

Beyond flax, `BatchNorm` has `momentum=None` (exact cumulative average; adds a `count`
`BatchStat`), `unbiased_running_var` and `update_stats` (train with the batch's statistics
without changing the `BatchStat`s). Integer input is accepted and normalized in float32, as
flax does (the functional core refuses it). Importing this module needs flax
(`pip install -e ".[flax]"` from a clone); `import jaxnorm` never imports it.
"""

from jaxnorm._flax import require_flax

require_flax("jaxnorm.nnx")

from collections.abc import Mapping  # noqa: E402
from types import MappingProxyType  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from flax.nnx.module import first_from  # noqa: E402
from flax.nnx.nn import dtypes as flax_dtypes_mod  # noqa: E402
from flax.nnx.nn import initializers  # noqa: E402
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn  # noqa: E402

import jaxnorm as jn  # noqa: E402
from jaxnorm import _checks, _flax, _flax_tools  # noqa: E402

__all__ = ("BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm",
           "recompute_batch_stats")

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _declare_params(num_features: int, use_scale: bool, use_bias: bool,
                    scale_init: Initializer, bias_init: Initializer, param_dtype: Dtype,
                    rngs: nnx.Rngs, scale_metadata: Mapping[str, Any],
                    bias_metadata: Mapping[str, Any], none: Any) -> tuple[Any, Any]:
  """`(scale, bias)` created as flax does (same order, so the same `rngs.params()` draws); an
  unused one is `none`. The caller assigns both to its attributes."""
  shape = (num_features,)
  scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
           if use_scale else none)
  bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
          if use_bias else none)
  return scale, bias


def _value(v: Any) -> jax.Array | None:
  return None if v is None else v[...]


def _promote(promote_dtype: PromoteDtypeFn, dtype: Dtype | None, x: Any,
             *arrays: Any) -> tuple[Any, ...]:
  """flax.nnx's input promotion (a module's `promote_dtype` to its `dtype`, under standard
  promotion rules), except that nothing is rounded to a narrower dtype.

  flax.nnx casts the input and the parameters to `dtype` before it normalizes, so
  `dtype=jnp.float16` on float32 input rounds `x` to float16 first and normalizes the rounded
  values: where the data have an offset, `x - mean` loses most of its digits (offset 300, std
  1: about 3 of float16's 11 bits are left). Here an array that the promotion would cast to a
  dtype that does not hold all its values (float32 -> float16, bfloat16 -> float16) keeps its
  own dtype; the output alone is cast to `dtype`. This is flax.linen's rule, so the two
  families of jaxnorm compute the same thing bit for bit.
  """
  originals = (x, *arrays)
  with jax.numpy_dtype_promotion("standard"):
    promoted = tuple(promote_dtype(originals, dtype=dtype))
    return tuple(_widest(a, p) for a, p in zip(originals, promoted, strict=True))


def _widest(original: Any, promoted: Any) -> Any:
  """`promoted`, unless it is `original` cast to a dtype that cannot hold all its values."""
  if original is None or promoted is None:
    return promoted
  before, after = jnp.result_type(original), jnp.result_type(promoted)
  return promoted if jnp.promote_types(before, after) == after else original


def _to_feature_shape(p: jax.Array | None, x: jax.Array,
                      feat: tuple[int, ...]) -> jax.Array | None:
  """nnx stores (num_features,) parameters; the core takes them in the feature shape."""
  return None if p is None else jnp.reshape(p, tuple(x.shape[a] for a in feat))


class BatchNorm(nnx.Module):
  r"""Batch normalization (Ioffe & Szegedy, 2015), a drop-in for `flax.nnx.BatchNorm`.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

  In training (`use_running_average=False`, `model.train()`) `μ, σ²` are the batch's moments
  over every axis but `axis` (population variance, two passes, at least float32, only where
  `mask` is True, count-weighted across `axis_name`) and the `mean`/`var` `BatchStat`s are
  updated with `running = momentum * running + (1 - momentum) * batch`
  (`jaxnorm.update_running_stats`); in evaluation (`model.eval()`) the running statistics are
  used, in float32.

  For complex input construct it with `dtype=jnp.complex64` (flax's way): the `mean`
  `BatchStat` is then complex64 and `var` float32, `E[|x - μ|²]`. A `BatchNorm` made with a
  real `dtype` raises a TypeError on complex input rather than drop the imaginary part of the
  running mean, as flax.nnx does.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> bn = jnnx.BatchNorm(2, momentum=0.5, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> bn(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> bn.mean[...]  # 0.5 * 0 + (1 - 0.5) * batch mean
    Array([ 1., 10.], dtype=float32)
    >>> bn.eval()
    >>> bn.use_running_average
    True

  Args:
    num_features: number of features (the product of the `axis` sizes).
    use_running_average: normalize with the stored statistics (default False: training).
    axis: the feature axis or axes (default: the last).
    momentum: decay of the running statistics in [0, 1), flax's convention (PyTorch's 0.1 is
      `jaxnorm.momentum_from_torch(0.1) == 0.9`); None for the exact cumulative average of
      every update, which adds an int32 `count` `BatchStat` (the number of updates).
    epsilon: constant added to the variance.
    dtype: dtype the inputs and parameters are promoted to, and of the output (default:
      inferred by `promote_dtype`, flax's rule).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    axis_name: mapped axis (`shard_map`, `pmap`, `vmap`) the batch is split over; statistics
      are those of the whole batch, each device weighted by its number of valid elements.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored (always the stable variance).
    promote_dtype: flax's input promotion function; it receives
      `(x, mean, var, scale, bias)` and `dtype=`. The promoted `x`, `scale` and `bias` are
      used, except where the promotion would round them to a narrower dtype (see the module
      docstring); the running statistics always enter in their stored dtype.
    rngs: random number streams; `rngs.params()` initializes `scale` and `bias`.
    bias_metadata: metadata of the `bias` `nnx.Param`.
    scale_metadata: metadata of the `scale` `nnx.Param`.
    unbiased_running_var: store the Bessel-corrected batch variance `var * n / (n - 1)`, as
      PyTorch does (normalization still uses the biased one).
    update_stats: in training, update the `BatchStat`s (default). False uses the batch's
      statistics and leaves the `BatchStat`s untouched.
    renorm: batch renormalization (`jaxnorm.batch_renorm`) in training, with `r_max` and
      `d_max` passed at call time (they may be traced). Off by default.
    virtual_batch_size: ghost batches of that many examples in training (see
      `jaxnorm.batch_norm`); None (default) normalizes the batch as one.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float | None = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes_mod.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      unbiased_running_var: bool = False,
      update_stats: bool = True,
      renorm: bool = False,
      virtual_batch_size: int | None = None,
  ):
    feature_shape = (num_features,)
    mean_dtype = _flax.running_mean_dtype(jnp.float32,
                                          _flax.complex_batch(None, dtype, param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, mean_dtype))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.count: nnx.BatchStat[jax.Array] | None
    if momentum is None:
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    else:
      self.count = nnx.data(None)
    self.scale, self.bias = _declare_params(
        num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
        scale_metadata, bias_metadata, nnx.data(None))
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.unbiased_running_var = unbiased_running_var
    self.update_stats = update_stats
    self.renorm = renorm
    self.virtual_batch_size = virtual_batch_size

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, update_stats: bool | None = None,
               r_max: Any = None, d_max: Any = None):
    """Normalizes `x` with the batch's or the running statistics.

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name for this call.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the batch statistics (ignored with running averages). A batch with no valid element,
        or one whose statistics are not finite, leaves the `BatchStat`s unchanged.
      update_stats: overrides the attribute of the same name for this call.
      r_max: with `renorm=True`, the bound of batch renormalization's `r` (>= 1).
      d_max: with `renorm=True`, the bound of batch renormalization's `d` (>= 0).

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg=(
            "No `use_running_average` argument was provided to BatchNorm. Pass it to the "
            "constructor, to the call, or use nnx.view(model, use_running_average=...)."))
    update = first_from(update_stats, self.update_stats, error_msg="update_stats is None.")
    x, _, _, scale, bias = _promote(self.promote_dtype, self.dtype, x, self.mean[...],
                                    self.var[...], _value(self.scale), _value(self.bias))
    feat = _checks.canonicalize_axes(self.axis, x.ndim, "axis")
    fshape = _flax.check_features("BatchNorm", self.num_features, x, feat, self.axis)
    if (_flax.complex_batch(x.dtype, self.dtype, self.param_dtype)
        and not jnp.iscomplexobj(self.mean[...])):
      raise TypeError(
          f"BatchNorm got complex input ({x.dtype}) but its running mean is "
          f"{self.mean[...].dtype}, which would lose the mean's imaginary part (flax.nnx drops "
          f"it). Construct it with dtype=jnp.complex64 to keep a complex running mean.")
    count = jnp.zeros((), jnp.int32) if self.count is None else self.count[...]
    state = jn.BatchNormState(jnp.reshape(self.mean[...], fshape),
                              jnp.reshape(self.var[...], fshape), count)
    training = not use_running_average
    y, new_state = _flax.batch_norm(
        x, state, _to_feature_shape(scale, x, feat), _to_feature_shape(bias, x, feat),
        dtype=self.dtype, training=training, feature_axes=feat, momentum=self.momentum,
        epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        unbiased_running_var=self.unbiased_running_var,
        virtual_batch_size=self.virtual_batch_size, renorm=self.renorm, r_max=r_max,
        d_max=d_max)
    if training and update:
      # As flax: stop_gradient only where variables are array refs.
      can_update = self.mean._can_update or self.var._can_update
      stop = jax.lax.stop_gradient if can_update else (lambda v: v)
      self.mean[...] = stop(jnp.reshape(new_state.mean, self.mean[...].shape))
      self.var[...] = stop(jnp.reshape(new_state.var, self.var[...].shape))
      if self.count is not None:
        self.count[...] = new_state.count
    return y

  def set_view(self, use_running_average: bool | None = None,
               update_stats: bool | None = None):
    """Sets the mode for `nnx.view` (flax's hook).

    Args:
      use_running_average: if not None, the new `use_running_average`.
      update_stats: if not None, the new `update_stats`.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
    if update_stats is not None:
      self.update_stats = update_stats


class LayerNorm(nnx.Module):
  r"""Layer normalization (Ba et al., 2016), a drop-in for `flax.nnx.LayerNorm`.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta, \qquad
    \mu, \sigma^2 = \text{moments}(x, \text{reduction\_axes})

  computed by `jaxnorm.layer_norm` (population variance, two passes, at least float32).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> ln = jnnx.LayerNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> ln(jnp.array([[1e4, 1e4 + 1, 1e4 + 2]])).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)

  Args:
    num_features: number of features (the product of the `feature_axes` sizes).
    epsilon: constant added to the variance.
    dtype: dtype the inputs and parameters are promoted to, and of the output.
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    reduction_axes: axes the statistics are computed over (default: the last).
    feature_axes: axes `scale` and `bias` run along (default: the last).
    axis_name: mapped axis to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored (always the stable variance).
    promote_dtype: flax's input promotion function, called with `(x, scale, bias)`; a result
      narrower than its argument is not used (see the module docstring).
    rngs: random number streams; `rngs.params()` initializes `scale` and `bias`.
    bias_metadata: metadata of the `bias` `nnx.Param`.
    scale_metadata: metadata of the `scale` `nnx.Param`.
    zero_centered_scale: `scale` stores γ - 1 (output :math:`\hat x(1 + \gamma) + \beta`, as
      Gemma and TransformerEngine), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: jaxnorm's choice of kernel (see
      `jaxnorm.layer_norm`; not a flax argument).
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes_mod.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      zero_centered_scale: bool = False,
      implementation: str | None = None,
  ):
    scale_init = _flax.zero_centered_init(scale_init, zero_centered_scale)
    self.scale, self.bias = _declare_params(
        num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
        scale_metadata, bias_metadata, nnx.data(None))
    self.zero_centered_scale = zero_centered_scale
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.implementation = implementation

  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example of `x` over `reduction_axes`.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the statistics (every element is normalized).

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x, scale, bias = _promote(self.promote_dtype, self.dtype, x, _value(self.scale),
                              _value(self.bias))
    feat = _checks.canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
    _flax.check_features("LayerNorm", self.num_features, x, feat, self.feature_axes,
                         "feature_axes")
    params = (_to_feature_shape(scale, x, feat), _to_feature_shape(bias, x, feat))
    return _flax.per_example(jn.layer_norm, self, x, params, feat, mask)


class RMSNorm(nnx.Module):
  r"""Root-mean-square normalization (Zhang & Sennrich, 2019), a drop-in for
  `flax.nnx.RMSNorm`.

  .. math::
    y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma

  computed by `jaxnorm.rms_norm` (mean square accumulated in at least float32).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> jnnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.array([[1.0, 7.0]]))
    Array([[0.2, 1.4]], dtype=float32)

  Args:
    num_features: number of features (the product of the `feature_axes` sizes).
    epsilon: constant added to the mean square.
    dtype: dtype the inputs and parameters are promoted to, and of the output.
    param_dtype: dtype of `scale`.
    use_scale: learn a scale γ.
    scale_init: initializer of the scale (default ones).
    reduction_axes: axes the mean square is computed over (default: the last).
    feature_axes: axes `scale` runs along (default: the last).
    axis_name: mapped axis to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility; no effect here (nor in flax).
    promote_dtype: flax's input promotion function, called with `(x, scale)`; a result
      narrower than its argument is not used (see the module docstring).
    rngs: random number streams; `rngs.params()` initializes `scale`.
    scale_metadata: metadata of the `scale` `nnx.Param`.
    zero_centered_scale: `scale` stores γ - 1 (output :math:`x r (1 + \gamma)`, Gemma's
      RMSNorm), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: jaxnorm's choice of kernel (see
      `jaxnorm.layer_norm`; not a flax argument).
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones,
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes_mod.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      zero_centered_scale: bool = False,
      implementation: str | None = None,
  ):
    scale_init = _flax.zero_centered_init(scale_init, zero_centered_scale)
    self.zero_centered_scale = zero_centered_scale
    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype),
                             **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.implementation = implementation

  def __call__(self, x, mask: jax.Array | None = None):
    """Divides each example of `x` by its root mean square over `reduction_axes`.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the mean square.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x, scale = _promote(self.promote_dtype, self.dtype, x, _value(self.scale))
    feat = _checks.canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
    _flax.check_features("RMSNorm", self.num_features, x, feat, self.feature_axes,
                         "feature_axes")
    return _flax.per_example(jn.rms_norm, self, x, (_to_feature_shape(scale, x, feat),), feat,
                             mask)


class GroupNorm(nnx.Module):
  r"""Group normalization (Wu & He, 2018), a drop-in for `flax.nnx.GroupNorm`.

  The channels (last axis) are split into groups of consecutive channels; each example's
  statistics run over `reduction_axes` and the channels of a group (`jaxnorm.group_norm`).
  Unlike flax.nnx, custom `reduction_axes` give correct output.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> gn = jnnx.GroupNorm(4, num_groups=2, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> gn(jnp.array([[1.0, 3.0, 10.0, 30.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)

  Args:
    num_features: number of channels (the last axis).
    num_groups: number of channel groups (default 32); None to use `group_size`.
    group_size: number of channels per group, instead of `num_groups`.
    epsilon: constant added to the variance.
    dtype: dtype the inputs and parameters are promoted to, and of the output.
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
    promote_dtype: flax's input promotion function, called with `(x, scale, bias)`; a result
      narrower than its argument is not used (see the module docstring).
    rngs: random number streams; `rngs.params()` initializes `scale` and `bias`.
    bias_metadata: metadata of the `bias` `nnx.Param`.
    scale_metadata: metadata of the `scale` `nnx.Param`.

  Raises:
    ValueError: not exactly one of `num_groups` and `group_size`, or groups that do not
      divide `num_features`.
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes | None = None,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes_mod.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    self.feature_axis = -1
    num_groups = _checks.resolve_groups(num_features, num_groups, group_size,
                                        "num_features")
    self.num_groups = num_groups
    self.group_size = num_features // num_groups
    self.scale, self.bias = _declare_params(
        num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
        scale_metadata, bias_metadata, nnx.data(None))
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example of channels-last `x` per group of channels.

    Args:
      x: the input, channels last; the first axis is the batch.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the statistics.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x, scale, bias = _promote(self.promote_dtype, self.dtype, x, _value(self.scale),
                              _value(self.bias))
    _flax.check_features("GroupNorm", self.num_groups * self.group_size, x, (x.ndim - 1,), -1,
                         "channel axis")
    return _flax.normalize(jn.group_norm, x, (scale, bias), self.dtype,
                           num_groups=self.num_groups, epsilon=self.epsilon,
                           reduction_axes=self.reduction_axes, mask=mask,
                           axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


class InstanceNorm(nnx.Module):
  r"""Instance normalization (Ulyanov et al., 2016), a drop-in for `flax.nnx.InstanceNorm`.

  Each example and feature is normalized over the remaining axes (all but the first and
  `feature_axes`), by `jaxnorm.instance_norm`.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> inorm = jnnx.InstanceNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> inorm(jnp.array([[[1.0, 10.0], [3.0, 30.0]]]))
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)

  Args:
    num_features: number of features (the product of the `feature_axes` sizes).
    epsilon: constant added to the variance.
    dtype: dtype the inputs and parameters are promoted to, and of the output.
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a bias β.
    use_scale: learn a scale γ.
    bias_init: initializer of the bias (default zeros).
    scale_init: initializer of the scale (default ones).
    feature_axes: the channel axes (default: the last); must not include the batch axis 0.
    axis_name: mapped axis to reduce over as well.
    axis_index_groups: device groups along `axis_name` (`jax.pmap` only).
    use_fast_variance: accepted for compatibility and ignored (always the stable variance).
    promote_dtype: flax's input promotion function, called with `(x, scale, bias)`; a result
      narrower than its argument is not used (see the module docstring).
    rngs: random number streams; `rngs.params()` initializes `scale` and `bias`.
    bias_metadata: metadata of the `bias` `nnx.Param`.
    scale_metadata: metadata of the `scale` `nnx.Param`.
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes_mod.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    self.scale, self.bias = _declare_params(
        num_features, use_scale, use_bias, scale_init, bias_init, param_dtype, rngs,
        scale_metadata, bias_metadata, None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example and channel of `x` over the other non-batch axes.

    Args:
      x: the input; the first axis is the batch.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the statistics.

    Returns:
      The normalized input, of `x`'s shape and flax's output dtype.
    """
    x, scale, bias = _promote(self.promote_dtype, self.dtype, x, _value(self.scale),
                              _value(self.bias))
    feat = _checks.canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
    _flax.check_features("InstanceNorm", self.num_features, x, feat, self.feature_axes,
                         "feature_axes")
    params = (_to_feature_shape(scale, x, feat), _to_feature_shape(bias, x, feat))
    return _flax.normalize(jn.instance_norm, x, params, self.dtype, feature_axes=feat,
                           epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                           axis_index_groups=self.axis_index_groups)


def recompute_batch_stats(model: nnx.Module, batches: Any, *, progress: bool = False,
                          **call_kwargs: Any) -> None:
  r"""Sets every jaxnorm `BatchNorm`'s statistics to its input's population statistics, in place.

  The nnx form of `jaxnorm.linen.recompute_batch_stats` (read it for the method): runs
  `model(batch, **call_kwargs)` over `batches` with the weights frozen, measures the input of
  every `jaxnorm.nnx.BatchNorm` the call reaches, merges the batches exactly
  (`jaxnorm.merge_moments`) and writes the population mean and variance into the `mean` and
  `var` `BatchStat`s (and the number of batches into `count`, with momentum=None):

  .. math::
    \mu = \frac{1}{N}\sum_{b}\sum_{i \in b} x_i, \qquad
    \sigma^2 = \frac{1}{N}\sum_{b}\sum_{i \in b} (x_i - \mu)^2

  With the model in evaluation mode (`model.eval()`, the usual case) the BatchNorms are
  re-estimated one after the other in call order, each seeing the BatchNorms before it with
  their new statistics (one pass per BatchNorm): the statistics of exactly the input each sees
  at inference. In training mode (`model.train()`) one pass suffices, every batch normalized by
  its own statistics (fvcore's method). The model's other state is not touched; the work runs
  on a copy of the model (`nnx.split`/`nnx.merge`) under `jax.jit`, one program per pass.

  Args:
    model: the nnx model.
    batches: an iterable of model inputs, each passed as the first positional argument; it is
      iterated once per pass (a one-shot iterator is kept in a list).
    progress: show a progress bar (tqdm, if installed).
    **call_kwargs: passed to the model's call.

  Raises:
    ValueError: `batches` is empty, the model calls no jaxnorm BatchNorm, or a BatchNorm saw no
      valid element.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)),
    ...                        jnnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    >>> model.eval()
    >>> batches = [jnp.full((4, 3), float(i)) + jnp.arange(3.0) for i in range(3)]
    >>> jnnx.recompute_batch_stats(model, batches)
    >>> h = model.layers[0](jnp.concatenate(batches))
    >>> bool(jnp.allclose(model.layers[1].mean[...], h.mean(0), atol=1e-4))
    True
  """
  _flax_tools.recompute_nnx(model, batches, BatchNorm, progress, call_kwargs)
