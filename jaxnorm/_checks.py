"""Argument validation: each public call checks its arguments here, once.

Every check runs at trace time on static information (shapes, dtypes, Python numbers) and raises
an error that names the argument, the value received and what is expected. A normalizer's
configuration leaves here as one immutable `Spec` (batch norm's as a `BatchNormSpec`), which the
functions that compute (`_stats`, `_apply`, `_fused`, the kernels) take whole and check no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._compat import axis_size, check_pallas

Axes = int | Sequence[int]


def canonicalize_axes(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
  """Returns `axes` as a sorted tuple of non-negative ints, or raises.

  Raises:
    TypeError: an axis is not an int.
    ValueError: an axis is out of range for an array of rank `ndim`, or repeated.
  """
  items: tuple[Any, ...]
  if isinstance(axes, (int, np.integer)):
    items = (axes,)
  elif isinstance(axes, Sequence):
    items = tuple(axes)
  else:
    raise TypeError(f"{name} must be an int or a sequence of ints; got {axes!r}.")
  out = []
  for a in items:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise TypeError(f"{name} must be an int or a sequence of ints; got {axes!r}.")
    if ndim == 0:
      raise ValueError(
          f"{name}={axes!r}, but the input is a scalar (rank 0) and has no axes: pass "
          f"reduction_axes=() and feature_axes=() to normalize it as a set of one element, or "
          f"give the input an axis first (x[None])."
      )
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axes!r} is out of range for an input of rank {ndim}: every axis must lie "
          f"in [{-ndim}, {ndim - 1}]."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axes!r} repeats an axis (as non-negative axes: {out}).")
  return tuple(sorted(out))


def check_floating(x: jax.Array, name: str = "x", allow_complex: bool = False,
                   real_only: str = "this function") -> None:
  """Raises a TypeError unless `x` is floating (or, with `allow_complex`, complex); `real_only`
  names what takes real input only, for the message about a complex `x`."""
  if allow_complex and jnp.issubdtype(x.dtype, jnp.complexfloating):
    return
  if not jnp.issubdtype(x.dtype, jnp.floating):
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      raise TypeError(f"{name} is complex ({x.dtype}); {real_only} takes real input only.")
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16, float32, float64); "
        f"got {x.dtype}. Cast it first, e.g. {name}.astype(jnp.float32)."
    )


def is_concrete(value: Any) -> bool:
  """True when `value` is a Python number or a concrete (non-traced) array."""
  return not isinstance(value, jax.core.Tracer)


def check_epsilon(epsilon: Any) -> None:
  """A scalar always (a traced one too: its shape is known); finite and non-negative when its
  value is known."""
  if jnp.ndim(epsilon) != 0:
    got = f" {epsilon!r}" if is_concrete(epsilon) else " (traced)"
    raise ValueError(f"epsilon must be a scalar, the constant added to the variance; got an "
                     f"array of shape {jnp.shape(epsilon)}{got}. Pass one value, e.g. "
                     f"epsilon=1e-5.")
  if is_concrete(epsilon):
    eps = np.asarray(epsilon)
    if eps.ndim != 0 or not np.isfinite(eps) or eps < 0:
      raise ValueError(f"epsilon must be a finite, non-negative scalar; got {epsilon!r}.")


def check_momentum(momentum: Any) -> None:
  """momentum may be None (cumulative average) or a scalar in [0, 1]; 1 freezes the running
  statistics, as in flax, equinox and PyTorch (its momentum 0), e.g. for fine-tuning."""
  if momentum is None or not is_concrete(momentum):
    return
  m = np.asarray(momentum)
  if m.ndim != 0 or not 0.0 <= float(m) <= 1.0:
    raise ValueError(
        f"momentum must be a scalar in [0, 1] (flax's decay convention: "
        f"new = momentum * old + (1 - momentum) * batch; 1.0 freezes the running statistics), "
        f"or None for the exact cumulative average; got {momentum!r}. For PyTorch's "
        f"convention (the new batch's weight m in [0, 1]) use jaxnorm.momentum_from_torch(m)."
    )


def check_inexact(value: ArrayLike, name: str) -> None:
  """Raises a TypeError unless `value` (a parameter or a statistic) is floating or complex."""
  try:
    dtype = jnp.result_type(value)
  except TypeError as e:  # JAX's "Cannot determine dtype of ..." names neither cause nor fix
    raise TypeError(_not_an_array(value, name)) from e
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"{name} must have a floating (or complex) dtype; got {dtype}. Cast it "
                    f"first, e.g. {name}.astype(jnp.float32).")


def _not_an_array(value: Any, name: str) -> str:
  """The message for a `value` passed as the array `name` that is none: a Python list, or a
  state (a NamedTuple) in a parameter's place."""
  got = type(value).__name__
  if isinstance(value, tuple) and {"mean", "var", "count"} <= set(getattr(value, "_fields", ())):
    fix = (f"The running state goes second: batch_norm(x, state, scale, bias, training=...); "
           f"pass {name} as an array, or None.")
  elif isinstance(value, list | tuple):
    fix = f"Convert it first, e.g. {name}=jnp.asarray(...)."
  else:
    fix = "Pass a jax.Array or a NumPy array."
  return (f"{name} must be an array (a jax.Array or a NumPy array) or a Python number; got a "
          f"{got}. {fix}")


