"""Drop-in replacements for flax.nnx's normalization layers, backed by jaxnorm's core.

Change one import line and keep the model and its state::

    from flax import nnx
    from jaxnorm import nnx as jnnx      # then nnx.BatchNorm -> jnnx.BatchNorm, ...

`BatchNorm`, `LayerNorm`, `RMSNorm`, `GroupNorm` and `InstanceNorm` are subclasses of the
`flax.nnx` classes of the same names: flax's `__init__` declares the `nnx.Param` (`scale`,
`bias`) and `nnx.BatchStat` (`mean`, `var`) attributes (so `nnx.state` of a flax model loads
into ours with `nnx.update` and back, and `rngs` draws the same numbers), and its arguments are
jaxnorm's too, with jaxnorm's extra keywords after them. `__call__` is jaxnorm's: the
statistics are those of `jaxnorm.linen` (read its module docstring), and `BatchNorm` follows
`model.train()`, `model.eval()`, `nnx.view(model, use_running_average=...)` (flax 0.12.4 and
later) and its updates work inside `nnx.jit`. Deliberate differences from flax.nnx:

* a `dtype` narrower than the input (`dtype=jnp.float16` on float32 input) is the output's
  dtype only: the input and the parameters are normalized at their own precision and the
  result is rounded once, as flax.linen does (`_dtypes.flax_promote`), so `jaxnorm.nnx` and
  `jaxnorm.linen` agree bit for bit in every configuration (flax 0.11's nnx layers round
  nothing before they normalize either: with flax 0.11 this is no difference);
* `BatchNorm` in evaluation uses the running statistics as stored (float32), where flax 0.12
  first rounds them to `dtype`;
* `BatchNorm` made with a complex `dtype` or `param_dtype` keeps a complex64 running mean,
  where flax.nnx stores it in float32 and drops its imaginary part; one made with a real
  `dtype` raises a TypeError on complex input;
* `GroupNorm` with custom `reduction_axes` is correct (flax.nnx spreads the group statistics
  along axis 1).

`InstanceNorm` exists where flax.nnx has one (flax 0.12.0 and later). Integer input is
normalized in float32, as flax does. Importing this module needs flax
(`pip install -e ".[flax]"` from a clone); `import jaxnorm` never imports it.
"""

from jaxnorm._flax import require_flax

require_flax("jaxnorm.nnx")

from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from flax.nnx.module import first_from  # noqa: E402

import jaxnorm as jn  # noqa: E402
from jaxnorm import _checks, _compat, _dtypes, _flax, _flax_tools  # noqa: E402
from jaxnorm._nnx_fold import FoldedBatchNorm, fold_model, fold_norms_into_dense  # noqa: E402

__all__: tuple[str, ...] = (
    "AddLayerNorm", "AddRMSNorm", "BatchNorm", "FoldedBatchNorm", "GroupNorm", "InstanceNorm",
    "LayerNorm", "RMSNorm", "fold_model", "fold_norms_into_dense", "recompute_batch_stats")


def _no_mode_message() -> str:
  """BatchNorm's error without a mode, naming the switch the installed flax has."""
  switch = ("nnx.view(model, use_running_average=...)" if _compat.flax_has_view()
            else "model.eval() / model.train() (flax < 0.12.4 has no nnx.view)")
  return ("No `use_running_average` argument was provided to BatchNorm. Pass it to the "
          f"constructor, to the call, or use {switch}.")


def _value(v: Any) -> jax.Array | None:
  return None if v is None else v[...]


def _to_feature_shape(p: jax.Array | None, x: jax.Array,
                      feat: tuple[int, ...]) -> jax.Array | None:
  """nnx stores (num_features,) parameters; the core takes them in the feature shape."""
  return None if p is None else jnp.reshape(p, tuple(x.shape[a] for a in feat))


def _zero_centered(kwargs: dict[str, Any], zero_centered_scale: bool) -> dict[str, Any]:
  """flax's keywords, with the default `scale_init` (ones) made zeros for a zero-centred
  scale."""
  if zero_centered_scale:
    init = kwargs.get("scale_init", jax.nn.initializers.ones)
    kwargs = {**kwargs, "scale_init": _flax.zero_centered_init(init, True)}
  return kwargs


