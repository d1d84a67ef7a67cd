"""Equinox drop-ins: `BatchNorm`, `LayerNorm`, `GroupNorm`, `RMSNorm` on jaxnorm's core.

`LayerNorm`, `GroupNorm` and `RMSNorm` are subclasses of the `equinox.nn` classes of the same
names: equinox's constructor and fields (names, order, shapes, dtypes), jaxnorm's `__call__`.
`BatchNorm` is not a subclass of `equinox.nn.BatchNorm`: equinox's constructor creates the
`StateIndex` fields with the initial state, which differs here (the "ema" buffers start at
`jaxnorm.batch_norm_init`'s mean 0 and variance 1, equinox's at `jnp.empty`), so inheriting
would build equinox's state and then replace its `StateIndex` fields; its `axis_name` is a
static field (equinox's is a leaf, a string among the arrays), and its `__call__` shares
nothing. It has equinox's constructor arguments and field names, order, shapes and dtypes.

Every layer is called as equinox's: one example at a time, channels first, under `jax.vmap`
(`BatchNorm` with its `axis_name`), returning `(output, state)` when given a state. So a model
that changes `eqx.nn.BatchNorm` to `jaxnorm.equinox.BatchNorm` keeps its serialized weights
(`eqx.tree_serialise_leaves`). The layers call the public jaxnorm functions: statistics in at
least float32, two-pass variance, masks, count-weighted statistics across devices.

What differs from `equinox.nn` on purpose:

* `BatchNorm(mode="batch")` starts the exponential average of the variance at 0, as the zero
  debiasing at inference assumes (equinox starts it at 1: after one step with momentum 0.9 its
  inference variance is `9 + v` instead of `v`). The state's shapes, dtypes and initial values
  are equinox's.
* Inputs of any floating dtype work (equinox's `BatchNorm` raises a `TypeError` on bfloat16),
  and every layer returns the input's dtype.
* Every call takes an optional boolean `mask=` broadcastable to the per-example input.

Importing `jaxnorm` does not import this module or equinox (the `equinox` extra).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

try:
  import equinox as eqx
except ImportError as e:
  raise ImportError('jaxnorm.equinox needs equinox, which is not installed. Install it with: '
                    'pip install -e ".[equinox]" (from a clone of the repository), or '
                    'pip install "jaxnorm[equinox]" (from a package index)') from e
from equinox import field
from equinox.nn import State, StateIndex

import jaxnorm as jn

from . import _checks
from ._dtypes import default_float

__all__ = ("AddLayerNorm", "AddRMSNorm", "BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm")

_NO_STATE: Any = object()


def _check_shape(name: str, shape: tuple[int, ...], x: jax.Array) -> None:
  if x.shape != shape:
    raise ValueError(
        f"`{name}(shape)(x)` needs x.shape == shape; got shape={shape} and x.shape={x.shape}. "
        f"Call it on one example at a time: replace `norm(x)` with `jax.vmap(norm)(x)`."
    )


def _batch_norm_shape_fix(input_size: int, axis_name: Any, x: jax.Array) -> str:
  """How to call `BatchNorm(input_size)` on `x`, an example of the wrong shape. Already under
  the `jax.vmap` of `axis_name` (`_checks.is_bound`), the example itself is the problem: a
  channels-last one needs its channels moved first; outside it, the call needs the vmap."""
  if all(_checks.is_bound(n) for n in _checks.axis_names(axis_name)):
    if x.ndim > 1 and x.shape[-1] == input_size:
      return (f"It is channels last (its last axis holds the {input_size} channels): move them "
              f"first, e.g. call it on jnp.moveaxis(x, -1, 0), or build the model channels "
              f"first.")
    return f"Axis 0 of each example must hold the {input_size} channels."
  return (f"Call it on one example at a time, under jax.vmap(..., axis_name={axis_name!r}) "
          f"over the batch.")


def _maybe_state(out: jax.Array, state: Any) -> Any:
  return out if state is _NO_STATE else (out, state)


def _whole_shape(fn: Any, name: str, layer: Any, x: ArrayLike, state: Any,
                 mask: ArrayLike | None, **extra: Any) -> Any:
  """`fn` (layer or RMS norm) of one example over its whole shape, with the layer's `weight`,
  `bias` and `eps` (and `extra`, the arguments only `fn` takes)."""
  x = jnp.asarray(x)
  _check_shape(name, layer.shape, x)
  axes = tuple(range(x.ndim))
  y = fn(x, layer.weight, layer.bias, reduction_axes=axes, feature_axes=axes,
         epsilon=layer.eps, mask=mask, **extra)
  return _maybe_state(y, state)


class BatchNorm(eqx.nn.StatefulLayer):
  r"""Batch normalization of one example, channels first, under `jax.vmap(axis_name=...)`.

  .. math::
    y_c = \frac{x_c - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\,\gamma_c + \beta_c

  with the statistics of every channel over the spatial axes and the batch (the examples of
  the mapped axis `axis_name`, and across devices when it names a `pmap`/`shard_map` axis too),
  computed by `jaxnorm.moments`: population variance in two passes in at least float32, each
  example weighted by its count of valid elements (`mask`).

  `mode="batch"` (jaxnorm's recommendation, as equinox's): training normalizes with the
  batch's statistics; the state keeps exponential averages `h ← m h + (1 - m) s` that start at
  0, and inference uses them zero-debiased, :math:`h / (1 - m^t)` after t steps (mean 0 and
  variance 1 before the first step). `mode="ema"`, and `"legacy"` (the default, with
  equinox's warning), keep equinox's semantics: the first batch fills the running statistics,
  later ones are blended in with `momentum`, and training normalizes with the blended
  statistics.

  The constructor takes `equinox.nn.BatchNorm`'s arguments:

  Args:
    input_size: the number of channels.
    axis_name: the `jax.vmap`/`jax.pmap` axis name (or names) of the batch.
    eps: constant added to the variance.
    channelwise_affine: whether to learn `weight` and `bias` of shape `(input_size,)`.
    momentum: decay of the running statistics, in [0, 1]; 1.0 freezes them (fine-tuning):
      `mode="ema"` keeps the first batch's statistics, as equinox does, and `mode="batch"` its
      initial mean 0 and variance 1 (equinox's debiasing would divide by 0 there).
    inference: use the running statistics (toggle with `eqx.nn.inference_mode`).
    dtype: dtype of the running statistics, `weight` and `bias` (default float32, float64
      with `jax_enable_x64`).
    mode: `"batch"`, `"ema"` or `"legacy"`.
    per_feature_count: with `mode="batch"`, count the updates per channel (the state's counter
      gets shape `(input_size,)`), so that a `mask` that hides whole channels in some steps
      leaves each channel's debiased average exact; equinox's scalar counter otherwise (which
      refuses a mask that can differ between channels).

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import jaxnorm.equinox as jne
    >>> bn, state = eqx.nn.make_with_state(jne.BatchNorm)(2, "batch", mode="batch",
    ...                                                   momentum=0.9)
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> step = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    >>> y, state = step(x, state)
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> y, _ = jax.vmap(eqx.nn.inference_mode(bn), axis_name="batch", in_axes=(0, None),
    ...                 out_axes=(0, None))(x, state)
    >>> y.round(3)  # the running statistics after one step: mean (2, 20), variance (1, 100)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: StateIndex | None
  ema_state_index: StateIndex | None
  batch_counter: StateIndex | None
  batch_state_index: StateIndex | None
  axis_name: Hashable | Sequence[Hashable] = field(static=True)
  inference: bool
  input_size: int = field(static=True)
  eps: float = field(static=True)
  channelwise_affine: bool = field(static=True)
  momentum: float = field(static=True)
  mode: Literal["ema", "batch"] = field(static=True)

  def __init__(
      self,
      input_size: int,
      axis_name: Hashable | Sequence[Hashable],
      eps: float = 1e-5,
      channelwise_affine: bool = True,
      momentum: float = 0.99,
      inference: bool = False,
      dtype: Any = None,
      mode: Literal["ema", "batch", "legacy"] = "legacy",
      per_feature_count: bool = False,
  ):
    if mode == "legacy":
      mode = "ema"
      warnings.warn(
          "When `BatchNorm(..., mode=...)` is unspecified it defaults to 'ema', for "
          "compatibility with equinox.nn.BatchNorm; for new code pass mode='batch'.",
          stacklevel=2,
      )
    if mode not in ("ema", "batch"):
      raise ValueError(f"mode must be 'batch', 'ema' or 'legacy'; got {mode!r}.")
    if not 0.0 <= momentum <= 1.0:
      raise ValueError(
          f"momentum must lie in [0, 1] (the decay of the running statistics; 1.0 freezes "
          f"them); got {momentum!r}.")
    dtype = default_float() if dtype is None else dtype
    self.mode = mode
    if channelwise_affine:
      self.weight = jnp.ones((input_size,), dtype)
      self.bias = jnp.zeros((input_size,), dtype)
    else:
      self.weight = None
      self.bias = None
    init = jn.batch_norm_init(input_size, dtype=dtype)
    if mode == "ema":
      self.ema_first_time_index = StateIndex(jnp.array(True))
      self.ema_state_index = StateIndex((init.mean, init.var))
      self.batch_counter = None
      self.batch_state_index = None
    else:
      self.batch_counter = StateIndex(jnp.zeros((input_size,), jnp.array(0).dtype)
                                      if per_feature_count else jnp.array(0))
      self.batch_state_index = StateIndex((init.mean, init.var))
      self.ema_first_time_index = None
      self.ema_state_index = None
    self.inference = inference
    self.axis_name = axis_name
    self.input_size = input_size
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    self.momentum = momentum

  def __call__(
      self,
      x: ArrayLike,
      state: State,
      *,
      key: Any = None,
      inference: bool | None = None,
      mask: ArrayLike | None = None,
  ) -> tuple[jax.Array, State]:
    """Normalizes one example `x` of shape `(input_size, *spatial)`; returns `(y, state)`.

    Args:
      x: one example, channels first.
      state: the `eqx.nn.State` holding the running statistics.
      key: ignored (equinox's convention).
      inference: overrides `self.inference` when not None.
      mask: optional boolean array broadcastable to `x`; True marks the elements that enter
        the batch statistics.

    Returns:
      `(y, state)`, `y` of `x`'s shape and dtype.
    """
    del key
    x = jnp.asarray(x)
    if inference is None:
      inference = self.inference
    if x.ndim < 1 or x.shape[0] != self.input_size:
      raise ValueError(
          f"BatchNorm({self.input_size}) expects one example, channels first, of shape "
          f"(input_size, ...) = ({self.input_size}, ...); got x.shape={x.shape}. "
          + _batch_norm_shape_fix(self.input_size, self.axis_name, x)
      )
    spatial = tuple(range(1, x.ndim))

    def normalize(mean: jax.Array, var: jax.Array) -> jax.Array:
      return jn.normalize(x, mean, var, self.weight, self.bias, reduction_axes=spatial,
                          feature_axes=0, epsilon=self.eps)

    if self.mode == "batch":
      assert self.batch_counter is not None and self.batch_state_index is not None
      count = state.get(self.batch_counter)
      mean, var = state.get(self.batch_state_index)
      if inference:
        # Zero debiasing: h_t = (1 - m) sum_k m^(t-k) s_k, so h_t / (1 - m^t) is a weighted mean.
        dtype = mean.dtype
        debias = 1 - jnp.asarray(self.momentum, dtype) ** count.astype(dtype)
        # Frozen statistics (momentum 1) are never updated: the initial ones, not debiased.
        debias = jnp.where((count == 0) | (self.momentum == 1.0), jnp.ones((), dtype), debias)
        return normalize(mean / debias, var / debias), state
      _checks.check_cumulative_count(mask, count, x.shape, (0,), 'mode="batch" (its '
                                     "zero-debiased average weighs a batch by the update count)")
      # The average starts at 0 (the initial variance 1 is what inference uses before step 1).
      hidden = jn.BatchNormState(mean, jnp.where(count == 0, jnp.zeros_like(var), var),
                                 count.astype(jnp.int32))
      y, new = jn.batch_norm(x, hidden, self.weight, self.bias, training=True,
                             feature_axes=0, momentum=self.momentum, epsilon=self.eps,
                             mask=mask, axis_name=self.axis_name)
      # count + 0 or 1, written so that equinox's weakly typed counter keeps its type
      state = state.set(self.batch_counter, count + jnp.where(new.count > hidden.count, 1, 0))
      if self.momentum != 1.0:  # frozen: the initial mean 0 / variance 1 stay as they are
        state = state.set(self.batch_state_index, (new.mean, new.var))
      return y, state
    assert self.ema_first_time_index is not None and self.ema_state_index is not None
    mean, var = state.get(self.ema_state_index)
    if not inference:
      first = state.get(self.ema_first_time_index)
      state = state.set(self.ema_first_time_index, jnp.array(False))
      batch = jn.moments(x, spatial, mask=mask, axis_name=self.axis_name)
      running = jn.BatchNormState(mean, var, jnp.zeros((), jnp.int32))
      blended = jn.update_running_stats(running, batch, momentum=self.momentum)
      filled = jn.update_running_stats(running, batch, momentum=None)  # count 0: the batch
      mean = jnp.where(first, filled.mean, blended.mean)
      var = jnp.where(first, filled.var, blended.var)
      state = state.set(self.ema_state_index, (mean, var))
    return normalize(mean, var), state


class LayerNorm(eqx.nn.LayerNorm):
  r"""`equinox.nn.LayerNorm` (its fields and constructor) with the statistics of
  `jaxnorm.layer_norm` (two passes, at least float32) over every element, the valid ones with
  `mask`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.equinox as jne
    >>> jax.vmap(jne.LayerNorm(3, eps=0.0))(jnp.array([[1.0, 2.0, 3.0]])).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
  """

  def __call__(self, x: ArrayLike, state: Any = _NO_STATE, *, key: Any = None,
               mask: ArrayLike | None = None) -> Any:
    """Normalizes `x` (of shape `self.shape`); returns `y`, or `(y, state)` given a state."""
    del key
    return _whole_shape(jn.layer_norm, "LayerNorm", self, x, state, mask)


def _add_whole_shape(fn: Any, name: str, layer: Any, x: ArrayLike, residual: ArrayLike,
                     state: Any, mask: ArrayLike | None, **extra: Any) -> Any:
  """`_whole_shape` of the fused residual add `fn` (`jaxnorm.add_layer_norm` or
  `add_rms_norm`): `(y, x + residual)`, or `((y, x + residual), state)` given a state."""
  x = jnp.asarray(x)
  _check_shape(name, layer.shape, x)
  axes = tuple(range(x.ndim))
  out = fn(x, residual, layer.weight, bias=layer.bias, reduction_axes=axes, feature_axes=axes,
           epsilon=layer.eps, mask=mask, **extra)
  return _maybe_state(out, state)


class AddLayerNorm(LayerNorm):
  r"""`LayerNorm` of `x + residual`, returning `(y, x + residual)` (`jaxnorm.add_layer_norm`):
  a pre-norm block's residual add and its next norm, with `LayerNorm`'s fields; `y` has `x`'s
  dtype, the sum the promoted one (a float32 residual stream stays float32).

  Example, in a pre-norm block (`r` the residual stream, `x` a sublayer's output):
    >>> import jax, jax.numpy as jnp, jaxnorm.equinox as jne
    >>> x, r = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 1.0, 1.0]])
    >>> y, r = jax.vmap(jne.AddLayerNorm(3, eps=0.0))(x, r)
    >>> y.round(4), r
    (Array([[-1.2247,  0.    ,  1.2247]], dtype=float32), Array([[2., 3., 4.]], dtype=float32))
  """

  def __call__(self, x: ArrayLike, residual: ArrayLike, state: Any = _NO_STATE, *,  # type: ignore[override]
               key: Any = None, mask: ArrayLike | None = None) -> Any:
    """Returns `(y, x + residual)` for `x` of shape `self.shape`, with the state if given."""
    del key
    return _add_whole_shape(jn.add_layer_norm, "AddLayerNorm", self, x, residual, state, mask)


class GroupNorm(eqx.nn.GroupNorm):
  r"""`equinox.nn.GroupNorm` (its fields and constructor) on one example of shape
  `(channels, *spatial)`, with the statistics of `jaxnorm.group_norm` (`channel_axis=1` on a
  batch of one).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.equinox as jne
    >>> jax.vmap(jne.GroupNorm(2, 4, eps=0.0))(jnp.array([[1.0, 3.0, 10.0, 30.0]]))
    Array([[-1.,  1., -1.,  1.]], dtype=float32)
  """

  def __init__(self, groups: int, channels: int | None = None, *args: Any, **kwargs: Any):
    """equinox's, after jaxnorm's check of `groups` (an error that names the value and the
    fix, where equinox divides by it)."""
    if channels is not None:
      _checks.resolve_groups(channels, groups, None, "channels")
    super().__init__(groups, channels, *args, **kwargs)

  __init__.__signature__ = inspect.signature(eqx.nn.GroupNorm.__init__)  # type: ignore[attr-defined]

  def __call__(self, x: ArrayLike, state: Any = _NO_STATE, *, key: Any = None,
               mask: ArrayLike | None = None) -> Any:
    """Normalizes `x` of shape `(channels, *spatial)`; returns `y`, or `(y, state)`."""
    del key
    x = jnp.asarray(x)
    channels = x.shape[0] if x.ndim else 0
    if x.ndim < 1 or channels % self.groups or (self.channels not in (None, channels)):
      raise ValueError(
          f"GroupNorm(groups={self.groups}, channels={self.channels}) expects one example of "
          f"shape (channels, ...) with channels divisible by groups; got x.shape={x.shape}. "
          f"Call it under jax.vmap."
      )
    y = jn.group_norm(x[None], self.weight, self.bias, num_groups=self.groups,
                      epsilon=self.eps, channel_axis=1,
                      mask=None if mask is None else jnp.asarray(mask)[None])
    return _maybe_state(y[0], state)


class RMSNorm(eqx.nn.RMSNorm):
  r"""`equinox.nn.RMSNorm` (its fields and constructor, with its optional bias) with the mean
  square of `jaxnorm.rms_norm` (at least float32, the valid elements with `mask`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.equinox as jne
    >>> jax.vmap(jne.RMSNorm(2, eps=0.0))(jnp.array([[1.0, 7.0]]))
    Array([[0.2, 1.4]], dtype=float32)

  For Hugging Face's roundings, `convention="llama"` or `"gemma"` is an argument of the call
  (see `jaxnorm.rms_norm`), not a field: the fields stay equinox's. With `"gemma"` the weight
  stores γ - 1, so start it at zeros (`eqx.tree_at`).
  """

  def __call__(self, x: ArrayLike, state: Any = _NO_STATE, *, key: Any = None,
               mask: ArrayLike | None = None, convention: str | None = None) -> Any:
    """Normalizes `x` (of shape `self.shape`); returns `y`, or `(y, state)` given a state;
    `convention` as in `jaxnorm.rms_norm`."""
    del key
    return _whole_shape(jn.rms_norm, "RMSNorm", self, x, state, mask, convention=convention)


class AddRMSNorm(RMSNorm):
  r"""`RMSNorm` of `x + residual`, returning `(y, x + residual)` (`jaxnorm.add_rms_norm`);
  as `AddLayerNorm` otherwise, with `convention` an argument of the call as in `RMSNorm`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxnorm.equinox as jne
    >>> y, r = jax.vmap(jne.AddRMSNorm(2, eps=0.0))(jnp.array([[2.0, 4.0]]),
    ...                                             jnp.array([[-1.0, 3.0]]))
    >>> y, r
    (Array([[0.2, 1.4]], dtype=float32), Array([[1., 7.]], dtype=float32))
  """

  def __call__(self, x: ArrayLike, residual: ArrayLike, state: Any = _NO_STATE, *,  # type: ignore[override]
               key: Any = None, mask: ArrayLike | None = None,
               convention: str | None = None) -> Any:
    """Returns `(y, x + residual)`, with the state if given; `convention` as in `RMSNorm`."""
    del key
    return _add_whole_shape(jn.add_rms_norm, "AddRMSNorm", self, x, residual, state, mask,
                            convention=convention)