def check_param(param: jax.Array | None, expected: tuple[int, ...], name: str,
                what: str, input_shape: tuple[int, ...] | None = None,
                feature_axes: tuple[int, ...] = ()) -> None:
  """`param` must have the shape `expected` or, with `input_shape`, one that broadcasts to it.

  The broadcast form is NumPy's (the parameter's axes align with the input's last axes), for
  per-example parameters such as `(batch, 1, features)`. With `feature_axes`, a parameter that
  fits another axis of the input is pointed to `feature_axes`.
  """
  if param is None:
    return
  check_inexact(param, name)
  shape = tuple(jnp.shape(param))
  if shape == tuple(expected):
    return
  if input_shape is not None and _broadcasts_to(shape, tuple(input_shape)):
    return
  also = ("" if input_shape is None else
          f" or a shape that broadcasts to the input's shape {tuple(input_shape)}")
  axis = _other_feature_axis(shape, tuple(input_shape or ()), feature_axes)
  fix = ("" if axis is None else f" If {name} runs along axis {axis} of the input (e.g. "
         f"channels first), pass feature_axes={axis}.")
  raise ValueError(
      f"{name} must have the shape of the {what}, {tuple(expected)}{also}; got shape "
      f"{shape}.{fix}"
  )


def _other_feature_axis(shape: tuple[int, ...], input_shape: tuple[int, ...],
                       feature_axes: tuple[int, ...]) -> int | None:
  """The first axis after the batch axis of an input of `input_shape`, not `feature_axes`,
  whose size is that of a one-axis `shape` (a parameter or state of channels-first input,
  say); None if there is none."""
  if len(shape) != 1 or not feature_axes:
    return None
  axes = [a for a in range(1, len(input_shape))
          if input_shape[a] == shape[0] and (a,) != feature_axes]
  return axes[0] if axes else None


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  try:
    return np.broadcast_shapes(shape, target) == target
  except ValueError:
    return False