class BatchNorm(nnx.BatchNorm):
  """`flax.nnx.BatchNorm` with jaxnorm's statistics (see the module docstring).

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

  flax's `momentum` may also be None, the exact cumulative average of every update, which adds
  an int32 `count` `BatchStat`: the number of updates, one per feature with
  `per_feature_count=True` (which a mask that differs between features needs).

  Args (jaxnorm's, after flax's):
    unbiased_running_var: store the Bessel-corrected batch variance `var * n / (n - 1)`, as
      PyTorch does (normalization still uses the biased one).
    update_stats: in training, update the `BatchStat`s (default). False uses the batch's
      statistics and leaves the `BatchStat`s untouched.
    renorm: batch renormalization (`jaxnorm.batch_renorm`) in training, with `r_max` and
      `d_max` passed at call time (they may be traced).
    virtual_batch_size: ghost batches of that many examples in training (see
      `jaxnorm.batch_norm`); None (default) normalizes the batch as one.
    per_feature_count: with `momentum=None`, make `count` of the features' shape, one count
      per feature, so that a `mask` that hides whole features in some batches leaves each
      feature's average exact (see `jaxnorm.batch_norm_init`).
  """

  @_flax.extends(nnx.BatchNorm.__init__)
  def __init__(self, *args: Any, unbiased_running_var: bool = False, update_stats: bool = True,
               renorm: bool = False, virtual_batch_size: int | None = None,
               per_feature_count: bool = False, **kwargs: Any):
    super().__init__(*args, **kwargs)
    if _dtypes.flax_complex(self.dtype, self.param_dtype):
      mean_dtype, _ = _dtypes.flax_batch_stats(self.mean[...].dtype, True)
      self.mean = nnx.BatchStat(self.mean[...].astype(mean_dtype))
    self.count: nnx.BatchStat[jax.Array] | None
    if _flax.cumulative(self.momentum):
      count_shape = self.mean[...].shape if per_feature_count else ()
      self.count = nnx.BatchStat(jnp.zeros(count_shape, jnp.int32))
    else:
      self.count = nnx.data(None)
    self.unbiased_running_var = unbiased_running_var
    self.update_stats = update_stats
    self.renorm = renorm
    self.virtual_batch_size = virtual_batch_size
    self.per_feature_count = per_feature_count

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None, update_stats: bool | None = None,
               r_max: Any = None, d_max: Any = None):
    """flax's call, plus `mask` (True marks the elements that enter the batch statistics; a
    batch with no valid element, or non-finite statistics, leaves the `BatchStat`s unchanged),
    `update_stats` (overrides the attribute for this call) and, with `renorm=True`, `r_max`
    (>= 1) and `d_max` (>= 0)."""
    use_running_average = first_from(
        use_running_average, self.use_running_average, error_msg=_no_mode_message())
    update = first_from(update_stats, self.update_stats, error_msg="update_stats is None.")
    x, _, _, scale, bias = _dtypes.flax_promote(
        _compat.nnx_promote_dtype(self), self.dtype, x, self.mean[...], self.var[...],
        _value(self.scale), _value(self.bias))
    feat = _checks.canonicalize_axes(self.axis, x.ndim, "axis")
    fshape = _flax.check_features("BatchNorm", self.num_features, x, feat, self.axis)
    if (_dtypes.flax_complex(x.dtype, self.dtype, self.param_dtype)
        and not jnp.iscomplexobj(self.mean[...])):
      raise TypeError(
          f"BatchNorm got complex input ({x.dtype}) but its running mean is "
          f"{self.mean[...].dtype}, which would lose the mean's imaginary part (flax.nnx drops "
          f"it). Construct it with dtype=jnp.complex64 to keep a complex running mean.")
    count = jnp.zeros((), jnp.int32) if self.count is None else self.count[...]
    if jnp.ndim(count):  # a per-feature count, laid out as the statistics
      count = jnp.reshape(count, fshape)
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
      can_update = _compat.can_update(self.mean) or _compat.can_update(self.var)
      stop = jax.lax.stop_gradient if can_update else (lambda v: v)
      self.mean[...] = stop(jnp.reshape(new_state.mean, self.mean[...].shape))
      self.var[...] = stop(jnp.reshape(new_state.var, self.var[...].shape))
      if self.count is not None:
        self.count[...] = jnp.reshape(new_state.count, self.count[...].shape)
    return y

  def set_view(self, use_running_average: bool | None = None,
               update_stats: bool | None = None):
    """flax's hook for `nnx.view` (flax 0.12.4 and later), plus `update_stats` (each changed
    where not None)."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
    if update_stats is not None:
      self.update_stats = update_stats


class LayerNorm(nnx.LayerNorm):
  r"""`flax.nnx.LayerNorm` with jaxnorm's statistics (`jaxnorm.layer_norm`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> ln = jnnx.LayerNorm(3, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> ln(jnp.array([[1e4, 1e4 + 1, 1e4 + 2]])).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)

  Args (jaxnorm's, after flax's):
    zero_centered_scale: `scale` stores γ - 1 (output :math:`\hat x(1 + \gamma) + \beta`, as
      Gemma and TransformerEngine), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: the choice of kernel (see
      `jaxnorm.layer_norm`).
  """

  @_flax.extends(nnx.LayerNorm.__init__)
  def __init__(self, *args: Any, zero_centered_scale: bool = False,
               implementation: str | None = None, **kwargs: Any):
    super().__init__(*args, **_zero_centered(kwargs, zero_centered_scale))
    self.zero_centered_scale = zero_centered_scale
    self.implementation = implementation

  def __call__(self, x, *, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the statistics (all are normalized)."""
    x, scale, bias = _dtypes.flax_promote(_compat.nnx_promote_dtype(self), self.dtype, x,
                                          _value(self.scale), _value(self.bias))
    feat = _checks.canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
    _flax.check_features("LayerNorm", self.num_features, x, feat, self.feature_axes,
                         "feature_axes")
    params = (_to_feature_shape(scale, x, feat), _to_feature_shape(bias, x, feat))
    return _flax.per_example(jn.layer_norm, self, x, params, feat, mask)


