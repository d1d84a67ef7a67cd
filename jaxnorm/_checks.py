"""Argument validation: each public call checks its arguments here, once.

Every check runs at trace time on static information (shapes, dtypes, Python numbers) and raises
an error that names the argument, the value received and what is expected. The functions that
compute (`_stats`, `_apply`, `_fused`, the kernels) take validated arguments and check nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

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
  if is_concrete(epsilon):
    eps = np.asarray(epsilon)
    if eps.ndim != 0 or not np.isfinite(eps) or eps < 0:
      raise ValueError(f"epsilon must be a finite, non-negative scalar; got {epsilon!r}.")


def check_momentum(momentum: Any) -> None:
  """momentum may be None (cumulative average) or a scalar in [0, 1)."""
  if momentum is None or not is_concrete(momentum):
    return
  m = np.asarray(momentum)
  if m.ndim != 0 or not 0.0 <= float(m) < 1.0:
    raise ValueError(
        f"momentum must be a scalar in [0, 1) (flax's decay convention: "
        f"new = momentum * old + (1 - momentum) * batch), or None for the exact cumulative "
        f"average; got {momentum!r}. For PyTorch's convention use "
        f"jaxnorm.momentum_from_torch({momentum!r})."
    )


def check_inexact(value: ArrayLike, name: str) -> None:
  """Raises a TypeError unless `value` (a parameter or a statistic) is floating or complex."""
  dtype = jnp.result_type(value)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(f"{name} must have a floating (or complex) dtype; got {dtype}. Cast it "
                    f"first, e.g. {name}.astype(jnp.float32).")


def check_param(param: jax.Array | None, expected: tuple[int, ...], name: str,
                what: str, input_shape: tuple[int, ...] | None = None) -> None:
  """`param` must have the shape `expected` or, with `input_shape`, one that broadcasts to it.

  The broadcast form is NumPy's (the parameter's axes align with the input's last axes), for
  per-example parameters such as `(batch, 1, features)`.
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
  raise ValueError(
      f"{name} must have the shape of the {what}, {tuple(expected)}{also}; got shape "
      f"{shape}."
  )


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


def check_bool(value: Any, name: str, why: str = "") -> None:
  """Raises a TypeError unless `value` is a Python bool (`why`: what it decides)."""
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, Python's True or False{why}; got {value!r}.")


def feature_shape(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[a] for a in feature_axes)


def normalizer_args(x: ArrayLike, reduction_axes: Axes | None, feature_axes: Axes, scale: Any,
                    bias: Any, epsilon: Any, mask: Any = None, axis_name: Any = None,
                    axis_index_groups: Any = None, allow_complex: bool = True,
                    real_only: str = "this function",
                    ) -> tuple[jax.Array, tuple[int, ...], tuple[int, ...], jax.Array | None]:
  """Validates the arguments every normalizer shares; returns `(x, reduction axes, feature
  axes, mask broadcast to x)` in canonical form. `reduction_axes=None`: every axis that is
  not a feature axis (batch normalization)."""
  x = jnp.asarray(x)
  check_floating(x, allow_complex=allow_complex, real_only=real_only)
  feat = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
  if reduction_axes is None:
    red = tuple(a for a in range(x.ndim) if a not in feat)
  else:
    red = canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
  fshape = feature_shape(x.shape, feat)
  for name, p in (("scale", scale), ("bias", bias)):
    check_param(p, fshape, name, f"input's feature axes {feat}", x.shape)
  check_epsilon(epsilon)
  valid = check_mask(mask, x.shape)
  check_axis_index_groups(axis_name, axis_index_groups)
  return x, red, feat, valid


IMPLEMENTATIONS = (None, "xla", "pallas")


def check_implementation(implementation: Any) -> None:
  """Raises a ValueError unless `implementation` is one of `IMPLEMENTATIONS`."""
  if not (implementation is None or (isinstance(implementation, str)
                                     and implementation in IMPLEMENTATIONS)):
    raise ValueError(
        f"implementation={implementation!r} is not one of None (choose), 'xla' (the XLA path) "
        f"and 'pallas' (the fused Pallas kernels)."
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
                             feat: tuple[int, ...], training: bool) -> None:
  """Its type always; its fit to the batch (axis 0) only in training (evaluation ignores it)."""
  if virtual_batch_size is None:
    return
  if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
    raise TypeError(f"virtual_batch_size must be a positive int or None; got "
                    f"{virtual_batch_size!r}.")
  if not training:
    return
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


def check_bound(value: Any, name: str, low: float) -> None:
  """A concrete `value` must be a finite scalar >= `low` (batch renormalization's bounds)."""
  if is_concrete(value):
    v = np.asarray(value)
    if v.ndim != 0 or not np.isfinite(v) or v < low:
      raise ValueError(
          f"{name} must be a finite scalar >= {low:g} ({name}={low:g} is plain batch "
          f"normalization); got {value!r}."
      )