def check_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
  """Returns `mask` as a boolean array broadcast to `shape`, or raises."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f"mask must be a boolean array (True marks the elements that enter the statistics); "
        f"got dtype {mask.dtype}. Use e.g. mask=(lengths[:, None] > positions)."
    )
  if not _broadcasts_to(mask.shape, tuple(shape)):
    raise ValueError(
        f"mask of shape {mask.shape} does not broadcast to the input's shape {tuple(shape)}."
    )
  return jnp.broadcast_to(mask, shape)


def check_axis_index_groups(axis_name: Any, axis_index_groups: Any) -> None:
  if axis_index_groups is not None and axis_name is None:
    raise ValueError(
        "axis_index_groups was given without axis_name; name the mapped axis the groups "
        "subdivide."
    )


def axis_names(axis_name: Any) -> tuple[Any, ...]:
  """`axis_name` as a tuple of names (one name or a tuple/list of them)."""
  return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def is_bound(name: Any) -> bool:
  """Whether an enclosing `jax.shard_map`, `jax.pmap` or `jax.vmap` binds the axis `name`
  (`jax.lax.axis_size` raises a NameError for one that none binds)."""
  try:
    axis_size(name)
  except NameError:
    return False
  return True


def mesh_axes() -> tuple[Any, ...]:
  """The mesh axes that collectives may name here: the manual axes of the enclosing
  `jax.shard_map` (or `jax.pmap`, which JAX runs as one); empty outside them."""
  return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def collective_error(axis_name: Any, error: Exception) -> Exception | None:
  """A clear error for `error`, raised by a collective over `axis_name`, when the axis names
  are its cause; None otherwise.

  It runs only after a collective failed, so valid calls pay nothing. The names that JAX can
  report are the mesh axes: it has no public list of the `jax.vmap` axes in scope, only
  `jax.lax.axis_size` to ask about one name. A bound name that is not a mesh axis is a
  `jax.vmap` axis; inside `jax.shard_map` with `check_vma=True`, JAX (0.10) fails on any
  collective over one (a bare AssertionError, or a ValueError about varying axes), whether
  the names are reduced together or one at a time.
  """
  names, mesh = axis_names(axis_name), mesh_axes()
  unbound = tuple(n for n in names if not is_bound(n))
  if unbound:
    return NameError(
        f"axis_name={axis_name!r}: {', '.join(map(repr, unbound))} "
        f"{'is' if len(unbound) == 1 else 'are'} not bound here, by any "
        f"enclosing jax.shard_map, jax.pmap or jax.vmap; mesh axes bound here: "
        f"{mesh if mesh else 'none'}. Pass the names of the axes the batch is split over: "
        f"mesh axes of the jax.shard_map, or the axis_name given to jax.pmap(axis_name=...) "
        f"or jax.vmap(axis_name=...) around this call."
    )
  vmapped = tuple(n for n in names if n not in mesh)
  vma_error = (isinstance(error, AssertionError | KeyError)
               or "can only accept axis_name" in str(error))
  if mesh and vmapped and vma_error:
    return ValueError(
        f"axis_name={axis_name!r} reduces over {', '.join(map(repr, vmapped))}, a jax.vmap "
        f"axis, inside jax.shard_map over mesh axes {mesh}: with shard_map's check_vma=True "
        f"(its default) JAX {jax.__version__} accepts no collective over a jax.vmap axis. Pass "
        f"check_vma=False to jax.shard_map (before JAX 0.6.1: check_rep=False to "
        f"jax.experimental.shard_map.shard_map), or map the devices with jax.pmap(axis_name=...) "
        f"around the jax.vmap; both give the statistics of the whole batch."
    )
  return None


def check_bool(value: Any, name: str) -> None:
  """Raises a TypeError unless `value` is a Python bool."""
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, Python's True or False; got {value!r}.")


def feature_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[a] for a in feature_axes)


class Spec(NamedTuple):
  """One normalizer call's configuration, validated once (`normalizer_spec`) and handed down
  whole: nothing below the public function checks it again or takes its fields one by one.

  Immutable. `epsilon` and `mask` may be arrays (traced); every other field is static, and
  `_fused` keys its compiled programs on them (with `_platform.hashable` device names).
  """

  reduction_axes: tuple[int, ...]  # the statistics' axes, sorted, non-negative
  feature_axes: tuple[int, ...]  # the axes scale and bias run along
  epsilon: Any  # a non-negative scalar: a Python number or an array
  mask: jax.Array | None  # boolean, broadcast to the input's shape
  axis_name: Any = None  # the mapped axes reduced over as well
  axis_index_groups: Any = None  # device groups along axis_name (jax.pmap only)
  centered: bool = True  # False: RMS normalization (mean 0, variance E[x²])
  groups: int | None = None  # group normalization of channels-last input (_layout.group_sum)


def normalizer_spec(x: ArrayLike, scale: Any, bias: Any, *, reduction_axes: Axes | None,
                    feature_axes: Axes, epsilon: Any, mask: Any = None, axis_name: Any = None,
                    axis_index_groups: Any = None, real_only: str | None = None,
                    ) -> tuple[jax.Array, Spec]:
  """Validates the arguments every normalizer shares; returns `x` as an array and the `Spec`
  (axes canonical, mask broadcast to x). `reduction_axes=None`: every axis that is not a
  feature axis (batch normalization). `real_only` names a function that takes real input only
  (None: complex input is accepted)."""
  x = jnp.asarray(x)
  check_floating(x, allow_complex=real_only is None,
                 real_only="this function" if real_only is None else real_only)
  feat = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  if reduction_axes is None:
    red = tuple(a for a in range(x.ndim) if a not in feat)
  else:
    red = canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  fshape = feature_shape(x.shape, feat)
  for name, p in (("scale", scale), ("bias", bias)):
    check_param(p, fshape, name, f"input along feature_axes={feat}", x.shape, feat)
  check_epsilon(epsilon)
  valid = check_mask(mask, x.shape)
  check_axis_index_groups(axis_name, axis_index_groups)
  return x, Spec(red, feat, epsilon, valid, axis_name, axis_index_groups)


def check_residual(residual: Any, x: jax.Array, where: str) -> jax.Array:
  """The residual stream of `add_rms_norm` / `add_layer_norm` (`where`): a real floating array
  of `x`'s shape exactly (the sum is the new residual stream, which keeps its shape); returns
  it as an array."""
  try:
    residual = jnp.asarray(residual)
  except (TypeError, ValueError) as e:  # JAX's words name neither the argument nor the fix
    raise TypeError(_not_an_array(residual, "residual")) from e
  if not jnp.issubdtype(residual.dtype, jnp.floating):  # x's check_floating, for the residual
    raise TypeError(f"residual must have a real floating dtype (float16, bfloat16, float32, "
                    f"float64) for {where}; got {residual.dtype}. Cast it first, e.g. "
                    f"residual.astype(jnp.float32).")
  if residual.shape != x.shape:
    fix = (f" Broadcast it explicitly if that is meant, e.g. residual=jnp.broadcast_to("
           f"residual, {x.shape})." if _broadcasts_to(residual.shape, x.shape) else
           " Pass the residual stream that x (the sublayer's output) is added to.")
    raise ValueError(
        f"residual must have x's shape {x.shape} (the new residual x + residual keeps it); "
        f"got shape {residual.shape}.{fix}")
  return residual


def residual_spec(x: ArrayLike, residual: Any, scale: Any, bias: Any, *, where: str,
                  implementation: Any, zero_centered_scale: Any, dtype: Any,
                  **shared: Any) -> tuple[jax.Array, jax.Array, Spec, Any]:
  """The checks of `add_rms_norm` and `add_layer_norm` (`where`): `(x, residual, spec, the
  output's dtype)`. `shared`: `normalizer_spec`'s axes, `epsilon`, `mask`, `axis_name` and
  `axis_index_groups`."""
  x, spec = normalizer_spec(x, scale, bias, real_only=where, **shared)
  residual = check_residual(residual, x, where)
  check_implementation(implementation)
  check_bool(zero_centered_scale, "zero_centered_scale")
  return x, residual, spec, output_dtype(dtype, x)


def output_dtype(dtype: Any, x: jax.Array) -> Any:
  """The fused residual add's `dtype`: None (x's) or a real floating dtype; returns it."""
  if dtype is None:
    return x.dtype
  try:
    out = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"dtype must be a floating dtype or None (x's); got {dtype!r}.") from e
  if not jnp.issubdtype(out, jnp.floating):
    raise TypeError(f"dtype must be a real floating dtype (the normalized output's) or None "
                    f"(x's); got {dtype!r}.")
  return out


def check_rank2(x: jax.Array, name: str) -> None:
  """Group and instance normalization: x has a batch axis first and at least one more."""
  if x.ndim < 2:
    raise ValueError(f"{name} expects input of rank >= 2 (batch first); got shape {x.shape}.")


def group_norm_spec(x: ArrayLike, scale: Any, bias: Any, *, num_groups: Any, group_size: Any,
                    reduction_axes: Axes | None, channel_axis: Any,
                    **shared: Any) -> tuple[jax.Array, Spec]:
  """`group_norm`'s checks; the `Spec`'s feature axis is the channel axis and its `groups` the
  number of groups. `shared`: `normalizer_spec`'s `epsilon`, `mask`, `axis_name` and
  `axis_index_groups`."""
  x = jnp.asarray(x)
  check_rank2(x, "group_norm")
  if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
    raise TypeError(f"channel_axis must be an int; got {channel_axis!r}.")
  (ch,) = canonicalize_axes(int(channel_axis), x.ndim, "channel_axis")
  if ch == 0:
    raise ValueError(f"channel_axis={channel_axis!r} is the batch axis 0; group "
                     f"normalization normalizes each example on its own.")
  if reduction_axes is None:
    reduction_axes = tuple(range(1, x.ndim))
  x, spec = normalizer_spec(x, scale, bias, reduction_axes=reduction_axes, feature_axes=ch,
                            **shared)
  if ch not in spec.reduction_axes:
    what = "the last (channel) axis" if ch == x.ndim - 1 else "the channel axis"
    raise ValueError(f"reduction_axes={reduction_axes!r} must include {what}, {ch}.")
  groups = resolve_groups(x.shape[ch], num_groups, group_size,
                          where=f" (axis {ch} of the input)")
  return x, spec._replace(groups=groups)


def instance_norm_spec(x: ArrayLike, scale: Any, bias: Any, *, feature_axes: Axes,
                       **shared: Any) -> tuple[jax.Array, Spec]:
  """`instance_norm`'s checks; the `Spec` reduces every axis but the batch and feature axes.
  `shared`: `normalizer_spec`'s `epsilon`, `mask`, `axis_name` and `axis_index_groups`."""
  x = jnp.asarray(x)
  check_rank2(x, "instance_norm")
  x, spec = normalizer_spec(x, scale, bias, reduction_axes=None, feature_axes=feature_axes,
                            **shared)
  if 0 in spec.feature_axes:
    raise ValueError(
        f"feature_axes={feature_axes!r} includes the batch axis 0; instance normalization "
        f"keeps the batch axis and the feature axes."
    )
  red = tuple(a for a in range(1, x.ndim) if a not in spec.feature_axes)
  return x, spec._replace(reduction_axes=red)


