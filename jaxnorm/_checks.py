"""Argument validation shared by every public function.

Every check runs at trace time on static information (shapes, dtypes, Python numbers) and raises
an error that names the argument, the value received and what is expected.
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


def check_param(param: jax.Array | None, expected: tuple[int, ...], name: str,
                what: str, input_shape: tuple[int, ...] | None = None) -> None:
  """`param` must have the shape `expected` or, with `input_shape`, one that broadcasts to it.

  The broadcast form is NumPy's (the parameter's axes align with the input's last axes), for
  per-example parameters such as `(batch, 1, features)`.
  """
  if param is None:
    return
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
