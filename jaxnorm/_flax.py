"""What `jaxnorm.linen` and `jaxnorm.nnx` share: one core call per layer kind, under flax's
dtype rule.

Nothing here computes a statistic or restates a dtype rule: the layers call the functional core
through these functions, which apply `_dtypes.flax_output` (flax's output dtype, integer input
normalized in float32 as flax does, which the core refuses) and pick the core function a
`BatchNorm` calls. `extends` gives an nnx layer's `__init__` its flax parent's signature plus
jaxnorm's extra keywords.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax

import jaxnorm as jn

from . import _checks
from ._dtypes import flax_dtypes, flax_output, residual_sum_dtype

INSTALL_HINT = ('pip install -e ".[flax]" (from a clone of the repository), or '
                'pip install "jaxnorm[flax]" (from a package index)')


def require_flax(module_name: str) -> None:
  """Raises an ImportError that says how to install flax, if it cannot be imported."""
  try:
    importlib.import_module("flax")
  except ImportError as e:
    raise ImportError(
        f"{module_name} needs flax, which is not installed. Install it with: {INSTALL_HINT}"
    ) from e


def normalize(fn: Callable[..., jax.Array], x: jax.Array, params: tuple[Any, ...],
              dtype: Any, **kwargs: Any) -> jax.Array:
  """`fn(x, *params, **kwargs)` (a jaxnorm normalizer) under flax's dtype rule."""
  xc, out_dtype = flax_output(x, params, dtype)
  return fn(xc, *params, **kwargs).astype(out_dtype)


def per_example(fn: Callable[..., jax.Array], layer: Any, x: jax.Array,
                params: tuple[Any, ...], feat: tuple[int, ...], mask: Any,
                **extra: Any) -> jax.Array:
  """`fn` (`jaxnorm.layer_norm` or `rms_norm`) configured by a linen or nnx `LayerNorm` or
  `RMSNorm` `layer` (both families name their attributes alike), under flax's dtype rule;
  `extra` holds the arguments only one of them takes (RMSNorm's `convention`)."""
  return normalize(fn, x, params, layer.dtype, reduction_axes=layer.reduction_axes,
                   feature_axes=feat, epsilon=layer.epsilon, mask=mask,
                   axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups,
                   zero_centered_scale=layer.zero_centered_scale,
                   implementation=layer.implementation, **extra)


def add_per_example(fn: Callable[..., Any], layer: Any, x: jax.Array, residual: Any,
                    params: tuple[Any, ...], feat: tuple[int, ...], mask: Any,
                    **extra: Any) -> tuple[jax.Array, jax.Array]:
  """`per_example` of an `Add*` layer: `fn` (`jaxnorm.add_layer_norm` or `add_rms_norm`)
  returns `(y, x + residual)`, `y` in flax's output dtype for the sum, as the unfused layer of
  the sum returns it."""
  residual = _checks.check_residual(residual, x, type(layer).__name__)
  h_dtype = residual_sum_dtype(x.dtype, residual.dtype)
  _, out = flax_dtypes(h_dtype, params, layer.dtype)
  return fn(x, residual, *params, reduction_axes=layer.reduction_axes, feature_axes=feat,
            epsilon=layer.epsilon, mask=mask, axis_name=layer.axis_name,
            axis_index_groups=layer.axis_index_groups,
            zero_centered_scale=layer.zero_centered_scale,
            implementation=layer.implementation, dtype=out, **extra)


def zero_centered_init(scale_init: Any, zero_centered_scale: bool) -> Any:
  """flax's default scale initializer (ones) becomes zeros for a zero-centred scale."""
  if zero_centered_scale and scale_init is jax.nn.initializers.ones:
    return jax.nn.initializers.zeros
  return scale_init


def check_features(layer: str, num_features: int, x: jax.Array, feat: tuple[int, ...],
                   axis: Any, axis_name: str = "axis") -> tuple[int, ...]:
  """The feature shape of `x` along `feat`, which must hold `num_features` elements."""
  shape = tuple(x.shape[a] for a in feat)
  size = math.prod(shape)
  if size != num_features:
    raise ValueError(
        f"{layer}(num_features={num_features}) got input of shape {x.shape}, whose "
        f"{axis_name}={axis!r} holds {size} features; construct it with "
        f"num_features={size}, or pass the {axis_name} that holds the features."
    )
  return shape


def batch_norm(x: jax.Array, state: Any, scale: Any, bias: Any, *, dtype: Any, renorm: bool,
               r_max: Any, d_max: Any, **kwargs: Any) -> tuple[jax.Array, Any]:
  """`jaxnorm.batch_renorm` with `renorm=True`, else `jaxnorm.batch_norm`, under flax's dtype
  rule; the keywords are the core's."""
  xc, out_dtype = flax_output(x, (scale, bias), dtype)
  if not renorm:
    y, new_state = jn.batch_norm(xc, state, scale, bias, **kwargs)
    return y.astype(out_dtype), new_state
  if kwargs["training"] and (r_max is None or d_max is None):
    raise ValueError(
        f"renorm=True needs r_max and d_max at call time in training (e.g. r_max=3.0, "
        f"d_max=5.0; r_max=1.0, d_max=0.0 is batch norm); got r_max={r_max!r}, "
        f"d_max={d_max!r}."
    )
  y, new_state = jn.batch_renorm(xc, state, scale, bias,
                                 r_max=1.0 if r_max is None else r_max,
                                 d_max=0.0 if d_max is None else d_max, **kwargs)
  return y.astype(out_dtype), new_state


def extends(flax_init: Callable[..., None]) -> Callable[[Callable[..., None]], Callable[..., None]]:
  """Decorates an nnx layer's `__init__(self, *args, <extras>, **kwargs)`, which passes `args`
  and `kwargs` on to `flax_init`: its signature becomes `flax_init`'s (names, order, defaults)
  followed by its own keyword-only extras, so `help()` and `inspect` show what it accepts."""
  def wrap(init: Callable[..., None]) -> Callable[..., None]:
    base = inspect.signature(flax_init)
    extras = [p for p in inspect.signature(init).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    init.__signature__ = base.replace(  # type: ignore[attr-defined]
        parameters=[*base.parameters.values(), *extras])
    return init
  return wrap


def arguments(flax_init: Callable[..., None], layer: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> dict[str, Any]:
  """The arguments `flax_init(layer, *args, **kwargs)` would receive, defaults filled in."""
  bound = inspect.signature(flax_init).bind(layer, *args, **kwargs)
  bound.apply_defaults()
  return bound.arguments


def cumulative(momentum: Any) -> bool:
  """Whether a `BatchNorm` keeps jaxnorm's exact cumulative average (`momentum=None`), whose
  update count is a variable of its own. flax types `momentum` as a float, hence a function
  rather than a test that type checkers take for unreachable."""
  return momentum is None


def check_instance_axes(feat: tuple[int, ...], axes: Any) -> None:
  """Raises flax's error, in flax's words (code written for flax matches them), for an
  `InstanceNorm` whose feature axes include the batch axis 0, with the value and the fix."""
  if 0 in feat:
    raise ValueError(
        f"The channel axes cannot include the leading dimension as this is assumed to be the "
        f"batch axis. Got feature_axes={axes!r}; pass the channel axes only (e.g. the default, "
        f"-1).")