def check_statistics(mean: ArrayLike, var: ArrayLike, x: jax.Array,
                     reduction_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """`normalize`'s given statistics: floating, of x's shape without `reduction_axes`."""
  stat_shape = tuple(d for i, d in enumerate(x.shape) if i not in reduction_axes)
  mean, var = jnp.asarray(mean), jnp.asarray(var)
  for name, s in (("mean", mean), ("var", var)):
    check_inexact(s, name)
    if s.shape != stat_shape:
      raise ValueError(
          f"{name} must have the input's shape {x.shape} without reduction_axes "
          f"{reduction_axes}, i.e. {stat_shape}; got shape {s.shape}."
      )
  return mean, var


class BatchNormSpec(NamedTuple):
  """A batch (re)normalization call's configuration, validated once (`batch_norm_spec`)."""

  norm: Spec  # the statistics' and the output's: axes, epsilon, mask, devices
  momentum: Any  # the running statistics' decay in [0, 1], None (cumulative average), traced
  unbiased_running_var: bool  # store the Bessel-corrected variance
  virtual_batch_size: int | None  # ghost batches in training (None: one batch)


def batch_norm_spec(x: ArrayLike, state: Any, scale: Any, bias: Any, *, state_type: type[Any],
                    training: Any, momentum: Any, unbiased_running_var: Any,
                    virtual_batch_size: Any, **shared: Any) -> tuple[jax.Array, BatchNormSpec]:
  """The checks of `batch_norm` and `batch_renorm` (`state_type`: `BatchNormState`); `shared`
  holds `normalizer_spec`'s options (`feature_axes`, `epsilon`, `mask`, `axis_name`,
  `axis_index_groups`, `real_only`), the statistics' axes being every other axis."""
  if not isinstance(training, bool):
    raise TypeError(
        f"training must be a Python bool (it selects the code path at trace time); got "
        f"{training!r}. Make it a static argument of your jitted function."
    )
  x, spec = normalizer_spec(x, scale, bias, reduction_axes=None, **shared)
  check_momentum(momentum)
  check_bool(unbiased_running_var, "unbiased_running_var")
  check_state(state, state_type, feature_shape(x.shape, spec.feature_axes),
              jnp.iscomplexobj(x), input_shape=x.shape, feature_axes=spec.feature_axes)
  if training and momentum is None:
    check_cumulative_count(shared.get("mask"), state.count, x.shape, spec.feature_axes,
                           "momentum=None (the cumulative average)")
  ghost = check_virtual_batch_size(virtual_batch_size, x.shape, spec.feature_axes, training)
  return x, BatchNormSpec(spec, momentum, unbiased_running_var, ghost)


def check_cumulative_count(mask: Any, count: Any, shape: tuple[int, ...],
                           feature_axes: tuple[int, ...], average: str) -> None:
  """An `average` that weighs a batch by the update count (`momentum=None`: `1 / (count + 1)`;
  equinox's zero debiasing: `1 - m**count`). A mask that can differ between features can hide
  one feature from a whole batch while the others advance one scalar count, and that
  feature's first batch would then enter with the wrong weight, the initial mean and variance
  keeping the rest: refused unless the count is per feature."""
  if mask is None or jnp.ndim(count) != 0:
    return
  mshape = (1,) * (len(shape) - jnp.ndim(mask)) + tuple(jnp.shape(mask))
  varying = [a for a in feature_axes if mshape[a] > 1 and shape[a] > 1]
  if varying:
    fshape = feature_shape(shape, feature_axes)
    per_example = tuple(1 if a in feature_axes else d for a, d in enumerate(mshape))
    raise ValueError(
        f"{average} with a mask of shape {tuple(jnp.shape(mask))} "
        f"that may differ between features (along axis {varying[0]}) needs one update count per "
        f"feature: with the state's single count, a feature the mask hides from a whole batch "
        f"would later enter the average with its initial mean 0 and variance 1 still weighing "
        f"in. Create the state with batch_norm_init({fshape}, per_feature_count=True) (layers: "
        f"per_feature_count=True), or pass a mask that is the same for every feature (shape "
        f"{per_example})."
    )


def check_state(state: Any, state_type: type[Any], feature_shape: tuple[int, ...],
                complex_input: bool, input_shape: tuple[int, ...] | None = None,
                feature_axes: tuple[int, ...] = ()) -> None:
  """A running-statistics state (`state_type`: `BatchNormState`) for input of `feature_shape`,
  complex or not (with `input_shape`: along `feature_axes` of such an input)."""
  if not isinstance(state, state_type):
    raise TypeError(f"state must be a jaxnorm.BatchNormState (see batch_norm_init); got "
                    f"{type(state).__name__}.")
  for name in ("mean", "var"):
    dtype = jnp.result_type(getattr(state, name))
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(f"state.{name} has dtype {dtype}; the running statistics are floating "
                      f"(batch_norm_init({tuple(feature_shape)}) makes float32 ones).")
  if not jnp.issubdtype(jnp.result_type(state.count), jnp.integer):
    raise TypeError(f"state.count has dtype {jnp.result_type(state.count)}; it counts updates, "
                    f"an integer (int32 from batch_norm_init).")
  if jnp.iscomplexobj(state.var):
    raise TypeError(f"state.var is complex ({state.var.dtype}); the running variance "
                    f"E[|x - mean|^2] is real (batch_norm_init(shape, dtype=jnp.complex64) "
                    f"makes a complex mean and a real variance).")
  if jnp.iscomplexobj(state.mean) != complex_input:
    kind = "complex" if complex_input else "real"
    hint = (f"batch_norm_init({tuple(feature_shape)}, dtype=jnp.complex64)" if complex_input
            else f"batch_norm_init({tuple(feature_shape)})")
    raise TypeError(
        f"state.mean is {state.mean.dtype} but the batch is {kind}: a complex batch needs a "
        f"complex running mean (its imaginary part would be lost) and a real batch a real one; "
        f"create the state with {hint}."
    )
  for name in ("mean", "var"):
    shape = tuple(jnp.shape(getattr(state, name)))
    if shape != tuple(feature_shape):
      raise ValueError(f"state.{name} has shape {shape} but the input's feature shape is "
                       f"{tuple(feature_shape)}"
                       + _state_shape_fix(shape, tuple(feature_shape), input_shape,
                                          feature_axes))
  check_count_shape(state.count, tuple(feature_shape))


def _state_shape_fix(shape: tuple[int, ...], fshape: tuple[int, ...],
                     input_shape: tuple[int, ...] | None, feature_axes: tuple[int, ...]) -> str:
  """The end of the message for a state of `shape` that does not match the input's feature
  shape `fshape`: where the input holds a feature axis of the state's size (channels first,
  say), the fix is `feature_axes`; a state of the wrong size is the fix only otherwise."""
  make = f"create the state with batch_norm_init({fshape})."
  if input_shape is None:
    return f"; {make}"
  where = f" (axes feature_axes={feature_axes} of the input, of shape {tuple(input_shape)})"
  axis = _other_feature_axis(shape, tuple(input_shape), feature_axes)
  if axis is None:
    return f"{where}; {make}"
  return (f"{where}. If the features lie along axis {axis} (e.g. channels first), pass "
          f"feature_axes={axis}; if they lie along feature_axes={feature_axes}, {make}")


def check_moments(value: Any, name: str, moments_type: type[Any]) -> None:
  """`value` must be a `Moments` (`moments_type`)."""
  if not isinstance(value, moments_type):
    raise TypeError(f"{name} must be a jaxnorm.Moments (see jaxnorm.moments); got "
                    f"{type(value).__name__}.")


def update_args(state: Any, batch: Any, *, state_type: type[Any], moments_type: type[Any],
                momentum: Any, unbiased_running_var: Any) -> None:
  """The checks of `update_running_stats`."""
  check_momentum(momentum)
  check_bool(unbiased_running_var, "unbiased_running_var")
  check_moments(batch, "batch", moments_type)
  check_state(state, state_type, jnp.shape(batch.mean), jnp.iscomplexobj(batch.mean))


def moments_args(x: ArrayLike, reduction_axes: Axes, *, mask: Any, axis_name: Any,
                 axis_index_groups: Any, dtype: Any) -> tuple[jax.Array, tuple[int, ...],
                                                          jax.Array | None]:
  """The checks of `moments`; returns `(x, reduction axes, mask broadcast to x)`."""
  x = jnp.asarray(x)
  check_floating(x, allow_complex=True)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"dtype={dtype!r} must be a floating (or complex) accumulation dtype, e.g. "
                    f"jnp.float32 or jnp.float64.")
  axes = canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  mask = check_mask(mask, x.shape)
  check_axis_index_groups(axis_name, axis_index_groups)
  return x, axes, mask