class RMSNorm(nnx.RMSNorm):
  r"""`flax.nnx.RMSNorm` with jaxnorm's mean square (`jaxnorm.rms_norm`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> jnnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.array([[1.0, 7.0]]))
    Array([[0.2, 1.4]], dtype=float32)

  Args (jaxnorm's, after flax's):
    zero_centered_scale: `scale` stores γ - 1 (output :math:`x r (1 + \gamma)`, Gemma's
      RMSNorm), and the default `scale_init` becomes zeros.
    implementation: None, `"xla"` or `"pallas"`: the choice of kernel (see
      `jaxnorm.layer_norm`).
    convention: None, `"llama"` or `"gemma"`: Hugging Face's rounding (see
      `jaxnorm.rms_norm`); under flax's dtype rule, so give bfloat16 parameters
      (`param_dtype`) for a bfloat16 model's bits. `"gemma"` also makes the default
      `scale_init` zeros, as `zero_centered_scale`.
  """

  @_flax.extends(nnx.RMSNorm.__init__)
  def __init__(self, *args: Any, zero_centered_scale: bool = False,
               implementation: str | None = None, convention: str | None = None,
               **kwargs: Any):
    super().__init__(*args, **_zero_centered(kwargs, zero_centered_scale
                                             or convention == "gemma"))
    self.zero_centered_scale = zero_centered_scale
    self.implementation = implementation
    self.convention = convention

  def __call__(self, x, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the mean square."""
    x, scale = _dtypes.flax_promote(_compat.nnx_promote_dtype(self), self.dtype, x,
                                    _value(self.scale))
    feat = _checks.canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
    _flax.check_features("RMSNorm", self.num_features, x, feat, self.feature_axes,
                         "feature_axes")
    return _flax.per_example(jn.rms_norm, self, x, (_to_feature_shape(scale, x, feat),), feat,
                             mask, convention=self.convention)


class AddLayerNorm(LayerNorm):
  """`LayerNorm` of `x + residual`, returning `(y, x + residual)` (`jaxnorm.add_layer_norm`):
  the unfused layer of the sum, bit for bit (a pre-norm block: `jaxnorm.linen.AddLayerNorm`).

    >>> import jax.numpy as jnp, flax.nnx as nnx, jaxnorm.nnx as jnnx
    >>> jnnx.AddLayerNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.ones((1, 2)), jnp.eye(1, 2))
    (Array([[ 1., -1.]], dtype=float32), Array([[2., 1.]], dtype=float32))
  """

  def __call__(self, x, residual, *, mask: jax.Array | None = None):  # type: ignore[override]
    x, feat, params = _add_params(self, x, residual, self.scale, self.bias)
    return _flax.add_per_example(jn.add_layer_norm, self, x, residual, params, feat, mask)


class AddRMSNorm(RMSNorm):
  """`RMSNorm` of `x + residual`, returning `(y, x + residual)` (`jaxnorm.add_rms_norm`); as
  `AddLayerNorm` otherwise."""

  def __call__(self, x, residual, mask: jax.Array | None = None):  # type: ignore[override]
    x, feat, params = _add_params(self, x, residual, self.scale)
    return _flax.add_per_example(jn.add_rms_norm, self, x, residual, params, feat, mask,
                                 convention=self.convention)


def _add_params(layer: Any, x: Any, residual: Any, *params: Any) -> tuple[Any, ...]:
  """`(x, feature axes, parameters)` of an `Add*` layer: the parameters promoted with the sum
  as the unfused layer promotes them with its input (`flax_promote`), in the feature shape."""
  x = jnp.asarray(x)
  r_dtype = _checks.check_residual(residual, x, type(layer).__name__).dtype
  h = jnp.zeros((), _dtypes.residual_sum_dtype(x.dtype, r_dtype))
  _, *ps = _dtypes.flax_promote(_compat.nnx_promote_dtype(layer), layer.dtype, h,
                                *map(_value, params))
  feat = _checks.canonicalize_axes(layer.feature_axes, x.ndim, "feature_axes")
  _flax.check_features(type(layer).__name__, layer.num_features, x, feat, layer.feature_axes,
                       "feature_axes")
  return x, feat, tuple(_to_feature_shape(p, x, feat) for p in ps)


class GroupNorm(nnx.GroupNorm):
  """`flax.nnx.GroupNorm` with jaxnorm's statistics (`jaxnorm.group_norm`); custom
  `reduction_axes` give correct output.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxnorm import nnx as jnnx
    >>> gn = jnnx.GroupNorm(4, num_groups=2, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> gn(jnp.array([[1.0, 3.0, 10.0, 30.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  @_flax.extends(nnx.GroupNorm.__init__)
  def __init__(self, *args: Any, **kwargs: Any):
    """flax's, after jaxnorm's check of the groups (whose error names the argument, the
    value and the fix)."""
    a = _flax.arguments(nnx.GroupNorm.__init__, self, args, kwargs)
    _checks.resolve_groups(a["num_features"], a["num_groups"], a["group_size"], "num_features")
    super().__init__(*args, **kwargs)

  def __call__(self, x, *, mask: jax.Array | None = None):
    """flax's call; `mask` marks the elements that enter the statistics."""
    x, scale, bias = _dtypes.flax_promote(_compat.nnx_promote_dtype(self), self.dtype, x,
                                          _value(self.scale), _value(self.bias))
    _flax.check_features("GroupNorm", self.num_groups * self.group_size, x, (x.ndim - 1,), -1,
                         "channel axis")
    return _flax.normalize(jn.group_norm, x, (scale, bias), self.dtype,
                           num_groups=self.num_groups, epsilon=self.epsilon,
                           reduction_axes=self.reduction_axes, mask=mask,
                           axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)


# flax 0.12.0 added `nnx.InstanceNorm`. With an older flax, jaxnorm.nnx has none either (the
# layers are drop-ins for the installed flax's), and the name says what to use instead.
if hasattr(nnx, "InstanceNorm"):
  class InstanceNorm(nnx.InstanceNorm):
    """`flax.nnx.InstanceNorm` with jaxnorm's statistics (`jaxnorm.instance_norm`).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxnorm import nnx as jnnx
      >>> inorm = jnnx.InstanceNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
      >>> inorm(jnp.array([[[1.0, 10.0], [3.0, 30.0]]]))
      Array([[[-1., -1.],
              [ 1.,  1.]]], dtype=float32)
    """

    def __call__(self, x, *, mask: jax.Array | None = None):
      """flax's call; `mask` marks the elements that enter the statistics."""
      x, scale, bias = _dtypes.flax_promote(_compat.nnx_promote_dtype(self), self.dtype, x,
                                            _value(self.scale), _value(self.bias))
      feat = _checks.canonicalize_axes(self.feature_axes, x.ndim, "feature_axes")
      _flax.check_instance_axes(feat, self.feature_axes)
      _flax.check_features("InstanceNorm", self.num_features, x, feat, self.feature_axes,
                           "feature_axes")
      params = (_to_feature_shape(scale, x, feat), _to_feature_shape(bias, x, feat))
      return _flax.normalize(jn.instance_norm, x, params, self.dtype, feature_axes=feat,
                             epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                             axis_index_groups=self.axis_index_groups)
else:
  __all__ = tuple(n for n in __all__ if n != "InstanceNorm")

  def __getattr__(name: str) -> Any:
    if name == "InstanceNorm":
      raise AttributeError(
          f"jaxnorm.nnx.InstanceNorm subclasses flax.nnx.InstanceNorm, which flax "
          f"{_compat.installed('flax')} lacks (flax 0.12.0 added it; that flax needs "
          f"jax>=0.7.1). Use jaxnorm.linen.InstanceNorm or jaxnorm.instance_norm, or upgrade "
          f"with pip install -U 'flax>=0.12.0'.")
    raise AttributeError(f"module 'jaxnorm.nnx' has no attribute {name!r}")


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
