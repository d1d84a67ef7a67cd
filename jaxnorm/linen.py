"""Drop-in replacements for flax.linen's normalization layers, backed by jaxnorm's core.

Change one import line and keep the model and its checkpoints::

    from flax import linen as nn
    from jaxnorm import linen as jnn     # then nn.BatchNorm -> jnn.BatchNorm, ...

`BatchNorm`, `LayerNorm`, `RMSNorm`, `GroupNorm` and `InstanceNorm` are subclasses of the
`flax.linen` classes of the same names: their fields (names, order, defaults, initializers and
documentation) are flax's, jaxnorm's extra fields come after them, and only `__call__` is
jaxnorm's. It creates flax's variables (`params/scale`, `params/bias`, `batch_stats/mean`,
`batch_stats/var`, same shapes and dtypes, in flax's order so that random initializers draw the
same numbers), returns flax's output dtype, and computes with the functional core
(`jaxnorm.batch_norm`, `jaxnorm.layer_norm`, ...), so the statistics are jaxnorm's:

* exact variance in at least float32 (two passes; on a GPU one read about a shift, see
  docs/guides/internals.md), with no `E[x²] - E[x]²` cancellation. `use_fast_variance` is
  accepted for compatibility and ignored, here and in `jaxnorm.nnx`;
* with `mask`, only valid elements count; with `axis_name`, devices are weighted by their
  number of valid elements (flax averages the per-device means), and a device or a whole batch
  with no valid element gives finite output and leaves `batch_stats` unchanged (flax: NaN).

`fold_model` folds the BatchNorms of a model as it is written into the layers before them
(`fold_batch_norms` does it for named pairs of a variables tree; both, and
`fold_norms_into_dense`, which folds the scale and offset of each LayerNorm/RMSNorm that only
Dense layers read into them, are written in `_linen_fold`) and `recompute_batch_stats`
re-estimates population statistics. Integer input is normalized in float32, as flax does (the
functional core refuses it). Importing this module needs flax (`pip install -e ".[flax]"` from a
clone); `import jaxnorm` never imports it.
"""

from jaxnorm._flax import require_flax

require_flax("jaxnorm.linen")

from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax.typing import Axes, Initializer  # noqa: E402

import jaxnorm as jn  # noqa: E402
from jaxnorm import _checks, _dtypes, _flax, _flax_tools  # noqa: E402
from jaxnorm._linen_fold import (  # noqa: E402  (re-exported: the public folding tools)
  Folding,
  fold_batch_norms,
  fold_model,
  fold_norms_into_dense,
)

__all__ = ("AddLayerNorm", "AddRMSNorm", "BatchNorm", "Folding", "GroupNorm", "InstanceNorm",
           "LayerNorm", "RMSNorm", "fold_batch_norms", "fold_model", "fold_norms_into_dense",
           "recompute_batch_stats")


def _feature_shape(x: jax.Array, axes: Axes, name: str) -> tuple[tuple[int, ...], list[int]]:
  """Canonical (sorted, non-negative) feature axes and flax's parameter shape (a list)."""
  feat = _checks.canonicalize_axes(axes, x.ndim, name)
  return feat, [x.shape[a] for a in feat]