def merge_args(a: Any, b: Any, moments_type: type[Any]) -> None:
  """The checks of `merge_moments`: two `Moments` of shapes that broadcast."""
  for name, m in (("a", a), ("b", b)):
    check_moments(m, name, moments_type)
  if not _broadcasts(*(jnp.shape(v) for v in (*a, *b))):
    raise ValueError(f"a and b must have shapes that broadcast; got a.mean of shape "
                     f"{jnp.shape(a.mean)} and b.mean of shape {jnp.shape(b.mean)}.")


def _broadcasts(*shapes: tuple[int, ...]) -> bool:
  try:
    np.broadcast_shapes(*shapes)
  except ValueError:
    return False
  return True


def init_args(feature_shape: Any, dtype: Any) -> tuple[int, ...]:
  """The checks of `batch_norm_init`; returns the feature shape as a tuple."""
  one = isinstance(feature_shape, (int, np.integer))
  shape = (feature_shape,) if one else tuple(feature_shape)
  if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
             for d in shape):
    raise ValueError(f"feature_shape must be a non-negative int or a sequence of them; got "
                     f"{feature_shape!r}.")
  shape = tuple(int(d) for d in shape)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"dtype must be a floating or complex dtype; got {dtype!r}.")
  return shape


def check_count_shape(count: Any, feature_shape: tuple[int, ...]) -> None:
  """A state's count is a scalar (one for the state) or of the feature shape (one a feature)."""
  shape = tuple(jnp.shape(count))
  if shape not in ((), feature_shape):
    raise ValueError(
        f"state.count must be a scalar (one count for the state) or of the feature shape "
        f"{feature_shape} (one a feature); got shape {shape}. Create the state with "
        f"batch_norm_init({feature_shape}) or batch_norm_init({feature_shape}, "
        f"per_feature_count=True).")