def _params(mdl: Any, shape: list[int], scale_init: Initializer | None = None,
            use_bias: bool = True) -> tuple[jax.Array | None, jax.Array | None]:
  """Declares `scale` then `bias` as the layer's fields say (flax's order, so the params RNG
  draws match); `scale_init` overrides the field (a zero-centred scale), `use_bias=False` is
  RMSNorm, which has no bias field."""
  scale = (mdl.param("scale", scale_init or mdl.scale_init, shape, mdl.param_dtype)
           if mdl.use_scale else None)
  bias = (mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype)
          if use_bias and mdl.use_bias else None)
  if not mdl.force_float32_reductions:  # flax: parameters then enter in param_dtype
    scale = None if scale is None else jnp.asarray(scale, mdl.param_dtype)
    bias = None if bias is None else jnp.asarray(bias, mdl.param_dtype)
  return scale, bias


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with jaxnorm's statistics (see the module docstring).

  Differences from flax: `momentum=None` keeps the exact cumulative average of every update
  and adds `batch_stats/count` (int32 scalar: the number of updates; one per feature with
  `per_feature_count=True`, which a mask that differs between features needs); with a numeric
  momentum
  the variable tree is exactly flax's, so checkpoints move both ways. A complex batch (complex
  input, `dtype` or `param_dtype`) has a complex64 `batch_stats/mean` from `init` on (flax
  makes it complex at the first update, so a jitted step compiles twice and a `lax.scan`
  carry fails); a float32 mean from a flax checkpoint is converted exactly.

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

  Attributes (jaxnorm's, after flax's):
    unbiased_running_var: store the Bessel-corrected batch variance `var * n / (n - 1)` in
      `batch_stats/var`, as PyTorch does (normalization still uses the biased one).
    update_stats: in training, write the updated statistics to `batch_stats` (default). With
      False the batch's statistics are used but `batch_stats` is left untouched, so it need not
      be mutable. May also be given at call time.
    renorm: batch renormalization (`jaxnorm.batch_renorm`) in training, with `r_max` and
      `d_max` passed at call time (they may be traced: a schedule costs no retrace). During
      `init`, missing bounds default to plain batch norm (1 and 0).
    virtual_batch_size: ghost batches of that many examples in training (see
      `jaxnorm.batch_norm`); None (default) normalizes the batch as one.
    per_feature_count: with `momentum=None`, make `batch_stats/count` of the features' shape,
      one count per feature, so that a `mask` that hides whole features in some batches
      leaves each feature's average exact (see `jaxnorm.batch_norm_init`); a checkpoint with a
      scalar count loads either way and keeps its scalar.
  """

  unbiased_running_var: bool = False
  update_stats: bool = True
  renorm: bool = False
  virtual_batch_size: int | None = None
  per_feature_count: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, update_stats: bool | None = None,
               r_max: Any = None, d_max: Any = None):
    """flax's call, plus `mask` (True marks the elements that enter the batch statistics; a
    batch with no valid element, or non-finite statistics, leaves `batch_stats` unchanged),
    `update_stats` (overrides the field for this call) and, with `renorm=True`, `r_max` (>= 1)
    and `d_max` (>= 0)."""
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    update = self.update_stats if update_stats is None else update_stats
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.axis, "axis")
    stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    is_complex = _dtypes.flax_complex(x.dtype, self.dtype, self.param_dtype)
    mean_dtype, var_dtype = _dtypes.flax_batch_stats(stat_dtype, is_complex)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, mean_dtype), shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, var_dtype), shape)
    ra_count = None
    if _flax.cumulative(self.momentum):
      count_shape = tuple(shape) if self.per_feature_count else ()
      ra_count = self.variable("batch_stats", "count",
                               lambda: jnp.zeros(count_shape, jnp.int32))
    scale, bias = _params(self, shape)
    count = jnp.zeros((), jnp.int32) if ra_count is None else ra_count.value
    mean = ra_mean.value
    if is_complex and not jnp.iscomplexobj(mean):  # flax.linen's float32 mean at init: exact
      mean = mean.astype(_dtypes.flax_batch_stats(mean.dtype, True)[0])
    initializing = self.is_initializing()
    training = not use_running_average
    if training and update and not initializing:
      self._check_mutable()
    y, new_state = _flax.batch_norm(
        x, jn.BatchNormState(mean, ra_var.value, count), scale, bias, dtype=self.dtype,
        training=training, feature_axes=feat, momentum=self.momentum, epsilon=self.epsilon,
        mask=mask, axis_name=None if initializing else self.axis_name,
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


class LayerNorm(nn.LayerNorm):
  r"""`flax.linen.LayerNorm` with jaxnorm's statistics (`jaxnorm.layer_norm`) and `mask`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 2.0, 3.0], [1e4, 1e4 + 1, 1e4 + 2]])
    >>> ln = jnn.LayerNorm(epsilon=0.0)
    >>> ln.apply(ln.init(jax.random.key(0), x), x).round(4)
    Array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]], dtype=float32)

  Attributes (jaxnorm's, after flax's):
    zero_centered_scale: `scale` stores γ - 1 (output :math:`\hat x(1 + \gamma) + \beta`, as
      Gemma and TransformerEngine), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: the choice of kernel (see
      `jaxnorm.layer_norm`).
  """

  zero_centered_scale: bool = False
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the statistics (all are normalized)."""
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale_init = _flax.zero_centered_init(self.scale_init, self.zero_centered_scale)
    params = _params(self, shape, scale_init)
    return _flax.per_example(jn.layer_norm, self, x, params, feat, mask)