def check_torch_momentum(momentum: Any) -> None:
  """PyTorch's momentum, the weight of the new batch, lies in [0, 1] (0 freezes the running
  statistics; None: cumulative)."""
  if momentum is not None and not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"PyTorch's momentum (the weight of the new batch) must lie in [0, 1], or be None for "
        f"the cumulative average; got {momentum!r}. Pass the value given to "
        f"torch.nn.BatchNorm*d(momentum=...).")


def replicas_args(states: list[Any], state_type: type[Any], *, axis_name: Any,
                  axis_index_groups: Any, weights: Any) -> jax.Array | None:
  """The checks of `sync_running_stats` (`states`: the leaves of its state tree); returns the
  weight as an array, or None."""
  if axis_name is None:
    raise ValueError(
        "axis_name must name the mapped axis of the replicas (the axis_name of jax.pmap or "
        "jax.vmap, or a mesh axis of jax.shard_map); got None. Under plain jax.jit over "
        "sharded arrays the running statistics are already global."
    )
  check_axis_index_groups(axis_name, axis_index_groups)
  for s in states:
    if not isinstance(s, state_type):
      raise TypeError(
          f"state must be a jaxnorm.BatchNormState or a pytree (dict, list, tuple) whose "
          f"leaves are BatchNormStates; found a leaf of type {type(s).__name__}. Pass only "
          f"the running statistics, e.g. the 'batch_stats' part of a model's variables."
      )
    if jnp.shape(s.mean) != jnp.shape(s.var):
      raise ValueError(f"state.mean and state.var must have the same shape; got "
                       f"{jnp.shape(s.mean)} and {jnp.shape(s.var)}.")
    check_count_shape(s.count, tuple(jnp.shape(s.mean)))
  return _replica_weight(weights)


def _replica_weight(weights: Any) -> jax.Array | None:
  if weights is None:
    return None
  w = jnp.asarray(weights)
  if w.shape != ():
    raise ValueError(
        f"weights must be a scalar, this replica's weight (e.g. the number of examples it "
        f"normalized); got shape {w.shape}."
    )
  if is_concrete(weights):
    value = float(np.asarray(weights))
    if not (value >= 0.0 and value < float("inf")):
      raise ValueError(f"weights must be finite and non-negative; got {weights!r}.")
  return w


def fold_args(kernel: ArrayLike, epsilon: Any, given: dict[str, Any],
              ) -> tuple[jax.Array, dict[str, jax.Array | None]]:
  """The checks of `fold_batch_norm` (`given`: its other arrays by name, None where absent);
  returns the kernel and those arrays as arrays."""
  kernel = jnp.asarray(kernel)
  check_floating(kernel, "kernel", real_only="fold_batch_norm")
  if kernel.ndim == 0:
    raise ValueError("kernel must have at least one axis (output features last); got a "
                     "scalar.")
  check_epsilon(epsilon)
  features = (kernel.shape[-1],)
  what = "kernel's output features (its last axis)"
  arrays: dict[str, jax.Array | None] = {
      k: None if v is None else jnp.asarray(v) for k, v in given.items()}
  for name, value in arrays.items():
    check_param(value, features, name, what)
    if value is not None:  # a complex mean (of complex batch norm) would lose its imaginary part
      check_floating(value, name, real_only="fold_batch_norm")
  return kernel, arrays