class RMSNorm(nn.RMSNorm):
  r"""`flax.linen.RMSNorm` with jaxnorm's mean square (`jaxnorm.rms_norm`) and `mask`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 7.0]])
    >>> rms = jnn.RMSNorm(epsilon=0.0)
    >>> rms.apply(rms.init(jax.random.key(0), x), x)
    Array([[0.2, 1.4]], dtype=float32)

  Attributes (jaxnorm's, after flax's):
    zero_centered_scale: `scale` stores γ - 1 (output :math:`x r (1 + \gamma)`, Gemma's
      RMSNorm), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: the choice of kernel (see
      `jaxnorm.layer_norm`).
    convention: None, `"llama"` or `"gemma"`: Hugging Face's rounding (see
      `jaxnorm.rms_norm`); under flax's dtype rule, so give bfloat16 parameters
      (`param_dtype`) for a bfloat16 model's bits. `"gemma"` also makes the default
      `scale_init` zeros, as `zero_centered_scale`.
  """

  zero_centered_scale: bool = False
  implementation: str | None = None
  convention: str | None = None

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the mean square."""
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale_init = _flax.zero_centered_init(self.scale_init, self.zero_centered_scale
                                          or self.convention == "gemma")
    scale, _ = _params(self, shape, scale_init, use_bias=False)
    return _flax.per_example(jn.rms_norm, self, x, (scale,), feat, mask,
                             convention=self.convention)


class AddLayerNorm(LayerNorm):
  """`LayerNorm` of `x + residual`, returning `(y, x + residual)` (`jaxnorm.add_layer_norm`):
  `LayerNorm`'s fields and parameters, the unfused layer of the sum bit for bit.

  Example, a pre-norm block whose stream `r` enters and leaves with each sublayer's output:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxnorm import linen as jnn
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, r):  # x: the previous sublayer's output
    ...     y, r = jnn.AddLayerNorm()(x, r)
    ...     return nn.Dense(x.shape[-1])(y), r
    >>> x, r = jnp.ones((2, 4)), jnp.arange(8.0).reshape(2, 4)
    >>> out, r = Block().apply(Block().init(jax.random.key(0), x, r), x, r)
    >>> r
    Array([[1., 2., 3., 4.],
           [5., 6., 7., 8.]], dtype=float32)
  """

  @nn.compact
  def __call__(self, x, residual, *, mask: jax.Array | None = None):  # type: ignore[override]
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale_init = _flax.zero_centered_init(self.scale_init, self.zero_centered_scale)
    params = _params(self, shape, scale_init)
    return _flax.add_per_example(jn.add_layer_norm, self, x, residual, params, feat, mask)


class AddRMSNorm(RMSNorm):
  """`RMSNorm` of `x + residual`, returning `(y, x + residual)` (`jaxnorm.add_rms_norm`), with
  `RMSNorm`'s fields and parameters; as `AddLayerNorm` otherwise."""

  @nn.compact
  def __call__(self, x, residual, *, mask: jax.Array | None = None):  # type: ignore[override]
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale_init = _flax.zero_centered_init(self.scale_init, self.zero_centered_scale
                                          or self.convention == "gemma")
    scale, _ = _params(self, shape, scale_init, use_bias=False)
    return _flax.add_per_example(jn.add_rms_norm, self, x, residual, (scale,), feat, mask,
                                 convention=self.convention)


class GroupNorm(nn.GroupNorm):
  """`flax.linen.GroupNorm` with jaxnorm's statistics (`jaxnorm.group_norm`) and `mask`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
    >>> gn = jnn.GroupNorm(num_groups=2, epsilon=0.0)
    >>> gn.apply(gn.init(jax.random.key(0), x), x)
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the statistics."""
    x = jnp.asarray(x)
    _, shape = _feature_shape(x, -1, "feature axis")
    return _flax.normalize(jn.group_norm, x, _params(self, shape), self.dtype,
                           num_groups=self.num_groups, group_size=self.group_size,
                           epsilon=self.epsilon, reduction_axes=self.reduction_axes, mask=mask,
                           axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


class InstanceNorm(nn.InstanceNorm):
  """`flax.linen.InstanceNorm` with jaxnorm's statistics (`jaxnorm.instance_norm`) and `mask`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxnorm import linen as jnn
    >>> x = jnp.array([[[1.0, 10.0], [3.0, 30.0]]])  # (batch, length, channels)
    >>> inorm = jnn.InstanceNorm(epsilon=0.0)
    >>> inorm.apply(inorm.init(jax.random.key(0), x), x)
    Array([[[-1., -1.],
            [ 1.,  1.]]], dtype=float32)
  """

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the statistics."""
    x = jnp.asarray(x)
    feat, shape = _feature_shape(x, self.feature_axes, "feature_axes")
    _flax.check_instance_axes(feat, self.feature_axes)
    return _flax.normalize(jn.instance_norm, x, _params(self, shape), self.dtype,
                           feature_axes=feat, epsilon=self.epsilon, mask=mask,
                           axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


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