def fold_norm_args(kernel: ArrayLike, bias: ArrayLike | None, scale: ArrayLike,
                   offset: ArrayLike | None,
                   ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
  """The checks of `fold_norm_into_dense`: a floating kernel `(features, *out)`, `scale` and
  `offset` of shape `(features,)`, `bias` of shape `out`; returns them as arrays."""
  where = "fold_norm_into_dense"
  kernel = jnp.asarray(kernel)
  check_floating(kernel, "kernel", real_only=where)
  if kernel.ndim < 2:
    raise ValueError(
        f"kernel must be a Dense kernel (features, out) or a DenseGeneral kernel "
        f"(features, *out), the normalized features first; got shape {kernel.shape}.")
  if scale is None:
    raise ValueError("scale is required: fold_norm_into_dense folds the norm's scale "
                     "(params/scale); pass jnp.ones(features) for a norm without one.")
  arrays = {"scale": scale, "offset": offset, "bias": bias}
  out = {k: None if v is None else jnp.asarray(v) for k, v in arrays.items()}
  features = (kernel.shape[0],)
  scale_shape = tuple(jnp.shape(scale))
  if len(scale_shape) >= 2 and scale_shape[-1:] == kernel.shape[1:2]:
    raise ValueError(
        f"scale has shape {scale_shape}, which fits kernel axis 1, not its first axis "
        f"({kernel.shape}): the normalized features must be the kernel's first axis. A stack of "
        f"kernels with leading batch axes (scanned layers) is not accepted; fold each slice, "
        f"e.g. jax.vmap(lambda k, s: fold_norm_into_dense(k, scale=s))(kernels, scales).")
  for name in ("scale", "offset"):
    check_param(out[name], features, name, "kernel's input features (its first axis)")
  check_param(out["bias"], kernel.shape[1:], "bias", "kernel's output features (its axes "
              "after the first)")
  for name, value in out.items():
    if value is not None:
      check_floating(value, name, real_only=where)
  return kernel, out["bias"], out["scale"], out["offset"]  # type: ignore[return-value]


IMPLEMENTATIONS = (None, "xla", "pallas")


def check_implementation(implementation: Any) -> None:
  """Raises a ValueError unless `implementation` is one of `IMPLEMENTATIONS`."""
  if not (implementation is None or (isinstance(implementation, str)
                                     and implementation in IMPLEMENTATIONS)):
    raise ValueError(
        f"implementation={implementation!r} is not one of None (choose), 'xla' (the XLA path) "
        f"and 'pallas' (the fused Pallas kernels)."
    )
  if implementation == "pallas":
    check_pallas()


CONVENTIONS = ("llama", "gemma")


def check_convention(convention: Any, zero_centered_scale: bool, bias: Any) -> None:
  """`rms_norm`'s `convention`: None or one of `CONVENTIONS`; `"llama"` has neither a bias nor
  a zero-centred scale (HF's LlamaRMSNorm multiplies by the weight itself)."""
  if not (convention is None or (isinstance(convention, str) and convention in CONVENTIONS)):
    raise ValueError(
        f"convention={convention!r} is not one of None (one rounding, at the end), 'llama' "
        f"(HF's LlamaRMSNorm, Mistral, Qwen2, T5) and 'gemma' (HF's GemmaRMSNorm)."
    )
  if convention == "llama" and (zero_centered_scale or bias is not None):
    raise ValueError(
        f"convention='llama' takes no bias and no zero_centered_scale (HF's LlamaRMSNorm "
        f"multiplies by its weight alone); got zero_centered_scale={zero_centered_scale}, "
        f"bias {'given' if bias is not None else 'None'}. For a weight stored as w - 1 use "
        f"convention='gemma'; for a bias use convention=None."
    )


def check_pallas_case(obstacle: str | None) -> None:
  """`implementation="pallas"` where `_pallas.obstacle` found what keeps the kernels out."""
  if obstacle is not None:
    raise ValueError(
        f"implementation='pallas' takes only the plain case (reduction and parameters over "
        f"the last axis, no mask, no axis_name, float32/bfloat16/float16, a Python-float "
        f"epsilon); got {obstacle}. Use implementation=None or 'xla' for this call."
    )


def resolve_groups(channels: int, num_groups: Any, group_size: Any,
                   channels_name: str = "the number of channels", where: str = "") -> int:
  """The number of groups from exactly one of `num_groups` and `group_size`, or raises.

  Raises:
    ValueError: both or neither given, or a count that is not a positive divisor of
      `channels` (named `channels_name` in the message, followed by `where`).
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"Give exactly one of num_groups and group_size; got num_groups={num_groups!r}, "
        f"group_size={group_size!r} (num_groups defaults to 32: pass num_groups=None to use "
        f"group_size)."
    )
  name, value = ("group_size", group_size) if num_groups is None else ("num_groups",
                                                                        num_groups)
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0
      or channels % value):
    raise ValueError(
        f"{name}={value!r} must be a positive divisor of {channels_name}, {channels}{where}."
    )
  return channels // int(value) if num_groups is None else int(value)


def check_virtual_batch_size(virtual_batch_size: Any, shape: tuple[int, ...],
                             feat: tuple[int, ...], training: bool) -> int | None:
  """Its type always; its fit to the batch (axis 0) only in training (evaluation ignores it).
  Returns it as a Python int (a NumPy integer is accepted, as for the axes), or None."""
  if virtual_batch_size is None:
    return None
  if (isinstance(virtual_batch_size, bool)
      or not isinstance(virtual_batch_size, (int, np.integer))):
    raise TypeError(f"virtual_batch_size must be a positive int or None; got "
                    f"{virtual_batch_size!r}.")
  virtual_batch_size = int(virtual_batch_size)
  if not training:
    return virtual_batch_size
  if 0 in feat:
    raise ValueError(
        f"virtual_batch_size splits axis 0 into ghost batches, but axis 0 is a feature axis "
        f"(feature_axes={feat}); put the batch first."
    )
  batch = shape[0]
  if virtual_batch_size <= 0 or batch % virtual_batch_size:
    raise ValueError(
        f"virtual_batch_size={virtual_batch_size} must be a positive divisor of the batch "
        f"size (axis 0 of the input), {batch}."
    )
  return virtual_batch_size


def check_bound(value: Any, name: str, low: float) -> None:
  """A concrete `value` must be a finite scalar >= `low` (batch renormalization's bounds)."""
  if is_concrete(value):
    v = np.asarray(value)
    if v.ndim != 0 or not np.isfinite(v) or v < low:
      raise ValueError(
          f"{name} must be a finite scalar >= {low:g} ({name}={low:g} is plain batch "
          f"normalization); got {value!r}."
      )
